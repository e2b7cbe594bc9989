"""The sampler against closed-form answers: Gaussian and Gaussian-mixture data with exact noise predictors."""

import math

import pytest
import torch
from gaussian import GaussianEps, MixtureEps

from ddimctl.sampling import ddim
from ddimctl import schedule

ABAR = schedule.alphas_cumprod(schedule.linear_betas())
MU = torch.tensor([0.5, -0.3, 0.0, 0.2], dtype=torch.float64)
STD = torch.tensor([0.2, 0.1, 0.5, 0.05], dtype=torch.float64)


def gaussian_error(x: torch.Tensor) -> float:
    """Distance between the sample's per-coordinate mean/std and the data's."""
    return float(((x.mean(0) - MU) ** 2 + (x.std(0) - STD) ** 2).sum().sqrt())


def mixture_ks(mix: MixtureEps, x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between samples and the mixture's exact CDF."""
    x = torch.sort(x)[0]
    n = len(x)
    cdf = (mix.w * 0.5 * (1 + torch.erf((x[:, None] - mix.m) / (mix.s * math.sqrt(2))))).sum(1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


# --- schedule and timestep sequences -------------------------------------------------------


def test_linear_schedule_matches_ddpm():
    betas = schedule.linear_betas()
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    abar = schedule.alphas_cumprod(betas)
    assert abar[0] == pytest.approx(1 - 1e-4)
    assert abar[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # DDPM's abar_T
    assert (abar[1:] < abar[:-1]).all()


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 333, 999, 1000])
def test_uniform_has_exactly_s_steps(steps):
    tau = schedule.timestep_sequence(steps, 1000, "uniform")
    assert len(tau) == steps
    assert tau[0] == 0 and tau[-1] < 1000
    assert (tau[1:] > tau[:-1]).all()
    assert tau[-1] > 1000 - 1000 / steps - 1  # the last step close to T for every S (App. D)


def test_every_sequence_matches_an_independent_construction():
    """All S from 1 to T: uniform is floor(i T / S) in Python integers; quad is the authors' numpy
    expression, duplicates dropped."""
    import numpy as np

    T = 1000
    for steps in range(1, T + 1):
        uniform = [i * T // steps for i in range(steps)]
        quad = sorted({int(s) for s in np.linspace(0, np.sqrt(0.8 * T), steps) ** 2})
        assert schedule.timestep_sequence(steps, T, "uniform").tolist() == uniform, steps
        assert schedule.timestep_sequence(steps, T, "quad").tolist() == quad, steps
    # The first S where torch.linspace's rounding would differ: the authors have 287 and 511.
    assert {287, 511} <= set(schedule.timestep_sequence(16, T, "quad").tolist())
    # S = 501 starts the walk near T, not at t = 500.
    assert schedule.timestep_sequence(501, T, "uniform")[-1] == 998


def test_quad_matches_the_paper_without_duplicates():
    tau = schedule.timestep_sequence(10, 1000, "quad")
    assert tau.tolist() == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert len(schedule.timestep_sequence(50, 1000, "quad")) == 49  # the paper's int cast repeats a step
    assert len(schedule.timestep_sequence(100, 1000, "quad")) == 96
    tau = schedule.timestep_sequence(100, 1000, "quad")
    assert (tau[1:] > tau[:-1]).all() and tau[0] == 0 and tau[-1] == 800


@pytest.mark.parametrize("steps,scheme", [(0, "uniform"), (1001, "uniform"), (10, "cosine")])
def test_bad_sequences_are_refused(steps, scheme):
    with pytest.raises(ValueError):
        schedule.timestep_sequence(steps, 1000, scheme)


# --- the update ----------------------------------------------------------------------------


def test_one_step_matches_the_paper_equation():
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_s, eta = float(ABAR[500]), float(ABAR[400]), 0.7
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma**2) * eps + sigma * z
    got = ddim.ddim_step(x, eps, a_t, a_s, ddim.ddim_sigma(a_t, a_s, eta), z)
    torch.testing.assert_close(got, expected)


def test_eta_one_is_the_ddpm_posterior_variance():
    a_t, a_s = float(ABAR[300]), float(ABAR[299])
    beta_t = 1 - a_t / a_s
    posterior_var = (1 - a_s) / (1 - a_t) * beta_t  # DDPM's beta-tilde
    assert ddim.ddim_sigma(a_t, a_s, 1.0) ** 2 == pytest.approx(posterior_var)


def test_sigma_hat_steps_with_the_papers_larger_variance():
    """Table 1's last row: sigma-hat = sqrt(1 - abar_t / abar_s) (the DDPM variance beta_t at one-step
    jumps), and the step's other coefficients take it as sigma; one step of it, written out here."""
    eps_model = GaussianEps(ABAR, MU, STD)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = ddim.sample(eps_model, x, ABAR, [0, 300], generator=torch.Generator().manual_seed(5), sigma_hat=True,
                      callback=(steps := []).append)
    a_t, a_s = float(ABAR[300]), float(ABAR[0])
    sigma = math.sqrt(1 - a_t / a_s)
    eps = eps_model(x, torch.full((3,), 300))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32).double()
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    want = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0)) * eps + sigma * z
    torch.testing.assert_close(steps[0].x, want, rtol=1e-6, atol=1e-6)
    assert got.shape == x.shape


