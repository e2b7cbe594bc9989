"""Higher-order solvers of the probability-flow ODE that DDIM (eta = 0) solves to first order, on the
model's own discrete timesteps, as small pure functions with ddim.sample's signature.

Notation (reference/solvers.md): at timestep t, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
and lambda_t = log(alpha_t / sigma_t); the walk ends at abar = 1 (sigma = 0, lambda = infinity),
where every solver returns its clean-image prediction, as ddim.sample does. Each step costs one
network call (PLMS's first step two). Every update is a fixed linear combination of the current
point and earlier predictions; its coefficients depend only on the timesteps, so they are Python
floats (float64) computed before any tensor work: nothing in the loop waits for the device.

- DPM-Solver++ (Lu et al. 2022), multistep, data prediction, order 2 (2M) and 3 (3M);
- UniPC (Zhao et al. 2023): the UniP predictor and the UniC corrector, order 2, B(h) = e^h - 1
  ("bh2", diffusers' default) or B(h) = h ("bh1");
- PLMS (Liu et al. 2022, PNDM with its Runge-Kutta warm-up replaced as diffusers' skip_prk_steps) and
  iPNDM (Zhang & Chen 2023): Adams-Bashforth combinations of the predicted noise, each applied with
  the DDIM transfer step.

Multistep orders are lowered at the start (no history yet) and, for DPM-Solver++ and UniPC, at the
end (the order is at most the number of steps left, so the last step, to sigma = 0, is first
order: its higher-order terms are undefined there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .ddim import (
    EpsModel,
    Generator,
    KeepKnown,
    StepCallback,
    batch_timesteps,
    end_step,
    half_log_snr,
    predict_x0,
    walk,
)


@dataclass(frozen=True)
class Level:
    """The noise level of a timestep: alpha, sigma and lambda = log(alpha / sigma)."""

    abar: float

    @property
    def alpha(self) -> float:
        return math.sqrt(self.abar)

    @property
    def sigma(self) -> float:
        return math.sqrt(1.0 - self.abar)

    @property
    def lam(self) -> float:
        return math.inf if self.abar >= 1.0 else half_log_snr(self.abar)


def combine(terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum(c * x) for float coefficients c: a fresh tensor, no device synchronisation."""
    (c0, x0), *rest = terms
    out = x0 * c0
    for c, x in rest:
        out.add_(x, alpha=c)
    return out


# --------------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D, where D
# extrapolates the clean-image predictions m0 (at s), m1, m2 (earlier) in lambda.


def dpmpp_coefficients(cur: Level, nxt: Level, earlier: Sequence[Level], order: int) -> tuple[float, list[float]]:
    """(c_x, [c_m0, c_m1, ...]) with x_next = c_x x + sum c_mj m_j, for the step cur -> nxt using
    `order` - 1 earlier levels (newest first). Lu et al. 2022, eq. (3.4) and Algorithm 2; the third
    order term as in their multistep code."""
    if nxt.sigma == 0.0:  # abar = 1: x_next is the prediction itself (e^-h = 0)
        return 0.0, [1.0]
    h = nxt.lam - cur.lam
    phi1 = math.expm1(-h)  # e^-h - 1
    c_x, c_m0 = nxt.sigma / cur.sigma, -nxt.alpha * phi1
    if order == 1:
        return c_x, [c_m0]
    r0 = (cur.lam - earlier[0].lam) / h
    if order == 2:  # D = m0 + (m0 - m1) / (2 r0)
        return c_x, [c_m0 * (1 + 0.5 / r0), -c_m0 * 0.5 / r0]
    r1 = (earlier[0].lam - earlier[1].lam) / h
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1; D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)
    a, b = nxt.alpha * phi2, -nxt.alpha * phi3  # x += a D1 + b D2
    w = r0 / (r0 + r1)
    d1 = [(1 + w) / r0, -(1 + w) / r0 - w / r1, w / r1]  # D1 in m0, m1, m2
    d2 = [1 / (r0 * (r0 + r1)), -1 / (r0 * (r0 + r1)) - 1 / (r1 * (r0 + r1)), 1 / (r1 * (r0 + r1))]
    return c_x, [c_m0 + a * d1[0] + b * d2[0], a * d1[1] + b * d2[1], a * d1[2] + b * d2[2]]


