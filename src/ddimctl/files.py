"""Files written atomically (a temporary file beside the target, renamed into place on success),
and where ddimctl keeps its cache."""

from __future__ import annotations

import glob
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A temporary is named after its target and the writer's process id, with "ddimctl" in the name:
# `.samples.png.ddimctl-4242-k3j9x_2a.tmp`. Only names of exactly this form, of a process that is
# gone, are ever deleted as stale; any other file is someone else's.
TEMPORARY_PREFIX = "ddimctl-"
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.ddimctl-(?P<pid>[1-9][0-9]{0,9})-[a-z0-9_]{8}\.tmp$")


@contextmanager
def atomic_path(path: str | os.PathLike, clean_stale: bool = True):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    clean_stale first removes what killed writers of this same target left (off for folders of
    thousands of images, which sample cleans once up front).
    """
    path = Path(path)
    if clean_stale:
        remove_stale_temporaries(path.parent, target=path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TEMPORARY_PREFIX}{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600; use the usual mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds (a kill,
    a full disk: no half-written folder). `path` must not exist, or be an empty folder, or a folder
    `replaceable` says this kind of write made before (it is then replaced whole)."""
    path = Path(path)
    remove_stale_temporaries(path.parent, target=path.name)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{TEMPORARY_PREFIX}{os.getpid()}-", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if path.exists():  # an earlier write of the same kind: swap, then drop the old one
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{TEMPORARY_PREFIX}{os.getpid()}-", suffix=".tmp"))
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
