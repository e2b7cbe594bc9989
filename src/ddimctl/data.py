"""Image folders as training data: found recursively, decoded once, kept as 8-bit tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .errors import DdimctlError, param
from .io.images import GRAYSCALE_MODES, READ_SUFFIXES, describe_changes, read_pixels

MAX_IN_MEMORY_BYTES = 8 << 30


def find_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """The image files under `folder`, sorted; those under `exclude` (a run folder kept inside its
    own data folder, whose sample grids are no training data) are left out."""
    if not folder.exists():
        raise DdimctlError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise DdimctlError(f"{folder} is not a folder; give a folder of images")
    skip = Path(exclude).resolve() if exclude is not None else None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in READ_SUFFIXES
                   and not (skip is not None and p.resolve().is_relative_to(skip)))
    if not files:
        raise DdimctlError(f"folder {folder} holds no images ({', '.join(sorted(READ_SUFFIXES))})")
    return files


def infer_channels(files: list[Path]) -> int:
    """1 when every image is grayscale, else 3; reads only the file headers."""
    for path in files:
        try:
            with Image.open(path) as img:
                if img.mode not in GRAYSCALE_MODES:
                    return 3
        except (UnidentifiedImageError, OSError):
            continue  # unreadable files are reported when the data are loaded
    return 1


def load_folder(
    folder: Path,
    resolution: int,
    channels: int,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    exclude: Path | None = None,
) -> torch.Tensor:
    """All images of `folder` (but those under `exclude`) as uint8 (N, C, H, W); unreadable files
    are reported once and skipped."""
    files = find_images(folder, exclude)
    needed = len(files) * channels * resolution * resolution
    if needed > MAX_IN_MEMORY_BYTES:
        raise DdimctlError(
            f"{len(files)} images at {resolution}x{resolution} need {needed / 2**30:.1f} GiB in memory; "
            f"use a lower {param('resolution')} or a subset of the data"
        )
    out = torch.empty((len(files), channels, resolution, resolution), dtype=torch.uint8)
    kept, bad, changes = 0, [], {}
    for i, path in enumerate(files):
        try:
            out[kept] = read_pixels(path, resolution, channels, changes)
            kept += 1
        except DdimctlError:
            bad.append(path)
        if progress is not None:
            progress(i + 1, len(files))
    if warn is not None:  # resizing training images is expected; a change of colour is told
        for line in describe_changes({k: v for k, v in changes.items() if k != "resized"}, resolution):
            warn(line)
    if bad and warn is not None:
        shown = ", ".join(str(p.relative_to(folder)) for p in bad[:5])
        warn(f"skipped {len(bad)} unreadable file(s): {shown}{', ...' if len(bad) > 5 else ''}")
    if kept == 0:
        raise DdimctlError(f"none of the {len(files)} files in {folder} could be read as an image")
    return out[:kept].clone()
