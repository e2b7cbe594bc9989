"""The fast solvers against diffusers' schedulers, the papers' formulas and their convergence orders.

diffusers is driven over exactly ddimctl's timesteps (its noise levels overwritten with ddimctl's
float64 schedule), so both sides compute the same numbers: on the mixture predictor in float64 they
agree to 1e-8 (rounding of the two formulations, amplified by the mixture's sharp modes); on the trained digits model in float32 to float precision.
"""

import numpy as np
import pytest
import torch
from gaussian import GaussianEps, MixtureEps

from ddimctl.sampling import samplers, solvers
from ddimctl import schedule
from ddimctl.bench import follow_grid

ABAR = schedule.alphas_cumprod(schedule.linear_betas())
MIX = MixtureEps(ABAR, [0.3, 0.7], [-0.6, 0.4], [0.1, 0.15])
COMMON = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def on_grid(scheduler, descending: list[int]):
    return follow_grid(scheduler, descending, ABAR)


def run_scheduler(scheduler, eps_model, x, states=None):
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
        if states is not None:
            states.append(x)
    return x


def dpm_scheduler(order: int, descending: list[int]):
    import diffusers

    return on_grid(diffusers.DPMSolverMultistepScheduler(
        **COMMON, solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
        final_sigmas_type="zero", lower_order_final=True), descending)


def unipc_scheduler(variant: str, descending: list[int]):
    import diffusers

    return on_grid(diffusers.UniPCMultistepScheduler(
        **COMMON, solver_order=2, solver_type=variant, final_sigmas_type="zero", lower_order_final=True), descending)


def pndm_scheduler(n: int):
    import diffusers

    s = diffusers.PNDMScheduler(**COMMON, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=0,
                                timestep_spacing="leading")
    s.set_timesteps(n)
    s.alphas_cumprod = ABAR.clone()
    return s


def descending(tau) -> list[int]:
    return [int(t) for t in reversed(tau)]


@pytest.fixture(scope="module")
def digits_eps():
    """The trained digits model in float64: a real denoiser, without float32's rounding noise,
    which a 25-step trajectory amplifies to about 1e-5."""
    from ddimctl.models.loading import load_model

    unet = load_model("digits").unet.double()

    def eps(x, t):
        with torch.no_grad():
            return unet(x, t)

    return eps


def digits_noise(n=2):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# --- equal to diffusers --------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5, 7, 10, 14, 20, 37])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_equals_diffusers_on_the_mixture(steps, order):
    x_T = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    tau = schedule.timestep_sequence(steps, 1000, "uniform")
    seen = []
    ours = solvers.dpmpp_multistep(MIX, x_T, ABAR, tau, order=order, callback=lambda step: seen.append(step.x))
    scheduler, x = dpm_scheduler(order, descending(tau)), x_T.clone()
    states = []
    for t in scheduler.timesteps:
        x = scheduler.step(MIX(x, torch.full((200,), int(t))), t, x).prev_sample
        states.append(x)
    # diffusers' DPM scheduler computes each step in float32 whatever the input: float32 precision
    if order == 3 and steps >= 15:
        # A documented difference: diffusers keeps order 3 at the second-to-last step from 15 steps
        # up; ddimctl follows the rule of the UniPC authors' code (and diffusers' own UniPC): the
        # order is at most the steps left, at any S, so that step is second order. Every step
        # before it agrees; from there on the results differ.
        assert all(float((a - b).abs().max()) < 1e-5 for a, b in zip(seen[:-2], states[:-2]))
        assert float((seen[-2] - states[-2]).abs().max()) > 1e-4
        return
    assert float((ours - states[-1]).abs().max()) < 1e-5


