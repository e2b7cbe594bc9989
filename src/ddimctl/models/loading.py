"""Weight loading: `--model` to a UNet with its schedule. The sources are here (the registry, a local
file or folder, a Hub repository); each hands what it found, a families.Checkpoint, to the family
that recognises it (families.FAMILIES). Pickles are only ever read with weights_only=True, including
the DDIM authors' list checkpoints [model, optimizer, epoch, step, ema]; Hub pickles are converted
once to safetensors.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import DdimctlError
from ..io.fields import is_whole_number, read_json_object
from ..io.files import atomic_save_safetensors, cache_dir, regular_file
from ..schedule import Schedule
from . import hub, runs
from .diffusers_format import (
    PIPELINE_INDEX,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    UNET_FOLDER,
    UNET_WEIGHTS,
    check_pipeline,
    config_from_diffusers,
    scheduler_config_name,
    unet_prefix,
)
from .families import Checkpoint, family_of
from .layouts import to_diffusers_names
from .registry import HEX64, REVISION, ModelEntry, registry
from .runs import Student
from .unet import PRESETS, UNet, UNetConfig

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
WEIGHT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


# --------------------------------------------------------------------------------------------
# Reading state dicts


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a safetensors file or a pickle (weights_only=True, never plain)."""
    regular_file(path)
    if path.suffix.lower() == ".safetensors":
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
        k.removeprefix("module.").startswith(("conv_in", "temb.", "time_embedding", "time_embed.")) for k in d
    )


# --------------------------------------------------------------------------------------------
# --model resolution


@dataclass
class LoadedModel:
    unet: UNet
    name: str
    source: str
    schedule: dict
    skip: str
    weights_sha256: str = ""  # the checkpoint file's content: what a record of this model's outputs names
    prediction: str = "epsilon"  # what the network predicts (PREDICTIONS); the samplers see the noise
    timestep_scale: float = 1.0  # the network sees t * this (improved-diffusion's rescale_timesteps: 1000 / T)
    student: Student | None = None  # a distilled student samples with its own calls and timesteps only

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

    def noise_model(self, device: torch.device, precision: str = "fp32", compile_mode: str | None = None,
                    batch_size: int | None = None):
        """The network as the samplers take it: eps_theta(x, t), the noise whatever it predicts (the
        model boundary: boundary.prepare)."""
        from . import boundary

        return boundary.prepare(self.unet, device, precision, compile_mode, batch_size, self.prediction,
                            self.alphas_cumprod if self.prediction != "epsilon" else None, self.timestep_scale)

    @property
    def class_count(self) -> int | None:
        """How many class labels a class-conditional network takes; None: unconditional."""
        return self.unet.config.class_count

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        try:
            return Schedule.from_dict(self.schedule).alphas_cumprod()
        except (ValueError, KeyError) as e:
            raise DdimctlError(f"model {self.name!r}: its noise schedule cannot be used ({e})") from e


def build_unet(config: UNetConfig, state: dict[str, torch.Tensor], what: str) -> UNet:
    """The UNet of `config` with the weights `state` (diffusers names: layouts.to_diffusers_names).
    The weights are held to the architecture on the meta device first: a config asking for a network
    far larger than its weights is refused without allocating it."""
    try:
        with torch.device("meta"):
            expected = UNet(config).state_dict()
    except ValueError as e:
        raise DdimctlError(f"{what}: {e}") from e
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise DdimctlError(
                f"{what}: weights do not fit the UNet architecture ({key} has shape {tuple(value.shape)}, the "
                f"architecture needs {tuple(expected[key].shape)}); check the config beside the checkpoint"
            )
        if key in expected and value.dtype not in WEIGHT_DTYPES:
            raise DdimctlError(f"{what}: {key} is stored as {str(value.dtype).removeprefix('torch.')}; ddimctl reads "
                               f"float16, bfloat16, float32 or float64 weights (quantized ones would be silently wrong)")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DdimctlError(f"{what}: the weights hold NaN or infinite values ({key}); the checkpoint is broken")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}") + (
            f" and {len(missing) + len(unexpected) - 1} more" if len(missing) + len(unexpected) > 1 else ""
        )
        raise DdimctlError(f"{what}: weights do not fit the UNet architecture ({detail})")
    unet = UNet(config)
    unet.load_state_dict(state)
    return unet.eval().requires_grad_(False)


