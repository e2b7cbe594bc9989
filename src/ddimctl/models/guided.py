"""openai's guided-diffusion and improved-diffusion checkpoints (the ADM UNet of Dhariwal & Nichol):
their flags, kept in a sidecar JSON under the names their READMEs' MODEL_FLAGS and DIFFUSION_FLAGS
use, and their state-dict layout, renamed into ddimctl's UNet.

Their code computes what ddimctl's UNet computes with these options: the time embedding [cos, sin]
without frequency shift, group norms in float32 with eps 1e-5, symmetric downsampling padding,
scale-shift norm, resnet resampling (resblock_updown), fixed head counts or head widths, a label
embedding added to the time embedding. Attention comes as one fused 1x1 qkv convolution, whose rows
are per head [q_h, k_h, v_h] in the legacy order and [q, k, v] (each per head) in the new one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..schedule import Schedule
from ..errors import DdimctlError
from ..io.fields import Fields
from .layouts import MAX_RESOLUTION, MAX_TRAIN_STEPS, checked
from .unet import UNetConfig

# guided-diffusion's script_util defaults: what a sidecar that leaves a flag out means.
DEFAULTS = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "channel_mult": "", "attention_resolutions": "16,8",
    "num_heads": 4, "num_head_channels": -1, "num_heads_upsample": -1, "learn_sigma": False, "class_cond": False,
    "use_scale_shift_norm": True, "resblock_updown": False, "use_new_attention_order": False, "dropout": 0.0,
    "noise_schedule": "linear", "diffusion_steps": 1000, "rescale_timesteps": False, "predict_xstart": False,
}
# Flags of training or of their own sampling loop: nothing the network or its schedule depends on.
# (use_fp16: ddimctl's --precision decides; timestep_respacing: --steps and --skip do.)
TRAINING_FLAGS = ("use_fp16", "use_checkpoint", "use_kl", "rescale_learned_sigmas", "sigma_small", "timestep_respacing")
CLASSES = 1000  # class_cond models are ImageNet's (script_util.NUM_CLASSES)
# Their create_model's channel_mult for an empty flag, by image size (improved-diffusion adds 32).
CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
                32: (1, 2, 2, 2)}
_BOOLEANS = {"True": True, "true": True, "False": False, "false": False}


@dataclass(frozen=True)
class GuidedModel:
    """What a sidecar says: the network, its schedule and what it predicts, its time input scale."""

    config: UNetConfig
    schedule: dict
    prediction: str  # "epsilon", or "sample" with predict_xstart
    timestep_scale: float  # rescale_timesteps: the network sees t * 1000 / T
    new_attention_order: bool


def is_guided_state(state: dict) -> bool:
    """Whether a state dict is in guided-/improved-diffusion's layout."""
    return "input_blocks.0.0.weight" in state and "time_embed.0.weight" in state


def _as_flags(cfg: dict) -> dict:
    """Flag values as JSON gives them or as their command lines do ("True", "16,8", "-1")."""
    flags = {}
    for key, value in cfg.items():
        default = DEFAULTS.get(key)
        if isinstance(value, str) and isinstance(default, bool):
            value = _BOOLEANS.get(value, value)
        elif isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                value = int(value) if isinstance(default, int) else float(value)
            except ValueError:
                pass
        flags[key] = value
    return flags


def _numbers(f: Fields, key: str, read: Callable[[str], float]) -> tuple | None:
    """A comma-separated flag ("16,8") or a JSON list; None when empty."""
    value = f.data.get(key)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return tuple(read(v) for v in value.split(","))
        except ValueError:
            raise DdimctlError(f"{f.where}: {key} {value!r} is not a comma-separated list of numbers") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # one value: "16" written as 16
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise DdimctlError(f"{f.where}: {key} is {value!r}, expected a list of numbers such as \"16,8\"")


