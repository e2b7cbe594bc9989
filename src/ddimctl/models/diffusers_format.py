"""diffusers' on-disk format: its folders (a pipeline or a bare UNet), UNet2DModel's config.json both
ways (the table export writes from too) and the scheduler configs of the DDPM family (noise schedule
and prediction type). Every key is read as diffusers reads it, left to ddimctl's own options, or
refused by name; each folder rule is written once, for local folders, Hub repositories, the Hub
cache's listing and export."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..schedule import PREDICTIONS, Schedule, SCHEDULE_KINDS, TRAINED
from ..errors import DdimctlError, param
from ..io.fields import Fields
from .layouts import MAX_RESOLUTION, MAX_TRAIN_STEPS, checked
from .unet import UNetConfig

# --------------------------------------------------------------------------------------------
# diffusers' folders: a pipeline (model_index.json, unet/, scheduler/), as save_pretrained writes it,
# or a bare UNet folder (config.json and its weights, a scheduler_config.json beside them if saved so).

PIPELINE_INDEX = "model_index.json"
UNET_FOLDER = "unet/"
UNET_CONFIG = "config.json"
# A UNet's weights file, by preference: safetensors first; a pickle is only read with weights_only=True.
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def unet_prefix(has: Callable[[str], bool]) -> str:
    """Where a diffusers folder keeps its UNet, given `has(name)`, whether a file of the folder exists:
    "unet/" in a pipeline (model_index.json; or, copied without it, no config.json at the top but
    unet/config.json), "" in a bare UNet folder."""
    if has(PIPELINE_INDEX):
        return UNET_FOLDER
    if not has(UNET_CONFIG) and has(UNET_FOLDER + UNET_CONFIG):
        return UNET_FOLDER
    return ""


# The pixel-space DDPM family's classes, allowed by name: a pipeline of another class (a latent one's
# UNet samples latents, not images), or a UNet of another class, is refused by name wherever it comes from.
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")
UNET_CLASS = "UNet2DModel"


def check_pipeline(index: dict, where: str) -> None:
    """A pipeline's model_index.json: one of PIXEL_PIPELINES, whose unet is a UNet2DModel and which
    has no other network (a VAE, a text encoder) beside its scheduler."""
    fields = Fields(index, where)
    kind = fields.text("_class_name", "")
    if kind not in PIXEL_PIPELINES:
        raise DdimctlError(f"{where}: a {kind or 'pipeline of no class'} is not a pixel-space DDPM pipeline; ddimctl loads "
                           f"{', '.join(PIXEL_PIPELINES)} folders")
    unet = index.get("unet")
    if not (isinstance(unet, list) and len(unet) == 2 and unet[1] == UNET_CLASS):
        raise DdimctlError(f"{where}: its unet is {unet!r}, not a diffusers {UNET_CLASS}")
    others = sorted(k for k, v in index.items() if not k.startswith("_") and k not in ("unet", "scheduler") and v)
    if others:
        raise DdimctlError(f"{where}: the pipeline holds {others[0]} beside its UNet (a latent or conditioned model); "
                           f"ddimctl samples pixel-space DDPM pipelines")


def scheduler_config_name(prefix: str) -> str:
    """The scheduler config of a diffusers folder whose UNet is at `prefix`: a pipeline's scheduler/,
    or beside a bare UNet."""
    return PIPELINE_SCHEDULER_CONFIG if prefix else SCHEDULER_CONFIG


# --------------------------------------------------------------------------------------------
# diffusers' UNet2DModel config, both ways: every parameter of UNet2DModel.__init__ is a key here,
# with diffusers' default (what a config without the key means), how it is read into a UNetConfig
# (or refused, by name) and how export writes it. tests/test_layouts.py holds this table to
# inspect.signature(UNet2DModel.__init__), so a new diffusers parameter cannot be silently ignored.

# block type -> (has attention, how it resamples: "conv", "resnet" or None: as downsample_type / upsample_type say)
DOWN_BLOCKS = {"DownBlock2D": (False, "conv"), "AttnDownBlock2D": (True, None), "ResnetDownsampleBlock2D": (False, "resnet")}
UP_BLOCKS = {"UpBlock2D": (False, "conv"), "AttnUpBlock2D": (True, None), "ResnetUpsampleBlock2D": (False, "resnet")}
RESAMPLING = ("conv", "resnet")


def _levels(f: Fields) -> tuple[tuple[int, ...], list[bool]]:
    """The widths and which levels attend, from block_out_channels and down_block_types."""
    widths = f.integers("block_out_channels", low=1, high=4096)
    down = f.texts("down_block_types")
    if len(down) != len(widths):
        raise DdimctlError(f"{f.where}: {len(down)} down_block_types for {len(widths)} block_out_channels; they must match")
    unknown = [kind for kind in down if kind not in DOWN_BLOCKS]
    if unknown:
        raise DdimctlError(f"{f.where}: down_block_types has {unknown[0]!r}; ddimctl builds "
                           f"{', '.join(DOWN_BLOCKS)} (pixel-space DDPM blocks)")
    return widths, [DOWN_BLOCKS[kind][0] for kind in down]


def _read_widths(f: Fields) -> dict:
    widths, _ = _levels(f)
    if any(w % widths[0] for w in widths):
        raise DdimctlError(f"{f.where}: block_out_channels {list(widths)} are not multiples of the first")
    return {"base_channels": widths[0], "channel_mult": tuple(w // widths[0] for w in widths)}


def _read_attention_levels(f: Fields) -> dict:
    _, attend = _levels(f)
    resolution = _read_resolution(f)["resolution"]
    return {"attention_resolutions": tuple(resolution >> i for i, a in enumerate(attend) if a)}


def _read_up_blocks(f: Fields) -> dict:
    _, attend = _levels(f)
    up = f.texts("up_block_types")
    unknown = [kind for kind in up if kind not in UP_BLOCKS]
    if unknown:
        raise DdimctlError(f"{f.where}: up_block_types has {unknown[0]!r}; ddimctl builds {', '.join(UP_BLOCKS)}")
    if [UP_BLOCKS[kind][0] for kind in up] != attend[::-1]:
        raise DdimctlError(f"{f.where}: up_block_types {list(up)} do not mirror the attention of down_block_types; "
                           f"ddimctl builds UNets whose up path mirrors the down path")
    return {}


def _read_resampling(f: Fields) -> dict:
    """One way of resampling for the whole UNet: strided / plain convolutions, or resnets that pool
    and upsample inside (ResnetDownsampleBlock2D, ResnetUpsampleBlock2D, or the "resnet" types)."""
    down_type = f.text("downsample_type", choices=RESAMPLING)
    up_type = f.text("upsample_type", choices=RESAMPLING)
    down, up = f.texts("down_block_types"), f.texts("up_block_types")
    used = {DOWN_BLOCKS[kind][1] or down_type for kind in down[:-1]} | {UP_BLOCKS[kind][1] or up_type for kind in up[:-1]}
    if len(used) > 1:
        raise DdimctlError(f"{f.where}: its blocks resample both with convolutions and with resnets (block types "
                           f"with downsample_type {down_type!r}, upsample_type {up_type!r}); ddimctl builds one kind")
    return {"resnet_resampling": used == {"resnet"}}


def _resampling(c: UNetConfig) -> str:
    return "resnet" if c.resnet_resampling else "conv"


def _write_blocks(c: UNetConfig, blocks: dict, resolutions: list[int]) -> list[str]:
    """Each level's block type (attention blocks name their resampling in downsample_type / upsample_type)."""
    resampling = _resampling(c)

    def kind(attends: bool) -> str:
        return next(k for k, (a, how) in blocks.items() if a == attends and how == (None if attends else resampling))

    return [kind(r in c.attention_resolutions) for r in resolutions]


