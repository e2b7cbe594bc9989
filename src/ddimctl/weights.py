"""Weight loading: the registry (weights.toml), checkpoint formats, and `--model` resolution.

Accepted layouts, all renamed to the diffusers UNet2DModel names that ddimctl.unet uses:
- diffusers (the google/ddpm-* Hub files), with current (to_q...) or 2022 (query...) attention names;
- the original DDPM layout of the DDIM authors' code (temb.dense, down.l.block.b, 1x1-conv attention,
  up levels counted from the highest resolution);
- that code's list checkpoint [model, optimizer, epoch, step, ema] saved from DataParallel.
Pickles are only ever read with weights_only=True; Hub pickles are converted once to safetensors.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import ddim, hub
from .errors import DdimctlError
from .files import atomic_path, cache_dir
from .unet import PRESETS, UNet, UNetConfig, count_parameters

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_SCHEDULE = {"kind": "linear", "train_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")


# --------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    architecture: str
    resolution: int
    schedule: dict
    skip: str
    license: str
    repo: str = ""
    revision: str = "main"
    file: str = ""
    sha256: str = ""
    params: int = 0
    bundled: str = ""  # a file inside the package instead of a Hub download
    extra: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        return "bundled" if self.bundled else f"hf://{self.repo}"


def registry_path() -> Path:
    """weights.toml: inside the installed package, or at the root of a source checkout."""
    packaged = resources.files("ddimctl").joinpath("weights.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "weights.toml"


@cache
def _registry_file() -> dict:
    return tomllib.loads(registry_path().read_text())


@cache
def registry() -> dict[str, ModelEntry]:
    """weights.toml, plus the models of the file named by $DDIMCTL_REGISTRY (a user's own list)."""
    data = dict(_registry_file())
    extra_file = os.environ.get("DDIMCTL_REGISTRY")
    if extra_file:
        try:
            extra = tomllib.loads(Path(extra_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise DdimctlError(f"DDIMCTL_REGISTRY={extra_file}: not a readable TOML file ({e})") from e
        for table in ("schedule", "models"):
            if not isinstance(extra.get(table, {}), dict):
                raise DdimctlError(
                    f"DDIMCTL_REGISTRY={extra_file}: [{table}] must be a table of entries, such as [models.NAME]"
                )
        data["schedule"] = {**data.get("schedule", {}), **extra.get("schedule", {})}
        data["models"] = {**data["models"], **extra.get("models", {})}
    schedules = data.get("schedule", {})
    known = {f for f in ModelEntry.__dataclass_fields__ if f not in {"name", "schedule", "extra"}}
    entries = {}
    for name, raw in data["models"].items():
        check_entry(name, raw)
        raw = dict(raw)
        schedule_name = raw.pop("schedule", "ddpm-linear")
        if schedule_name not in schedules:
            raise DdimctlError(f"model {name!r} in the registry names an unknown schedule {schedule_name!r}")
        entries[name] = ModelEntry(
            name=name,
            schedule=dict(schedules[schedule_name]),
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )
    return entries


# Fields every registry entry needs, and the type each field must have.
REQUIRED_FIELDS = ("description", "architecture", "resolution", "skip", "license")
FIELD_TYPES = {"resolution": int, "params": int, "description": str, "architecture": str, "skip": str,
               "license": str, "repo": str, "revision": str, "file": str, "sha256": str, "bundled": str, "schedule": str}


def check_entry(name: str, raw) -> None:
    """One-line errors for a malformed registry entry (a user's DDIMCTL_REGISTRY file, say)."""
    where = f"model {name!r} in the registry"
    if not isinstance(raw, dict):
        raise DdimctlError(f"{where} is a {type(raw).__name__}, not a table; write it as [models.{name}] with its fields")
    missing = [f for f in REQUIRED_FIELDS if f not in raw]
    if missing:
        raise DdimctlError(f"{where} lacks {', '.join(missing)}; see weights.toml for a complete entry")
    for key, kind in FIELD_TYPES.items():
        if key in raw and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            raise DdimctlError(f"{where}: {key} must be a {kind.__name__}, got {raw[key]!r}")
    if not raw.get("bundled") and not (raw.get("repo") and raw.get("file")):
        raise DdimctlError(f"{where} needs repo and file (a Hub download) or bundled (a packaged file)")


def default_model() -> str:
    return _registry_file().get("default", "cifar10")


# --------------------------------------------------------------------------------------------
# Reading state dicts


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a safetensors file or a pickle (weights_only=True, never plain)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise DdimctlError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DdimctlError(
            f"{path}: not a loadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"ddimctl reads safetensors and tensor-only pickles"
        ) from e
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    # The DDIM authors' checkpoints are [model, optimizer, epoch, step, ema]: the EMA weights are last.
    if isinstance(obj, (list, tuple)):
        candidates = [o for o in obj if isinstance(o, dict) and _looks_like_weights(o)]
        if not candidates:
            raise DdimctlError(f"{path}: a list checkpoint with no model weights in it")
        obj = candidates[-1]
    if isinstance(obj, dict):
        for key in ("ema", "ema_model", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict) and not _looks_like_weights(obj):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not _looks_like_weights(obj):
        raise DdimctlError(f"{path}: no UNet weights found in this checkpoint")
    return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}


def _looks_like_weights(d: dict) -> bool:
    return any(torch.is_tensor(v) for v in d.values()) and any(
        k.removeprefix("module.").startswith(("conv_in", "temb.", "time_embedding")) for k in d
    )


# --------------------------------------------------------------------------------------------
# Renaming to the diffusers layout

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


def schedule_alphas_cumprod(schedule: dict) -> torch.Tensor:
    if schedule.get("kind", "linear") != "linear":
        raise DdimctlError(f"unknown schedule kind {schedule['kind']!r}; ddimctl supports 'linear'")
    betas = ddim.linear_betas(schedule["train_steps"], schedule["beta_start"], schedule["beta_end"])
    return ddim.alphas_cumprod(betas)


# --------------------------------------------------------------------------------------------
# --model resolution


@dataclass
class LoadedModel:
    unet: UNet
    name: str
    source: str
    schedule: dict
    skip: str

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.resolution, c.resolution)

    @property
    def train_steps(self) -> int:
        return int(self.schedule["train_steps"])

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return schedule_alphas_cumprod(self.schedule)


def build_unet(config: UNetConfig, state: dict[str, torch.Tensor], what: str) -> UNet:
    try:
        unet = UNet(config)
    except ValueError as e:
        raise DdimctlError(f"{what}: {e}") from e
    state = to_diffusers_names(state)
    expected = unet.state_dict()
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise DdimctlError(
                f"{what}: weights do not fit the UNet architecture ({key} has shape {tuple(value.shape)}, the "
                f"architecture needs {tuple(expected[key].shape)}); check the config beside the checkpoint"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DdimctlError(f"{what}: the weights hold NaN or infinite values ({key}); the checkpoint is broken")
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}") + (
            f" and {len(missing) + len(unexpected) - 1} more" if len(missing) + len(unexpected) > 1 else ""
        )
        raise DdimctlError(f"{what}: weights do not fit the UNet architecture ({detail})")
    return unet.eval().requires_grad_(False)


