"""The noise schedule's vocabulary, which models, training, export and sampling all speak: the
schedule (betas and abar over T train steps), what a network predicts and how each prediction turns
into the noise, and the paper's timestep sub-sequences. No sampling maths here (that is ddim.py's).

Conventions: train timesteps are 0-based (0..T-1); `alphas_cumprod[t]` is abar_t = prod_{s<=t}
(1 - beta_s) in float64; a sub-sequence tau is increasing, tau_1 < ... < tau_S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The paper's two timestep sub-sequences (section 4.2, Appendix D.2): the choices a model's default
# DDIM skip is made from (a registry entry's, a run's). choices.SKIP_SCHEMES has the later ones too.
PAPER_SKIPS = ("uniform", "quad")




# The noise schedules of the DDPM family, by their diffusers names: linear (every public DDPM
# checkpoint), scaled_linear (linear in sqrt(beta)), squaredcos_cap_v2 (the cosine alpha-bar of Nichol &
# Dhariwal, betas capped at 0.999; improved-diffusion's "cosine"), sigmoid (GeoDiff's), laplace (diffusers'
# DDPMScheduler); and TRAINED: betas given one by one (diffusers' trained_betas).
SCHEDULE_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
TRAINED = "trained"


@dataclass(frozen=True)
class Schedule:
    """A noise schedule over train_steps (T) steps: `kind` of SCHEDULE_KINDS, between beta_start and
    beta_end where the kind has them (the cosine and laplace schedules have none; "trained" has its T
    betas in trained_betas)."""

    train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    kind: str = "linear"
    trained_betas: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in (*SCHEDULE_KINDS, TRAINED):
            raise ValueError(f"unknown schedule kind {self.kind!r}; use one of {', '.join(SCHEDULE_KINDS)}")
        if not (self.train_steps >= 1 and 0 < self.beta_start <= self.beta_end < 1):
            raise ValueError(f"a schedule needs T >= 1 and 0 < beta_start <= beta_end < 1, got {self}")
        if (self.kind == TRAINED) != (self.trained_betas is not None):
            raise ValueError("trained betas go with the schedule kind 'trained', and only with it")
        if self.trained_betas is not None:
            betas = tuple(self.trained_betas)
            if len(betas) != self.train_steps or not all(0 < b < 1 for b in betas):
                raise ValueError(f"trained betas must be {self.train_steps} numbers in (0, 1), one per training "
                                 f"step; got {len(betas)}")
            object.__setattr__(self, "trained_betas", betas)

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        trained = d.get("trained_betas")
        return cls(int(d["train_steps"]), float(d["beta_start"]), float(d["beta_end"]), d.get("kind", "linear"),
                   tuple(float(b) for b in trained) if trained is not None else None)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "train_steps": self.train_steps, "beta_start": self.beta_start, "beta_end": self.beta_end}
        return {**d, "trained_betas": list(self.trained_betas)} if self.trained_betas is not None else d

    def betas(self) -> torch.Tensor:
        T, start, end = self.train_steps, self.beta_start, self.beta_end
        if self.kind == "scaled_linear":
            return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
        if self.kind == "squaredcos_cap_v2":
            return cosine_betas(T)
        if self.kind == "laplace":
            return laplace_betas(T)
        if self.kind == "sigmoid":
            return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start
        if self.kind == TRAINED:
            return torch.tensor(self.trained_betas, dtype=torch.float64)
        return linear_betas(T, start, end)

    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod(self.betas())


def linear_betas(train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, train_steps, dtype=torch.float64)


def cosine_betas(train_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: abar(u) = cos((u + 0.008) / 1.008 * pi / 2)^2 on u = t / T,
    each beta 1 - abar(u_{t+1}) / abar(u_t), capped at max_beta."""
    u = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
    abar = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def laplace_betas(train_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' laplace schedule: log-SNR lambda(u) = -sign(1/2 - u) log(1 - 2 |1/2 - u| + 1e-6) / 2
    on u = t / T, its function f(u) = sqrt(sigmoid(lambda)) in the place of abar, each beta
    1 - f(u_{t+1}) / f(u_t), capped at max_beta."""
    u = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
    sign = torch.where(0.5 - u >= 0, 1.0, -1.0)
    lam = -0.5 * sign * torch.log(1 - 2 * (0.5 - u).abs() + 1e-6)
    f = torch.sigmoid(lam).sqrt()
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


def timestep_sequence(steps: int, train_steps: int, scheme: str = "uniform") -> torch.Tensor:
    """The paper's sub-sequence tau (increasing, tau_1 = 0), without duplicates.

    uniform: tau_i = floor(i T / S), i = 0..S-1: exactly S steps, the last close to T for every S
    (naive code walks S + 1 steps when S does not divide T, or starts far below T).
    quad: int(linspace(0, sqrt(0.8 T), S)[i] ** 2) with numpy's linspace rounding, as in the authors'
    code; its int cast repeats early timesteps (S = 50 gives 49 distinct), and a repeated timestep is
    a no-op step, so repeats are dropped.
    """
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be between 1 and {train_steps}, got {steps}")
    if scheme == "uniform":
        return torch.arange(steps, dtype=torch.long) * train_steps // steps
    if scheme == "quad":
        return torch.unique(_numpy_linspace(math.sqrt(0.8 * train_steps), steps).pow(2).long())  # sorted
    raise ValueError(f"unknown skip scheme {scheme!r}; use one of {', '.join(PAPER_SKIPS)}")


def _numpy_linspace(stop: float, num: int) -> torch.Tensor:
    """numpy.linspace(0, stop, num) bit for bit (i * step, the end set exactly); torch.linspace rounds
    differently, which moves quad timesteps by one at about 200 values of S."""
    points = torch.arange(num, dtype=torch.float64) * (stop / max(num - 1, 1))
    if num > 1:
        points[-1] = stop
    return points


PREDICTIONS = ("epsilon", "sample", "v_prediction")  # what a network predicts, by diffusers' names


def noise_from_prediction(prediction: str, x_t: torch.Tensor, output: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The noise eps that a network's output stands for, whatever it predicts: epsilon itself, the
    clean image ("sample": x_t = sqrt(abar) x0 + sqrt(1 - abar) eps), or v = sqrt(abar) eps -
    sqrt(1 - abar) x0 ("v_prediction"). abar_t broadcasts against x_t (one value per row)."""
    if prediction == "epsilon":
        return output
    if prediction == "sample":
        return (x_t - abar_t.sqrt() * output) / (1 - abar_t).sqrt()
    if prediction == "v_prediction":
        return abar_t.sqrt() * output + (1 - abar_t).sqrt() * x_t
    raise ValueError(f"unknown prediction {prediction!r}")


def prediction_target(prediction: str, x_0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """What a network predicting `prediction` should output for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps:
    the training target that noise_from_prediction inverts."""
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x_0
    if prediction == "v_prediction":
        return abar_t.sqrt() * noise - (1 - abar_t).sqrt() * x_0
    raise ValueError(f"unknown prediction {prediction!r}")