def converted_path(entry: ModelEntry, sha256: str) -> Path:
    """Where a Hub pickle's safetensors conversion is kept: inside ddimctl's cache, always (the
    registry checked the name; the digest is hexadecimal), which is asserted, not assumed."""
    root = (cache_dir() / "converted").resolve()
    path = (root / entry.name / f"{sha256.lower()}.safetensors").resolve()
    if not (HEX64.match(sha256) and path.is_relative_to(root) and path.parent.parent == root):
        raise DdimctlError(f"model {entry.name!r}: no safe cache path for it; fix its name or sha256 in the registry")
    return path


def registered_config(entry: ModelEntry) -> UNetConfig:
    """The UNet of a registry entry: its architecture's preset at its resolution, with its overrides."""
    if entry.architecture not in PRESETS:
        raise DdimctlError(f"model {entry.name!r}: unknown architecture {entry.architecture!r} in weights.toml")
    preset = PRESETS[entry.architecture].to_dict()
    return UNetConfig(**{**preset, "resolution": entry.resolution, "dropout": 0.0, **entry.extra.get("unet", {})})


def load_registered(entry: ModelEntry, *, hub_cache: str | None = None, endpoint: str | None = None,
                    notify: Callable[[str], None] = lambda message: None) -> LoadedModel:
    """A registry model: its weights (bundled, or the Hub file pinned by its sha256) read as ddimctl's
    own family, with the entry as their config."""
    if entry.bundled:
        path = Path(str(resources.files("ddimctl").joinpath("bundled", entry.bundled)))
        if entry.sha256 and hub.sha256_of(path) != entry.sha256:
            raise DdimctlError(f"model {entry.name!r}: the bundled {path.name} does not match its sha256; reinstall ddimctl")
        state = read_checkpoint(path)
        digest = entry.sha256 or hub.sha256_of(path)
    else:
        state, digest = _hub_state_dict(entry, hub_cache, endpoint, notify)
    config = {"unet": registered_config(entry).to_dict(), "schedule": entry.schedule, "skip": entry.skip,
              "prediction": entry.prediction}
    where = f"model {entry.name!r}"
    return from_checkpoint(Checkpoint(state, where, config, where), entry.name, entry.source, digest, notify)


def _hub_state_dict(entry: ModelEntry, hub_cache: str | None, endpoint: str | None,
                    notify: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a registry model's Hub file, and that file's sha256."""
    is_pickle = Path(entry.file).suffix in PICKLE_SUFFIXES
    if is_pickle and entry.sha256 and (state := _read_converted(converted_path(entry, entry.sha256), notify)) is not None:
        return state, entry.sha256
    path = hub.download(
        entry.name, entry.repo, entry.file, entry.revision, entry.sha256 or None, cache_dir=hub_cache, endpoint=endpoint
    )
    digest = entry.sha256 or hub.sha256_of(path)
    if not entry.sha256:
        notify(f"{entry.name}: no sha256 recorded in the registry, so the download was not verified; "
               f"the file has sha256 {digest}")
    state = _read_download(entry, path, hub_cache)
    if not is_pickle:
        return state, digest
    converted = converted_path(entry, digest)
    if (done := _read_converted(converted, notify)) is not None:
        return done, digest
    state = to_diffusers_names(state)
    atomic_save_safetensors(state, converted, {"source": f"{entry.repo}/{entry.file}", "sha256": digest})
    return state, digest


def _read_converted(path: Path, notify: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
    """A conversion from ddimctl's cache, or None: none yet, or a damaged one (cut short by a crash or
    a full disk), which is removed so that it is converted afresh from the verified download."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        path.unlink()
        notify(f"removed a damaged conversion from ddimctl's cache ({path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}); converting afresh")
        return None