def converted_path(entry: ModelEntry, sha256: str) -> Path:
    return cache_dir() / "converted" / entry.name / f"{sha256}.safetensors"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:  # a full disk, say: safetensors raises its own error, not OSError
            raise OSError(f"could not write {path} ({e})") from e


def load_registered(entry: ModelEntry, *, hub_cache: str | None = None, endpoint: str | None = None) -> LoadedModel:
    if entry.bundled:
        path = Path(str(resources.files("ddimctl").joinpath("bundled", entry.bundled)))
        if entry.sha256 and hub.sha256_of(path) != entry.sha256:
            raise DdimctlError(f"model {entry.name!r}: the bundled {path.name} does not match its sha256; reinstall ddimctl")
        state = read_checkpoint(path)
    else:
        state = _hub_state_dict(entry, hub_cache, endpoint)
    config = PRESETS[entry.architecture] if entry.architecture in PRESETS else None
    if config is None:
        raise DdimctlError(f"model {entry.name!r}: unknown architecture {entry.architecture!r} in weights.toml")
    config = UNetConfig(**{**config.to_dict(), "resolution": entry.resolution, "dropout": 0.0, **entry.extra.get("unet", {})})
    unet = build_unet(config, state, f"model {entry.name!r}")
    return LoadedModel(unet, entry.name, entry.source, entry.schedule, entry.skip)


