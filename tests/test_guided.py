"""openai's guided-diffusion / improved-diffusion checkpoints, checked against their own code (the
guided-diffusion-sdk packaging of openai/guided-diffusion): the network for every flag that changes
it, and DDIM inversion and sampling through the command line against their schedule and their
ddim_sample_loop."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import ddimctl
from PIL import Image

from ddimctl.io import images
from ddimctl.models import loading
from ddimctl.errors import DdimctlError
from ddimctl.sampling.latents import load_latents

guided = pytest.importorskip("guided_diffusion.script_util")

SMALL = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16")
CASES = {
    "legacy attention, 2 heads": dict(num_heads=2),
    "new attention order, 16 channels per head": dict(num_head_channels=16, use_new_attention_order=True),
    "resblock_updown": dict(resblock_updown=True, num_heads=2),
    "learned sigmas, class-conditional": dict(learn_sigma=True, class_cond=True),
    "no scale-shift norm, attention at two levels": dict(use_scale_shift_norm=False, attention_resolutions="32,16"),
    # their 512 model starts at half the channel count; their create_model parses only integers
    "channel multiplier 0.5": dict(num_channels=64, channel_mult=[0.5, 1]),
}


def their_model(flags: dict, seed: int = 0):
    """Their UNet for these flags (the rest at their defaults), every weight random: their
    initialisation zeroes the output convolutions, which would hide a wrong layout."""
    args = {**guided.model_and_diffusion_defaults(), **flags}
    names = guided.create_model.__code__.co_varnames[: guided.create_model.__code__.co_argcount]
    kwargs = {k: args[k] for k in names}
    if isinstance(kwargs["channel_mult"], list):  # build the fractional one directly, as their code would
        from guided_diffusion.unet import UNetModel

        model = UNetModel(image_size=32, in_channels=3, model_channels=kwargs["num_channels"], out_channels=3,
                          num_res_blocks=1, attention_resolutions=(2,), channel_mult=tuple(kwargs["channel_mult"]),
                          num_heads=4, use_scale_shift_norm=True)
    else:
        model = guided.create_model(**kwargs)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def save(tmp_path, model, flags, name="model"):
    torch.save(model.state_dict(), tmp_path / f"{name}.pt")
    (tmp_path / f"{name}.json").write_text(json.dumps(flags))
    return tmp_path / f"{name}.pt"


@pytest.mark.parametrize("case", CASES)
def test_every_flag_gives_their_network(tmp_path, case):
    flags = {**SMALL, **CASES[case]}
    theirs = their_model(flags)
    loaded = loading.load_model(str(save(tmp_path, theirs, flags)))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 417, 999])
    y = torch.tensor([0, 7, 999]) if flags.get("class_cond") else None
    with torch.no_grad():
        want = theirs(x, t, y) if y is not None else theirs(x, t)
        got = loaded.unet(x, t, y)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max()), case


# An improved-diffusion-style model: T = 4000 cosine steps, rescaled timesteps, learned sigmas, classes.
END_TO_END = {
    "guided: linear, unconditional": dict(num_heads=2),
    "improved: cosine T=4000, rescaled, learned sigmas, classes": dict(
        diffusion_steps=4000, noise_schedule="cosine", rescale_timesteps=True, learn_sigma=True, class_cond=True,
        num_head_channels=16, use_new_attention_order=True, resblock_updown=True),
}


def paper_inversion(model, x, abar, taus, scale, y):
    """The paper's eta = 0 inversion (the image counts as tau_1 = 0) with their network and schedule."""
    abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.as_tensor(abar)])  # abar(-1) = 1
    for s, t in zip([-1] + taus[:-1], taus):
        ts = torch.full((x.shape[0],), max(s, taus[0]), dtype=torch.long)
        kwargs = {"y": y} if y is not None else {}
        eps = model(x, ts.float() * scale if scale != 1 else ts, **kwargs)[:, :3]
        a_s, a_t = float(abar[s + 1]), float(abar[t + 1])
        x0 = (x - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s)
        x = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    return x


