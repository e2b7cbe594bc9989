"""Folders of samples: one PNG per image, written while the device runs the next batch, resumable
after an interruption, and never mixing the images of two runs with different settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import images
from .errors import DdimctlError, param
from .files import atomic_path
from .sampling import ProgressFn, Sampler, check_finite, interpolation_alphas, interpolation_latents


def image_names(folder: Path, count: int) -> Callable[[int], Path]:
    width = max(6, len(str(count - 1)))
    return lambda i: Path(folder) / f"{i:0{width}d}.png"


def images_written(folder: Path, count: int) -> int:
    name_of = image_names(folder, count)
    return sum(name_of(i).exists() for i in range(count))


def sample_to_folder(
    sampler: Sampler,
    batch: int,
    seed: int,
    count: int,
    folder: Path,
    world,
    x_T: torch.Tensor | None = None,
    scale: int = 1,
    progress: ProgressFn | None = None,
    notify: Callable[[str], None] = lambda message: None,
) -> tuple[int, float]:
    """Images 0..count-1 as zero-padded PNGs in `folder`, skipping complete ones already there; this
    process's share under torchrun. PNGs are encoded on worker threads while the device runs the next
    batch. Returns how many this process wrote, and the seconds sampling waited for the writers."""
    name_of = image_names(folder, count)
    side = sampler.model.config.resolution * scale
    todo = [i for i in range(count) if not (name_of(i).exists() and finished_image(name_of(i), (side, side)))]
    if len(todo) < count and world.is_main:
        notify(f"{count - len(todo)} of {count} images already in {folder}; generating the rest")
    world.barrier()  # every process lists the folder before any writes to it
    todo = todo[world.rank :: world.size]  # image i depends only on (seed, i): any split gives the same set
    with images.BackgroundWriter() as writer:
        for indices, x0 in sampler.sample_indices(todo, seed, batch, x_T, progress):
            writer.submit([(p, name_of(i)) for i, p in zip(indices, images.enlarge(images.to_uint8(x0), scale))])
    world.barrier()
    return len(todo), writer.stalled_s


def interpolate_to_folder(
    sampler: Sampler,
    ends: torch.Tensor,
    frames: int,
    batch: int,
    folder: Path,
    scale: int = 1,
    progress: ProgressFn | None = None,
) -> None:
    """`frames` slerp frames between the two latents `ends`, decoded with eta = 0 batch by batch and
    written one PNG each: memory does not grow with the number of frames."""
    name_of = image_names(folder, frames)
    alphas = interpolation_alphas(frames)
    with images.BackgroundWriter() as writer:
        for start in range(0, frames, batch):
            z = interpolation_latents(ends, alphas[start : start + batch])
            x = check_finite(list(range(start, start + len(z))), sampler.sample(z, None, progress).cpu())
            writer.submit([(p, name_of(start + i)) for i, p in enumerate(images.enlarge(images.to_uint8(x), scale))])


# --------------------------------------------------------------------------------------------
# The record of the run writing into a folder.

FOLDER_RECORD = ".ddimctl-sample.json"


def claim_folder(folder: Path, settings: dict[str, str]) -> None:
    """Record the settings of the run writing into `folder`, or refuse when the folder already holds
    images of a run with other settings (their images would mix)."""
    record = Path(folder) / FOLDER_RECORD
    if record.is_file():
        try:
            before = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            before = {}
        differ = [f"{k} {before.get(k)!s} (now {v})" for k, v in settings.items() if str(before.get(k)) != str(v)]
        if differ:
            raise DdimctlError(
                f"{folder} holds images of a run with other settings ({', '.join(differ)}); "
                f"use the same settings to finish it, or another {param('out')}"
            )
        return
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(settings, indent=2))


def finished_image(path: Path, size: tuple[int, int]) -> bool:
    """Whether a PNG from an earlier run is complete (a 0-byte or truncated file is redone)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.size != size:
                return False
            img.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False