def test_last_step_returns_x0_and_uses_each_timestep_once():
    eps_model = GaussianEps(ABAR, MU, STD)
    tau = schedule.timestep_sequence(20, 1000, "uniform")
    x = torch.randn(8, 4, dtype=torch.float64)
    seen = []
    out = ddim.sample(eps_model, x, ABAR, tau, callback=seen.append)
    assert eps_model.calls == list(reversed(tau.tolist()))  # S calls, from tau_S down to tau_1
    assert [(step.index, step.timestep) for step in seen] == list(enumerate(reversed(tau.tolist())))
    # The last step goes from tau_1 = 0 to abar = 1 (not to abar_0): the output is exactly the clean
    # image predicted at t = 0 from the point the step before reached.
    x_at_0 = seen[-2].x
    predicted = ddim.predict_x0(x_at_0, GaussianEps(ABAR, MU, STD)(x_at_0, torch.zeros(8, dtype=torch.long)), float(ABAR[0]))
    torch.testing.assert_close(out, predicted, atol=1e-12, rtol=0)
    torch.testing.assert_close(seen[-1].x0, predicted, atol=1e-12, rtol=0)
    assert float((out - x_at_0).abs().max()) > 1e-3  # stopping at abar_0 would be told apart


def test_sample_is_deterministic_at_eta_zero_and_not_above():
    eps_model = GaussianEps(ABAR, MU, STD)
    tau = schedule.timestep_sequence(10, 1000, "uniform")
    x = torch.randn(4, 4, dtype=torch.float64)
    a = ddim.sample(eps_model, x, ABAR, tau, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim.sample(eps_model, x, ABAR, tau, eta=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    c = ddim.sample(eps_model, x, ABAR, tau, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = ddim.sample(eps_model, x, ABAR, tau, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert (c - d).abs().max() > 1e-3


def test_per_row_generators_make_rows_independent_of_the_batch():
    eps_model = GaussianEps(ABAR, MU, STD)
    tau = schedule.timestep_sequence(10, 1000, "uniform")
    x = torch.randn(4, 4, dtype=torch.float64)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    whole = ddim.sample(eps_model, x, ABAR, tau, eta=1.0, generator=gens(range(4)))
    part = ddim.sample(eps_model, x[2:], ABAR, tau, eta=1.0, generator=gens(range(2, 4)))
    torch.testing.assert_close(whole[2:], part)


# --- against the data distribution ----------------------------------------------------------


def linear_map_error(steps: int, scheme: str) -> float:
    """At eta = 0 and Gaussian data the sampler is affine per coordinate, x_0 = A x_T + b, so the
    distribution of its output, N(b, A^2), is known exactly: no Monte Carlo noise in the check."""
    eps_model = GaussianEps(ABAR, MU, STD)
    tau = schedule.timestep_sequence(steps, 1000, scheme)
    b = ddim.sample(eps_model, torch.zeros(1, 4, dtype=torch.float64), ABAR, tau)[0]
    a = ddim.sample(eps_model, torch.ones(1, 4, dtype=torch.float64), ABAR, tau)[0] - b
    return float(((b - MU) ** 2 + (a.abs() - STD) ** 2).sum().sqrt())


@pytest.mark.parametrize("scheme", ["uniform", "quad"])
def test_error_shrinks_as_steps_grow_gaussian(scheme):
    """Convergence to the data distribution as S grows. Any consistent solver converges, so the DDIM
    update itself is held by test_one_step_matches_the_paper_equation and by
    tests/test_reference_scheduler.py (the same x0 as diffusers' DDIMScheduler)."""
    errors = [linear_map_error(s, scheme) for s in (10, 20, 50, 100, 1000)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:-1])), errors
    assert errors[-1] < 0.01  # 1000 steps: the data distribution (errors[0] is ~0.1-0.2)
    assert errors[0] > 5 * errors[-1]


def test_many_steps_match_the_data_distribution():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(40000, 4, dtype=torch.float64, generator=g)
    out = ddim.sample(GaussianEps(ABAR, MU, STD), x_T, ABAR, schedule.timestep_sequence(1000, 1000, "uniform"))
    torch.testing.assert_close(out.mean(0), MU, atol=0.01, rtol=0)
    torch.testing.assert_close(out.std(0), STD, atol=0.01, rtol=0.03)


def test_eta_zero_beats_eta_one_at_ten_steps_gaussian():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(40000, 4, dtype=torch.float64, generator=g)
    tau = schedule.timestep_sequence(10, 1000, "uniform")
    err = {
        eta: gaussian_error(ddim.sample(GaussianEps(ABAR, MU, STD), x_T, ABAR, tau, eta=eta, generator=torch.Generator().manual_seed(1)))
        for eta in (0.0, 0.5, 1.0)
    }
    assert err[0.0] < err[0.5] < err[1.0], err


def test_mixture_error_shrinks_and_eta_zero_wins_at_small_s():
    mix = MixtureEps(ABAR, [0.3, 0.7], [-0.6, 0.4], [0.1, 0.15])
    x_T = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ks = {}
    for steps in (10, 20, 50, 200):
        tau = schedule.timestep_sequence(steps, 1000, "uniform")
        for eta in (0.0, 1.0):
            out = ddim.sample(mix, x_T, ABAR, tau, eta=eta, generator=torch.Generator().manual_seed(3))
            ks[steps, eta] = mixture_ks(mix, out[:, 0])
    assert ks[10, 0.0] > ks[20, 0.0] > ks[50, 0.0] > ks[200, 0.0]
    assert ks[200, 0.0] < 0.02
    for steps in (10, 20, 50):
        assert ks[steps, 0.0] < ks[steps, 1.0]


def test_sigma_hat_is_worse_than_ddim_at_ten_steps():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 4, dtype=torch.float64, generator=g)
    tau = schedule.timestep_sequence(10, 1000, "uniform")
    eps_model = GaussianEps(ABAR, MU, STD)
    hat = ddim.sample(eps_model, x_T, ABAR, tau, generator=torch.Generator().manual_seed(1), sigma_hat=True)
    assert gaussian_error(hat) > 2 * gaussian_error(ddim.sample(eps_model, x_T, ABAR, tau))


# --- inversion ------------------------------------------------------------------------------


def test_round_trip_error_shrinks_with_steps():
    eps_model = GaussianEps(ABAR, MU, STD)
    x = MU + STD * torch.randn(2000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mse = []
    for steps in (10, 20, 50, 100, 200, 1000):
        tau = schedule.timestep_sequence(steps, 1000, "uniform")
        x_T = ddim.invert(eps_model, x, ABAR, tau)
        mse.append(float((ddim.sample(eps_model, x_T, ABAR, tau) - x).pow(2).mean()))
    assert all(later < earlier / 2 for earlier, later in zip(mse, mse[1:])), mse
    assert mse[-1] < 1e-5


def test_invert_evaluates_s_times_at_current_timesteps_in_order():
    eps_model = GaussianEps(ABAR, MU, STD)
    tau = schedule.timestep_sequence(10, 1000, "quad")
    ddim.invert(eps_model, torch.zeros(2, 4, dtype=torch.float64), ABAR, tau)
    # The clean image counts as tau_1 = 0; every call is at the point's current timestep, so the
    # calls are tau_1 (clean), tau_1, ..., tau_{S-1}: S of them, none at the target.
    taus = tau.tolist()
    assert eps_model.calls == [taus[0]] + taus[:-1]


def test_exact_inversion_round_trips_to_float64_precision_gaussian():
    """Solving each step's implicit equation makes decode(encode(x)) == x at any S, where plain
    inversion is off by the ODE's discretisation error."""
    eps_model = GaussianEps(ABAR, MU, STD)
    x = MU + STD * torch.randn(500, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (5, 10, 20):
        tau = schedule.timestep_sequence(steps, 1000, "uniform")
        plain = float((ddim.sample(eps_model, ddim.invert(eps_model, x, ABAR, tau), ABAR, tau) - x).abs().max())
        # G is affine here, so Anderson with a memory of the 4 coordinates' rates solves each step exactly.
        x_T, calls = ddim.invert_exact(eps_model, x, ABAR, tau, tol=1e-13, max_iters=30, memory=4)
        exact = float((ddim.sample(eps_model, x_T, ABAR, tau) - x).abs().max())
        assert exact < 1e-10 and plain > 1e3 * exact, (steps, plain, exact)
        assert steps < calls <= 1 + 30 * steps


def test_exact_inversion_on_a_mixture_beats_plain_within_4s_calls():
    mix = MixtureEps(ABAR, [0.3, 0.7], [-0.6, 0.5], [0.05, 0.1])
    x = mix.sample_data(400, torch.Generator().manual_seed(0)).view(100, 4)
    tau = schedule.timestep_sequence(10, 1000, "uniform")
    plain = float((ddim.sample(mix, ddim.invert(mix, x, ABAR, tau), ABAR, tau) - x).pow(2).mean())
    errors = {}
    for iters in (3, 10):
        x_T, calls = ddim.invert_exact(mix, x, ABAR, tau, tol=1e-6, max_iters=iters)
        errors[iters] = float((ddim.sample(mix, x_T, ABAR, tau) - x).pow(2).mean())
        assert calls <= 1 + iters * len(tau)
    assert errors[3] < plain / 20 and errors[10] < plain / 1000, (plain, errors)


def test_exact_inversion_checks_its_options():
    with pytest.raises(ValueError):
        ddim.invert_exact(GaussianEps(ABAR, MU, STD), MU[None], ABAR, [0, 100], max_iters=0)


def test_edit_without_mask_at_zero_strength_and_exact_start_returns_the_input():
    eps_model = GaussianEps(ABAR, MU, STD)
    x = MU + STD * torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ddim.edit(eps_model, x, ABAR, []), x)
    tau = schedule.timestep_sequence(20, 1000, "uniform")[:10]  # strength 0.5
    x_t0, _ = ddim.invert_exact(eps_model, x, ABAR, tau, tol=1e-13, max_iters=100)
    torch.testing.assert_close(ddim.edit(eps_model, x, ABAR, tau, x_start=x_t0), x, atol=1e-10, rtol=0)


def test_sdedit_moves_corrupted_data_towards_the_data_distribution():
    """Data far off the distribution (x 3 the spread) comes back with the data's statistics at full
    strength, and closer to the input at low strength."""
    eps_model = GaussianEps(ABAR, MU, STD)
    g = torch.Generator().manual_seed(0)
    corrupted = MU + 3 * STD * torch.randn(4000, 4, dtype=torch.float64, generator=g)
    tau = schedule.timestep_sequence(50, 1000, "uniform")
    full = ddim.edit(eps_model, corrupted, ABAR, tau, generator=g)
    assert gaussian_error(full) < 0.08 and gaussian_error(corrupted) > 0.5
    weak = ddim.edit(eps_model, corrupted, ABAR, tau[:5], generator=g)
    assert (weak - corrupted).pow(2).mean() < (full - corrupted).pow(2).mean() / 5


def test_sdedit_starts_from_the_image_noised_to_t0():
    """q(x_t0 | x_0) = N(sqrt(abar) x_0, (1 - abar) I): the first call sees exactly that point, from the
    generator's noise (written out here)."""
    seen = []

    def eps_model(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)

    x_0 = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ddim.edit(eps_model, x_0, ABAR, [0, 200, 400], generator=torch.Generator().manual_seed(7))
    z = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32).double()
    torch.testing.assert_close(seen[0], math.sqrt(ABAR[400]) * x_0 + math.sqrt(1 - ABAR[400]) * z)


def test_masked_edit_keeps_the_known_pixels_exactly_and_fills_the_rest():
    eps_model = GaussianEps(ABAR, MU, STD)
    g = torch.Generator().manual_seed(0)
    x = torch.full((3000, 4), 5.0, dtype=torch.float64)  # far from the data everywhere
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # regenerate the first two
    out = ddim.edit(eps_model, x, ABAR, schedule.timestep_sequence(200, 1000, "uniform"), mask=mask, generator=g)
    assert torch.equal(out[:, 2:], x[:, 2:])
    torch.testing.assert_close(out[:, :2].mean(0), MU[:2], atol=0.02, rtol=0)
    torch.testing.assert_close(out[:, :2].std(0), STD[:2], atol=0.02, rtol=0)


def test_latents_of_data_are_standard_normal():
    eps_model = GaussianEps(ABAR, MU, STD)
    x = MU + STD * torch.randn(20000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = ddim.invert(eps_model, x, ABAR, schedule.timestep_sequence(1000, 1000, "uniform"))
    torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(4, dtype=torch.float64), atol=0.03, rtol=0)


# --- slerp ----------------------------------------------------------------------------------


def test_slerp_ends_norm_and_angle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    torch.testing.assert_close(ddim.slerp(a, b, 0.0), a)
    torch.testing.assert_close(ddim.slerp(a, b, 1.0), b)
    b_scaled = b * a.norm() / b.norm()
    mid = ddim.slerp(a, b_scaled, 0.5)
    # Halfway between equal-norm ends: equal angles to both.
    cos = lambda u, v: float((u * v).sum() / (u.norm() * v.norm()))  # noqa: E731
    assert cos(mid, a) == pytest.approx(cos(mid, b_scaled), abs=1e-5)
    # The norm is kept (a straight line would shrink it).
    assert float(ddim.slerp(a, b_scaled, 0.5).norm()) == pytest.approx(float(a.norm()), rel=1e-5)
    assert float(((a + b_scaled) / 2).norm()) < 0.9 * float(a.norm())


# --- the Frechet distance --------------------------------------------------------------------