def _read_download(entry: ModelEntry, path: Path, hub_cache: str | None) -> dict[str, torch.Tensor]:
    """A downloaded checkpoint's tensors; one that cannot be parsed is removed from the cache (it
    would fail again on every rerun) and named in a one-line error."""
    try:
        return read_checkpoint(path)
    except DdimctlError as e:
        hub.remove_download(path, hub_cache)
        raise DdimctlError(f"model {entry.name!r}: the downloaded {entry.file} cannot be read ({e}); it was deleted "
                           f"from the cache, run the command again to fetch it afresh") from e


def is_cached(entry: ModelEntry, hub_cache: str | None = None) -> bool:
    if entry.bundled:
        return True
    if entry.sha256 and converted_path(entry, entry.sha256).is_file():
        return True
    return hub.cached_file(entry.repo, entry.file, entry.revision, hub_cache) is not None


def from_checkpoint(checkpoint: Checkpoint, name: str, source: str, sha256: str,
                    notify: Callable[[str], None]) -> LoadedModel:
    """The model of a checkpoint, read by the family that recognises it (families.FAMILIES)."""
    family = family_of(checkpoint)
    config = family.config(checkpoint)
    timing = family.timing(checkpoint, notify)  # every file read and checked before the weights are touched
    try:
        unet = build_unet(config, family.rename(checkpoint, config), checkpoint.weights)
    except DdimctlError as e:
        raise DdimctlError(f"{e}; {family.misfit(checkpoint)}" if family.misfit else str(e)) from e
    return LoadedModel(unet, name, source, timing.schedule, timing.skip, sha256, timing.prediction, timing.timestep_scale,
                       timing.student)


def load_local(path: Path, notify: Callable[[str], None] = lambda message: None) -> LoadedModel:
    """A diffusers folder (a pipeline or a UNet), a ddimctl run folder (its newest checkpoint), a
    checkpoint inside a run folder (with that run's config), or a single checkpoint file with an
    optional sidecar config (NAME.json or config.json beside it)."""
    if not path.exists():
        raise DdimctlError(f"{path}: no such file or folder")
    root = path if path.is_dir() else path.parent
    # Present means present: a config that is a FIFO, a folder or unreadable is an error, never "absent".
    present = os.path.lexists
    if root.name + "/" == UNET_FOLDER and present(root.parent / PIPELINE_INDEX):
        root, prefix = root.parent, UNET_FOLDER  # a pipeline's unet/ folder, or a file in it: its pipeline
    else:
        prefix = unet_prefix(lambda name: present(root / name))
    if present(root / PIPELINE_INDEX):
        check_pipeline(read_json_object(root / PIPELINE_INDEX), str(root / PIPELINE_INDEX))
    folder = root / prefix
    if path.is_dir():
        config_file = folder / UNET_CONFIG if present(folder / UNET_CONFIG) else None
        cfg = read_json_object(config_file) if config_file else {}
        if runs.is_run_config(cfg):  # a `ddimctl train` folder: its newest checkpoint
            weights = runs.newest_checkpoint(path)
        else:
            name = next((n for n in UNET_WEIGHTS if present(folder / n)), None)
            if name is None:
                raise DdimctlError(f"{path}: no weights found (looked for {', '.join(UNET_WEIGHTS)})")
            weights = folder / name
    else:
        weights = path
        run_config = path.parent.parent / runs.CONFIG if path.parent.name == runs.CHECKPOINTS else None
        sidecars = [path.with_suffix(".json"), path.parent / UNET_CONFIG, run_config]
        config_file = next((p for p in sidecars if p is not None and present(p)), None)
        cfg = read_json_object(config_file) if config_file else {}
    state = read_checkpoint(weights)
    if any(k.startswith("ema.") for k in state):  # a training checkpoint: use the EMA weights
        state = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    scheduler_file = root / scheduler_config_name(prefix)
    if not present(scheduler_file) and prefix:  # a bare UNet folder inside the pipeline keeps its own too
        scheduler_file = folder / SCHEDULER_CONFIG
    scheduler = read_json_object(scheduler_file) if present(scheduler_file) else None
    where = str(config_file) if config_file else str(path)
    checkpoint = Checkpoint(state, str(weights), cfg, where, scheduler, str(scheduler_file))
    return from_checkpoint(checkpoint, path.name, str(path), hub.sha256_of(weights), notify)