def _read_classes(f: Fields) -> dict:
    if f.data.get("num_class_embeds") is None:
        return {"class_count": None}
    return {"class_count": f.integer("num_class_embeds", low=1, high=1_000_000)}


def _read_resolution(f: Fields) -> dict:
    size = f.data.get("sample_size")
    if size is None:
        raise DdimctlError(f"{f.where}: sample_size is missing or null; set it to the model's image size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise DdimctlError(f"{f.where}: sample_size {size!r} is not square; ddimctl samples square images")
        f = Fields({"sample_size": size[0]}, f.where)
    return {"resolution": f.integer("sample_size", low=1, high=MAX_RESOLUTION)}


def _read_head_channels(f: Fields) -> dict:
    if f.data.get("attention_head_dim") is None:
        return {"head_channels": None}
    return {"head_channels": f.integer("attention_head_dim", low=1, high=4096)}


def _read_attention_norm(f: Fields) -> dict:
    if f.data.get("attn_norm_num_groups") is None:
        if f.data.get("resnet_time_scale_shift") == "scale_shift" and f.data.get("add_attention", True):
            # diffusers then builds the mid block's attention without a norm, a form ddimctl does not build
            raise DdimctlError(f"{f.where}: attn_norm_num_groups null with resnet_time_scale_shift 'scale_shift' "
                               f"gives the mid attention no norm, which ddimctl does not build")
        return {"attention_norm_groups": None}
    groups = f.integer("attn_norm_num_groups", low=1, high=4096)
    return {"attention_norm_groups": None if groups == f.data.get("norm_num_groups") else groups}  # None: the same


def _read_mid_block(f: Fields) -> dict:
    kind = f.data.get("mid_block_type")
    if kind not in ("UNetMidBlock2D", None):
        raise DdimctlError(f"{f.where}: mid_block_type {kind!r}; ddimctl builds UNetMidBlock2D or none (null)")
    return {"mid_block": kind is not None}


def _read_time_embedding_dim(f: Fields) -> dict:
    if f.data.get("time_embedding_dim") is None:
        return {"time_embedding_dim": None}
    return {"time_embedding_dim": f.integer("time_embedding_dim", low=2, high=65536)}


def _field(field: str, read) -> Callable:
    """A key that is one UNetConfig field, read with `read(fields, key)`."""
    return lambda key: (lambda f: {field: read(f, key)}, lambda c: getattr(c, field))


def _only(values: tuple, why: str) -> Callable:
    """A key ddimctl builds in these values only (written as the first); others are refused by name."""
    def read(key):
        def check(f: Fields) -> dict:
            if f.data.get(key) not in values:
                raise DdimctlError(f"{f.where}: {key}={f.data.get(key)!r} is not supported: {why}")
            return {}
        return check, lambda c: values[0]
    return read


@dataclass(frozen=True)
class DiffusersKey:
    default: object  # what diffusers takes when a config leaves the key out
    read: Callable[[Fields], dict]  # the UNetConfig fields it gives (the key's value or default in f)
    write: Callable[[UNetConfig], object]  # what export writes for it


def _key(default, how: Callable) -> Callable[[str], DiffusersKey]:
    return lambda key: DiffusersKey(default, *how(key))


_integer = lambda low, high: lambda f, key: f.integer(key, low=low, high=high)  # noqa: E731
_number = lambda low, high: lambda f, key: f.number(key, low=low, high=high)  # noqa: E731
_flag = lambda f, key: f.flag(key)  # noqa: E731

DIFFUSERS_UNET_KEYS: dict[str, DiffusersKey] = {name: make(name) for name, make in {
    "sample_size": _key(None, lambda key: (_read_resolution, lambda c: c.resolution)),
    "in_channels": _key(3, _field("in_channels", _integer(1, 4))),
    "out_channels": _key(3, _field("out_channels", _integer(1, 8))),
    "center_input_sample": _key(False, _only((False,), "the network takes [-1, 1] pixels as they are")),
    "time_embedding_type": _key("positional", _only(("positional",), "ddimctl builds the sinusoidal embedding of "
                                                    "DDPM models (fourier is score-SDE's NCSN++, a VE model)")),
    "time_embedding_dim": _key(None, lambda key: (_read_time_embedding_dim, lambda c: c.time_embedding_dim)),
    "freq_shift": _key(0, _field("freq_shift", _integer(0, 1))),
    "flip_sin_to_cos": _key(True, _field("flip_sin_to_cos", _flag)),
    "down_block_types": _key(("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"), lambda key: (
        _read_attention_levels, lambda c: _write_blocks(c, DOWN_BLOCKS, c.level_resolutions))),
    "mid_block_type": _key("UNetMidBlock2D", lambda key: (_read_mid_block, lambda c: "UNetMidBlock2D" if c.mid_block else None)),
    "up_block_types": _key(("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), lambda key: (
        _read_up_blocks, lambda c: _write_blocks(c, UP_BLOCKS, c.level_resolutions[::-1]))),
    "block_out_channels": _key((224, 448, 672, 896), lambda key: (_read_widths, lambda c: c.widths)),
    "layers_per_block": _key(2, _field("num_res_blocks", _integer(1, 64))),
    "mid_block_scale_factor": _key(1, _field("mid_scale", _number(1e-3, 1e3))),
    "downsample_padding": _key(1, _field("downsample_padding", _integer(0, 1))),
    "downsample_type": _key("conv", lambda key: (_read_resampling, _resampling)),
    "upsample_type": _key("conv", lambda key: (lambda f: {}, _resampling)),  # read with downsample_type
    "dropout": _key(0.0, _field("dropout", _number(0, 0.999))),
    "act_fn": _key("silu", _only(("silu", "swish"), "the DDPM UNet uses SiLU (swish)")),
    "attention_head_dim": _key(8, lambda key: (_read_head_channels, lambda c: c.head_channels)),
    "norm_num_groups": _key(32, _field("norm_groups", _integer(1, 4096))),
    # written out with scale_shift, where diffusers would read a missing value as "no norm"
    "attn_norm_num_groups": _key(None, lambda key: (
        _read_attention_norm, lambda c: c.attention_norm_groups or (c.norm_groups if c.scale_shift else None))),
    "norm_eps": _key(1e-5, _field("norm_eps", _number(1e-12, 1))),
    "resnet_time_scale_shift": _key("default", lambda key: (
        lambda f: {"scale_shift": f.text(key, choices=("default", "scale_shift")) == "scale_shift"},
        lambda c: "scale_shift" if c.scale_shift else "default")),
    "add_attention": _key(True, _field("mid_attention", _flag)),
    "class_embed_type": _key(None, _only((None,), "ddimctl builds the learned class embedding of num_class_embeds "
                                         "('timestep' and 'identity' embed other inputs)")),
    "num_class_embeds": _key(None, lambda key: (_read_classes, lambda c: c.class_count)),
    # Only a learned time embedding uses it; with the positional one diffusers ignores it, and so may we.
    "num_train_timesteps": _key(None, lambda key: (lambda f: {}, lambda c: None)),
}.items()}


def config_from_diffusers(cfg: dict, where: str = "config.json") -> UNetConfig:
    """UNetConfig from a diffusers UNet2DModel config.json: every key read as diffusers reads it (a
    missing key means diffusers' default), and one ddimctl does not build refused by name."""
    if cfg.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise DdimctlError(f"{where}: a {cfg['_class_name']} is not a pixel-space {UNET_CLASS}; ddimctl loads {UNET_CLASS} "
                           f"weights only")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_UNET_KEYS)
    if unknown:
        raise DdimctlError(f"{where}: {unknown[0]!r} is not a UNet2DModel setting ddimctl knows; a UNet2DModel "
                           f"config has {', '.join(DIFFUSERS_UNET_KEYS)}")
    fields = Fields({**{k: key.default for k, key in DIFFUSERS_UNET_KEYS.items()}, **cfg}, where)
    values: dict = {}
    for key in DIFFUSERS_UNET_KEYS.values():
        values.update(key.read(fields))
    return checked(UNetConfig(**values), where)