@pytest.mark.parametrize("case", END_TO_END)
def test_invert_and_sample_match_their_ddim(tmp_path, case):
    flags = {**SMALL, **END_TO_END[case]}
    theirs = their_model(flags, seed=3)
    checkpoint = save(tmp_path, theirs, flags)
    g = torch.Generator().manual_seed(2)
    pictures = [(torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(2)]
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(tmp_path / f"in{i}.png")
    classes = ["--class", "3,998"] if flags.get("class_cond") else []
    ddimctl("invert", tmp_path / "in0.png", tmp_path / "in1.png", "--model", checkpoint, "--steps", "10", "--skip",
            "uniform", "--device", "cpu", "--out", tmp_path / "L.safetensors", *classes, cwd=tmp_path)
    ddimctl("sample", "--model", checkpoint, "--latents", tmp_path / "L.safetensors", "--steps", "10", "--skip",
            "uniform", "--precision", "fp32", "--device", "cpu", "--out", f"{tmp_path}/out/", "--scale", "1", *classes,
            cwd=tmp_path)

    steps = flags.get("diffusion_steps", 1000)
    args = {**guided.model_and_diffusion_defaults(), **flags, "timestep_respacing": "ddim10"}
    base = guided.create_gaussian_diffusion(steps=steps, learn_sigma=args["learn_sigma"],
                                            noise_schedule=args["noise_schedule"], rescale_timesteps=False)
    spaced = guided.create_gaussian_diffusion(
        steps=steps, learn_sigma=args["learn_sigma"], noise_schedule=args["noise_schedule"],
        rescale_timesteps=args["rescale_timesteps"], timestep_respacing="ddim10")
    y = torch.tensor([3, 998]) if flags.get("class_cond") else None
    x0 = torch.stack([torch.from_numpy(p).permute(2, 0, 1).float() / 127.5 - 1 for p in pictures])
    taus = [i * steps // 10 for i in range(10)]  # their "ddim10" spacing: every T / 10 steps from 0
    with torch.no_grad():
        want_latents = paper_inversion(theirs, x0, base.alphas_cumprod, taus, 1000 / steps if args["rescale_timesteps"]
                                       else 1, y)
    latents = load_latents(tmp_path / "L.safetensors", (3, 32, 32))
    relative = float((latents - want_latents).norm() / want_latents.norm())
    assert relative <= 1e-3, relative

    with torch.no_grad():
        decoded = spaced.ddim_sample_loop(theirs, (2, 3, 32, 32), noise=latents, clip_denoised=False,
                                          model_kwargs={"y": y} if y is not None else {})
    want = images.to_uint8(decoded).numpy().astype(int)  # (N, H, W, C)
    got = np.stack([np.asarray(Image.open(tmp_path / "out" / f"00000{i}.png").convert("RGB")).astype(int) for i in (0, 1)])
    within = float((np.abs(got - want) <= 1).mean())
    assert within >= 0.995, within


def test_a_checkpoint_without_its_flags_says_which_sidecar_to_write(tmp_path):
    flags = {**SMALL, **CASES["learned sigmas, class-conditional"]}
    torch.save(their_model(flags).state_dict(), tmp_path / "adm.pt")
    with pytest.raises(DdimctlError) as refused:
        loading.load_model(str(tmp_path / "adm.pt"))
    message = str(refused.value)
    assert "adm.json" in message and "\n" not in message
    suggested = json.loads(message[message.index("{"):message.rindex("}") + 1])
    assert (suggested["num_channels"], suggested["learn_sigma"], suggested["class_cond"]) == (32, True, True)


def test_the_suggested_sidecar_comes_from_the_weights_and_loads_as_printed(tmp_path):
    """A layout their defaults do not describe (three levels 1,2,2, one block each, attention at 16,
    resnet resampling): the suggestion reads every flag the weights show, pasted as printed it loads,
    and the network is theirs; the message names what the weights cannot show."""
    flags = dict(image_size=32, num_channels=32, channel_mult="1,2,2", num_res_blocks=1, attention_resolutions="16",
                 resblock_updown=True, learn_sigma=True)
    theirs = their_model(flags)
    torch.save(theirs.state_dict(), tmp_path / "adm.pt")
    result = ddimctl("sample", "--model", "adm.pt", "-n", "1", "--steps", "2", cwd=tmp_path, check=False)
    message = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "cannot show image_size" in message and "num_heads" in message
    suggested = json.loads(message[message.index("{"):message.index("}") + 1])
    assert {k: suggested[k] for k in flags} == {**flags, "channel_mult": "1,2,2"}
    (tmp_path / "adm.json").write_text(message[message.index("{"):message.index("}") + 1])  # pasted as printed
    loaded = loading.load_model(str(tmp_path / "adm.pt"))
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(loaded.unet(x, t), theirs(x, t), atol=1e-4)


def test_heads_and_a_qkv_that_do_not_fit_are_refused_before_the_split(tmp_path):
    """A head count that does not divide the attention's channels, or weights whose fused qkv is not
    (3C, C), are one line naming the flag or the tensor: no reshape runs before the check."""
    theirs = their_model({**SMALL, "num_heads": 2})
    result = ddimctl("sample", "--model", save(tmp_path, theirs, {**SMALL, "num_heads": 3}), "-n", "1", "--steps", "2",
                     check=False, cwd=tmp_path)
    assert result.returncode == 1 and "is not divisible by 3 attention heads" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    state = theirs.state_dict()
    key = next(k for k in state if k.endswith("qkv.weight"))
    state[key] = state[key].transpose(0, 1).contiguous()
    torch.save(state, tmp_path / "transposed.pt")
    (tmp_path / "transposed.json").write_text(json.dumps({**SMALL, "num_heads": 2}))
    result = ddimctl("sample", "--model", tmp_path / "transposed.pt", "-n", "1", "--steps", "2", check=False, cwd=tmp_path)
    assert result.returncode == 1 and f"{key} has shape" in result.stderr and "no fused q, k, v" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change,named", [
    ({"num_res_blocks": 2}, "num_res_blocks"),  # the weights have one per level: the flags do not fit
    ({"classifier_scale": 1.0}, "classifier_scale"),
    ({"noise_schedule": "sqrt"}, "noise_schedule"),
    ({"learn_sigma": "maybe"}, "learn_sigma"),
    ({"attention_resolutions": "16,x"}, "attention_resolutions"),
    ({"num_heads_upsample": 3}, "num_heads_upsample"),
])
def test_a_wrong_sidecar_is_one_line_naming_the_flag(tmp_path, change, named):
    theirs = their_model({**SMALL, "num_heads": 2})
    checkpoint = save(tmp_path, theirs, {**SMALL, "num_heads": 2, **change})
    result = ddimctl("sample", "--model", checkpoint, "-n", "1", "--steps", "2", "--out", tmp_path / "x.png",
                     check=False, cwd=tmp_path)
    assert result.returncode != 0 and named in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_their_command_line_spelling_of_flags_is_read(tmp_path):
    """Flags copied from their README (strings such as "True" and "16,8") mean what they say."""
    flags = {**SMALL, "learn_sigma": "True", "num_heads": "2", "rescale_timesteps": "true", "use_fp16": "False",
             "diffusion_steps": "4000", "noise_schedule": "cosine"}
    loaded = loading.load_model(str(save(tmp_path, their_model({**SMALL, "learn_sigma": True, "num_heads": 2}), flags)))
    assert (loaded.config.out_channels, loaded.train_steps, loaded.timestep_scale) == (6, 4000, 0.25)
    assert loaded.schedule["kind"] == "squaredcos_cap_v2"
    one = {**SMALL, "num_heads": 2, "attention_resolutions": 16, "channel_mult": [1, 2]}  # JSON numbers, not strings
    assert loading.load_model(str(save(tmp_path, their_model({**SMALL, "num_heads": 2}), one, "one"))).config.attention_resolutions == (16,)