def _hub_state_dict(entry: ModelEntry, hub_cache: str | None, endpoint: str | None) -> dict[str, torch.Tensor]:
    is_pickle = Path(entry.file).suffix in PICKLE_SUFFIXES
    if is_pickle and entry.sha256 and converted_path(entry, entry.sha256).is_file():
        return load_file(str(converted_path(entry, entry.sha256)))
    path = hub.download(
        entry.name, entry.repo, entry.file, entry.revision, entry.sha256 or None, cache_dir=hub_cache, endpoint=endpoint
    )
    if not entry.sha256:
        digest = hub.sha256_of(path)
        print(f"note: {entry.name}: no sha256 recorded in weights.toml; the file has sha256 {digest}", file=sys.stderr)
    else:
        digest = entry.sha256
    if not is_pickle:
        return read_checkpoint(path)
    converted = converted_path(entry, digest)
    if converted.is_file():
        return load_file(str(converted))
    state = to_diffusers_names(read_checkpoint(path))
    atomic_save_safetensors(state, converted, {"source": f"{entry.repo}/{entry.file}", "sha256": digest})
    return state


def is_cached(entry: ModelEntry, hub_cache: str | None = None) -> bool:
    if entry.bundled:
        return True
    if entry.sha256 and converted_path(entry, entry.sha256).is_file():
        return True
    return hub.cached_file(entry.repo, entry.file, entry.revision, hub_cache) is not None


def load_local(path: Path) -> LoadedModel:
    """A diffusers folder, a ddimctl run folder, or a single checkpoint file with optional sidecar."""
    if not path.exists():
        raise DdimctlError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        if (path / "unet").is_dir() and not (path / "config.json").is_file():
            folder = path / "unet"  # a diffusers pipeline folder
        config_file = folder / "config.json"
        cfg = _read_json(config_file) if config_file.is_file() else {}
        if cfg.get("format") == "ddimctl-run":  # a `ddimctl train` folder: its newest checkpoint
            weights = _newest_run_checkpoint(path)
        else:
            name = next((n for n in WEIGHT_FILES if (folder / n).is_file()), None)
            if name is None:
                raise DdimctlError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
            weights = folder / name
    else:
        weights = path
        sidecar = [path.with_suffix(".json"), folder / "config.json"]
        cfg = next((_read_json(p) for p in sidecar if p.is_file()), {})
    state = read_checkpoint(weights)
    if any(k.startswith("ema.") for k in state):  # a training checkpoint: use the EMA weights
        state = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    state = to_diffusers_names(state)

    schedule = dict(DEFAULT_SCHEDULE)
    skip = "uniform"
    if "unet" in cfg:  # ddimctl's own format (written by `ddimctl train`)
        config = UNetConfig(**{**cfg["unet"], "dropout": 0.0})
        schedule = cfg.get("schedule", schedule)
        skip = cfg.get("skip", skip)
    elif "block_out_channels" in cfg:
        config = config_from_diffusers(cfg)
    else:
        config = infer_config(state, cfg.get("resolution"))
    for scheduler_file in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if scheduler_file.is_file():
            schedule = schedule_from_diffusers(_read_json(scheduler_file))
            break
    unet = build_unet(config, state, str(path))
    return LoadedModel(unet, path.name, str(path), schedule, skip)


def _newest_run_checkpoint(run_dir: Path) -> Path:
    found = sorted((run_dir / "checkpoints").glob("step-*.safetensors"))
    if not found:
        raise DdimctlError(f"{run_dir}: this training run has no checkpoint yet; train longer or wait for the first save")
    return found[-1]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DdimctlError(f"{path}: not a readable JSON config ({e})") from e


def load_model(spec: str, *, hub_cache: str | None = None, endpoint: str | None = None) -> LoadedModel:
    """Resolve `--model`: a registry name (weights.toml) or a local path."""
    entries = registry()
    if spec in entries:
        return load_registered(entries[spec], hub_cache=hub_cache, endpoint=endpoint)
    path = Path(spec).expanduser()
    if path.exists():
        return load_local(path)
    raise DdimctlError(
        f"unknown model {spec!r}: not a registered name ({', '.join(entries)}) nor an existing path; "
        f"`ddimctl models` lists the registry"
    )


__all__ = [
    "LoadedModel",
    "ModelEntry",
    "atomic_save_safetensors",
    "count_parameters",
    "infer_config",
    "load_model",
    "read_checkpoint",
    "registry",
    "to_diffusers_names",
]
