"""metrics.py: the Frechet distance, and per-image MSE and PSNR."""

import math

import pytest
import torch

from ddimctl import metrics


def test_frechet_distance_matches_the_closed_form_and_scipy():
    from ddimctl import metrics

    g = torch.Generator().manual_seed(0)
    d = 5
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov1, cov2 = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    got = metrics.frechet_distance(mu1, cov1, mu2, cov2)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    root = scipy_linalg.sqrtm(cov1.numpy() @ cov2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum()) + float(torch.trace(cov1 + cov2)) - 2 * float(root.trace())
    assert got == pytest.approx(expected, rel=1e-8)
    # Diagonal covariances: the W2 distance has the closed form sum (m1 - m2)^2 + (s1 - s2)^2.
    s1, s2 = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    m1, m2 = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    closed = float(((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert metrics.frechet_distance(m1, torch.diag(s1**2), m2, torch.diag(s2**2)) == pytest.approx(closed, rel=1e-10)
    # From samples of known Gaussians, the estimate converges to the truth.
    x = m1 + s1 * torch.randn(200000, 3, generator=g, dtype=torch.float64)
    y = m2 + s2 * torch.randn(200000, 3, generator=g, dtype=torch.float64)
    assert metrics.frechet_distance_between(x, y) == pytest.approx(closed, abs=0.05)


def test_mse_and_psnr_per_image_on_the_unit_scale():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), -0.8)])  # [0, 1] values 0.5 and 0.1
    torch.testing.assert_close(metrics.mse_per_image(b, a), torch.tensor([0.0, 0.16]))
    assert metrics.psnr(0.01) == 20.0 and metrics.psnr(0.0) == float("inf")
    clamped = metrics.mse_per_image(torch.full((1, 1, 2, 2), 3.0), torch.ones(1, 1, 2, 2))
    assert float(clamped) == 0.0  # values beyond 1 count as 1, as in a saved image


def test_round_trip_errors_are_table_2s_numbers():
    target = torch.zeros(2, 1, 4, 4)  # grey 0.5 on the [0, 1] scale
    recon = target.clone()
    recon[0] += 0.2  # 0.6: squared error 0.01 everywhere
    recon[1, :, :2] -= 0.4  # 0.3 on half the pixels: 0.04 / 2
    report = metrics.round_trip_errors(recon, target, ["a.png", "b.png"])
    assert [i["image"] for i in report["images"]] == ["a.png", "b.png"]
    assert [i["mse"] for i in report["images"]] == pytest.approx([0.01, 0.02])
    assert report["images"][0]["psnr"] == pytest.approx(20.0)
    assert report["mse"] == pytest.approx(0.015)
    assert report["psnr"] == pytest.approx(10 * math.log10(1 / 0.015))
