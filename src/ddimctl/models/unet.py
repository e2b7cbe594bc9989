"""The DDPM UNet of Ho et al. (2020), with diffusers' UNet2DModel parameter names.

The names match the Hub checkpoints (google/ddpm-*) so their state dicts load as they are;
other layouts are renamed into this one by their family's module. The options beyond the DDPM UNet
(multi-head attention, the time embedding's order and shift, scale-shift norm, symmetric
downsampling padding, resnet resampling, class labels, the mid block's form) are the ones
diffusers' UNet2DModel and openai's ADM UNet (guided-/improved-diffusion) offer for the same blocks,
so models trained with diffusers' own script and openai's checkpoints load too; their defaults are
the DDPM UNet.
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
    base_channels: int = 128  # the time embedding's sinusoid width; level widths are multiples of it
    channel_mult: tuple[float, ...] = (1, 2, 2, 2)  # whole widths; ADM's 512 model starts at 0.5
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-6
    head_channels: int | None = None  # attention channels per head; None: `heads` heads
    heads: int = 1  # attention heads of every layer, when head_channels is None (ADM's num_heads)
    attention_norm_groups: int | None = None  # the mid block's attention norm; None: norm_groups
    flip_sin_to_cos: bool = False  # time embedding [cos, sin] instead of DDPM's [sin, cos]
    freq_shift: int = 1  # frequencies exp(-ln(10000) i / (half - freq_shift)); DDPM's is 1
    time_embedding_dim: int | None = None  # None: 4 base_channels
    scale_shift: bool = False  # the time embedding scales and shifts norm2's output (ADM, diffusers' "scale_shift")
    downsample_padding: int = 0  # 0: the TF original's (0, 1, 0, 1) pad; 1: a symmetric 1-pixel pad
    mid_block: bool = True
    mid_attention: bool = True
    mid_scale: float = 1.0  # the mid block's residual sums are divided by this (diffusers' mid_block_scale_factor)
    resnet_resampling: bool = False  # resnets that pool / upsample inside (ADM's resblock_updown) do the resampling
    class_count: int | None = None  # class-conditional: a learned embedding per class label joins the time's
    float32_norms: bool = False  # group norms compute in float32 whatever the weights' dtype (ADM's GroupNorm32)

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
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"{self.out_channels} output channels for {self.in_channels} input channels; a noise "
                             f"predictor has as many (or twice as many, with learned variances)")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample padding must be 0 or 1, got {self.downsample_padding}")
        if any(self.base_channels * m != int(self.base_channels * m) or m <= 0 for m in self.channel_mult):
            raise ValueError(f"channel multipliers {list(self.channel_mult)} of {self.base_channels} channels do not "
                             f"give whole widths")
        if self.class_count is not None and self.class_count < 1:
            raise ValueError(f"a class-conditional UNet needs at least one class, got {self.class_count}")
        for width in self.widths:
            if self.head_channels is None and width % self.heads:
                raise ValueError(f"channel width {width} is not divisible by {self.heads} attention heads")
            if width % self.norm_groups:
                raise ValueError(f"channel width {width} is not divisible by {self.norm_groups} norm groups")
            if self.head_channels is not None and width % self.head_channels:
                raise ValueError(f"channel width {width} is not divisible by {self.head_channels} channels per head")
        if self.attention_norm_groups is not None and self.widths[-1] % self.attention_norm_groups:
            raise ValueError(f"channel width {self.widths[-1]} is not divisible by {self.attention_norm_groups} "
                             f"attention norm groups")

    @property
    def widths(self) -> list[int]:
        return [int(self.base_channels * m) for m in self.channel_mult]

    def activation_bytes(self, training: bool = False) -> int:
        """A floor of the memory one image takes in a forward pass (training: and its backward pass):
        10 (40) float32 copies of every level's feature maps, and attention's score matrices. Measured
        on CPU: 15-46 copies in inference, 78-116 in training (digits, cifar10)."""
        maps = sum(w * r * r for w, r in zip(self.widths, self.level_resolutions))
        scores = sum(self.attention_heads(w) * r**4 for w, r in zip(self.widths, self.level_resolutions)
                     if r in self.attention_resolutions)
        return 4 * (maps * (40 if training else 10) + scores * (3 if training else 1))

    def attention_heads(self, width: int) -> int:
        """Heads of an attention layer `width` channels wide: of head_channels each, else `heads`."""
        return width // self.head_channels if self.head_channels else self.heads

    @property
    def embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.base_channels

    @property
    def learned_variance(self) -> bool:
        """Twice the input's channels out: the noise, then variances that DDIM does not use."""
        return self.out_channels == 2 * self.in_channels

    def to_dict(self) -> dict:
        return asdict(self)

    def example_classes(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Class labels for a probe call of `batch` images: class 0, or None for an unconditional UNet."""
        return torch.zeros(batch, dtype=torch.long, device=device) if self.class_count else None

    def example_inputs(self, batch: int, device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, t, classes) of one network call for `batch` images, for probes, warm-ups and benchmarks:
        Gaussian noise (from `generator` if given), the middle timestep, class 0 if it takes classes."""
        shape = (batch, self.in_channels, self.resolution, self.resolution)
        x = torch.randn(shape, generator=generator).to(device) if generator else torch.randn(shape, device=device)
        t = torch.full((batch,), 500, dtype=torch.long, device=device)
        return x, t, self.example_classes(batch, device)


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


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: int = 1) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: [sin, cos] with frequencies
    exp(-ln(10000) i / (half - freq_shift)); the original DDPM's is freq_shift 1, no flip."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - freq_shift)
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=1)