def test_class_labels_are_checked_before_any_work(tmp_path):
    flags = {**SMALL, "class_cond": True}
    checkpoint = save(tmp_path, their_model(flags), flags)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    for args, named in [
        (("sample", "--class", "1000", "-n", "1"), "0 to 999"),
        (("sample", "--class", "1,2,3", "-n", "2"), "3 classes for 2 images"),
        (("invert", tmp_path / "a.png"), "--class"),  # no seed to draw from: the class must be given
    ]:
        result = ddimctl(*args, "--model", checkpoint, "--steps", "2", "--out", tmp_path / "o.safetensors"
                         if args[0] == "invert" else tmp_path / "o.png", check=False, cwd=tmp_path)
        assert result.returncode != 0 and named in result.stderr and len(result.stderr.strip().splitlines()) == 1, args
    assert not list(tmp_path.glob("o.*"))


def test_a_class_conditional_model_draws_each_images_class_from_its_seed(tmp_path):
    """Without --class, image i's class comes from (seed, i): the same images at any batch size,
    and given the same classes explicitly, the same pixels."""
    from ddimctl.sampling import runners
    from ddimctl import seeds

    flags = {**SMALL, "class_cond": True}
    loaded = loading.load_model(str(save(tmp_path, their_model(flags), flags)))
    drawn = runners.generate(loaded, 3, steps=3, seed=5, device="cpu", batch_size=3)
    in_twos = runners.generate(loaded, 3, steps=3, seed=5, device="cpu", batch_size=2)
    classes = seeds.image_classes(5, range(3), 1000).tolist()
    given = runners.generate(loaded, 3, steps=3, seed=5, device="cpu", batch_size=3, classes=classes)
    other = runners.generate(loaded, 3, steps=3, seed=5, device="cpu", batch_size=3, classes=[(c + 1) % 1000 for c in classes])
    assert len(set(classes)) > 1
    assert float((drawn - in_twos).abs().max()) < 1e-4 and torch.equal(drawn, given)
    assert float((drawn - other).abs().amax((1, 2, 3)).min()) > 1e-3  # the label reaches every image


