"""Image metrics: per-image MSE and PSNR (the paper's Table 2), and the Frechet distance between
Gaussians fitted to features."""

from __future__ import annotations

import math

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = features.double().flatten(1)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2), with Tr (C1 C2)^1/2 = Tr (C1^1/2 C2 C1^1/2)^1/2,
    a symmetric form that eigh computes stably."""
    root1 = _sqrt_psd(cov1)
    cross = _sqrt_psd(root1 @ cov2 @ root1)
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * torch.trace(cross))


def frechet_distance_between(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def _as_shown(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images on the [0, 1] scale, clamped to the displayable range as a saved image is."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def mse_per_image(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image on the [0, 1] scale (the paper's Table 2 measure) of [-1, 1]
    tensors, both clamped first (a no-op for a target read from a picture)."""
    return (_as_shown(x) - _as_shown(target)).pow(2).flatten(1).mean(1)


def round_trip_errors(x: torch.Tensor, target: torch.Tensor, names: list[str]) -> dict:
    """Table 2's numbers for reconstructions x of target: the mean MSE and its PSNR, and each image's."""
    mse = mse_per_image(x, target)
    return {
        "mse": float(mse.mean()),
        "psnr": psnr(float(mse.mean())),
        "images": [{"image": name, "mse": float(m), "psnr": psnr(float(m))} for name, m in zip(names, mse)],
    }


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of an MSE on the [0, 1] scale."""
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def psnr_per_image(x: torch.Tensor, target: torch.Tensor, ceiling_db: float = 120.0) -> torch.Tensor:
    """psnr of each image's mse_per_image, capped at `ceiling_db` (identical images)."""
    return 10 * torch.log10(1 / mse_per_image(x, target).clamp_min(10 ** (-ceiling_db / 10)))