def dpmpp_multistep(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    *,
    order: int,
    generator: Generator = None,
    callback: StepCallback | None = None,
    keep_known: KeepKnown = None,
) -> torch.Tensor:
    """DPM-Solver++ multistep of the given order; step i uses order min(order, i + 1, steps left)."""
    steps = walk(alphas_cumprod, timesteps)
    levels = [Level(abar_t) for _, _, abar_t, _ in steps] + [Level(1.0)]
    plan = [dpmpp_coefficients(levels[i], levels[i + 1], levels[i - 1 :: -1] if i else [],
                               min(order, i + 1, len(steps) - i)) for i in range(len(steps))]
    x, predictions = x_T, []  # clean-image predictions, newest first
    for i, (t, s, abar_t, _) in enumerate(steps):
        x0 = predict_x0(x, eps_model(x, batch_timesteps(t, x)).to(x.dtype), abar_t)
        predictions = [x0, *predictions[: order - 1]]
        c_x, c_m = plan[i]
        x = end_step(i, t, s, combine([(c_x, x), *zip(c_m, predictions)]), x0, keep_known, callback)
    return x


def sample_dpmpp_2m(eps_model, x_T, alphas_cumprod, timesteps, *, generator=None, callback=None, keep_known=None):
    """DPM-Solver++(2M): second-order multistep, data prediction (Lu et al. 2022)."""
    return dpmpp_multistep(eps_model, x_T, alphas_cumprod, timesteps, order=2, callback=callback, keep_known=keep_known)


def sample_dpmpp_3m(eps_model, x_T, alphas_cumprod, timesteps, *, generator=None, callback=None, keep_known=None):
    """DPM-Solver++(3M): third-order multistep, data prediction (Lu et al. 2022)."""
    return dpmpp_multistep(eps_model, x_T, alphas_cumprod, timesteps, order=3, callback=callback, keep_known=keep_known)


# --------------------------------------------------------------------------------------------
# UniPC (data prediction, order 2). With hh = -h, B(h) = e^hh - 1 (bh2) or hh (bh1):
#   UniP:  x_next = (sigma_n / sigma_c) x - alpha_n (e^hh - 1) m0 - alpha_n B(h) rho (m1 - m0) / r1
#   UniC:  the same step again once m_next is known: ... - alpha_n B(h) (sum rho_k D_k + rho_c (m_next - m0))
# with r1 = (lambda_1 - lambda_c) / h for the earlier point, rho = 1/2 for the order-2 predictor and
# the corrector's rho from R rho = b, R_ij = r_j^i, b_i = i! h phi_{i+1}(hh) / B(h) (Zhao et al., Alg. 1-2).


def _unipc_b(h: float, order: int, variant: str) -> tuple[float, list[float]]:
    """B(h) and b_1..b_order."""
    hh = -h
    big_b = math.expm1(hh) if variant == "bh2" else hh
    phi = math.expm1(hh) / hh - 1.0  # h phi_2(hh), then the next ones by the recurrence
    b, factorial = [], 1
    for i in range(1, order + 1):
        b.append(phi * factorial / big_b)
        factorial *= i + 1
        phi = phi / hh - 1.0 / factorial
    return big_b, b


def unipc_predictor(cur: Level, nxt: Level, earlier: Sequence[Level], order: int, variant: str) -> tuple[float, list[float]]:
    """(c_x, [c_m0, c_m1]) of UniP of order 1 or 2."""
    if nxt.sigma == 0.0:
        return 0.0, [1.0]
    h = nxt.lam - cur.lam
    c_x, c_m0 = nxt.sigma / cur.sigma, -nxt.alpha * math.expm1(-h)
    if order == 1:
        return c_x, [c_m0]
    big_b, _ = _unipc_b(h, order, variant)
    r1 = (earlier[0].lam - cur.lam) / h
    k = -nxt.alpha * big_b * 0.5 / r1  # x += k (m1 - m0)
    return c_x, [c_m0 - k, k]


def unipc_corrector(cur: Level, nxt: Level, earlier: Sequence[Level], order: int, variant: str) -> tuple[float, list[float]]:
    """(c_x, [c_m_next, c_m0, c_m1]) of UniC of order 1 or 2 for the step cur -> nxt, given the
    prediction m_next made at nxt."""
    h = nxt.lam - cur.lam
    big_b, b = _unipc_b(h, order, variant)
    c_x, c_m0 = nxt.sigma / cur.sigma, -nxt.alpha * math.expm1(-h)
    scale = -nxt.alpha * big_b
    if order == 1:
        rho_next = 0.5
        return c_x, [scale * rho_next, c_m0 - scale * rho_next, 0.0]
    r1 = (earlier[0].lam - cur.lam) / h
    # R = [[1, 1], [r1, 1]], R (rho_1, rho_next) = (b_1, b_2)
    rho_1 = (b[0] - b[1]) / (1.0 - r1)
    rho_next = b[0] - rho_1
    k = scale * rho_1 / r1  # x += k (m1 - m0)
    return c_x, [scale * rho_next, c_m0 - scale * rho_next - k, k]