def diffusers_config(c: UNetConfig) -> dict:
    """The UNet2DModel config.json that builds this UNet (export writes it); what UNet2DModel cannot
    build is refused by name."""
    if c.base_channels != c.widths[0]:
        raise DdimctlError(f"its time embedding is {c.base_channels} wide and its first level {c.widths[0]}; "
                           f"UNet2DModel makes them equal, so it cannot hold this UNet")
    if c.head_channels is None and c.heads != 1 and c.attention_resolutions:
        widths = {w for w, r in zip(c.widths, c.level_resolutions) if r in c.attention_resolutions}
        if c.mid_block and c.mid_attention:
            widths.add(c.widths[-1])
        if len(widths) > 1 or min(widths) % c.heads:
            raise DdimctlError(f"its attention layers have {c.heads} heads each at widths {sorted(widths)}; "
                               f"UNet2DModel has one head width for all of them")
        c = replace(c, head_channels=min(widths) // c.heads)
    return {"_class_name": "UNet2DModel", **{name: key.write(c) for name, key in DIFFUSERS_UNET_KEYS.items()}}


# diffusers' scheduler classes of the discrete DDPM family (betas over integer timesteps); a model saved
# with another (consistency models, score-SDE VE models) only looks like these.
DDPM_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "DDPMParallelScheduler",
    "DDIMParallelScheduler",
)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr")
# How the scheduler samples: ddimctl's --sampler, --steps and --skip decide that (the paper's sampler
# unclipped); DDPM's ancestral variance is not used by DDIM.
SAMPLING_KEYS = (
    "variance_type", "timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps", "solver_order",
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped",
    "predict_x0", "disable_corrector", "solver_p", "interpolation_type", "timestep_type", "sigma_min", "sigma_max",
    "use_dynamic_shifting", "time_shift_type", "shift_terminal", "dynamic_thresholding_ratio", "clip_sample_range",
    "sample_max_value", "clip_sample", "thresholding", "use_flow_sigmas", "flow_shift",
)
CLIPPING_DEFAULT = {"DDPMScheduler": True, "DDIMScheduler": True, "DDPMParallelScheduler": True,
                    "DDIMParallelScheduler": True, "HeunDiscreteScheduler": False}



