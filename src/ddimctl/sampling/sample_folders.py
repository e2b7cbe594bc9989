"""Folders of samples: one PNG per image, written while the device runs the next batch, resumable
after an interruption, and never mixing the images of two runs with different settings."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import images
from . import samplers
from ..errors import DdimctlError, param
from ..io.fields import read_json_object
from ..io.files import Ledger, atomic_path, hold_folder, sha256_of
from .runners import ProgressFn, Runner, aligned_batches, check_finite, interpolation_alphas, interpolation_latents
from ..models.loading import LoadedModel


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
    count: int  # images of the run (their names are numbered by it)
    batches: list[list[int]]
    todo: list[int]
    already: int  # complete images found in the folder
    share: int  # images this folder is to hold: the run's, or its shard's

    @property
    def computed(self) -> int:
        """Images this process runs through the network (finished ones sharing a batch included)."""
        return sum(len(b) for b in self.batches)


def plan_folder(folder: Path, count: int, batch: int, world, shard: tuple[int, int] = (0, 1)) -> FolderPlan:
    """Images 0..count-1 of a run as zero-padded PNGs in `folder`: which are missing (only a PNG that
    holds exactly what ddimctl wrote counts as done), and this process's share of the batches that
    hold them. With shard (I, N) the folder holds the run's batches k with k % N == I only, a split
    fixed by the run itself (not by what is done), so a shard resumes as itself and the union of the
    N shards' folders is a straight run's images."""
    name_of = image_names(folder, count)
    ledger = Ledger(folder)
    index, shards = shard
    ours = [b for k, b in enumerate(aligned_batches(range(count), batch, count)) if k % shards == index]
    todo = [i for b in ours for i in b if not ledger.owns(name_of(i))]
    mine = aligned_batches(todo, batch, count)[world.rank :: world.size]
    members = {i for b in mine for i in b}
    share = sum(map(len, ours))
    return FolderPlan(Path(folder), count, mine, [i for i in todo if i in members], share - len(todo), share)


def fill_folder(
    runner: Runner,
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
        for indices, x0 in runner.run_batches(plan.batches, plan.todo, seed, x_T, progress):  # the plan is what runs
            writer.submit([(p, name_of(i)) for i, p in zip(indices, images.enlarge(images.to_uint8(x0), scale))])
    world.barrier()
    return writer.stalled_s


def interpolate_to_folder(
    runner: Runner,
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
    batch = runner.batch or frames
    with images.BackgroundWriter() as writer:
        for start in range(0, frames, batch):
            z = interpolation_latents(ends, alphas[start : start + batch])
            x = check_finite(list(range(start, start + len(z))), runner.sample(z, None, progress, range(start, start + len(z))).cpu())
            writer.submit([(p, name_of(start + i)) for i, p in enumerate(images.enlarge(images.to_uint8(x), scale))])


# --------------------------------------------------------------------------------------------
# The record of the run writing into a folder.

FOLDER_RECORD = ".ddimctl-sample.json"


def run_record(model: LoadedModel, settings: samplers.Settings, seed: int, latents: Path | None, precision: str,
               scale: int, classes: list[int] | None = None, shard: tuple[int, int] = (0, 1), batch: int | None = None) -> dict:
    """What a folder's record holds: everything that decides the images' pixels, the model and the
    latents by their content (a newer checkpoint in a run folder, or other latents at the same path,
    are another run); a shard's folder its shard and the batch size that defines the split."""
    sharded = {"shard": f"{shard[0]}/{shard[1]}", "batch_size": batch} if shard[1] > 1 else {}
    return {"model": model.name, "source": model.source, "weights_sha256": model.weights_sha256, **settings.record(), "seed": seed,
            "latents": str(latents) if latents else None, "latents_sha256": sha256_of(latents) if latents else None,
            "precision": precision, "scale": scale, "classes": classes, **sharded}


def claim_folder(folder: Path, settings: dict, count: int) -> None:
    """Record the settings of the run writing into `folder`, or refuse (check_folder). A PNG of
    ddimctl's that was cut short or emptied since is removed here, and redone."""
    hold_folder(folder)  # one run in a folder at a time: another is refused before it writes anything
    for path in check_folder(folder, settings, count):
        path.unlink()
    record = Path(folder) / FOLDER_RECORD
    if not record.exists():
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps(settings, indent=2))


def check_folder(folder: Path, settings: dict, count: int) -> list[Path]:
    """Refuse, writing nothing, when `folder` holds images of a run with other settings (they would
    mix), or files of the names this run would write that ddimctl did not write (someone else's:
    never overwritten, never counted as this run's); returns ddimctl's own damaged PNGs, to redo."""
    record = Path(folder) / FOLDER_RECORD
    ledger = Ledger(folder)
    ledger.check()
    if os.path.lexists(record):
        before = None
        if ledger.owns(record):
            try:
                before = read_json_object(record)
            except DdimctlError:
                pass
        if not isinstance(before, dict):
            raise DdimctlError(f"{record} is not a record ddimctl wrote (or it changed since); name a fresh "
                               f"{param('out')} folder")
        differ = [f"{k} {_short(before.get(k))} (now {_short(v)})" for k, v in settings.items()
                  if str(before.get(k)) != str(v)]
        if differ:
            raise DdimctlError(
                f"{folder} holds images of a run with other settings ({', '.join(differ)}); "
                f"use the same settings to finish it, or another {param('out')}"
            )
    name_of = image_names(folder, count)
    damaged, foreign = [], []
    for path in ledger.foreign(name_of(i) for i in range(count)):
        if ledger.names(path) and not path.is_symlink() and path.is_file() and not finished_image(path, None):
            damaged.append(path)
        else:
            foreign.append(path.name)
    if foreign:
        raise DdimctlError(
            f"{folder} holds {len(foreign)} file(s) named like this run's images that ddimctl did not write "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); name a fresh {param('out')} folder, "
            f"or move those files"
        )
    return damaged


def _short(value) -> str:
    """A value as an error shows it (content hashes shortened)."""
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def finished_image(path: Path, size: tuple[int, int] | None) -> bool:
    """Whether a PNG from an earlier run is complete (a 0-byte or truncated file is redone)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if size is not None and img.size != size:
                return False
            img.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False
