"""diffusers' UNet2DModel configs as people write them: every __init__ parameter is read (or refused by
name) by one two-way table, and every accepted config gives diffusers' own output."""

import inspect
import json

import pytest
import torch

from ddimctl.models import boundary, loading
from ddimctl.sampling import runners, samplers
from ddimctl.errors import DdimctlError
from ddimctl.models.diffusers_format import DIFFUSERS_UNET_KEYS, config_from_diffusers, diffusers_config

diffusers = pytest.importorskip("diffusers")

# A small version of diffusers' train_unconditional.py layout: every other argument left at its default
# (attention_head_dim 8 = multi-head, flip_sin_to_cos, freq_shift 0, downsample_padding 1, norm_eps 1e-5).
TRAIN_UNCONDITIONAL = dict(
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
)
VARIANTS = {
    "train_unconditional defaults": {},
    "single head (attention_head_dim null)": {"attention_head_dim": None},
    "head dim 16": {"attention_head_dim": 16},
    "google/ddpm-* embedding and padding": {"flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0},
    "mid_block_scale_factor 2": {"mid_block_scale_factor": 2.0},
    "attn_norm_num_groups 4": {"attn_norm_num_groups": 4},
    "scale_shift norm": {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8},
    "no mid attention": {"add_attention": False},
    "no mid block": {"mid_block_type": None},
    "time_embedding_dim 96": {"time_embedding_dim": 96},
    "norm_eps 1e-6": {"norm_eps": 1e-6},
    "learned variance (6 channels out)": {"out_channels": 6},
    "dropout 0.1": {"dropout": 0.1},
    "resnet resampling blocks": {
        "down_block_types": ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"),
        "up_block_types": ("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        "downsample_type": "resnet", "upsample_type": "resnet"},
    "class labels (num_class_embeds 10)": {"num_class_embeds": 10},
}


def test_the_table_is_unet2dmodel_signature_both_ways():
    """Every parameter of UNet2DModel.__init__ has a row, no row is not one, and each row's default is
    diffusers' (a config without the key means that value)."""
    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    params = {name: p.default for name, p in signature.items() if name != "self"}
    assert set(DIFFUSERS_UNET_KEYS) == set(params)
    for name, default in params.items():
        ours = DIFFUSERS_UNET_KEYS[name].default
        assert (list(ours) if isinstance(ours, tuple) else ours) == (list(default) if isinstance(default, tuple) else default), name


def diffusers_folder(tmp_path, **change) -> tuple[object, loading.LoadedModel]:
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**{**TRAIN_UNCONDITIONAL, **change}).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight count
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "unet")
    return ref, loading.load_model(str(tmp_path / "unet"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_accepted_config_gives_diffusers_output(tmp_path, variant):
    ref, loaded = diffusers_folder(tmp_path, **VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([3, 871])
    classes = torch.tensor([0, 9]) if loaded.config.class_count else None
    with torch.no_grad():
        want, got = ref(x, t, class_labels=classes).sample, loaded.unet(x, t, classes)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max()), variant
    # the round trip through export's writer gives the same architecture
    assert config_from_diffusers(json.loads(json.dumps(diffusers_config(loaded.config))), "export") == loaded.config


def test_a_learned_variance_model_hands_only_the_noise_to_the_samplers(tmp_path):
    """6 output channels for 3 input channels: the first 3 are the noise, the rest is not used."""
    ref, loaded = diffusers_folder(tmp_path, out_channels=6)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    with torch.no_grad():
        got, want = boundary.prepare(loaded.unet, torch.device("cpu"), "fp32")(x, t), ref(x, t).sample[:, :3]
    assert got.shape == x.shape and float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_a_learned_variance_checkpoint_without_config_samples(tmp_path):
    """It used to load and then end `sample` in a torch traceback (size of tensor a (3) must match b (6))."""
    from helpers import ddimctl
    from safetensors.torch import save_file

    from ddimctl.models.unet import PRESETS, UNet, UNetConfig

    config = UNetConfig(**{**PRESETS["tiny"].to_dict(), "out_channels": 6})
    torch.manual_seed(0)
    save_file(UNet(config).state_dict(), str(tmp_path / "lv.safetensors"))
    (tmp_path / "lv.json").write_text(json.dumps({"resolution": 16}))
    loaded = loading.load_model(str(tmp_path / "lv.safetensors"))
    assert loaded.config.out_channels == 6 and loaded.image_shape == (3, 16, 16)
    ddimctl("sample", "--model", tmp_path / "lv.safetensors", "--steps", "3", "-n", "2", "--out", "lv/", cwd=tmp_path)
    from PIL import Image

    assert [Image.open(tmp_path / "lv" / f"00000{i}.png").size for i in (0, 1)] == [(16, 16)] * 2


@pytest.mark.parametrize("change,named", [
    ({"downsample_type": "resnet"}, "downsample_type"),
    ({"upsample_type": "resnet"}, "upsample_type"),
    ({"num_class_embeds": 0}, "num_class_embeds"),
    ({"down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"]}, "resample"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift"),
    ({"resnet_time_scale_shift": "scale_shift"}, "attn_norm_num_groups"),
    ({"down_block_types": ["SkipDownBlock2D", "AttnDownBlock2D", "DownBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]}, "up_block_types"),
    ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type"),
    ({"freq_shift": 2}, "freq_shift"),
    ({"sample_size": None}, "sample_size"),
    ({"cross_attention_dim": 768}, "cross_attention_dim"),
])
def test_what_ddimctl_does_not_build_is_refused_by_name(change, named):
    cfg = {**{k: list(v) if isinstance(v, tuple) else v for k, v in TRAIN_UNCONDITIONAL.items()}, **change}
    with pytest.raises(DdimctlError) as refused:
        config_from_diffusers(cfg, "config.json")
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_a_config_without_keys_means_diffusers_defaults():
    """The defect this replaces: a config leaving out downsample_padding (diffusers: 1) loaded with the
    (0, 1, 0, 1) pad, and attention_head_dim left out (diffusers: 8) as one head."""
    config = config_from_diffusers({k: list(v) if isinstance(v, tuple) else v for k, v in TRAIN_UNCONDITIONAL.items()})
    assert (config.downsample_padding, config.head_channels, config.flip_sin_to_cos, config.freq_shift,
            config.norm_eps) == (1, 8, True, 0, 1e-5)


def test_scheduler_configs_are_read_key_by_key():
    """The DDPM family's scheduler classes load (their sampling keys are ddimctl's options to decide),
    clipping is said once, and what is not a DDPM schedule is refused by name."""
    from ddimctl.models.diffusers_format import schedule_from_diffusers

    for cls in ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                "PNDMScheduler"):
        cfg = {k: v for k, v in getattr(diffusers, cls)().config.items() if not k.startswith("_")}
        cfg["_class_name"] = cls
        heard = []
        schedule, prediction = schedule_from_diffusers(cfg, "s.json", heard.append)
        assert schedule["train_steps"] == 1000 and schedule["beta_end"] == 0.02 and prediction == "epsilon", cls
        assert len(heard) == (cls in ("DDPMScheduler", "DDIMScheduler")) and all("unclipped" in h for h in heard), cls
    heard = []
    schedule_from_diffusers({"_class_name": "DDPMScheduler", "clip_sample": False}, "s.json", heard.append)
    assert heard == []
    for cfg, named in [({"_class_name": "CMStochasticIterativeScheduler"}, "CMStochasticIterativeScheduler"),
                       ({"_class_name": "ScoreSdeVeScheduler"}, "ScoreSdeVeScheduler"),
                       ({"beta_schedule": "exp"}, "exp"),
                       ({"trained_betas": [0.1, 0.2]}, "trained_betas"),  # not one per step
                       ({"num_train_timesteps": 2, "trained_betas": [0.1, 1.5]}, "trained_betas"),
                       ({"prediction_type": "flow"}, "prediction_type"),
                       ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
                       ({"betta_start": 0.001}, "betta_start")]:
        with pytest.raises(DdimctlError, match=named):
            schedule_from_diffusers(cfg, "s.json")


def test_a_pipeline_folder_loads_with_its_scheduler(tmp_path):
    """save_pretrained of a DDIMPipeline: unet/ and scheduler/ beside model_index.json."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TRAIN_UNCONDITIONAL).eval()
    scheduler = diffusers.DDIMScheduler(beta_end=0.012, clip_sample=False)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = loading.load_model(str(tmp_path / "pipe"))
    assert loaded.schedule["beta_end"] == 0.012 and loaded.config.head_channels == 8
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(loaded.unet(x, t), unet(x, t).sample, atol=1e-5)


def ddim_against_diffusers(loaded, unet, scheduler, clip=False):
    """ddimctl's DDIM at S = 10 (uniform) and diffusers' DDIMScheduler loop from the same x_T: (ours,
    theirs, the runner)."""
    from ddimctl.sampling import samplers, runners

    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    runner = runners.Runner.create(loaded, samplers.Settings("ddim", 10, "uniform", clip=clip), torch.device("cpu"))
    with torch.no_grad():
        ours = runner.sample(x_T, None)
        scheduler.set_timesteps(10)
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
    return ours, x, runner


def test_clip_samples_as_diffusers_clip_sample_does(tmp_path):
    """--clip (ddim.clipping_x0) against DDIMScheduler(clip_sample=True) stepping with the noise of the
    clipped x0 (use_clipped_model_output, as guided-diffusion's DDIM with clip_denoised) on the same 10
    timesteps: a random network predicts x0 far outside [-1, 1], so clipping decides the result."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TRAIN_UNCONDITIONAL).eval()
    scheduler = diffusers.DDIMScheduler(clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = loading.load_model(str(tmp_path / "pipe"))
    ours, theirs, _ = ddim_against_diffusers(loaded, unet, scheduler, clip=True)
    unclipped, _, _ = ddim_against_diffusers(loaded, unet, scheduler)
    within = ((ours - theirs).abs() <= 1 / 255).float().mean()
    assert within >= 0.995 and float((ours - theirs).abs().max()) < 0.05, (float(within), float((ours - theirs).abs().max()))
    assert float((unclipped - theirs).abs().max()) > 0.5  # without clipping the same loop lands elsewhere


def test_clip_sample_gives_ddim_pipelines_own_output_of_a_folder_saved_with_clip_sample(tmp_path):
    """DDPMPipeline.save_pretrained writes clip_sample: true, and DDIMPipeline then clips x0 but steps
    with the network's own noise (use_clipped_model_output off, its default): --clip-sample is that
    loop, the plain sampler and --clip (which recomputes the noise) are not."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TRAIN_UNCONDITIONAL).eval()
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    pipeline = diffusers.DDIMPipeline.from_pretrained(tmp_path / "pipe")  # as its users load it
    assert pipeline.scheduler.config.clip_sample
    heard = []
    loaded = loading.load_model(str(tmp_path / "pipe"), notify=heard.append)
    assert any("clip_sample\x00 gives diffusers' own DDIMPipeline output" in h for h in heard)  # (--clip-sample)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pipeline.scheduler.set_timesteps(10)
        theirs = x_T.clone()
        for t in pipeline.scheduler.timesteps:  # DDIMPipeline.__call__'s loop with its defaults
            theirs = pipeline.scheduler.step(pipeline.unet(theirs, t).sample, t, theirs, eta=0.0,
                                             use_clipped_model_output=None).prev_sample
    ours = {name: runners.Runner.create(loaded, samplers.Settings("ddim", 10, "uniform", **options),
                                        torch.device("cpu")).sample(x_T, None)
            for name, options in [("clip_sample", {"clip_sample": True}), ("plain", {}), ("clip", {"clip": True})]}
    to_pixels = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    within = ((to_pixels(ours["clip_sample"]) - to_pixels(theirs)).abs() <= 1).float().mean()
    assert within >= 0.995, float(within)
    for other in ("plain", "clip"):
        assert float((to_pixels(ours[other]) - to_pixels(theirs)).abs().mean()) > 5, other


@pytest.mark.parametrize("beta_schedule,prediction", [
    ("linear", "epsilon"), ("squaredcos_cap_v2", "epsilon"), ("linear", "v_prediction"), ("linear", "sample"),
    ("scaled_linear", "v_prediction"), ("scaled_linear", "sample"), ("squaredcos_cap_v2", "v_prediction"),
])
def test_schedules_and_predictions_sample_as_diffusers_ddim_does(tmp_path, beta_schedule, prediction):
    """A pipeline folder with any of these schedules and predictions: ddimctl's DDIM (the model
    boundary turns the output into the noise) against diffusers' DDIMScheduler loop, clip_sample
    off, set_alpha_to_one, on the same 10 timesteps from the same x_T."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TRAIN_UNCONDITIONAL).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule=beta_schedule, prediction_type=prediction, clip_sample=False,
                                        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                                        beta_end=0.012 if beta_schedule == "scaled_linear" else 0.02,
                                        beta_start=0.00085 if beta_schedule == "scaled_linear" else 0.0001)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = loading.load_model(str(tmp_path / "pipe"))
    assert loaded.prediction == prediction and loaded.schedule["kind"] == beta_schedule
    torch.testing.assert_close(loaded.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-6)
    ours, x, runner = ddim_against_diffusers(loaded, unet, scheduler)
    assert sorted(scheduler.timesteps.tolist()) == runner.timesteps.tolist()
    within = ((ours - x).abs() <= 1 / 255).float().mean()
    assert within >= 0.995 and float((ours - x).abs().max()) < 0.05, (float(within), float((ours - x).abs().max()))


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"])
def test_every_schedule_kind_equals_diffusers_betas(kind):
    """(DDIMScheduler has no sigmoid; DDPMScheduler has them all.)"""
    from ddimctl import schedule

    reference = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=0.0002, beta_end=0.015, num_train_timesteps=500)
    ours = schedule.Schedule(500, 0.0002, 0.015, kind).alphas_cumprod()
    torch.testing.assert_close(ours.float(), reference.alphas_cumprod, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta_schedule", ["trained_betas", "laplace"])
def test_trained_and_laplace_betas_sample_as_diffusers_and_export_as_betas(tmp_path, beta_schedule):
    """trained_betas (diffusers then ignores beta_schedule) and DDPMScheduler's laplace schedule: the
    same alphas_cumprod, DDIM as diffusers' DDIMScheduler on them, and an export whose DDIMScheduler
    (which has no laplace) carries the betas themselves."""
    from ddimctl import schedule

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TRAIN_UNCONDITIONAL).eval()
    betas = (schedule.laplace_betas(1000) if beta_schedule == "laplace" else torch.linspace(2e-4, 0.03, 1000) ** 1.1).tolist()
    if beta_schedule == "laplace":
        scheduler = diffusers.DDPMScheduler(beta_schedule="laplace", clip_sample=False)
    else:
        scheduler = diffusers.DDPMScheduler(trained_betas=betas, clip_sample=False)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = loading.load_model(str(tmp_path / "pipe"))
    assert loaded.schedule["kind"] == ("laplace" if beta_schedule == "laplace" else "trained")
    torch.testing.assert_close(loaded.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-6)

    reference = diffusers.DDIMScheduler(trained_betas=betas, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                        timestep_spacing="leading")
    ours, x, _ = ddim_against_diffusers(loaded, unet, reference)
    assert float(((ours - x).abs() <= 1 / 255).float().mean()) >= 0.995

    from ddimctl.models.export import export_diffusers

    export_diffusers(loaded, tmp_path / "exported")
    exported = diffusers.DDIMScheduler.from_pretrained(tmp_path / "exported" / "scheduler")
    torch.testing.assert_close(exported.alphas_cumprod, scheduler.alphas_cumprod, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["digits", "v_prediction", "sample"])
def test_an_export_samples_in_diffusers_ddim_pipeline_as_ddimctl_does(tmp_path, model):
    """The exported folder in diffusers' own hands: DDIMPipeline.from_pretrained, its loop with the
    pipeline's defaults (eta 0, no clipping arguments), from the same x_T as ddimctl's DDIM at S = 10:
    the same timesteps and the same images to float rounding (the scheduler's schedule, prediction,
    final step to abar = 1, spacing and offset are all in the export's hands)."""
    from ddimctl.models.export import export_diffusers

    if model == "digits":
        loaded = loading.load_model("digits")
    else:
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(**{**TRAIN_UNCONDITIONAL, "in_channels": 1, "out_channels": 1}).eval()
        schedule = (dict(beta_schedule="squaredcos_cap_v2") if model == "v_prediction"
                    else dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.015))
        scheduler = diffusers.DDIMScheduler(prediction_type=model, clip_sample=False, **schedule)
        diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
        loaded = loading.load_model(str(tmp_path / "pipe"))
    export_diffusers(loaded, tmp_path / "exported")
    pipeline = diffusers.DDIMPipeline.from_pretrained(tmp_path / "exported")
    x_T = torch.randn(4, *loaded.image_shape, generator=torch.Generator().manual_seed(1))
    runner = runners.Runner.create(loaded, samplers.Settings("ddim", 10, "uniform"), torch.device("cpu"))
    with torch.no_grad():
        ours = runner.sample(x_T, None)
        pipeline.scheduler.set_timesteps(10)
        theirs = x_T.clone()
        for t in pipeline.scheduler.timesteps:
            theirs = pipeline.scheduler.step(pipeline.unet(theirs, t).sample, t, theirs, eta=0.0).prev_sample
    assert sorted(pipeline.scheduler.timesteps.tolist()) == runner.timesteps.tolist()
    assert float((ours - theirs).abs().max()) < 2e-4, float((ours - theirs).abs().max())
