"""DDIM (Song, Meng & Ermon, ICLR 2021) as small pure functions over tensors: the update (ddim_step),
sample, invert, exact inversion, edit and slerp.

Conventions (schedule.py's): train timesteps are 0-based (0..T-1); `alphas_cumprod[t]` is abar_t in
float64; a sub-sequence `timesteps` is increasing, tau_1 < ... < tau_S, and the sampler walks it
downwards, finishing with a step to abar = 1 (the clean image). The schedule, the predictions and
the paper's timestep sub-sequences are schedule.py's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..schedule import timestep_sequence  # noqa: F401 (the paper's tau, where ddim.sample's callers look)

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None


class Step(NamedTuple):
    """What a sampler's callback sees after each step: the step's index (0-based), the timestep it
    started from, the new point x and the clean image predicted at t (no second network call)."""

    index: int
    timestep: int
    x: torch.Tensor
    x0: torch.Tensor


StepCallback = Callable[[Step], None]
KeepKnown = Callable[[int, torch.Tensor], torch.Tensor] | None


def end_step(index: int, t: int, s: int, x_s: torch.Tensor, x0: torch.Tensor, keep_known: KeepKnown,
             callback: StepCallback | None) -> torch.Tensor:
    """What every sampler does after its step from t to s: inpainting's known pixels put back, then
    the callback told."""
    if keep_known is not None:
        x_s = keep_known(s, x_s)
    if callback is not None:
        callback(Step(index, t, x_s, x0))
    return x_s


def ddim_sigma(abar_t: float, abar_s: float, eta: float) -> float:
    """sigma_t(eta) for the step t -> s (eta = 1 is the DDPM posterior standard deviation)."""
    return eta * math.sqrt((1 - abar_s) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_s)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float) -> torch.Tensor:
    return (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)


def clipping_x0(eps_model: EpsModel, alphas_cumprod: torch.Tensor) -> EpsModel:
    """The noise model whose predicted x0 is clipped to [-1, 1] at every call, the noise recomputed
    from the clipped x0 (guided-diffusion's DDIM with clip_denoised; diffusers' clip_sample with
    use_clipped_model_output), so that every sampler steps with it. Not the paper's sampler (its code
    never clips); it keeps the samples of an under-trained model in range, where unclipped they
    saturate into flat colour and noise."""

    def clipped(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = eps_model(x, t)
        abar_t = float(alphas_cumprod[int(t[0])])  # every sampler calls with one timestep per batch
        x0 = predict_x0(x, eps, abar_t).clamp(-1, 1)
        return (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)

    return clipped


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    abar_t: float,
    abar_s: float,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_sample: bool = False,
) -> torch.Tensor:
    """The DDIM update (paper eq. 12) from x_t to x_s given the predicted noise eps.

        x0  = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z

    clip_sample clips x0 to [-1, 1] and keeps eps: diffusers' DDIMScheduler with clip_sample (its
    default for DDPM and DDIM pipelines), not the paper's update.
    """
    x0 = predict_x0(x_t, eps, abar_t)
    if clip_sample:
        x0 = x0.clamp(-1, 1)
    x_s = math.sqrt(abar_s) * x0 + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_s = x_s + sigma * noise
    return x_s


def standard_normal(like: torch.Tensor, generator: Generator) -> torch.Tensor:
    """N(0, I) noise shaped like `like`; a list of generators gives row b from generator[b].

    One generator per image makes each image's noise independent of the batch it is in.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        z = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    else:
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
        device = generator[0].device
        # Pinned host memory, so that the copy below does not wait for the GPU.
        z = torch.empty(like.shape, device=device, pin_memory=like.is_cuda and device.type == "cpu")
        for row, g in zip(z, generator):
            torch.randn(row.shape, generator=g, out=row)
    return z.to(device=like.device, dtype=like.dtype, non_blocking=True)


def _abar(alphas_cumprod: torch.Tensor, t: int) -> float:
    return 1.0 if t < 0 else float(alphas_cumprod[t])