def sample_unipc(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    *,
    generator: Generator = None,
    callback: StepCallback | None = None,
    keep_known: KeepKnown = None,
    variant: str = "bh2",
) -> torch.Tensor:
    """UniPC, order 2: each step's result is corrected with the network call the next step makes
    anyway, so it costs one call per step; the last step (to abar = 1) has no corrector."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be bh1 or bh2, got {variant!r}")
    order = 2
    steps = walk(alphas_cumprod, timesteps)
    levels = [Level(abar_t) for _, _, abar_t, _ in steps] + [Level(1.0)]
    orders = [min(order, i + 1, len(steps) - i) for i in range(len(steps))]
    earlier = [levels[i - 1 :: -1] if i else [] for i in range(len(steps))]
    predictors = [unipc_predictor(levels[i], levels[i + 1], earlier[i], orders[i], variant) for i in range(len(steps))]
    correctors = [unipc_corrector(levels[i], levels[i + 1], earlier[i], orders[i], variant) for i in range(len(steps) - 1)]
    x, start, predictions = x_T, x_T, []  # start: the point the last step left from
    for i, (t, s, abar_t, _) in enumerate(steps):
        x0 = predict_x0(x, eps_model(x, batch_timesteps(t, x)).to(x.dtype), abar_t)
        if i > 0:  # correct the previous step with this prediction; x0 stays the predictor's
            c_x, (c_next, *c_m) = correctors[i - 1]
            x = combine([(c_x, start), (c_next, x0), *zip(c_m, predictions)])
        predictions = [x0, *predictions[: order - 1]]
        start = x
        c_x, c_m = predictors[i]
        x = end_step(i, t, s, combine([(c_x, x), *zip(c_m, predictions)]), x0, keep_known, callback)
    return x


# --------------------------------------------------------------------------------------------
# PLMS and iPNDM: linear multistep in the predicted noise, e' = sum w_j eps_j (newest first),
# then the DDIM transfer x_s = sqrt(abar_s) x0(x_t, e') + sqrt(1 - abar_s) e'.

ADAMS_BASHFORTH = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def transfer(x_t: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_s: float) -> torch.Tensor:
    """The DDIM (eta = 0) step from t to s with noise eps, PNDM's transfer part."""
    c_x = math.sqrt(abar_s / abar_t)
    c_e = math.sqrt(1.0 - abar_s) - math.sqrt(abar_s * (1.0 - abar_t) / abar_t)
    return combine([(c_x, x_t), (c_e, eps)])


def _multistep_eps(
    eps_model, x_T, alphas_cumprod, timesteps, callback, keep_known, pseudo_heun_start: bool
) -> torch.Tensor:
    steps = walk(alphas_cumprod, timesteps)
    x, history = x_T, []  # network outputs, newest first
    for i, (t, s, abar_t, abar_s) in enumerate(steps):
        eps = eps_model(x, batch_timesteps(t, x)).to(x.dtype)
        history = [eps, *history[:3]]
        if i == 0 and pseudo_heun_start and s >= 0:
            # PLMS's first step: the average of the noise at both ends, the end point from an Euler step.
            ahead = eps_model(transfer(x, eps, abar_t, abar_s), batch_timesteps(s, x)).to(x.dtype)
            combined = (eps + ahead) / 2
        else:
            combined = combine(list(zip(ADAMS_BASHFORTH[len(history) - 1], history)))
        x0 = predict_x0(x, combined, abar_t)
        x = end_step(i, t, s, transfer(x, combined, abar_t, abar_s), x0, keep_known, callback)
    return x


def sample_plms(eps_model, x_T, alphas_cumprod, timesteps, *, generator=None, callback=None, keep_known=None):
    """PLMS (Liu et al. 2022) as diffusers' PNDMScheduler(skip_prk_steps=True): a first step with
    two network calls (the noise averaged over both ends), then Adams-Bashforth of order 2, 3 and 4
    in the noise. len(timesteps) + 1 network calls (one when there is a single timestep)."""
    return _multistep_eps(eps_model, x_T, alphas_cumprod, timesteps, callback, keep_known, pseudo_heun_start=True)


def sample_ipndm(eps_model, x_T, alphas_cumprod, timesteps, *, generator=None, callback=None, keep_known=None):
    """iPNDM (Zhang & Chen 2023, improved PNDM): Adams-Bashforth in the noise of order 1, 2, 3 at
    the first steps and 4 after, one network call per step."""
    return _multistep_eps(eps_model, x_T, alphas_cumprod, timesteps, callback, keep_known, pseudo_heun_start=False)
