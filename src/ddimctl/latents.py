"""The latents file: safetensors with a float32 "latents" (N, C, H, W) and string metadata saying how
they were made (model, S, skip, eta, plain or exact inversion and its tolerance)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import DdimctlError, param
from .files import atomic_save_safetensors

if TYPE_CHECKING:
    from .sampling import ExactInversion


def save_latents(path: Path, latents: torch.Tensor, **metadata) -> None:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_save_safetensors({"latents": latents.float().cpu()}, Path(path), meta)


def inversion_metadata(exact: ExactInversion | None) -> dict[str, str]:
    """How latents were made, for the latents file and reports."""
    if exact is None:
        return {"inversion": "plain"}
    return {"inversion": "exact", "tol": f"{exact.tol:g}", "max_iters": str(exact.max_iters)}


def _read(path: Path, read):
    """read(path) on a latents file, with one-line errors for a missing or unreadable one."""
    if not Path(path).is_file():
        raise DdimctlError(f"{param('latents')} {path}: no such file")
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
    if latents.dim() == 4 and latents.shape[0] == 0:
        raise DdimctlError(f"{param('latents')} {path}: holds no latents (0 rows); write some with `ddimctl invert`")
    if latents.is_floating_point() and not torch.isfinite(latents).all():
        bad = (~torch.isfinite(latents.flatten(1))).any(1).nonzero().flatten().tolist()
        raise DdimctlError(f"{param('latents')} {path}: latent(s) {', '.join(map(str, bad[:5]))} hold NaN or infinite values")
    if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(image_shape):
        raise DdimctlError(
            f"{param('latents')} {path}: shape {tuple(latents.shape)} does not fit this model, which needs "
            f"(N, {', '.join(map(str, image_shape))})"
        )
    return latents.float()


def latents_settings(path: Path) -> dict[str, str]:
    """The settings a latents file was made with (model, steps, skip, eta, inversion, ...)."""
    made = _read(path, _metadata)
    if "eta" in made:
        made["eta"] = f"{float(made['eta']):g}"
    return made


def latents_differences(made: dict[str, str], asked: dict[str, str]) -> list[str]:
    """The settings under which latents were made that differ from the ones asked for now."""
    return [f"{k} {made[k]} (now {v})" for k, v in asked.items() if k in made and made[k] != v]


def moments(latents: torch.Tensor) -> list[tuple[float, float]]:
    """Mean and standard deviation of each latent: a Gaussian x_T has about 0 and 1."""
    flat = latents.flatten(1).double()
    return list(zip(flat.mean(1).tolist(), flat.std(1).tolist()))