def batch_timesteps(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def walk(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | Sequence[int]) -> list[tuple[int, int, float, float]]:
    """The steps of a sampler over increasing `timesteps`, walked downwards: (t, s, abar_t, abar_s)
    for each, the last one to s = -1, where abar = 1 (the clean image). Python floats: the loop
    never waits for the device."""
    taus = [int(t) for t in timesteps]
    pairs = zip(reversed(taus), reversed([-1] + taus[:-1]))
    return [(t, s, _abar(alphas_cumprod, t), _abar(alphas_cumprod, s)) for t, s in pairs]


@torch.no_grad()
def sample(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    *,
    generator: Generator = None,
    callback: StepCallback | None = None,
    keep_known: KeepKnown = None,
    eta: float = 0.0,
    sigma_hat: bool = False,
    clip_sample: bool = False,
) -> torch.Tensor:
    """Generate x_0 from x_T by walking `timesteps` (increasing) downwards with the DDIM update.

    eta = 0 is deterministic; eta = 1 uses the DDPM posterior variance. sigma_hat replaces sigma by
    the paper's larger DDPM variance sqrt(1 - abar_t / abar_s) (Table 1's last row). clip_sample:
    diffusers' clipped x0 with the network's own noise (ddim_step).
    keep_known(s, x_s), for inpainting, puts the known pixels back after each step to timestep s.
    callback(Step) runs after every step. Every sampler of samplers.SAMPLERS has this signature.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = x_T
    for i, (t, s, abar_t, abar_s) in enumerate(walk(alphas_cumprod, timesteps)):
        eps = eps_model(x, batch_timesteps(t, x)).to(x.dtype)
        if sigma_hat:
            sigma = math.sqrt(1 - abar_t / abar_s)
        else:
            sigma = ddim_sigma(abar_t, abar_s, eta)
        noise = standard_normal(x, generator) if sigma > 0 else None
        x0 = predict_x0(x, eps, abar_t) if callback is not None else None
        x = end_step(i, t, s, ddim_step(x, eps, abar_t, abar_s, sigma, noise, clip_sample), x0, keep_known, callback)
    return x


@torch.no_grad()
def invert(
    eps_model: EpsModel,
    x_0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Encode x_0 to x_T: the eta = 0 ODE integrated up the same `timesteps` that `sample` walks down.

    S network evaluations for S timesteps, each at the current point and its own timestep (the
    clean image counts as tau_1, which is 0 in both of the paper's schemes), never clipped.
    """
    taus = [int(t) for t in timesteps]
    x = x_0
    for i, (s, t) in enumerate(zip([-1] + taus[:-1], taus)):
        abar_s, abar_t = _abar(alphas_cumprod, s), _abar(alphas_cumprod, t)
        eps = eps_model(x, batch_timesteps(max(s, taus[0]), x)).to(x.dtype)
        x0 = predict_x0(x, eps, abar_s) if callback is not None else None
        x = ddim_step(x, eps, abar_s, abar_t)  # the same update, towards more noise
        if callback is not None:
            callback(Step(i, t, x, x0))
    return x


@torch.no_grad()
def invert_exact(
    eps_model: EpsModel,
    x_0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    tol: float = 1e-3,
    max_iters: int = 4,
    memory: int = 1,
    callback: StepCallback | None = None,
) -> tuple[torch.Tensor, int]:
    """Encode x_0 to the x_T that `sample` (eta = 0, same timesteps) decodes back to x_0.

    Each inversion step s -> t solves the implicit equation x_t = G(x_t), with G(x_t) = ddim_step(x_s,
    eps(x_t, t), abar_s, abar_t): the sampling step from (x_t, t) then lands exactly on x_s. It starts
    from the DDIM step with the noise extrapolated linearly in lambda = log(alpha / sigma) from the
    last two points, as a multistep predictor does (the plain Euler guess, the noise at s, for the
    first two steps); both are free. It iterates G with Anderson acceleration over the last `memory`
    iterates, per image, and stops when every image's root-mean-square change is below `tol` (on the
    [-1, 1] scale) or after `max_iters` network calls. Returns x_T and the network calls per image.
    """
    if max_iters < 1 or not tol >= 0:
        raise ValueError(f"exact inversion needs max_iters >= 1 and tol >= 0, got {max_iters} and {tol}")
    taus = [int(t) for t in timesteps]
    x = x_0
    eps = eps_model(x, batch_timesteps(taus[0], x)).to(x.dtype)
    evaluations = 1
    solved: list[tuple[float, torch.Tensor]] = []  # (lambda, noise) at the points reached so far
    for i, (s, t) in enumerate(zip([-1] + taus[:-1], taus)):
        abar_s, abar_t = _abar(alphas_cumprod, s), _abar(alphas_cumprod, t)
        guess = eps  # Euler: the noise predicted at the start point
        if len(solved) >= 2:
            (lam_1, eps_1), (lam_0, eps_0) = solved[-2:]
            guess = torch.lerp(eps_0, eps_1, (half_log_snr(abar_t) - lam_0) / (lam_1 - lam_0))  # extrapolated
        x_t = ddim_step(x, guess, abar_s, abar_t)
        tried, mapped = [], []
        for _ in range(max_iters):
            eps = eps_model(x_t, batch_timesteps(t, x_t)).to(x.dtype)
            evaluations += 1
            g = ddim_step(x, eps, abar_s, abar_t)
            if (g - x_t).pow(2).flatten(1).mean(1).sqrt().max() <= tol:
                x_t = g
                break
            tried, mapped = (tried + [x_t])[-memory - 1 :], (mapped + [g])[-memory - 1 :]
            x_t = anderson_step(tried, mapped)
        x = x_t
        solved.append((half_log_snr(abar_t), eps))
        if callback is not None:
            callback(Step(i, t, x, predict_x0(x, eps, abar_t)))
    return x, evaluations


def half_log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma), the time variable of the ODE's exact solvers."""
    return 0.5 * math.log(abar / (1 - abar))


