"""Errors name values, not flags: the library says `batch_size`, the command line says `--batch-size`."""

import math

import pytest
import torch

from ddimctl.sampling import samplers, runners
from ddimctl.cli.common import flag
from ddimctl.errors import DdimctlError, param, spell
from ddimctl.train import TrainOptions


def test_library_names_the_parameter_and_cli_names_the_flag():
    with pytest.raises(DdimctlError) as caught:
        runners.check_settings(batch_size=0)
    assert str(caught.value) == "batch_size must be at least 1, got 0"
    assert caught.value.render(flag) == "--batch-size must be at least 1, got 0"


def test_a_message_keeps_its_own_text_around_the_names():
    # Braces, percent signs and backslashes in a path are the message's text, not formatting.
    message = f"{param('latents')} /tmp/{{a}}%s\\b.safetensors: see {param('out')} and {param('save_every')}"
    assert spell(message) == "latents /tmp/{a}%s\\b.safetensors: see out and save_every"
    assert spell(message, flag) == "--latents /tmp/{a}%s\\b.safetensors: see --out and --save-every"


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"num": 0}, "num must be at least 1, got 0"),
        ({"strength": 1.5}, "strength must be between 0 and 1, got 1.5"),
        ({"strength": math.nan}, "strength must be between 0 and 1, got nan"),
        ({"frames": 1}, "frames must be at least 2, got 1"),
    ],
)
def test_each_sampling_rule(values, expected):
    with pytest.raises(DdimctlError) as caught:
        runners.check_settings(**values)
    assert str(caught.value) == expected


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"sampler": "plms", "steps": 2}, "steps must be at least 3 for plms (its first step takes two network calls), got 2"),
        ({"skip": "cosine"}, "skip: unknown skip scheme 'cosine'; use one of uniform, quad, logsnr, karras, ays, trailing, or explicit timesteps"),
        ({"eta": math.nan}, "eta must be between 0 and 1 (0: DDIM, 1: DDPM's posterior variance), got nan"),
        ({"eta": -0.5}, "eta must be between 0 and 1 (0: DDIM, 1: DDPM's posterior variance), got -0.5"),
        ({"sampler": "dpm++2m", "eta": 1.0}, "eta is a setting of the ddim sampler; dpm++2m is deterministic (leave it out)"),
        ({"sampler": "unipc", "sigma_hat": True}, "sigma_hat is a setting of the ddim sampler; unipc is deterministic (leave it out)"),
        ({"sampler": "euler"}, "sampler must be one of ddim, dpm++2m, dpm++3m, unipc, plms, ipndm, got 'euler'"),
    ],
)
def test_each_sampler_settings_rule(values, expected):
    with pytest.raises(DdimctlError) as caught:
        samplers.Settings(**values)
    assert str(caught.value) == expected


def test_steps_are_checked_against_the_models_schedule():
    with pytest.raises(DdimctlError, match=r"^steps must be between 1 and 1000 \(the model's train steps\), got 1001$"):
        samplers.Settings(steps=1001).for_model(1000, "uniform")
    assert samplers.Settings(steps=2000).for_model(4000, "quad").skip == "quad"  # a longer schedule takes more
    assert samplers.Settings("plms", steps=1001).for_model(1000, "uniform").steps == 1001  # 1000 timesteps + 1 call


def test_values_that_every_run_can_use_pass():
    runners.check_settings(batch_size=1, num=1, strength=0.0, frames=2)
    samplers.Settings("ddim", 1000, "quad", 0.0).for_model(1000, "uniform")
    with pytest.raises(DdimctlError, match="steps"):  # and the model's check is the one that holds S to T
        samplers.Settings("ddim", 10**9).for_model(1000, "uniform")


@pytest.mark.parametrize("tol,max_iters", [(-1e-3, 4), (float("nan"), 4), (1e-3, 0)])
def test_exact_inversion_refuses_what_it_cannot_run(tol, max_iters):
    """ddim.invert_exact's own rule, for library callers (the CLI's ExactInversion checks first)."""
    from ddimctl.sampling import ddim
    from ddimctl import schedule

    abar = schedule.Schedule().alphas_cumprod()
    with pytest.raises(ValueError, match="max_iters >= 1 and tol >= 0"):
        ddim.invert_exact(lambda x, t: torch.zeros_like(x), torch.zeros(1, 1, 2, 2), abar, [0, 500], tol, max_iters)


def test_a_library_caller_gets_the_same_rule_as_the_cli(tmp_path):
    from ddimctl.models import loading

    model = loading.load_model("digits")
    with pytest.raises(DdimctlError, match=r"^eta must be between 0 and 1 \(0: DDIM, 1: DDPM's posterior variance\), got -1$"):
        runners.Runner.create(model, samplers.Settings(eta=-1), torch.device("cpu"))
    with pytest.raises(DdimctlError, match="^batch_size must be at least 1, got 0$"):
        runners.make_runner(model, samplers.Settings(steps=10), "cpu", batch_size=0)


def test_training_options_name_their_values():
    with pytest.raises(DdimctlError) as caught:
        TrainOptions(data="d", out="o", save_every=0).check()
    assert (str(caught.value), caught.value.render(flag)) == (
        "save_every must be at least 1, got 0", "--save-every must be at least 1, got 0")
    with pytest.raises(DdimctlError, match="^channels must be 1 or 3, got 2$"):
        TrainOptions(data="d", out="o", unet={"in_channels": 2}).check()
