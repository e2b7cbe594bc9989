"""Folders of samples: one PNG per image, written while the device runs the next batch, resumable
after an interruption, and never mixing the images of two runs with different settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import images, samplers
from .errors import DdimctlError, param
from .files import atomic_path
from .sampling import ProgressFn, Sampler, aligned_batches, check_finite, interpolation_alphas, interpolation_latents


def image_names(folder: Path, count: int) -> Callable[[int], Path]:
    width = max(6, len(str(count - 1)))
    return lambda i: Path(folder) / f"{i:0{width}d}.png"


def images_written(folder: Path, count: int) -> int:
    name_of = image_names(folder, count)
    return sum(name_of(i).exists() for i in range(count))


@dataclass
class FolderPlan:
    """What one process writes into a folder of samples: whole batches of the run (so each image is
    computed exactly as in a straight run), and the images of them still missing."""

    folder: Path
    count: int
    batches: list[list[int]]
    todo: list[int]
    already: int  # complete images found in the folder

    @property
    def computed(self) -> int:
        """Images this process runs through the network (finished ones sharing a batch included)."""
        return sum(len(b) for b in self.batches)


def plan_folder(folder: Path, count: int, batch: int, world, side: int) -> FolderPlan:
    """Images 0..count-1 of a run as zero-padded PNGs in `folder`: which are missing (a 0-byte or
    truncated PNG counts as missing), and this process's share of the batches that hold them."""
    name_of = image_names(folder, count)
    todo = [i for i in range(count) if not (name_of(i).exists() and finished_image(name_of(i), (side, side)))]
    mine = aligned_batches(todo, batch, count)[world.rank :: world.size]
    members = {i for b in mine for i in b}
    return FolderPlan(Path(folder), count, mine, [i for i in todo if i in members], count - len(todo))


def fill_folder(
    sampler: Sampler,
    plan: FolderPlan,
    seed: int,
    world,
    x_T: torch.Tensor | None = None,
    scale: int = 1,
    progress: ProgressFn | None = None,
) -> float:
    """Write this process's missing images of `plan`. PNGs are encoded on worker threads while the
    device runs the next batch. Returns the seconds sampling waited for the writers."""
    name_of = image_names(plan.folder, plan.count)
    world.barrier()  # every process has listed the folder before any writes to it
    with images.BackgroundWriter() as writer:
        for indices, x0 in sampler.sample_indices(plan.todo, seed, sampler.batch, x_T, progress, count=plan.count):
            writer.submit([(p, name_of(i)) for i, p in zip(indices, images.enlarge(images.to_uint8(x0), scale))])
    world.barrier()
    return writer.stalled_s


def interpolate_to_folder(
    sampler: Sampler,
    ends: torch.Tensor,
    frames: int,
    folder: Path,
    scale: int = 1,
    progress: ProgressFn | None = None,
) -> None:
    """`frames` slerp frames between the two latents `ends`, decoded (deterministically) batch by batch and
    written one PNG each: memory does not grow with the number of frames."""
    name_of = image_names(folder, frames)
    alphas = interpolation_alphas(frames)
    batch = sampler.batch or frames
    with images.BackgroundWriter() as writer:
        for start in range(0, frames, batch):
            z = interpolation_latents(ends, alphas[start : start + batch])
            x = check_finite(list(range(start, start + len(z))), sampler.sample(z, None, progress).cpu())
            writer.submit([(p, name_of(start + i)) for i, p in enumerate(images.enlarge(images.to_uint8(x), scale))])


# --------------------------------------------------------------------------------------------
# The record of the run writing into a folder.

FOLDER_RECORD = ".ddimctl-sample.json"


def run_record(model: str, settings: samplers.Settings, seed: int, latents: str | None, precision: str,
               scale: int) -> dict:
    """What a folder's record holds: everything that decides the images' pixels."""
    return {"model": model, **settings.record(), "seed": seed, "latents": latents, "precision": precision,
            "scale": scale}


def claim_folder(folder: Path, settings: dict, count: int) -> None:
    """Record the settings of the run writing into `folder`, or refuse: when the folder holds images
    of a run with other settings (they would mix), or, without a record of ddimctl's, files of the
    names this run would write (someone else's: never overwritten, never counted as this run's)."""
    record = Path(folder) / FOLDER_RECORD
    if record.is_file():
        try:
            before = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            before = None
        if not isinstance(before, dict):
            raise DdimctlError(f"{record} is not a record ddimctl wrote; name a fresh {param('out')} folder")
        before.setdefault("sampler", "ddim")  # records of earlier versions: DDIM was the only sampler
        differ = [f"{k} {before.get(k)!s} (now {v})" for k, v in settings.items() if str(before.get(k)) != str(v)]
        if differ:
            raise DdimctlError(
                f"{folder} holds images of a run with other settings ({', '.join(differ)}); "
                f"use the same settings to finish it, or another {param('out')}"
            )
        return
    name_of = image_names(folder, count)
    foreign = [name_of(i).name for i in range(count) if name_of(i).exists()]
    if foreign:
        raise DdimctlError(
            f"{folder} holds {len(foreign)} file(s) named like this run's images ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}) but no record of a ddimctl run; name a fresh {param('out')} "
            f"folder, or remove those files"
        )
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