def schedule_from_diffusers(cfg: dict, where: str = "scheduler_config.json",
                            notify: Callable[[str], None] = lambda message: None) -> tuple[dict, str]:
    """The noise schedule of a diffusers scheduler config and what the network predicts (PREDICTIONS);
    every key is read, left to ddimctl's own sampling options (said when the config asks for
    clipping), or refused by name."""
    fields = Fields(cfg, where)
    kind = fields.text("_class_name", "DDPMScheduler")
    if kind not in DDPM_SCHEDULERS:
        raise DdimctlError(f"{where}: {kind} is not a scheduler of the DDPM family (betas over integer timesteps); "
                           f"ddimctl samples DDPM-family models only")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in SCHEDULE_KEYS + SAMPLING_KEYS)
    if unknown:
        raise DdimctlError(f"{where}: {unknown[0]!r} is not a scheduler setting ddimctl knows")
    betas = fields.text("beta_schedule", "linear")
    if betas not in SCHEDULE_KINDS:
        raise DdimctlError(f"{where}: uses beta_schedule={betas!r}; ddimctl supports the beta schedules "
                           f"{', '.join(SCHEDULE_KINDS)} and trained_betas")
    steps = fields.integer("num_train_timesteps", 1000, 1, MAX_TRAIN_STEPS)
    trained = None
    if cfg.get("trained_betas") is not None:  # diffusers then ignores beta_schedule
        value = cfg["trained_betas"]
        if not (isinstance(value, list) and len(value) == steps and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in value)):
            raise DdimctlError(f"{where}: trained_betas must be a list of {steps} numbers in (0, 1), one per "
                               f"num_train_timesteps")
        betas, trained = TRAINED, tuple(float(b) for b in value)
    prediction = fields.text("prediction_type", "epsilon", PREDICTIONS)
    for key in ("rescale_betas_zero_snr", "use_flow_sigmas"):
        if fields.flag(key, False):
            raise DdimctlError(f"{where}: sets {key}, which is not a DDPM schedule; ddimctl does not support it")
    clipping = [key for key, default in (("clip_sample", CLIPPING_DEFAULT.get(kind, False)), ("thresholding", False))
                if fields.flag(key, default)]
    if clipping:
        notify(f"{where}: its {kind} would clip the predicted image ({' and '.join(clipping)}); ddimctl samples "
               f"unclipped, as the paper and the DDIM authors' code do: {param('clip_sample')} gives diffusers' own "
               f"DDIMPipeline output")
    try:
        schedule = Schedule(
            train_steps=steps,
            beta_start=fields.number("beta_start", 1e-4, 1e-12, 0.999),
            beta_end=fields.number("beta_end", 0.02, 1e-12, 0.999),
            kind=betas,
            trained_betas=trained,
        ).to_dict()
    except ValueError as e:
        raise DdimctlError(f"{where}: {e}") from e
    return schedule, prediction
