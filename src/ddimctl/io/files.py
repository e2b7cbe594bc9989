"""Files written atomically (a temporary file beside the target, renamed into place on success),
and where ddimctl keeps its cache."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import DdimctlError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A temporary is named after its target and the writer's process id, with "ddimctl" in the name:
# `.samples.png.ddimctl-4242-k3j9x_2a.tmp`. Only names of exactly this form, of a process that is
# gone, are ever deleted as stale; any other file is someone else's.
TEMPORARY_PREFIX = "ddimctl-"
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.ddimctl-(?P<pid>[1-9][0-9]{0,9})-[a-z0-9_]{8}\.tmp$")
NAME_MAX = 255  # bytes in a file name on the common file systems


def _temporary_target(name: str) -> str:
    """The target's name as its temporaries carry it: shortened so that '.NAME.ddimctl-PID-XXXXXXXX.tmp'
    fits NAME_MAX (a target whose own name fits must be writable)."""
    room = NAME_MAX - len(f"..{TEMPORARY_PREFIX}-.tmp") - 10 - 8  # the pid's digits, mkstemp's 8 characters
    return name.encode()[:room].decode(errors="ignore")


def _temporary_prefix(name: str) -> str:
    return f".{_temporary_target(name)}.{TEMPORARY_PREFIX}{os.getpid()}-"


@contextmanager
def _naming(path: Path, tmp: Path):
    """Errors about a temporary name the user's path instead: the temporary is ddimctl's business."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and Path(e.filename).name == tmp.name:
            e.filename = str(path)
        raise


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Ownership: every file ddimctl writes is entered in its folder's ledger, one "SHA256  NAME" line
# appended per write (sha256sum's format: `sha256sum -c .ddimctl-files` checks a folder). A file is
# ddimctl's only while its bytes still have the hash entered last for its name: a name proves
# nothing, so a user's file of the same name is never overwritten, adopted or deleted.

LEDGER = ".ddimctl-files"
_LEDGER_LINE = re.compile(r"^(?P<sha256>[0-9a-f]{64})  (?P<name>[^/\\\n]+)$")


class Ledger:
    """What ddimctl wrote into one folder: name -> sha256 of the bytes it wrote last (read once; the
    file is untrusted input like any other: lines that are not entries are passed over)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.entries: dict[str, str] = {}
        try:
            text = (self.folder / LEDGER).read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            if match := _LEDGER_LINE.match(line):
                self.entries[match.group("name")] = match.group("sha256")

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether `path` (in this folder) is a regular file holding exactly what ddimctl wrote there."""
        path = Path(path)
        expected = self.entries.get(path.name)
        return expected is not None and path.is_file() and not path.is_symlink() and sha256_of(path) == expected

    def names(self, path: str | os.PathLike) -> bool:
        """Whether ddimctl wrote a file of this name here (whatever it holds now)."""
        return Path(path).name in self.entries

    def foreign(self, paths) -> list[Path]:
        """The paths that exist but are not ddimctl's (a write there would destroy someone's file)."""
        return [Path(p) for p in paths if os.path.lexists(p) and not self.owns(p)]


def enter_in_ledger(path: str | os.PathLike) -> None:
    """Enter the file ddimctl has just written at `path` in its folder's ledger. One append of one
    short line (atomic for O_APPEND writes), so writer threads and processes never interleave."""
    path = Path(path)
    line = f"{sha256_of(path)}  {path.name}\n".encode()
    fd = os.open(path.parent / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def refuse_foreign(paths) -> None:
    """Before any work: refuse when a file this command would write exists and is not ddimctl's."""
    paths = [Path(p) for p in paths if os.path.lexists(p)]  # the ledger is read only where a file stands
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(p.parent, []).append(p)
    foreign = [p for folder, group in by_folder.items() for p in Ledger(folder).foreign(group)]
    if foreign:
        names = ", ".join(str(p) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DdimctlError(
            f"{names}: {'this file exists' if len(foreign) == 1 else f'{len(foreign)} files exist'} that ddimctl did not "
            f"write, and would be overwritten; move {'it' if len(foreign) == 1 else 'them'} or choose another output"
        )


@contextmanager
def atomic_path(path: str | os.PathLike, clean_stale: bool = True):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    clean_stale first removes what killed writers of this same target left (off for folders of
    thousands of images, which sample cleans once up front).
    """
    path = Path(path)
    refuse_foreign([path])  # the last guard; commands check their outputs before any work
    if clean_stale:
        remove_stale_temporaries(path.parent, target=path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        with _naming(path, Path(tmp)):
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600; use the usual mode
            os.replace(tmp, path)
        enter_in_ledger(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds (a kill,
    a full disk: no half-written folder). `path` must not exist, or be an empty folder, or a folder
    `replaceable` says this kind of write made before (it is then replaced whole)."""
    path = Path(path)
    remove_stale_temporaries(path.parent, target=path.name)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if path.exists():  # an earlier write of the same kind: swap, then drop the old one
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp"))
            old.rmdir()
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists() and not tmp.is_symlink():
            shutil.rmtree(tmp)


def remove_stale_temporaries(folder: str | os.PathLike, target: str | None = None) -> int:
    """Delete the temporaries atomic_path left in `folder` (of `target` only, if given) when its
    process was killed between writing and renaming; those of live processes stay, and so does every
    file not named exactly as atomic_path names them. Returns how many were removed."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    target = _temporary_target(target) if target is not None else None
    pattern = f".{glob.escape(target)}.{TEMPORARY_PREFIX}*.tmp" if target else f".*.{TEMPORARY_PREFIX}*.tmp"
    for candidate in folder.glob(pattern):
        match = TEMPORARY.match(candidate.name)
        if not match or (target is not None and match.group("target") != target):
            continue
        if candidate.is_symlink():  # ddimctl writes plain files and folders only
            continue
        if not _process_alive(int(match.group("pid"))):
            if candidate.is_dir():
                shutil.rmtree(candidate)  # an atomic_folder of a killed process
            else:
                candidate.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    """Whether process `pid` may still be running; when that cannot be told, it may."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's live process, or not a valid id
        return True
    return True


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Tensors to a safetensors file, atomically, the same bytes for the same tensors and metadata;
    any failure (a full disk) is an OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:  # a full disk, say: safetensors raises its own error, not OSError
            raise OSError(f"could not write {path} ({e})") from e
        sort_metadata(tmp)


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted. safetensors writes them in hash
    order, which changes from run to run (safetensors issue #584), so a rerun would not give the
    bytes of the run before. Only the header's key order changes; the tensors are untouched."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # escapes unlike serde's: keep the file as safetensors wrote it
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # trailing spaces are the format's own padding


def cache_dir() -> Path:
    """ddimctl's own cache (converted checkpoints, compiled kernels): $DDIMCTL_CACHE, else
    ~/.cache/ddimctl."""
    if os.environ.get("DDIMCTL_CACHE"):
        return Path(os.environ["DDIMCTL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddimctl"
