"""The UNet against diffusers' UNet2DModel (an independent implementation), and every accepted layout."""


import pytest
import torch
from conftest import random_unet
from helpers import diffusers_unet

from ddimctl.models.unet import PRESETS, UNet, count_parameters

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("preset", ["tiny", "small", "cifar10"])
def test_matches_diffusers_unet2dmodel(preset):
    ours = random_unet(preset, seed=1)
    ref = diffusers_unet(preset)
    ref.load_state_dict(ours.state_dict())  # strict: the parameter names are diffusers'
    c = PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c.in_channels, c.resolution, c.resolution, generator=g)
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        a, b = ours(x, t), ref(x, t).sample
    assert a.shape == x.shape
    assert (a - b).abs().max() <= 1e-4, float((a - b).abs().max())
    assert a.std() > 0.1  # a real output, not a near-constant


@pytest.mark.parametrize("preset,params", [("cifar10", 35_746_307), ("ddpm256", 113_673_219), ("celeba64", 78_700_803)])
def test_parameter_counts_match_the_published_models(preset, params):
    with torch.device("meta"):
        assert count_parameters(UNet(PRESETS[preset])) == params


