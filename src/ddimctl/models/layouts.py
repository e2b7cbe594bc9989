"""Checkpoint layouts: renaming every accepted layout to diffusers' UNet2DModel names, and reading
architectures and schedules from state dicts and ddimctl's own configs (diffusers' configs:
diffusers_format.py).

- diffusers (the google/ddpm-* Hub files), with current (to_q...) or 2022 (query...) attention names;
- the original DDPM layout of the DDIM authors' code (temb.dense, down.l.block.b, 1x1-conv attention,
  up levels counted from the highest resolution).
"""

from __future__ import annotations

import re

import torch

from ..schedule import Schedule, SCHEDULE_KINDS
from ..errors import DdimctlError
from ..io.fields import Fields
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


_ORIGINAL_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}


def _from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"down\.(\d+)\.", k))), default=-1)
    if levels == 0:
        raise DdimctlError("an original-layout checkpoint (temb.dense) without down.N keys: it is not a whole DDPM UNet")
    out = {}
    for key, value in state.items():
        try:
            new = _original_name(key.split("."), levels)
        except (IndexError, ValueError, KeyError):
            new = None
        if new is None:
            raise DdimctlError(f"unexpected key {key!r} in an original-layout checkpoint (its mid block has "
                               f"{', '.join(_ORIGINAL_MID)}; its levels down.N and up.N)")
        if ".attentions." in new and value.dim() == 4:  # 1x1 convolutions become linear layers
            if tuple(value.shape[2:]) != (1, 1):
                raise DdimctlError(f"{key} has shape {tuple(value.shape)}: an attention layer of the original layout is "
                                   f"a 1x1 convolution")
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def _original_name(parts: list[str], levels: int) -> str | None:
    """diffusers' name of the original layout's key `parts` (None: not a key of that layout)."""
    if parts[0] == "temb":  # temb.dense.{0,1}
        return f"time_embedding.linear_{int(parts[2]) + 1}.{parts[3]}"
    if parts[0] in {"down", "up"}:
        level = int(parts[1])
        prefix = f"down_blocks.{level}" if parts[0] == "down" else f"up_blocks.{levels - 1 - level}"
        kind, rest = parts[2], parts[3:]
        if kind == "block":
            return f"{prefix}.resnets.{rest[0]}.{_rename_resnet(rest[1:])}"
        if kind == "attn":
            return f"{prefix}.attentions.{rest[0]}.{_rename_attention(rest[1:])}"
        if kind in {"downsample", "upsample"}:
            return f"{prefix}.{kind}rs.0.{'.'.join(rest)}"
        return None
    if parts[0] == "mid":
        rename = _rename_attention if parts[1] == "attn_1" else _rename_resnet
        return f"mid_block.{_ORIGINAL_MID[parts[1]]}.{rename(parts[2:])}" if len(parts) > 2 else None
    if parts[0] == "norm_out":
        return "conv_norm_out." + ".".join(parts[1:])
    return ".".join(parts)


def _rename_resnet(parts: list[str]) -> str:
    return ".".join([_ORIGINAL_RESNET.get(parts[0], parts[0])] + parts[1:])


def _rename_attention(parts: list[str]) -> str:
    return ".".join([_ORIGINAL_ATTENTION[parts[0]]] + parts[1:])


# --------------------------------------------------------------------------------------------
# Architecture from a config file or from the weights themselves

# Resolution is not visible in the weights; these are the public layouts by number of levels.
_RESOLUTION_BY_LEVELS = {4: 32, 5: 64, 6: 256}