@pytest.mark.parametrize("steps", [3, 10, 25])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_equals_diffusers_on_the_digits_model(digits_eps, steps, order):
    tau = schedule.timestep_sequence(steps, 1000, "quad")  # non-uniform spacing too
    x_T = digits_noise()
    seen, states = [], []
    ours = solvers.dpmpp_multistep(digits_eps, x_T, ABAR, tau, order=order, callback=lambda step: seen.append(step.x))
    ref = run_scheduler(dpm_scheduler(order, descending(tau)), digits_eps, x_T.clone(), states)
    if order == 3 and len(tau) >= 15:  # the second-to-last step's order differs (above)
        assert all(float((a - b).abs().max()) < 1e-5 for a, b in zip(seen[:-2], states[:-2]))
        assert float((seen[-2] - states[-2]).abs().max()) > 1e-4
        return
    assert float((ours - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("steps", [1, 2, 5, 7, 10, 20, 37])
def test_unipc_equals_diffusers_on_the_mixture(steps):
    x_T = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    tau = schedule.timestep_sequence(steps, 1000, "uniform")
    ours = solvers.sample_unipc(MIX, x_T, ABAR, tau)
    ref = run_scheduler(unipc_scheduler("bh2", descending(tau)), MIX, x_T.clone())
    assert float((ours - ref).abs().max()) < 1e-8


def test_unipc_bh1_equals_diffusers_until_its_last_step():
    """diffusers' bh1 turns the last step into NaN (B(h) = h is infinite at sigma = 0, times a zero
    correction); up to there it agrees with ours, whose last step is the clean-image prediction."""
    x_T = torch.randn(100, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tau = schedule.timestep_sequence(8, 1000, "uniform")
    seen = []
    ours = solvers.sample_unipc(MIX, x_T, ABAR, tau, variant="bh1", callback=lambda step: seen.append(step.x))
    scheduler, x = unipc_scheduler("bh1", descending(tau)), x_T.clone()
    for i, t in enumerate(scheduler.timesteps[:-1]):
        x = scheduler.step(MIX(x, torch.full((100,), int(t))), t, x).prev_sample
        assert float((x - seen[i]).abs().max()) < 1e-8, i
    assert torch.isfinite(ours).all()
    bh2 = solvers.sample_unipc(MIX, x_T, ABAR, tau, variant="bh2")
    assert float((ours - bh2).abs().max()) > 1e-4  # the variants are different methods


def test_unipc_equals_diffusers_on_the_digits_model(digits_eps):
    tau = schedule.timestep_sequence(10, 1000, "uniform")
    x_T = digits_noise()
    ours = solvers.sample_unipc(digits_eps, x_T, ABAR, tau)
    ref = run_scheduler(unipc_scheduler("bh2", descending(tau)), digits_eps, x_T.clone())
    assert float((ours - ref).abs().max()) < 1e-8


@pytest.mark.parametrize("n", [1, 2, 4, 10, 20, 50])
def test_plms_equals_diffusers_pndm_skip_prk(n):
    """PNDMScheduler assumes evenly spaced timesteps, T // n apart: n that divide T = 1000."""
    x_T = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    calls = []

    def counted(x, t):
        calls.append(int(t[0]))
        return MIX(x, t)

    ours = solvers.sample_plms(counted, x_T, ABAR, schedule.timestep_sequence(n, 1000, "uniform"))
    ours_calls, calls[:] = list(calls), []
    ref = run_scheduler(pndm_scheduler(n), counted, x_T.clone())
    assert float((ours - ref).abs().max()) < 1e-8
    assert ours_calls == calls and len(calls) == (n + 1 if n > 1 else 1)


def test_plms_on_the_digits_model_equals_diffusers(digits_eps):
    x_T = digits_noise()
    ours = solvers.sample_plms(digits_eps, x_T, ABAR, schedule.timestep_sequence(10, 1000, "uniform"))
    ref = run_scheduler(pndm_scheduler(10), digits_eps, x_T.clone())
    assert float((ours - ref).abs().max()) < 1e-8


def paper_multistep(eps_model, x, taus, plms: bool):
    """PLMS / iPNDM written from the papers' equations, independently of solvers.py: the pseudo
    numerical transfer phi(x, e, t -> s) of PNDM eq. (11) and the linear multistep coefficients."""
    coefficients = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}
    divisors = {1: 1, 2: 2, 3: 12, 4: 24}

    def phi(x, e, t, s):
        a_t, a_s = float(ABAR[t]), (float(ABAR[s]) if s >= 0 else 1.0)
        return (a_s / a_t) ** 0.5 * x - (a_s - a_t) / (a_t * (1 - a_s) ** 0.5 + (a_t * (1 - a_t) * a_s) ** 0.5) * e

    ts = list(reversed(taus)) + [-1]
    history = []
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        e = eps_model(x, torch.full((x.shape[0],), t))
        history.insert(0, e)
        if plms and i == 0 and s >= 0:
            e2 = eps_model(phi(x, e, t, s), torch.full((x.shape[0],), s))
            combined = (e + e2) / 2
        else:
            k = min(len(history), 4)
            combined = sum(c * h for c, h in zip(coefficients[k], history)) / divisors[k]
        x = phi(x, combined, t, s)
    return x


@pytest.mark.parametrize("steps", [1, 3, 7, 33])
@pytest.mark.parametrize("name", ["plms", "ipndm"])
def test_plms_and_ipndm_follow_the_papers_formulas_on_any_grid(steps, name):
    x_T = torch.randn(100, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for scheme in ("uniform", "quad"):
        tau = schedule.timestep_sequence(steps, 1000, scheme)
        ours = samplers.SAMPLERS[name].function(MIX, x_T, ABAR, tau)
        paper = paper_multistep(MIX, x_T, tau.tolist(), plms=name == "plms")
        assert float((ours - paper).abs().max()) < 1e-8, scheme


# --- properties shared by every sampler -----------------------------------------------------


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_ends_at_the_clean_image_and_calls_once_per_step(name):
    """With an exact predictor for data concentrated at one point, every sampler must land on it
    (the last step is to abar = 1, not abar_0); S timesteps cost S calls (PLMS S + 1)."""
    point = torch.tensor([0.3, -0.7, 0.1, 0.9], dtype=torch.float64)
    eps_model = GaussianEps(ABAR, point, torch.full((4,), 1e-9, dtype=torch.float64))
    tau = schedule.timestep_sequence(6, 1000, "uniform")
    steps_seen = []
    out = samplers.SAMPLERS[name].function(eps_model, torch.randn(3, 4, dtype=torch.float64), ABAR, tau,
                                           callback=steps_seen.append)
    torch.testing.assert_close(out, point.expand(3, 4), atol=1e-6, rtol=0)
    assert [s.timestep for s in steps_seen] == descending(tau)
    assert len(eps_model.calls) == len(tau) + samplers.SAMPLERS[name].extra_calls
    torch.testing.assert_close(steps_seen[-1].x0, point.expand(3, 4), atol=1e-6, rtol=0)  # the callback's x0


def state_at(name: str, x_T: torch.Tensor, steps: int, stop: int) -> torch.Tensor:
    """x after the step that lands on timestep `stop`, on the grid 0, 960 / (steps - 1), ..., 960:
    every grid starts at the same timestep and holds `stop`, so errors measure the solver alone
    (the paper's grids start at T - T / S, an O(1 / S) difference of their own)."""
    grid = torch.arange(steps) * (960 // (steps - 1))
    seen = {}
    samplers.SAMPLERS[name].function(MIX, x_T, ABAR, grid, callback=lambda step: seen.update({step.timestep: step.x}))
    above = grid.tolist()[grid.tolist().index(stop) + 1]
    return seen[above]


def test_convergence_orders_on_the_mixture():
    """Error at t = 480 against the solution on every timestep (961 steps of 3M), S = 17 -> 33 -> 65:
    slope ~1 for DDIM, ~2 for 2M, ~3 for UniPC (its corrector adds an order); 3M's first step is
    first order (no history yet), which caps it near 2.3 here. Pinned loosely."""
    x_T = torch.randn(400, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = state_at("dpm++3m", x_T, 961, 480)
    errors_of = {name: [float((state_at(name, x_T, steps, 480) - exact).abs().mean()) for steps in (17, 33, 65)]
                 for name in ("ddim", "dpm++2m", "unipc", "dpm++3m", "ipndm")}
    slopes = {name: float(np.log2(errors[0] / errors[-1]) / 2) for name, errors in errors_of.items()}
    assert 0.8 < slopes["ddim"] < 1.2, slopes
    assert 1.7 < slopes["dpm++2m"] < 2.3, slopes
    assert 2.5 < slopes["unipc"] < 3.3, slopes
    assert 2.1 < slopes["dpm++3m"] < 3.5, slopes
    # iPNDM is already at ~1e-5 from S = 17 (fourth order once warmed up), too close to the
    # reference's own error for a clean slope: its errors stay far below DDIM's instead.
    assert all(errors_ipndm < errors_ddim / 20 for errors_ipndm, errors_ddim in zip(errors_of["ipndm"], errors_of["ddim"]))


def test_every_sampler_has_the_one_signature():
    """samplers.SamplerFunction: the same positional tensors and keyword-only hooks for every row."""
    import inspect

    from ddimctl.sampling import samplers

    for name, spec in samplers.SAMPLERS.items():
        params = inspect.signature(spec.function).parameters
        assert list(params)[:4] == ["eps_model", "x_T", "alphas_cumprod", "timesteps"], name
        for hook in ("generator", "callback", "keep_known"):
            assert params[hook].kind is inspect.Parameter.KEYWORD_ONLY and params[hook].default is None, (name, hook)
