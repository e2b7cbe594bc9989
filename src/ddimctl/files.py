"""Files written atomically (a temporary file beside the target, renamed into place on success),
and where ddimctl keeps its cache."""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    # The writer's process id in the name tells a stale temporary (its process is gone) from a live one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600; use the usual mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


TEMPORARY = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files atomic_path left in `folder` when its process was killed (kill -9
    between writing and renaming); those of live processes stay. Returns how many were removed."""
    removed = 0
    for candidate in Path(folder).glob(".*.tmp"):
        match = TEMPORARY.match(candidate.name)
        if match and not _process_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Tensors to a safetensors file, atomically; any failure (a full disk) is an OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:  # a full disk, say: safetensors raises its own error, not OSError
            raise OSError(f"could not write {path} ({e})") from e


def cache_dir() -> Path:
    """ddimctl's own cache (converted checkpoints, compiled kernels): $DDIMCTL_CACHE, else
    ~/.cache/ddimctl."""
    if os.environ.get("DDIMCTL_CACHE"):
        return Path(os.environ["DDIMCTL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddimctl"