# --------------------------------------------------------------------------------------------
# Any Hub repository in diffusers' format: a pipeline (model_index.json, unet/, scheduler/) or a bare UNet


def hub_repo_id(spec: str) -> tuple[str, str] | None:
    """OWNER/NAME[@REVISION] as (repo, revision), or None when spec is not a Hub repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, at, revision = spec.partition("@")
    if repo.count("/") != 1 or spec.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    if at and not revision:
        raise DdimctlError(f"{spec!r}: nothing follows '@'; name a branch, tag or commit, or leave out '@' for main")
    if revision and not REVISION.match(revision):
        raise DdimctlError(f"{spec!r}: {revision!r} is not a branch, tag or commit name")
    return repo, revision or "main"


def load_hub_repo(repo: str, revision: str, *, hub_cache: str | None = None, endpoint: str | None = None,
                  notify: Callable[[str], None] = lambda message: None) -> LoadedModel:
    """A Hub repository in diffusers' format, downloaded into the standard Hub cache: its configs read
    key by key, its weights (safetensors first; a .bin only as weights_only) checked against the
    sha256 the Hub reports for them before anything parses them."""
    name = f"{repo}@{revision}" if revision != "main" else repo

    def fetch(filename: str, missing_ok: bool = True) -> Path | None:
        return hub.download(name, repo, filename, revision, cache_dir=hub_cache, endpoint=endpoint,
                            missing_ok=missing_ok, fix="--model")

    prefix = unet_prefix(lambda filename: fetch(filename) is not None)
    if prefix and (index := fetch(PIPELINE_INDEX)) is not None:
        check_pipeline(read_json_object(index), f"{name}: {PIPELINE_INDEX}")
    config_file = fetch(prefix + UNET_CONFIG, missing_ok=False)
    cfg = read_json_object(config_file)
    where = f"{name}: {prefix}{UNET_CONFIG}"
    config_from_diffusers(cfg, where)  # a config ddimctl cannot build is refused before the weights are fetched
    scheduler = fetch(scheduler_config_name(prefix))
    weights = next((p for f in UNET_WEIGHTS if (p := fetch(prefix + f)) is not None), None)
    if weights is None:
        raise DdimctlError(f"{name}: no {' or '.join(UNET_WEIGHTS)} in {prefix or 'the repository'}")
    expected = hub.reported_sha256(weights)
    if expected is None:
        raise DdimctlError(f"{name}: {weights.name} is not stored in LFS, so the Hub reports no sha256 to check it "
                           f"against; download it yourself and pass the folder")
    actual = hub.sha256_of(weights)
    if actual != expected:
        hub.remove_download(weights, hub_cache)
        raise DdimctlError(f"{name}: {weights.name} has sha256 {actual[:16]}..., the Hub reported {expected[:16]}...; "
                           f"the corrupt download was deleted, run the command again to fetch it afresh")
    checkpoint = Checkpoint(read_checkpoint(weights), name, cfg, where,
                            read_json_object(scheduler) if scheduler is not None else None,
                            f"{name}: {scheduler.name}" if scheduler is not None else "")
    return from_checkpoint(checkpoint, name, f"hf://{repo}@{revision}", actual, notify)


def cached_hub_repos(hub_cache: str | None = None) -> list[tuple[str, str, str]]:
    """(repository id, its refs, "pipeline" or "UNet") of the Hub repositories in the cache that
    `--model OWNER/NAME` loads: a UNet2DModel config (at the top or in unet/) and its weights in some
    snapshot. Only the config's class is read; the weights are checked when a command loads them."""
    found = []
    for repo, refs, snapshots in hub.cached_repositories(hub_cache):
        for snapshot in snapshots:
            prefix = unet_prefix(lambda name: (snapshot / name).is_file())
            try:  # the rules a load applies, but for the weights: a repository that would be refused is not listed
                if (snapshot / PIPELINE_INDEX).is_file():
                    check_pipeline(read_json_object(snapshot / PIPELINE_INDEX), PIPELINE_INDEX)
                config_from_diffusers(read_json_object(snapshot / prefix / UNET_CONFIG), UNET_CONFIG)
            except DdimctlError:
                continue
            if any((snapshot / prefix / f).is_file() for f in UNET_WEIGHTS):
                found.append((repo, ", ".join(refs), "pipeline" if prefix else "UNet"))
                break
    return found