def test_class_labels_for_an_unconditional_model_are_refused(tmp_path):
    flags = {**SMALL, "num_heads": 2}
    checkpoint = save(tmp_path, their_model(flags), flags)
    result = ddimctl("sample", "--model", checkpoint, "--class", "3", "-n", "1", "--steps", "2", "--out",
                     tmp_path / "o.png", check=False, cwd=tmp_path)
    assert result.returncode != 0 and "not class-conditional" in result.stderr and not (tmp_path / "o.png").exists()


def test_an_adm_model_exports_to_diffusers_when_unet2dmodel_can_hold_it(tmp_path):
    """Equal head widths and no rescaled timesteps: diffusers' UNet2DModel gives the same output;
    rescaled timesteps are refused by name before anything is written."""
    diffusers = pytest.importorskip("diffusers")
    flags = {**SMALL, "num_head_channels": 16, "use_scale_shift_norm": True}
    theirs = their_model(flags)
    ddimctl("export", save(tmp_path, theirs, flags), tmp_path / "pipe", cwd=tmp_path)
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        want, got = theirs(x, t), unet(x, t).sample
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())

    rescaled = {**flags, "rescale_timesteps": True, "diffusion_steps": 4000}
    result = ddimctl("export", save(tmp_path, theirs, rescaled, "rescaled"), tmp_path / "pipe2", check=False,
                     cwd=tmp_path)
    assert result.returncode != 0 and "rescaled timesteps" in result.stderr and not (tmp_path / "pipe2").exists()


def test_tune_steps_refuses_a_class_conditional_model_before_any_work(tmp_path):
    flags = {**SMALL, "class_cond": True}
    checkpoint = save(tmp_path, their_model(flags), flags)
    result = ddimctl("tune-steps", "--model", checkpoint, "--sampler", "unipc", "--steps", "5", "--out",
                     tmp_path / "t.json", check=False, cwd=tmp_path)
    assert result.returncode != 0 and "class-conditional" in result.stderr and not (tmp_path / "t.json").exists()


def test_fp16_weights_load_as_their_float32_network(tmp_path):
    """Checkpoints saved from use_fp16 training may hold float16 tensors: read as those values in fp32."""
    flags = {**SMALL, "num_heads": 2}
    theirs = their_model(flags)  # their fp32 network (use_fp16 only sets their compute dtype)
    torch.save({k: v.half() for k, v in theirs.state_dict().items()}, tmp_path / "half.pt")
    (tmp_path / "half.json").write_text(json.dumps({**flags, "use_fp16": True}))
    loaded = loading.load_model(str(tmp_path / "half.pt"))
    rounded = their_model(flags)
    rounded.load_state_dict({k: v.half().float() for k, v in theirs.state_dict().items()})
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        want, got = rounded(x, t), loaded.unet(x, t)
    assert next(loaded.unet.parameters()).dtype == torch.float32
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