class TimestepEmbedding(nn.Module):
    def __init__(self, channels: int, embed_dim: int, flip_sin_to_cos: bool = False, freq_shift: int = 1):
        super().__init__()
        self.channels, self.flip_sin_to_cos, self.freq_shift = channels, flip_sin_to_cos, freq_shift
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.channels, self.flip_sin_to_cos, self.freq_shift)
        return self.linear_2(F.silu(self.linear_1(emb.to(self.linear_1.weight.dtype))))


class GroupNorm32(nn.GroupNorm):
    """Group norm computed in float32 whatever the input's and the weights' dtype (as ADM's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def group_norm(groups: int, channels: int, eps: float, float32: bool = False) -> nn.GroupNorm:
    return (GroupNorm32 if float32 else nn.GroupNorm)(groups, channels, eps=eps)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding between them and a residual connection;
    resample "down" (2x2 average pooling) or "up" (nearest) after the first norm, on both paths
    (ADM's resblock_updown, diffusers' ResnetDownsampleBlock2D / ResnetUpsampleBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float, groups: int, eps: float,
                 scale_shift: bool = False, output_scale: float = 1.0, resample: str | None = None,
                 float32_norms: bool = False):
        super().__init__()
        self.norm1 = group_norm(groups, in_channels, eps, float32_norms)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(embed_dim, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = group_norm(groups, out_channels, eps, float32_norms)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.scale_shift, self.output_scale, self.resample = scale_shift, output_scale, resample

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        # temb_act is SiLU(temb), computed once per forward and shared by every block.
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        x = self._resample(x)
        temb = self.time_emb_proj(temb_act)[:, :, None, None]
        if self.scale_shift:
            scale, shift = temb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + temb)
        h = self.conv2(self.dropout(F.silu(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale == 1 else out / self.output_scale


class AttentionBlock(nn.Module):
    """Self-attention over all pixels in `heads` heads (UNetConfig.attention_heads), with a residual
    connection."""

    def __init__(self, channels: int, groups: int, eps: float, heads: int = 1, output_scale: float = 1.0,
                 float32_norm: bool = False):
        super().__init__()
        self.group_norm = group_norm(groups, channels, eps, float32_norm)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.heads = heads
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        # (B, heads, HW, C / heads); the default scale is (C / heads)^-0.5
        q, k, v = (proj(tokens).unflatten(2, (self.heads, -1)).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return out if self.output_scale == 1 else out / self.output_scale


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor | None = None) -> torch.Tensor:
        # temb_act: unused here; resamplers take it because resnet resamplers (ResnetBlock) use it
        if self.conv.padding == (0, 0):
            x = F.pad(x, (0, 1, 0, 1))  # asymmetric pad, as in the TF original
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets, optional attention after each, optional resampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module], resampler: nn.Module | None, key: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        setattr(self, key, nn.ModuleList([resampler] if resampler is not None else []))
        self.resampler_key = key

    @property
    def resampler(self) -> nn.Module | None:
        resamplers = getattr(self, self.resampler_key)
        return resamplers[0] if len(resamplers) else None


class MidBlock(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        c, width = config, config.widths[-1]
        resnet = lambda: ResnetBlock(width, width, c.embed_dim, c.dropout, c.norm_groups, c.norm_eps,  # noqa: E731
                                     c.scale_shift, c.mid_scale, float32_norms=c.float32_norms)
        self.resnets = nn.ModuleList([resnet(), resnet()])
        attention_groups = c.attention_norm_groups or c.norm_groups
        self.attentions = nn.ModuleList(
            [AttentionBlock(width, attention_groups, c.norm_eps, c.attention_heads(width), c.mid_scale, c.float32_norms)]
            if c.mid_attention else []
        )

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb_act)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x, temb_act)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): predicts the noise in x_t at timesteps t (0..T-1) (with learned
    variances: the noise, then the variances, along the channels); class-conditional UNets take
    class labels y too."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.check()
        self.config = config
        c0 = config.widths[0]
        embed_dim = config.embed_dim
        groups, eps, dropout = config.norm_groups, config.norm_eps, config.dropout
        widths = config.widths
        attend = [res in config.attention_resolutions for res in config.level_resolutions]
        last = len(widths) - 1

        def resnet(width_in: int, width_out: int, resample: str | None = None) -> ResnetBlock:
            return ResnetBlock(width_in, width_out, embed_dim, dropout, groups, eps, config.scale_shift,
                               resample=resample, float32_norms=config.float32_norms)

        def attention(width: int) -> AttentionBlock:
            return AttentionBlock(width, groups, eps, config.attention_heads(width),
                                  float32_norm=config.float32_norms)

        def downsample(width: int) -> nn.Module:
            return resnet(width, width, "down") if config.resnet_resampling else Downsample(width, config.downsample_padding)

        def upsample(width: int) -> nn.Module:
            return resnet(width, width, "up") if config.resnet_resampling else Upsample(width)

        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(config.base_channels, embed_dim, config.flip_sin_to_cos, config.freq_shift)
        self.class_embedding = nn.Embedding(config.class_count, embed_dim) if config.class_count else None

        skip_widths = [c0]
        self.down_blocks = nn.ModuleList()
        width = c0
        for level, out_width in enumerate(widths):
            resnets, attentions = [], []
            for _ in range(config.num_res_blocks):
                resnets.append(resnet(width, out_width))
                width = out_width
                if attend[level]:
                    attentions.append(attention(width))
                skip_widths.append(width)
            resampler = downsample(width) if level != last else None
            if resampler is not None:
                skip_widths.append(width)
            self.down_blocks.append(Level(resnets, attentions, resampler, "downsamplers"))

        self.mid_block = MidBlock(config) if config.mid_block else None

        # up_blocks[0] is the lowest resolution, as in diffusers.
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            out_width = widths[level]
            resnets, attentions = [], []
            for _ in range(config.num_res_blocks + 1):
                resnets.append(resnet(width + skip_widths.pop(), out_width))
                width = out_width
                if attend[level]:
                    attentions.append(attention(width))
            resampler = upsample(width) if level != 0 else None
            self.up_blocks.append(Level(resnets, attentions, resampler, "upsamplers"))

        self.conv_norm_out = group_norm(groups, c0, eps, config.float32_norms)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int, classes: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_tensor(timesteps) or timesteps.dim() == 0:
            timesteps = torch.full((x.shape[0],), int(timesteps), device=x.device, dtype=torch.long)
        temb = self.time_embedding(timesteps.to(x.device))
        if (classes is None) != (self.class_embedding is None):
            raise ValueError("class labels go with class-conditional UNets, and only with them")
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(classes.to(x.device)).to(temb.dtype)
        temb_act = F.silu(temb)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, temb_act)
                if len(block.attentions):
                    h = block.attentions[i](h)
                skips.append(h)
            if block.resampler is not None:
                h = block.resampler(h, temb_act)
                skips.append(h)

        if self.mid_block is not None:
            h = self.mid_block(h, temb_act)

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), temb_act)
                if len(block.attentions):
                    h = block.attentions[i](h)
            if block.resampler is not None:
                h = block.resampler(h, temb_act)

        return self.conv_out(F.silu(self.conv_norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["UNet", "UNetConfig", "PRESETS", "count_parameters", "timestep_embedding"]