def run_checkpoint(spec: str) -> Path | None:
    """RUN@STEP (a run folder and a step it saved): that checkpoint's path; None if spec is not one."""
    run, at, step = spec.rpartition("@")
    if not at or not is_whole_number(step) or not Path(run).expanduser().is_dir():
        return None
    run_dir = Path(run).expanduser()
    if runs.saved_run(run_dir) is None:
        return None
    path = runs.checkpoint_path(run_dir, int(step))
    if not path.is_file():
        kept = ", ".join(str(runs.step_of(p)) for p in runs.checkpoint_files(run_dir)) or "none"
        raise DdimctlError(f"{run_dir} has no checkpoint of step {int(step)} (it keeps steps {kept})")
    return path


def load_model(spec: str, *, hub_cache: str | None = None, endpoint: str | None = None,
               notify: Callable[[str], None] = lambda message: None) -> LoadedModel:
    """Resolve `--model`: a registry name (weights.toml), a local path or a Hub repository. notify()
    hears what a user should know (an unverified download's hash, variances that are not used)."""
    loaded = _resolve(spec, hub_cache, endpoint, notify)
    if loaded.config.learned_variance:
        notify(f"{loaded.name} also predicts variances (its last {loaded.config.in_channels} output channels): DDIM "
               f"and the ODE solvers use only its noise prediction, as the paper's sampler does")
    return loaded


def _resolve(spec: str, hub_cache: str | None, endpoint: str | None, notify: Callable[[str], None]) -> LoadedModel:
    entries = registry()
    if spec in entries:
        return load_registered(entries[spec], hub_cache=hub_cache, endpoint=endpoint, notify=notify)
    path = Path(spec).expanduser()
    if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO or a device would block or never end
        raise DdimctlError(f"{path}: not a regular file or folder; --model takes a checkpoint file or a model folder")
    if path.exists():
        return load_local(path, notify)
    checkpoint = run_checkpoint(spec)
    if checkpoint is not None:
        loaded = load_local(checkpoint, notify)
        loaded.name = spec
        return loaded
    hub_repo = hub_repo_id(spec)
    if hub_repo is not None:
        registered = [e for e in entries.values() if e.repo.lower() == hub_repo[0].lower() and "@" not in spec]
        if registered:  # the registry pins its file and sha256
            notify(f"{spec} is registered as {registered[0].name}: its pinned file and sha256 are used")
            return load_registered(registered[0], hub_cache=hub_cache, endpoint=endpoint, notify=notify)
        return load_hub_repo(*hub_repo, hub_cache=hub_cache, endpoint=endpoint, notify=notify)
    close = difflib.get_close_matches(spec, list(entries), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DdimctlError(
        f"unknown model {spec!r}: {hint}not a registered name ({', '.join(entries)}), an existing path nor a Hub "
        f"repository id (OWNER/NAME); `ddimctl models` lists the registry"
    )


__all__ = ["LoadedModel", "build_unet", "is_cached", "load_local", "load_model", "load_registered", "read_checkpoint"]