def infer_config(state: dict[str, torch.Tensor], resolution: int | None = None, where: str = "the weights") -> UNetConfig:
    """The UNetConfig that a diffusers-named state dict was built with."""
    try:
        base = state["conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("down_blocks."))
        mult = tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // base for i in range(levels))
        blocks = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down_blocks.0.resnets."))
        attention_levels = [i for i in range(levels) if f"down_blocks.{i}.attentions.0.to_q.weight" in state]
        in_channels = state["conv_in.weight"].shape[1]
        out_channels = state["conv_out.weight"].shape[0]
        scale_shift = state["down_blocks.0.resnets.0.time_emb_proj.weight"].shape[0] == 2 * base * mult[0]
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise DdimctlError(f"{where}: these weights are not a DDPM UNet (missing {e})") from e
    if resolution is None:
        if levels not in _RESOLUTION_BY_LEVELS:
            raise DdimctlError(
                f"{where}: cannot tell the resolution of a {levels}-level UNet; put a config.json beside the weights"
            )
        resolution = _RESOLUTION_BY_LEVELS[levels]
    return checked(UNetConfig(
        resolution=resolution,
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=blocks,
        attention_resolutions=tuple(resolution >> i for i in attention_levels),
        scale_shift=scale_shift,
        mid_attention="mid_block.attentions.0.to_q.weight" in state,
    ), where)


# Bounds for what a config file may ask for: beyond them no public DDPM lies, and a typo would reach
# the allocator (a 10^9-step schedule, a 10^6-pixel side).
MAX_RESOLUTION = 2048
MAX_TRAIN_STEPS = 100_000


def unet_config_from(fields: Fields) -> UNetConfig:
    """UNetConfig from ddimctl's own format (a run's or a sidecar's "unet" object), every field typed."""
    fields.only(UNetConfig.__dataclass_fields__)
    d = UNetConfig()
    optional = lambda key, low, high: None if fields.data.get(key) is None else fields.integer(key, None, low, high)  # noqa: E731
    config = UNetConfig(
        resolution=fields.integer("resolution", d.resolution, 1, MAX_RESOLUTION),
        in_channels=fields.integer("in_channels", d.in_channels, 1, 4),
        out_channels=fields.integer("out_channels", d.out_channels, 1, 8),
        base_channels=fields.integer("base_channels", d.base_channels, 1, 4096),
        channel_mult=fields.integers("channel_mult", d.channel_mult, 1, 64),
        num_res_blocks=fields.integer("num_res_blocks", d.num_res_blocks, 1, 64),
        attention_resolutions=fields.integers("attention_resolutions", d.attention_resolutions, 1, MAX_RESOLUTION,
                                              non_empty=False),
        dropout=fields.number("dropout", d.dropout, 0, 0.999),
        norm_groups=fields.integer("norm_groups", d.norm_groups, 1, 4096),
        norm_eps=fields.number("norm_eps", d.norm_eps, 1e-12, 1),
        head_channels=optional("head_channels", 1, 4096),
        attention_norm_groups=optional("attention_norm_groups", 1, 4096),
        flip_sin_to_cos=fields.flag("flip_sin_to_cos", d.flip_sin_to_cos),
        freq_shift=fields.integer("freq_shift", d.freq_shift, 0, 1),
        time_embedding_dim=optional("time_embedding_dim", 2, 65536),
        scale_shift=fields.flag("scale_shift", d.scale_shift),
        downsample_padding=fields.integer("downsample_padding", d.downsample_padding, 0, 1),
        mid_block=fields.flag("mid_block", d.mid_block),
        mid_attention=fields.flag("mid_attention", d.mid_attention),
        mid_scale=fields.number("mid_scale", d.mid_scale, 1e-3, 1e3),
        heads=fields.integer("heads", d.heads, 1, 4096),
        resnet_resampling=fields.flag("resnet_resampling", d.resnet_resampling),
        class_count=optional("class_count", 1, 1_000_000),
        float32_norms=fields.flag("float32_norms", d.float32_norms),
    )
    return checked(config, fields.where)


def checked(config: UNetConfig, where: str) -> UNetConfig:
    try:
        config.check()
    except ValueError as e:
        raise DdimctlError(f"{where}: {e}") from e
    return config


def schedule_from(fields: Fields) -> Schedule:
    """A noise schedule from ddimctl's format ({"kind", "train_steps", "beta_start", "beta_end"}); no
    table at all is DDPM's schedule, but a table must say its T (a default would be a silent guess)."""
    fields.only(("kind", "train_steps", "beta_start", "beta_end"))
    if not fields.data:
        return Schedule()
    schedule = dict(
        train_steps=fields.integer("train_steps", low=1, high=MAX_TRAIN_STEPS),
        beta_start=fields.number("beta_start", 1e-4, 1e-12, 0.999),
        beta_end=fields.number("beta_end", 0.02, 1e-12, 0.999),
        kind=fields.text("kind", "linear", SCHEDULE_KINDS),
    )
    try:
        return Schedule(**schedule)
    except ValueError as e:
        raise DdimctlError(f"{fields.where}: {e}") from e
