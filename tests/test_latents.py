"""latents.py: the latents file (x_T with the settings it was made with) and what invert reports of it."""

import pytest
import torch

from safetensors.torch import save_file

from ddimctl.sampling import latents, samplers
from ddimctl.errors import DdimctlError
from ddimctl.sampling.runners import ExactInversion


def test_a_latents_file_keeps_its_values_and_settings(tmp_path):
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "z.safetensors"
    latents.save_latents(path, z, "digits", samplers.Settings("ddim", 20, "uniform"),
                         **latents.inversion_metadata(ExactInversion(1e-3, 3)))
    assert torch.equal(latents.load_latents(path, (1, 4, 4)), z)
    made = latents.latents_settings(path)
    assert made["inversion"] == "exact" and made["tol"] == "0.001" and made["max_iters"] == "3"
    assert made["sampler"] == "ddim" and made["skip"] == "uniform"
    assert latents.latents_differences(made, {"model": "digits", "steps": "50"}) == ["steps 20 (now 50)"]


def test_decoding_takes_the_files_settings_unless_told_otherwise(tmp_path):
    made = {"model": "digits", "sampler": "ddim", "steps": "20", "skip": "quad", "eta": "0", "inversion": "exact"}
    assert latents.decoding_settings(made, "ddim", None, None, 0.0, False) == samplers.Settings("ddim", 20, "quad")
    asked = latents.decoding_settings(made, "dpm++2m", 10, "uniform", 0.0, False)
    assert asked == samplers.Settings("dpm++2m", 10, "uniform")
    assert latents.decoding_notes("z.safetensors", made, "digits", asked) == [
        "z.safetensors was inverted with sampler ddim (now dpm++2m), steps 20 (now 10), skip quad (now uniform): "
        "decoding will not return the images exactly"]
    assert latents.decoding_notes("z.safetensors", made, "digits", samplers.Settings("ddim", 20, "quad")) == []
    clipped = latents.decoding_settings(made, "ddim", None, None, 0.0, False, clip=True)
    assert latents.decoding_notes("z.safetensors", made, "digits", clipped) == [
        "z.safetensors was inverted with x0 unclipped (now --clip): decoding will not return the images exactly"]


@pytest.mark.parametrize("field, value, expected", [
    ("steps", "many", "a positive integer"), ("steps", "0", "a positive integer"), ("skip", "cosine", "one of uniform, quad, logsnr, karras, ays, trailing or explicit timesteps"),
    ("sampler", "euler", "one of ddim"), ("eta", "x", "a number"),
])
def test_metadata_fields_are_checked_as_untrusted_input(tmp_path, field, value, expected):
    path = tmp_path / "z.safetensors"
    save_file({"latents": torch.zeros(1, 1, 4, 4)}, str(path), {"model": "digits", "steps": "20", field: value})
    with pytest.raises(DdimctlError, match=f"metadata field '{field}' is '{value}', expected {expected}"):
        latents.latents_settings(path)


def test_moments_of_each_latent():
    z = torch.stack([torch.full((1, 2, 2), 3.0), torch.tensor([[[1.0, -1.0], [1.0, -1.0]]])])
    (mean0, std0), (mean1, std1) = latents.moments(z)
    assert (mean0, std0) == (3.0, 0.0)
    assert mean1 == 0.0 and std1 == pytest.approx((4 / 3) ** 0.5)  # unbiased, over the 4 values
