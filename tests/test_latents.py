"""latents.py: the latents file (x_T with the settings it was made with) and what invert reports of it."""

import pytest
import torch

from ddimctl import latents
from ddimctl.sampling import ExactInversion


def test_a_latents_file_keeps_its_values_and_settings(tmp_path):
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "z.safetensors"
    latents.save_latents(path, z, model="digits", steps="20", skip="uniform", eta="0",
                         **latents.inversion_metadata(ExactInversion(1e-3, 3)))
    assert torch.equal(latents.load_latents(path, (1, 4, 4)), z)
    made = latents.latents_settings(path)
    assert made["inversion"] == "exact" and made["tol"] == "0.001" and made["max_iters"] == "3"
    assert latents.latents_differences(made, {"model": "digits", "steps": "50"}) == ["steps 20 (now 50)"]


def test_moments_of_each_latent():
    z = torch.stack([torch.full((1, 2, 2), 3.0), torch.tensor([[[1.0, -1.0], [1.0, -1.0]]])])
    (mean0, std0), (mean1, std1) = latents.moments(z)
    assert (mean0, std0) == (3.0, 0.0)
    assert mean1 == 0.0 and std1 == pytest.approx((4 / 3) ** 0.5)  # unbiased, over the 4 values