def read_flags(cfg: dict, where: str) -> GuidedModel:
    """The model a guided-/improved-diffusion sidecar describes; a flag ddimctl does not know, or a
    value it cannot build, is refused by name."""
    unknown = sorted(k for k in cfg if k not in DEFAULTS and k not in TRAINING_FLAGS)
    if unknown:
        raise DdimctlError(f"{where}: {unknown[0]!r} is not a guided-diffusion model flag ddimctl knows; the flags "
                           f"are {', '.join(DEFAULTS)} (and the training ones {', '.join(TRAINING_FLAGS)})")
    f = Fields({**DEFAULTS, **_as_flags(cfg)}, where)
    size = f.integer("image_size", low=1, high=MAX_RESOLUTION)
    mult = _numbers(f, "channel_mult", float) or CHANNEL_MULT.get(size)
    if mult is None:
        raise DdimctlError(f"{where}: their code has no default channel_mult for image_size {size}; set channel_mult")
    mult = tuple(int(m) if float(m).is_integer() else float(m) for m in mult)  # 1.0 as 1, 0.5 as it is
    heads = f.integer("num_heads", low=1, high=4096)
    head_channels = f.integer("num_head_channels", low=-1, high=4096)
    heads_up = f.integer("num_heads_upsample", low=-1, high=4096)
    if head_channels == 0 or heads_up == 0:
        raise DdimctlError(f"{where}: num_head_channels and num_heads_upsample are -1 or at least 1")
    if head_channels == -1 and heads_up not in (-1, heads):
        raise DdimctlError(f"{where}: num_heads_upsample {heads_up} differs from num_heads {heads}; ddimctl builds "
                           f"one head count for the whole UNet")
    steps = f.integer("diffusion_steps", low=1, high=MAX_TRAIN_STEPS)
    schedule = f.text("noise_schedule", choices=("linear", "cosine"))
    # Their linear schedule is DDPM's scaled to keep its ends at any T: 1000 / T times [1e-4, 0.02].
    kind, scale = ("linear", 1000 / steps) if schedule == "linear" else ("squaredcos_cap_v2", 1.0)
    config = UNetConfig(
        resolution=size,
        in_channels=3,
        out_channels=6 if f.flag("learn_sigma") else 3,
        base_channels=f.integer("num_channels", low=1, high=4096),
        channel_mult=mult,
        num_res_blocks=f.integer("num_res_blocks", low=1, high=64),
        attention_resolutions=tuple(int(r) for r in _numbers(f, "attention_resolutions", int) or ()),
        dropout=0.0,  # sampling never drops out
        norm_groups=32,
        norm_eps=1e-5,
        head_channels=None if head_channels == -1 else head_channels,
        heads=heads,
        flip_sin_to_cos=True,
        freq_shift=0,
        scale_shift=f.flag("use_scale_shift_norm"),
        downsample_padding=1,
        resnet_resampling=f.flag("resblock_updown"),
        class_count=CLASSES if f.flag("class_cond") else None,
        float32_norms=True,
    )
    f.number("dropout", low=0, high=0.999)
    return GuidedModel(
        config=checked(config, where),
        schedule=Schedule(steps, 1e-4 * scale, 0.02 * scale, kind).to_dict(),
        prediction="sample" if f.flag("predict_xstart") else "epsilon",
        timestep_scale=1000 / steps if f.flag("rescale_timesteps") else 1.0,
        new_attention_order=f.flag("use_new_attention_order"),
    )


def suggested_flags(state: dict[str, torch.Tensor]) -> str:
    """A sidecar for these weights, and what they cannot show. The state dict shows the levels and
    their widths (num_channels, channel_mult), the blocks per level, where attention sits, how it
    resamples, classes, learned sigmas and scale-shift norm; not image_size (guessed from the levels:
    attention_resolutions follow it), the heads (their qkv is fused), the qkv order, the schedule or T.
    Pasted as printed it loads; the flags it cannot show are said, with the choice to make."""
    flags = {key: DEFAULTS[key] for key in ("image_size", "num_channels", "channel_mult", "num_res_blocks",
                                            "attention_resolutions", "num_heads", "num_head_channels")}
    try:
        base = state["time_embed.0.weight"].shape[1]
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("output_blocks.")}
        upsamplers = sum(any(k.startswith(f"output_blocks.{b}.{j}.") and (".conv." in k or ".in_layers." in k)
                             for k in state for j in (1, 2)) for b in blocks)
        levels = upsamplers + 1
        per_level = len(blocks) // levels - 1
        widths = [state[f"input_blocks.{1 + level * (per_level + 1)}.0.out_layers.3.weight"].shape[0]
                  for level in range(levels)]
        attends = [f"input_blocks.{1 + level * (per_level + 1)}.1.qkv.weight" in state for level in range(levels)]
        mult = tuple(w / base for w in widths)
        size = next((s for s, m in CHANNEL_MULT.items() if tuple(float(v) for v in m) == mult), 2 ** (levels + 2))
        flags.update(
            image_size=size, num_channels=base, num_res_blocks=per_level,
            channel_mult=",".join(f"{m:g}" for m in mult),
            attention_resolutions=",".join(str(size >> level) for level, a in enumerate(attends) if a),
            num_heads=4, num_head_channels=-1,  # their defaults
            resblock_updown=f"input_blocks.{per_level + 1}.0.in_layers.0.weight" in state,
            use_scale_shift_norm=state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * widths[0],
            learn_sigma=state["out.2.weight"].shape[0] == 2 * state["input_blocks.0.0.weight"].shape[1],
            class_cond="label_emb.weight" in state,
        )
    except (KeyError, IndexError, ValueError, ZeroDivisionError):
        pass  # not their layout after all: their defaults, and the flags' own errors say the rest
    return (f"{json.dumps(flags)} (the weights cannot show image_size, {flags['image_size']} assumed: the model's "
            f"README says it, and attention_resolutions scale with it; nor num_heads against num_head_channels, "
            f"use_new_attention_order, noise_schedule or diffusion_steps: set what the README's flags say)")


# --------------------------------------------------------------------------------------------
# Their layout into ddimctl's names

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESAMPLER = {"op": "conv", "conv": "conv"}  # Downsample's strided conv, Upsample's conv


