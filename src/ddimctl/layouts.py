"""Checkpoint layouts: renaming every accepted layout to diffusers' UNet2DModel names, and reading
architectures and schedules from state dicts and diffusers configs.

- diffusers (the google/ddpm-* Hub files), with current (to_q...) or 2022 (query...) attention names;
- the original DDPM layout of the DDIM authors' code (temb.dense, down.l.block.b, 1x1-conv attention,
  up levels counted from the highest resolution).
"""

from __future__ import annotations

import re

import torch

from .errors import DdimctlError
from .unet import UNetConfig

_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
_ORIGINAL_RESNET = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}
_ORIGINAL_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def to_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename any accepted layout to diffusers' UNet2DModel names (a no-op on those)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "temb.dense.0.weight" in state:
        return _from_original(state)
    renamed = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in _LEGACY_ATTENTION.items():
                key = key.replace(old, new)
        renamed[key] = value
    return renamed


def _from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"down\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "temb":  # temb.dense.{0,1}
            new = f"time_embedding.linear_{int(parts[2]) + 1}.{parts[3]}"
        elif parts[0] in {"down", "up"}:
            level = int(parts[1])
            prefix = f"down_blocks.{level}" if parts[0] == "down" else f"up_blocks.{levels - 1 - level}"
            kind, rest = parts[2], parts[3:]
            if kind == "block":
                new = f"{prefix}.resnets.{rest[0]}.{_rename_resnet(rest[1:])}"
            elif kind == "attn":
                new = f"{prefix}.attentions.{rest[0]}.{_rename_attention(rest[1:])}"
            elif kind in {"downsample", "upsample"}:
                new = f"{prefix}.{kind}rs.0.{'.'.join(rest)}"
            else:
                raise DdimctlError(f"unexpected key {key!r} in an original-layout checkpoint")
        elif parts[0] == "mid":
            sub = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[parts[1]]
            rename = _rename_attention if parts[1] == "attn_1" else _rename_resnet
            new = f"mid_block.{sub}.{rename(parts[2:])}"
        elif parts[0] == "norm_out":
            new = "conv_norm_out." + ".".join(parts[1:])
        else:
            new = key
        if ".attentions." in new and value.dim() == 4:  # 1x1 convolutions become linear layers
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def _rename_resnet(parts: list[str]) -> str:
    return ".".join([_ORIGINAL_RESNET.get(parts[0], parts[0])] + parts[1:])


def _rename_attention(parts: list[str]) -> str:
    return ".".join([_ORIGINAL_ATTENTION[parts[0]]] + parts[1:])


# --------------------------------------------------------------------------------------------
# Architecture from a config file or from the weights themselves

# Resolution is not visible in the weights; these are the public layouts by number of levels.
_RESOLUTION_BY_LEVELS = {4: 32, 5: 64, 6: 256}


def infer_config(state: dict[str, torch.Tensor], resolution: int | None = None) -> UNetConfig:
    """The UNetConfig that a diffusers-named state dict was built with."""
    try:
        base = state["conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("down_blocks."))
        mult = tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // base for i in range(levels))
        blocks = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down_blocks.0.resnets."))
        attention_levels = [i for i in range(levels) if f"down_blocks.{i}.attentions.0.to_q.weight" in state]
        in_channels = state["conv_in.weight"].shape[1]
        out_channels = state["conv_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise DdimctlError(f"these weights are not a DDPM UNet (missing {e})") from e
    if resolution is None:
        if levels not in _RESOLUTION_BY_LEVELS:
            raise DdimctlError(
                f"cannot tell the resolution of a {levels}-level UNet; put a config.json beside the weights"
            )
        resolution = _RESOLUTION_BY_LEVELS[levels]
    return UNetConfig(
        resolution=resolution,
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=blocks,
        attention_resolutions=tuple(resolution >> i for i in attention_levels),
    )


def config_from_diffusers(cfg: dict) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DModel config.json, refusing features this UNet lacks."""
    unsupported = {
        "act_fn": ("silu",),
        "time_embedding_type": ("positional",),
        "flip_sin_to_cos": (False,),
        "freq_shift": (1,),
        "center_input_sample": (False,),
        "resnet_time_scale_shift": ("default",),
        "add_attention": (True,),
        "class_embed_type": (None,),
    }
    for key, allowed in unsupported.items():
        if key in cfg and cfg[key] not in allowed:
            raise DdimctlError(f"config.json sets {key}={cfg[key]!r}, which the DDPM UNet does not support")
    widths = cfg["block_out_channels"]
    base = widths[0]
    resolution = cfg["sample_size"]
    resolution = resolution[0] if isinstance(resolution, (list, tuple)) else resolution
    head_dim = cfg.get("attention_head_dim")
    attention = [i for i, kind in enumerate(cfg["down_block_types"]) if "Attn" in kind]
    for i in attention:
        if head_dim is not None and head_dim != widths[i]:
            raise DdimctlError("config.json asks for multi-head attention; the DDPM UNet has one head")
    return UNetConfig(
        resolution=resolution,
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_resolutions=tuple(resolution >> i for i in attention),
        norm_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-6),
    )


def schedule_from_diffusers(cfg: dict) -> dict:
    kind = cfg.get("beta_schedule", "linear")
    if kind != "linear" or cfg.get("trained_betas"):
        raise DdimctlError(f"scheduler config uses beta_schedule={kind!r}; ddimctl supports the linear schedule")
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise DdimctlError(f"scheduler config predicts {cfg['prediction_type']!r}; ddimctl needs epsilon prediction")
    return {
        "kind": "linear",
        "train_steps": cfg.get("num_train_timesteps", 1000),
        "beta_start": cfg.get("beta_start", 1e-4),
        "beta_end": cfg.get("beta_end", 0.02),
    }