def anderson_step(tried: list[torch.Tensor], mapped: list[torch.Tensor]) -> torch.Tensor:
    """The next iterate of Anderson-accelerated fixed-point iteration, per image (leading index):
    G(x_k) corrected by the combination of earlier differences that best cancels the residual
    G(x) - x. With one iterate it is plain iteration, x_{k+1} = G(x_k)."""
    if len(tried) < 2:
        return mapped[-1]
    b = tried[-1].shape[0]
    residuals = torch.stack([(g - x).reshape(b, -1) for x, g in zip(tried, mapped)], dim=2).double()
    outputs = torch.stack([g.reshape(b, -1) for g in mapped], dim=2).double()
    d_res, d_out = residuals.diff(dim=2), outputs.diff(dim=2)  # (B, D, m)
    gram = d_res.transpose(1, 2) @ d_res
    gram = gram + 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-30)[:, None, None] * torch.eye(
        gram.shape[1], dtype=gram.dtype
    )
    gamma = torch.linalg.solve(gram, d_res.transpose(1, 2) @ residuals[:, :, -1:])  # (B, m, 1)
    return (outputs[:, :, -1:] - d_out @ gamma).reshape(mapped[-1].shape).to(mapped[-1].dtype)


def noise_to(x_0: torch.Tensor, abar: float, noise: torch.Tensor) -> torch.Tensor:
    """A draw from q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given standard noise."""
    return math.sqrt(abar) * x_0 + math.sqrt(1 - abar) * noise


@torch.no_grad()
def edit(
    eps_model: EpsModel,
    x_0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    mask: torch.Tensor | None = None,
    *,
    generator: Generator = None,
    x_start: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    sample_fn: Callable[..., torch.Tensor] = sample,
    **options,
) -> torch.Tensor:
    """SDEdit (Meng et al.) and masked inpainting: start from x_0 noised to t0 = timesteps[-1] (or
    from `x_start`, e.g. its exact inversion) and walk `timesteps` down with `sample_fn` (DDIM, or any
    sampler of the same signature; `options` such as eta go to it).

    With a mask (1 = regenerate, 0 = keep, broadcast over channels), the kept pixels are replaced
    after every step by x_0 noised to that step's timestep, and by x_0 itself at the end.
    """
    taus = [int(t) for t in timesteps]
    if not taus:
        return x_0.clone()
    x = x_start if x_start is not None else noise_to(x_0, _abar(alphas_cumprod, taus[-1]), standard_normal(x_0, generator))
    keep_known = None
    if mask is not None:
        def keep_known(s: int, x_s: torch.Tensor) -> torch.Tensor:
            known = x_0 if s < 0 else noise_to(x_0, _abar(alphas_cumprod, s), standard_normal(x_0, generator))
            return torch.lerp(known, x_s, mask)
    return sample_fn(eps_model, x, alphas_cumprod, taus, generator=generator, callback=callback, keep_known=keep_known, **options)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between latents a and b (per leading index), as in the paper."""
    a_flat, b_flat = a.flatten(1).double(), b.flatten(1).double()
    cos = (a_flat * b_flat).sum(1) / (a_flat.norm(dim=1) * b_flat.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    near = sin.abs() < 1e-6  # (anti)parallel latents: fall back to a straight line
    safe_sin = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1 - alpha, torch.sin((1 - alpha) * theta) / safe_sin)
    wb = torch.where(near, torch.full_like(sin, alpha), torch.sin(alpha * theta) / safe_sin)
    out = wa[:, None] * a_flat + wb[:, None] * b_flat
    return out.reshape(a.shape).to(a.dtype)
