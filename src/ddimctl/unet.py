"""The DDPM UNet of Ho et al. (2020), with diffusers' UNet2DModel parameter names.

The names match the Hub checkpoints (google/ddpm-*) so their state dicts load as they are;
other layouts are renamed into this one by ddimctl.weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))

    @property
    def level_resolutions(self) -> list[int]:
        return [self.resolution >> level for level in range(len(self.channel_mult))]

    def check(self) -> None:
        """Raise ValueError when this UNet cannot be built or cannot take its resolution."""
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        levels = len(self.channel_mult)
        if self.resolution % (1 << (levels - 1)):
            raise ValueError(
                f"resolution {self.resolution} is not divisible by {1 << (levels - 1)}, "
                f"as {levels} levels of downsampling need"
            )
        missing = sorted(set(self.attention_resolutions) - set(self.level_resolutions))
        if missing:
            raise ValueError(
                f"attention at {missing} matches no level (levels are {self.level_resolutions}); "
                f"set the attention resolutions to some of these"
            )
        for width in [self.base_channels * m for m in self.channel_mult]:
            if width % self.norm_groups:
                raise ValueError(f"channel width {width} is not divisible by {self.norm_groups} norm groups")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, UNetConfig] = {
    # Ho et al.: CIFAR-10 (35.7M parameters), the 256x256 LSUN/CelebA-HQ models (113.7M).
    "cifar10": UNetConfig(resolution=32, channel_mult=(1, 2, 2, 2), dropout=0.1),
    "celeba64": UNetConfig(resolution=64, channel_mult=(1, 2, 2, 2, 4), dropout=0.1),
    "ddpm256": UNetConfig(resolution=256, channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
    # The bundled `digits` model: scikit-learn's 8x8 handwritten digits upscaled to 16x16, grayscale.
    "digits": UNetConfig(
        resolution=16, in_channels=1, out_channels=1, base_channels=32, channel_mult=(1, 2, 2),
        num_res_blocks=2, attention_resolutions=(8,), dropout=0.1,
    ),
    # Small layouts for quick experiments and tests.
    "small": UNetConfig(resolution=32, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1),
    "tiny": UNetConfig(
        resolution=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,)
    ),
}


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, [sin, cos] as in the original DDPM."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1)
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimestepEmbedding(nn.Module):
    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.channels).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        # temb_act is SiLU(temb), computed once per forward and shared by every block.
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # default scale is C^-0.5
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the TF original


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets, optional attention after each, optional resampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module], sampler: nn.Module | None, key: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        setattr(self, key, nn.ModuleList([sampler] if sampler is not None else []))
        self.sampler_key = key

    @property
    def sampler(self) -> nn.Module | None:
        samplers = getattr(self, self.sampler_key)
        return samplers[0] if len(samplers) else None


class MidBlock(nn.Module):
    def __init__(self, channels: int, embed_dim: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, embed_dim, dropout, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups, eps)])

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb_act)
        x = self.attentions[0](x)
        return self.resnets[1](x, temb_act)


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in x_t at integer timesteps t (0..T-1)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.check()
        self.config = config
        c0 = config.base_channels
        embed_dim = 4 * c0
        groups, eps, dropout = config.norm_groups, config.norm_eps, config.dropout
        widths = [c0 * m for m in config.channel_mult]
        attend = [res in config.attention_resolutions for res in config.level_resolutions]
        last = len(widths) - 1

        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, embed_dim)

        skip_widths = [c0]
        self.down_blocks = nn.ModuleList()
        width = c0
        for level, out_width in enumerate(widths):
            resnets, attentions = [], []
            for _ in range(config.num_res_blocks):
                resnets.append(ResnetBlock(width, out_width, embed_dim, dropout, groups, eps))
                width = out_width
                if attend[level]:
                    attentions.append(AttentionBlock(width, groups, eps))
                skip_widths.append(width)
            sampler = Downsample(width) if level != last else None
            if sampler is not None:
                skip_widths.append(width)
            self.down_blocks.append(Level(resnets, attentions, sampler, "downsamplers"))

        self.mid_block = MidBlock(width, embed_dim, dropout, groups, eps)

        # up_blocks[0] is the lowest resolution, as in diffusers.
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            out_width = widths[level]
            resnets, attentions = [], []
            for _ in range(config.num_res_blocks + 1):
                resnets.append(ResnetBlock(width + skip_widths.pop(), out_width, embed_dim, dropout, groups, eps))
                width = out_width
                if attend[level]:
                    attentions.append(AttentionBlock(width, groups, eps))
            sampler = Upsample(width) if level != 0 else None
            self.up_blocks.append(Level(resnets, attentions, sampler, "upsamplers"))

        self.conv_norm_out = nn.GroupNorm(groups, c0, eps=eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(timesteps) or timesteps.dim() == 0:
            timesteps = torch.full((x.shape[0],), int(timesteps), device=x.device, dtype=torch.long)
        temb_act = F.silu(self.time_embedding(timesteps.to(x.device)))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, temb_act)
                if len(block.attentions):
                    h = block.attentions[i](h)
                skips.append(h)
            if block.sampler is not None:
                h = block.sampler(h)
                skips.append(h)

        h = self.mid_block(h, temb_act)

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), temb_act)
                if len(block.attentions):
                    h = block.attentions[i](h)
            if block.sampler is not None:
                h = block.sampler(h)

        return self.conv_out(F.silu(self.conv_norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["UNet", "UNetConfig", "PRESETS", "count_parameters", "timestep_embedding"]
