"""Files written atomically (a temporary file beside the target, renamed into place on success),
and where ddimctl keeps its cache."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600; use the usual mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cache_dir() -> Path:
    """ddimctl's own cache (converted checkpoints, compiled kernels): $DDIMCTL_CACHE, else
    ~/.cache/ddimctl."""
    if os.environ.get("DDIMCTL_CACHE"):
        return Path(os.environ["DDIMCTL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddimctl"
