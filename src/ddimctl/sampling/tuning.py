"""Timesteps fitted to one model and sampler (`ddimctl tune-steps`).

The method is LD3's objective (Tong et al., ICLR 2025) searched without gradients: the S timesteps
that bring a sampler's images closest to a teacher's from the same x_T. The teacher is the same
probability-flow ODE solved far more finely (UniPC, TEACHER_CALLS network calls on the logSNR grid),
on a few hundred x_T drawn from the seed. The search starts from the best built-in scheme and moves
one timestep at a time, halving the move when no move helps, and keeps a move only when the
teacher error falls, so the result is never worse than the scheme it started from. Deterministic for
a seed; on the bundled digits model it takes a few minutes on a 2-core CPU.

Why not GITS' dynamic programming over a fine grid: its costs are those of single Euler (DDIM)
steps, exact for DDIM but only a proxy for multistep solvers, whose error depends on the whole grid;
this search measures the sampler itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import samplers, timesteps
from .. import seeds

TEACHER_CALLS = 100
TEACHER = samplers.Settings("unipc", TEACHER_CALLS, "logsnr")
MOVES = (64, 32, 16, 8, 4, 2, 1)  # how far one timestep moves, coarse to fine
# A move is kept when it lowers the error by more than this fraction: float rounding (another thread
# count, another CPU) moves the error by about 1e-7, so near-ties are decided the same way everywhere.
MIN_GAIN = 1e-4


@dataclass
class TuningResult:
    timesteps: list[int]
    start_scheme: str
    start_error: float
    error: float
    evaluations: int
    network_calls: int
    seconds: float
    history: list[float] = field(default_factory=list)


def teacher_error(images: torch.Tensor, teacher: torch.Tensor) -> float:
    """Root mean squared distance to the teacher's images, per pixel on [-1, 1]."""
    return float((images.double() - teacher.double()).pow(2).mean().sqrt())


def neighbours(grid: list[int], index: int, move: int, train_steps: int) -> list[list[int]]:
    """The grids with timestep `index` moved by +-move, kept strictly increasing inside 0..T-1."""
    found = []
    for step in (-move, move):
        value = grid[index] + step
        low = grid[index - 1] + 1 if index > 0 else 0
        high = grid[index + 1] - 1 if index + 1 < len(grid) else train_steps - 1
        if low <= value <= high:
            found.append(grid[:index] + [value] + grid[index + 1 :])
    return found


def tune(
    eps_model,
    alphas_cumprod: torch.Tensor,
    image_shape: tuple[int, ...],
    settings: samplers.Settings,
    *,
    count: int = 128,
    seed: int = 0,
    batch: int = 128,
    progress: Callable[[str, float], None] = lambda what, error: None,
) -> TuningResult:
    """Fit the timesteps of `settings` (its sampler and S) to the model behind eps_model."""
    started = time.perf_counter()
    train_steps = alphas_cumprod.shape[0]
    # Trajectories of their own stream: never the x_T of a sampling run with the same seed.
    x_T = seeds.initial_noise(seeds.image_generators(seeds.derive(seed, "tune-steps"), range(count)), image_shape)
    calls = 0

    def run(walk: samplers.Settings, grid) -> torch.Tensor:
        nonlocal calls
        grid = torch.as_tensor(grid, dtype=torch.long)
        out = []
        with torch.no_grad():
            for start in range(0, count, batch):
                out.append(walk.run(eps_model, x_T[start : start + batch], alphas_cumprod, grid))
        calls += count * walk.network_calls(len(grid))
        return torch.cat(out)

    teacher = run(TEACHER, TEACHER.timesteps(alphas_cumprod))
    walked = settings.steps - settings.spec.extra_calls
    evaluations = 0

    def error_of(grid: list[int]) -> float:
        nonlocal evaluations
        evaluations += 1
        return teacher_error(run(settings, grid), teacher)

    starts = {}
    for scheme in timesteps.SCHEMES:
        grid = timesteps.scheme_sequence(scheme, walked, alphas_cumprod).tolist()
        if len(grid) == walked and grid not in starts.values():
            starts[scheme] = grid
    scored = {scheme: error_of(grid) for scheme, grid in starts.items()}
    start_scheme = min(scored, key=scored.get)
    grid, best = starts[start_scheme], scored[start_scheme]
    progress(f"start: {start_scheme}", best)
    history = [best]
    for move in MOVES:
        improved = True
        while improved:
            improved = False
            for index in range(walked):
                for candidate in neighbours(grid, index, move, train_steps):
                    error = error_of(candidate)
                    if error < best * (1 - MIN_GAIN):
                        grid, best, improved = candidate, error, True
                        history.append(best)
                        progress(f"move {move}", best)
                        break
    return TuningResult(grid, start_scheme, scored[start_scheme], best, evaluations, calls,
                        time.perf_counter() - started, history)


def relative_gain(result: TuningResult) -> float:
    return 1 - result.error / result.start_error if result.start_error > 0 and math.isfinite(result.error) else 0.0
