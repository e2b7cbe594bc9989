"""Files: read only when regular (and text only up to a size), written atomically (a temporary
file beside the target, renamed into place on success) and entered in their folder's ledger, one
writer per folder, and where ddimctl keeps its cache."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import DdimctlError

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None


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


# --------------------------------------------------------------------------------------------
# Reading: every file ddimctl reads is untrusted, its own too. Only regular files are opened (a FIFO
# would block forever, a device never end), and text files only up to a size.

TEXT_LIMIT = 64 << 20  # bytes of a config, sidecar, record, ledger or registry: far beyond any real one


def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def regular_file(path: str | os.PathLike) -> Path:
    """`path` itself, once it is known to be a regular file (links followed); a FIFO, device, socket
    or folder is a one-line error, before anything opens it (opening a FIFO blocks)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DdimctlError(f"{path}: cannot be read ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        raise DdimctlError(f"{path} is {_kind(mode)}, not a file ddimctl can read; give a regular file")
    return Path(path)


def read_regular(path: str | os.PathLike, limit: int = TEXT_LIMIT) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened without blocking and checked on
    the open descriptor itself, so that nothing swapped in between is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DdimctlError(f"{path}: cannot be read ({e.strerror or e})") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DdimctlError(f"{path} is {_kind(info.st_mode)}, not a file ddimctl can read; give a regular file")
        if info.st_size > limit:
            raise DdimctlError(f"{path} holds {info.st_size:,} bytes, more than a file of this kind ever needs "
                               f"({limit:,}); give the right file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise DdimctlError(f"{path}: cannot be read ({e.strerror or e})") from e
    finally:
        os.close(fd)
    if len(data) > limit:
        raise DdimctlError(f"{path} grew beyond {limit:,} bytes while being read; give the right file")
    return data


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
# A ledger is told by its content: this first line (a comment to sha256sum), or, as versions before it
# wrote them, entries only. A file of the name that is neither is someone else's, never written into.
LEDGER_HEADER = "# ddimctl's ledger: the files it wrote in this folder and their sha256 (sha256sum -c checks them)\n"
_LEDGER_LINE = re.compile(r"^(?P<sha256>[0-9a-f]{64})  (?P<name>[^/\\\n]+)$")


class Ledger:
    """What ddimctl wrote into one folder: name -> sha256 of the bytes it wrote last (read once; the
    file is untrusted input like any other: lines that are not entries are passed over, and a file of
    the ledger's name that is not one (`foreign`) counts for nothing)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.entries: dict[str, str] = {}
        self.foreign_ledger = False
        if not os.path.lexists(self.folder / LEDGER):
            return
        text = read_regular(self.folder / LEDGER).decode("utf-8", errors="replace")
        lines = text.splitlines()
        if not (text.startswith(LEDGER_HEADER) or (lines and all(_LEDGER_LINE.match(line) for line in lines))):
            self.foreign_ledger = True
            return
        for line in lines:
            if match := _LEDGER_LINE.match(line):
                self.entries[match.group("name")] = match.group("sha256")

    def check(self) -> None:
        """Refuse a folder whose ledger's name holds someone else's file: ddimctl could not keep its own."""
        if self.foreign_ledger:
            raise DdimctlError(f"{self.folder / LEDGER} is not ddimctl's (it keeps its ledger of the files it writes under "
                               f"that name); move that file, or choose another output folder")

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether `path` (in this folder) is a regular file holding exactly what ddimctl wrote there: by
        its ledger entry, or, a file written alone, by its own mark (carries_mark)."""
        path = Path(path)
        if not path.is_file() or path.is_symlink():
            return False
        expected = self.entries.get(path.name)
        return (expected is not None and sha256_of(path) == expected) or carries_mark(path)

    def names(self, path: str | os.PathLike) -> bool:
        """Whether ddimctl wrote a file of this name here (whatever it holds now)."""
        return Path(path).name in self.entries

    def foreign(self, paths) -> list[Path]:
        """The paths that exist but are not ddimctl's (a write there would destroy someone's file)."""
        return [Path(p) for p in paths if os.path.lexists(p) and not self.owns(p)]


# A file written alone (a picture, a latents file) carries its own mark instead of a ledger entry: the
# sha256 of what it holds, inside it (a PNG text chunk, safetensors metadata). A rerun may replace
# ddimctl's own file and refuses anyone else's, and no ledger is left in the user's folder.
MARK = "ddimctl-sha256"
MARKED_SUFFIXES = (".png", ".safetensors")


def pixels_digest(img) -> str:
    """The mark of a picture: its mode, size and pixels (what decoding gives, whatever the encoder did)."""
    return hashlib.sha256(f"{img.mode} {img.width}x{img.height}\n".encode() + img.tobytes()).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The mark of a safetensors file: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def carries_mark(path: Path) -> bool:
    """Whether a file ddimctl writes alone holds its mark, and the mark its content: a user's file
    cannot (whatever its name), nor one changed since."""
    if path.suffix.lower() not in MARKED_SUFFIXES:
        return False
    try:
        regular_file(path)
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as img:
                img.load()
                return img.format == "PNG" and img.text.get(MARK) == pixels_digest(img)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            mark = (f.metadata() or {}).get(MARK)
            return mark is not None and mark == tensors_digest({k: f.get_tensor(k) for k in f.keys()})
    except Exception:  # not a readable file of its kind: not one ddimctl wrote
        return False


def enter_in_ledger(path: str | os.PathLike) -> None:
    """Enter the file ddimctl has just written at `path` in its folder's ledger. One append of one
    short line (atomic for O_APPEND writes), so writer threads and processes never interleave; a new
    ledger appears whole, its header in it (linked into place, which never replaces a file)."""
    path = Path(path)
    line = f"{sha256_of(path)}  {path.name}\n".encode()
    ledger = path.parent / LEDGER
    if not os.path.lexists(ledger):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(LEDGER), suffix=".tmp")
        try:
            os.write(fd, LEDGER_HEADER.encode())
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())
            try:
                os.link(tmp, ledger)
            except FileExistsError:  # another writer's, a moment earlier
                pass
        finally:
            os.unlink(tmp)
    Ledger(path.parent).check()
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def refuse_foreign(paths, ledger: bool = True) -> None:
    """Before any work: refuse when a file this command would write exists and is not ddimctl's (and,
    for files a ledger will enter, when the folder's ledger name holds someone else's file)."""
    paths = [Path(p) for p in paths]
    for folder in {p.parent for p in paths if p.parent.is_dir()} if ledger else ():
        Ledger(folder).check()
    paths = [p for p in paths if os.path.lexists(p)]  # entries are read only where a file stands
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
def atomic_path(path: str | os.PathLike, clean_stale: bool = True, ledger: bool = True):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A crash or kill at any moment leaves either the old file or the new one, never half of one.
    clean_stale first removes what killed writers of this same target left (off for folders of
    thousands of images, which sample cleans once up front). ledger False: the file carries its own
    mark (MARK), and is entered in no ledger.
    """
    path = Path(path)
    refuse_foreign([path], ledger)  # the last guard; commands check their outputs before any work
    if clean_stale:
        remove_stale_temporaries(path.parent, target=path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        with _naming(path, Path(tmp)):
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600; use the usual mode
            os.replace(tmp, path)
        if ledger:
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


# --------------------------------------------------------------------------------------------
# One writer per folder: a run folder, a folder of samples, a sweep's, an edit's.

_held: dict[str, int] = {}  # folder (real path) -> the descriptor its lock is held on, for this process


def hold_folder(folder: str | os.PathLike) -> None:
    """From now until this process ends (or release_folders), this process alone writes into the
    existing `folder`; another ddimctl process asking for it is refused at once. The hold is an
    flock on the folder itself: nothing is written into it, and a killed process lets go with it."""
    key = os.path.realpath(folder)
    if key in _held or fcntl is None:  # (no flock on this system: one writer is the user's to keep)
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DdimctlError(f"{folder} is being written by another ddimctl process right now; wait for it to end, or "
                           f"choose another output folder") from None
    _held[key] = fd


def release_folders() -> None:
    """Let go of every folder this process holds (a command run in a longer-lived process ends)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


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


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None,
                            mark: bool = False) -> None:
    """Tensors to a safetensors file, atomically, the same bytes for the same tensors and metadata;
    any failure (a full disk) is an OSError. mark: a file written alone, marked (MARK) not ledgered."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mark:
        metadata = {**(metadata or {}), MARK: tensors_digest(tensors)}
    with atomic_path(path, ledger=not mark) as tmp:
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
