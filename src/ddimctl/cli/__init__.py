"""The `ddimctl` command line: parses options, calls the library, shows progress. No math here.

One module per group of commands; common.py holds the app, the shared options and the helpers.
"""

from __future__ import annotations

import importlib
import sys

from .. import threads

THREADS_DECIDED = threads.choose(command=threads.command_of(sys.argv[1:]))  # before torch is imported: it reads OMP_* once

import typer  # noqa: E402

from ..errors import DdimctlError, spell  # noqa: E402
from .common import app, cpu_threads_note, flag, progress_on_interrupt, remove_made_folders  # noqa: E402

if THREADS_DECIDED:
    cpu_threads_note.append(THREADS_DECIDED)

# Each module registers its commands when imported; this order is the order of --help.
for _group in ("generate", "inversion", "tuning", "training", "evaluation"):
    importlib.import_module(f".{_group}", __name__)


def main() -> None:
    remove_made_folders()  # (a list of this command's own: runs in one process start empty)
    try:
        run_command()
    finally:  # the folders this command held (a longer-lived process goes on); none if files was never imported
        files = sys.modules.get("ddimctl.io.files")
        if files is not None:
            files.release_folders()


def run_command() -> None:
    try:
        from typer._click.exceptions import ClickException  # typer >= 0.2x carries its own click
    except ImportError:
        from click import ClickException

    def interrupted() -> None:
        remove_made_folders()
        done = spell(progress_on_interrupt[-1](), flag) if progress_on_interrupt else ""
        print(f"interrupted{'; ' + done if done else ''}", file=sys.stderr)
        sys.exit(130)

    try:
        # click's standalone mode would turn Ctrl-C into a silent exit 130 (typer) or "Aborted!".
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        interrupted()
    except ClickException as e:  # usage errors: click's usage line and message
        e.show()
        sys.exit(e.exit_code)
    except DdimctlError as e:
        remove_made_folders()
        print(f"error: {e.render(flag)}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, permissions, ...: say what failed, in one line
        remove_made_folders()
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:
        from .. import distributed

        if not distributed.peer_lost(e):
            raise
        # Under torchrun, a process that refused (one line of its own) closes its connections.
        print(f"error: process {distributed.from_env().rank} stopped: another process of this torchrun launch "
              f"ended first (its error says why)", file=sys.stderr)
        sys.exit(1)
    if code == 130:  # typer's way of reporting a KeyboardInterrupt in non-standalone mode
        interrupted()
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
