"""The latents file: safetensors with a float32 "latents" (N, C, H, W) and string metadata saying how
they were made (model, the sampler they were inverted for, S, skip, plain or exact inversion and its
tolerance)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import choices
from . import samplers, timesteps
from ..errors import DdimctlError, param
from ..io.fields import is_whole_number
from ..io.files import atomic_save_safetensors, regular_file

if TYPE_CHECKING:
    from .runners import ExactInversion


def _as_text(values: dict) -> dict[str, str]:
    """Metadata values as safetensors keeps them: strings (others as JSON)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def save_latents(path: Path, latents: torch.Tensor, model: str, settings: samplers.Settings, **metadata) -> None:
    """Write latents with the model and (resolved) settings they were inverted with, in the record
    format of a samples folder (Settings.record)."""
    made = {"model": model, **settings.record(), **metadata}
    atomic_save_safetensors({"latents": latents.float().cpu()}, Path(path), _as_text(made), mark=True)


def inversion_metadata(exact: ExactInversion | None) -> dict[str, str]:
    """How latents were made, for the latents file and reports."""
    if exact is None:
        return {"inversion": "plain"}
    return {"inversion": "exact", "tol": f"{exact.tol:g}", "max_iters": str(exact.max_iters)}


def _read(path: Path, read):
    """read(path) on a latents file, with one-line errors for a missing or unreadable one."""
    if not os.path.lexists(path):
        raise DdimctlError(f"{param('latents')} {path}: no such file")
    regular_file(path)
    try:
        return read(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DdimctlError(f"{param('latents')} {path}: not a safetensors file ({e}); write one with `ddimctl invert`") from e


def _metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def load_latents(path: Path, image_shape: Sequence[int]) -> torch.Tensor:
    tensors = _read(path, load_file)
    if "latents" not in tensors:
        raise DdimctlError(f"{param('latents')} {path}: no tensor named 'latents' in it")
    latents = tensors["latents"]
    if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(image_shape):  # the shape first: the checks below index it
        raise DdimctlError(
            f"{param('latents')} {path}: shape {tuple(latents.shape)} does not fit this model, which needs "
            f"(N, {', '.join(map(str, image_shape))})"
        )
    if latents.shape[0] == 0:
        raise DdimctlError(f"{param('latents')} {path}: holds no latents (0 rows); write some with `ddimctl invert`")
    if latents.is_floating_point() and not torch.isfinite(latents).all():
        bad = (~torch.isfinite(latents.flatten(1))).any(1).nonzero().flatten().tolist()
        raise DdimctlError(f"{param('latents')} {path}: latent(s) {', '.join(map(str, bad[:5]))} hold NaN or infinite values")
    return latents.float()


def latents_settings(path: Path) -> dict[str, str]:
    """The settings a latents file was made with (model, sampler, steps, skip, eta, inversion, ...),
    each checked: the file is untrusted input. Files of earlier versions name no sampler: ddim."""
    made = _read(path, _metadata)
    made.setdefault("sampler", "ddim")

    def bad(field: str, expected: str):
        return DdimctlError(f"{param('latents')} {path}: its metadata field {field!r} is {made[field]!r}, "
                            f"expected {expected}; write the file again with `ddimctl invert`")

    if "steps" in made and not (is_whole_number(made["steps"]) and int(made["steps"]) >= 1):
        raise bad("steps", "a positive integer")
    if "skip" in made:
        try:
            timesteps.check(made["skip"])
        except ValueError:
            raise bad("skip", f"one of {', '.join(timesteps.SCHEMES)} or explicit timesteps") from None
    if made.get("sigma_hat", "false") not in ("true", "false"):
        raise bad("sigma_hat", "true or false")
    if made["sampler"] not in samplers.SAMPLERS:
        raise bad("sampler", f"one of {choices.sampler_names()}")
    if "eta" in made:
        try:
            made["eta"] = f"{float(made['eta']):g}"
        except ValueError:
            raise bad("eta", "a number") from None
    if "classes" in made:  # a class-conditional model's labels, one per latent
        try:
            classes = json.loads(made["classes"])
        except ValueError:
            classes = None
        if not (isinstance(classes, list) and classes and all(type(c) is int and c >= 0 for c in classes)):
            raise bad("classes", "a list of class labels")
        made["classes"] = classes
    return made


def latents_differences(made: dict[str, str], asked: dict[str, str]) -> list[str]:
    """The settings under which latents were made that differ from the ones asked for now."""
    return [f"{k} {made[k]} (now {v})" for k, v in asked.items() if k in made and made[k] != v]


def decoding_settings(made: dict[str, str], sampler: str, steps: int | None, skip: str | None, eta: float,
                      sigma_hat: bool, clip: bool = False, clip_sample: bool = False) -> samplers.Settings:
    """How latents decode: with the S and skip they were inverted with, unless told otherwise."""
    return samplers.Settings(sampler, steps if steps is not None else int(made.get("steps", choices.DEFAULT_STEPS)),
                             skip or made.get("skip"), eta, sigma_hat, clip, clip_sample)


def decoding_notes(name: str, made: dict[str, str], model: str, settings: samplers.Settings) -> list[str]:
    """What a user decoding latents `name` with (resolved) `settings` should know."""
    asked = _as_text({"model": model, **settings.record()})
    clipped = "--clip" if settings.clip else "--clip-sample" if settings.clip_sample else None
    differ = latents_differences(made, asked) + ([f"x0 unclipped (now {clipped})"] if clipped else [])
    if differ:
        return [f"{name} was inverted with {', '.join(differ)}: decoding will not return the images exactly"]
    if made.get("inversion", "plain") == "plain":
        return [f"{name} came from plain inversion: the images return approximately (more exactly as S grows); "
                f"`ddimctl invert --exact` makes latents that decode back exactly"]
    return []


def moments(latents: torch.Tensor) -> list[tuple[float, float]]:
    """Mean and standard deviation of each latent: a Gaussian x_T has about 0 and 1."""
    flat = latents.flatten(1).double()
    return list(zip(flat.mean(1).tolist(), flat.std(1).tolist()))