def _module_names(c: UNetConfig) -> dict[str, tuple[str, str]]:
    """Their module prefix -> (ddimctl's prefix, kind), walking the UNet as their UNetModel builds it."""
    names = {"time_embed.0": ("time_embedding.linear_1", ""), "time_embed.2": ("time_embedding.linear_2", ""),
             "label_emb": ("class_embedding", ""), "input_blocks.0.0": ("conv_in", ""),
             "out.0": ("conv_norm_out", ""), "out.2": ("conv_out", ""),
             "middle_block.0": ("mid_block.resnets.0", "resnet"), "middle_block.1": ("mid_block.attentions.0", "attention"),
             "middle_block.2": ("mid_block.resnets.1", "resnet")}
    resampler = "resnet" if c.resnet_resampling else "resampler"
    levels = len(c.channel_mult)
    attends = [r in c.attention_resolutions for r in c.level_resolutions]
    block = 1
    for level in range(levels):
        for i in range(c.num_res_blocks):
            names[f"input_blocks.{block}.0"] = (f"down_blocks.{level}.resnets.{i}", "resnet")
            if attends[level]:
                names[f"input_blocks.{block}.1"] = (f"down_blocks.{level}.attentions.{i}", "attention")
            block += 1
        if level != levels - 1:
            names[f"input_blocks.{block}.0"] = (f"down_blocks.{level}.downsamplers.0", resampler)
            block += 1
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for i in range(c.num_res_blocks + 1):
            names[f"output_blocks.{block}.0"] = (f"up_blocks.{up}.resnets.{i}", "resnet")
            position = 1
            if attends[level]:
                names[f"output_blocks.{block}.1"] = (f"up_blocks.{up}.attentions.{i}", "attention")
                position = 2
            if level and i == c.num_res_blocks:
                names[f"output_blocks.{block}.{position}"] = (f"up_blocks.{up}.upsamplers.0", resampler)
            block += 1
    return names


def _split_qkv(fused: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v rows (weights with the 1x1 conv's last axis dropped, or biases) of a fused qkv."""
    fused = fused.reshape(fused.shape[0], -1)  # (3C, C) or (3C, 1)
    channels = fused.shape[0] // 3
    if new_order:
        q, k, v = fused.reshape(3, channels, -1).unbind(0)
    else:
        q, k, v = fused.reshape(heads, 3, channels // heads, -1).unbind(1)
    return tuple(part.reshape(channels, -1).squeeze(1).contiguous() for part in (q, k, v))


def _qkv_channels(key: str, value: torch.Tensor, config: UNetConfig, where: str) -> int:
    """The channels C of a fused qkv tensor, checked before it is split: a (3C, C, 1) or (3C, C)
    weight or a (3C,) bias, whose C the flags' heads divide."""
    shape = tuple(value.shape)
    is_weight = key.endswith(".weight")
    fused = (len(shape) in (2, 3) and shape[0] == 3 * shape[1] and shape[2:] in ((), (1,))) if is_weight else (
        len(shape) == 1 and shape[0] % 3 == 0)
    if not fused or not shape[0]:
        raise DdimctlError(f"{where}: {key} has shape {shape}, which is no fused q, k, v (3C x C); the weights are not "
                           f"guided-diffusion's")
    channels = shape[0] // 3
    heads = config.attention_heads(channels)
    if heads < 1 or channels % heads:
        flag = f"num_head_channels {config.head_channels}" if config.head_channels else f"num_heads {config.heads}"
        raise DdimctlError(f"{where}: {flag} does not divide the {channels} channels of {key.rsplit('.', 2)[0]} into "
                           f"heads; fix num_heads or num_head_channels")
    return channels


def to_ddimctl_names(state: dict[str, torch.Tensor], model: GuidedModel, where: str) -> dict[str, torch.Tensor]:
    """Their state dict under ddimctl's UNet names; a key their UNetModel with these flags would not
    have is an error naming it (the flags do not match the weights)."""
    names = _module_names(model.config)
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        prefix = next((p for p in (module.rsplit(".", n)[0] for n in range(module.count(".") + 1)) if p in names), None)
        if prefix is None:
            raise DdimctlError(f"{where}: the weights hold {key}, which a model of these flags does not have")
        target, kind = names[prefix]
        inner = module[len(prefix) + 1:]
        if kind == "resnet" and inner in _RESNET:
            out[f"{target}.{_RESNET[inner]}.{param}"] = value
        elif kind == "resampler" and inner in _RESAMPLER:
            out[f"{target}.{_RESAMPLER[inner]}.{param}"] = value
        elif kind == "attention" and inner == "qkv":
            channels = _qkv_channels(key, value, model.config, where)
            q, k, v = _split_qkv(value, model.config.attention_heads(channels), model.new_attention_order)
            out.update({f"{target}.to_q.{param}": q, f"{target}.to_k.{param}": k, f"{target}.to_v.{param}": v})
        elif kind == "attention" and inner in ("norm", "proj_out"):
            name = "group_norm" if inner == "norm" else "to_out.0"
            out[f"{target}.{name}.{param}"] = value.squeeze(-1) if inner == "proj_out" and param == "weight" else value
        elif kind == "" and not inner:
            out[f"{target}.{param}"] = value
        else:
            raise DdimctlError(f"{where}: the weights hold {key}, which a model of these flags does not have")
    return out
