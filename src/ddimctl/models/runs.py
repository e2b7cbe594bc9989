"""The run folder of `ddimctl train` and `ddimctl distill`, one format for the trainers and the loader:

    RUN/config.json                  format "ddimctl-run", the UNet, schedule, skip and training options
                                     (a student's also its teacher, calls, timesteps and sampler)
    RUN/checkpoints/step-N.safetensors   model, EMA and optimizer state (step in the metadata)
    RUN/samples/step-N.png           a grid of DDIM samples from the EMA weights
    RUN/train.log                    step, loss, learning rate, images/s
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..choices import SAMPLER_NAMES
from ..errors import DdimctlError, param
from ..io.fields import Fields, is_whole_number, read_json_object
from ..io.files import Ledger, atomic_save_safetensors
from .layouts import unet_config_from
from .unet import UNet, UNetConfig

RUN_FORMAT = "ddimctl-run"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
LOG = "train.log"


@dataclass(frozen=True)
class Student:
    """What a distilled student samples with (`ddimctl distill`): its network calls, timesteps and
    sampler, and the teacher it learnt from (name and weights' sha256)."""

    teacher: str
    teacher_sha256: str
    steps: int
    timesteps: tuple[int, ...]
    sampler: str

    def record(self) -> dict:
        return {"teacher": self.teacher, "teacher_sha256": self.teacher_sha256, "steps": self.steps,
                "timesteps": list(self.timesteps), "sampler": self.sampler}

    @classmethod
    def read(cls, fields: Fields, train_steps: int) -> Student:
        """A run's "student" record, every field checked (a file anyone may have edited)."""
        fields.only(("teacher", "teacher_sha256", "steps", "timesteps", "sampler"))
        steps = fields.integer("steps", low=1, high=MAX_STUDENT_STEPS)
        timesteps = fields.integers("timesteps", low=0, high=train_steps - 1)
        if len(timesteps) != steps or list(timesteps) != sorted(set(timesteps)):
            raise DdimctlError(f"{fields.where}: 'timesteps' must be {steps} increasing timesteps, one per call")
        digest = fields.text("teacher_sha256")
        if not HEX64.match(digest):
            raise DdimctlError(f"{fields.where}: 'teacher_sha256' is not a sha256 in hexadecimal")
        return cls(fields.text("teacher"), digest, steps, tuple(timesteps), fields.text("sampler", choices=SAMPLER_NAMES))


MAX_STUDENT_STEPS = 8  # a student is for few calls: beyond these the solvers do as well
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def is_run_config(cfg: dict) -> bool:
    return cfg.get("format") == RUN_FORMAT


CHECKPOINT_NAME = re.compile(r"^step-[0-9]{8}\.safetensors$")


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoints (named exactly as ddimctl names them), oldest first."""
    found = (Path(run_dir) / CHECKPOINTS).glob("step-*.safetensors")
    return sorted(p for p in found if CHECKPOINT_NAME.match(p.name) and p.is_file() and not p.is_symlink())


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}.safetensors"


def sample_grid_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SAMPLES / f"step-{step:08d}.png"


# --------------------------------------------------------------------------------------------
# The run folder: its config, and what a resume may change


def run_config(options: dict, config: UNetConfig, schedule: dict, prediction: str) -> dict:
    """config.json of a run folder: enough for `--model RUN_DIR` (the UNet, its noise schedule, what
    it predicts) and for checking a resume (session.record_run adds the CPU thread count: the weights'
    bits depend on it)."""
    return {"format": RUN_FORMAT, "unet": config.to_dict(), "schedule": schedule, "prediction": prediction,
            "skip": "uniform", "train": options}


def recorded_threads(saved: dict | None) -> int | None:
    """The CPU thread count a run recorded (its weights' bits depend on it), or None."""
    return Fields(saved or {}, CONFIG).integer("cpu_threads", None, 1, 1_000_000)


def thread_change(saved: dict | None, threads: int) -> str | None:
    """What a CPU resume with `threads` threads should know when the run used another count."""
    before = recorded_threads(saved)
    if before is None or before == threads:
        return None
    return (f"this run was trained with {before} CPU thread(s) and resumes with {threads}: the weights will not be "
            f"bit-identical to an uninterrupted run; --threads {before} keeps them so")


# Options a resumed run may change (the rest decide the weights: a change would not continue the run).
RESUME_MAY_CHANGE = ("steps", "save_every", "keep", "sample_count", "sample_steps", "log_every", "compile", "data", "out")
ARCHITECTURE_OPTIONS = ("unet", "preset", "init")
# Options that runs of earlier versions did not record, at the value those runs were trained with.
RECORDED_SINCE = {"prediction": "epsilon", "noise_schedule": "linear"}  # checked as the architecture itself (prepare_run_dir)


def _comparable(name: str, value):
    """A value as a resume compares it: paths resolved, lists and tuples alike."""
    if name in ("data", "out") and isinstance(value, str):
        return str(Path(value).resolve())
    return list(value) if isinstance(value, tuple) else value


def saved_run(run_dir: Path) -> dict | None:
    """config.json of an existing run folder (checked: a file anyone may have edited), or None."""
    config_file = Path(run_dir) / CONFIG
    if not config_file.is_file():
        return None
    saved = read_json_object(config_file)
    if not is_run_config(saved):
        raise DdimctlError(f"{run_dir} holds something other than a ddimctl run; choose another {param('out')}")
    fields = Fields(saved, str(config_file))
    unet_config_from(fields.table("unet"))
    fields.table("train", {})
    return saved


def resume_changes(run_dir: Path, options: dict, may_change: tuple[str, ...] = RESUME_MAY_CHANGE,
                   recorded_since: dict = RECORDED_SINCE) -> dict[str, list]:
    """What resuming the run in `run_dir` with `options` (train.TrainOptions, or distill's, as a dict)
    changes: {option: [the run's value, the new one]}. Only `may_change` may differ (and train's steps
    only with a constant learning rate: the cosine schedule depends on it); anything else is refused.
    `recorded_since`: options earlier runs did not record, at the value they were trained with."""
    run = saved_run(run_dir)
    if run is None:  # no run yet: a resume starts it with these options, and there is nothing to compare
        return {}
    saved = {**recorded_since, **run.get("train", {})}
    changed = {k: [saved[k], v] for k, v in options.items()
               if k in saved and k not in ARCHITECTURE_OPTIONS and _comparable(k, saved[k]) != _comparable(k, v)}
    fixed = [k for k in changed if k not in may_change or (k == "steps" and options.get("lr_schedule") == "cosine")]
    if fixed:
        k = fixed[0]
        before, after = (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for v in changed[k])
        raise DdimctlError(
            f"{run_dir} was trained with {param(k)} {before}; resuming with {after} would not continue "
            f"it (leave {param(k)} out, or start a new {param('out')}); a resume may change "
            f"{', '.join(param(n) for n in may_change if n != 'out')}"
        )
    return changed


def prepare_run_dir(run_dir: Path, config: UNetConfig, resume: bool) -> Path | None:
    """Check RUN_DIR against this run; return the checkpoint to resume from, if any. A folder whose
    config.json is not one ddimctl wrote must hold none of the files a run writes (a user's train.log
    is never appended to, their samples/ never written into)."""
    check_owned(run_dir)
    existing = checkpoint_files(run_dir) if run_dir.is_dir() else []
    saved = saved_run(run_dir)
    if saved is not None:
        mine = config.to_dict()
        theirs = UNetConfig(**{**mine, **saved["unet"]}).to_dict()  # lists in JSON, tuples here
        # dropout is no part of the weights, but a resume that changed it would not continue the run
        changed = [k for k in mine if theirs[k] != mine[k] and (resume or k != "dropout")]
        if existing and changed:
            raise DdimctlError(
                f"{run_dir} holds a run with another architecture or dropout ({', '.join(changed)} differ); "
                f"use the same settings or another {param('out')}"
            )
    if existing and not resume:
        raise DdimctlError(
            f"{run_dir} already holds a run (newest checkpoint {existing[-1].name}); "
            f"pass {param('resume')} to continue it, or choose another {param('out')}"
        )
    return existing[-1] if existing else None


def check_owned(run_dir: Path) -> None:
    if not run_dir.is_dir():
        return
    Ledger(run_dir).check()
    if Ledger(run_dir).owns(run_dir / CONFIG):
        return
    theirs = [p for p in (run_dir / CONFIG, run_dir / LOG) if os.path.lexists(p)]
    theirs += [p for sub in (CHECKPOINTS, SAMPLES) if (run_dir / sub).is_dir() for p in sorted((run_dir / sub).iterdir())]
    if theirs:
        raise DdimctlError(
            f"{run_dir} holds {theirs[0].relative_to(run_dir)}{f' and {len(theirs) - 1} more' if len(theirs) > 1 else ''}, "
            f"which ddimctl did not write (there is no run config of ddimctl's); a run would write into them: choose "
            f"another {param('out')}"
        )


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.stem.removeprefix("step-"))


def newest_checkpoint(run_dir: Path) -> Path:
    found = checkpoint_files(run_dir)
    if not found:
        raise DdimctlError(f"{run_dir}: this training run has no checkpoint yet; train longer or wait for the first save")
    return found[-1]


def check_run_dir(run_dir: Path | str) -> None:
    """Fail before any work when the run folder cannot be created or written."""
    existing = Path(run_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DdimctlError(f"cannot create the run folder {run_dir}: {existing} is a file, not a folder; choose another {param('out')}")
    if not os.access(existing, os.W_OK):
        raise DdimctlError(f"cannot create the run folder {run_dir}: {existing} is not writable; choose another {param('out')}")


def interrupted_at(run_dir: Path | str) -> str:
    """What a stopped run leaves, for the line Ctrl-C prints."""
    files = checkpoint_files(Path(run_dir)) if Path(run_dir).is_dir() else []
    if not files:
        return f"no checkpoint was written to {run_dir} yet"
    return f"the newest checkpoint is {files[-1].name}; resume with the same command and {param('resume')}"


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (unreadable, truncated, no optimizer state), or None."""
    try:
        with safe_open(str(path), "pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            for key in keys:  # reading every tensor finds a file cut short
                f.get_slice(key)[...]
    except Exception as e:  # safetensors raises several types for a damaged file
        return f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if "step" not in meta or not any(k.startswith("model.") for k in keys):
        return "not a ddimctl training checkpoint"
    if not any(k.startswith("optim.") for k in keys) or "param_groups" not in meta:
        return "holds no optimizer state"
    if not is_whole_number(meta["step"]) or int(meta["step"]) != step_of(path):
        return f"its step {meta['step']!r} is not the {step_of(path)} its name says"
    if not _are_param_groups(meta["param_groups"]):
        return "its optimizer settings (param_groups) are damaged"
    return None


def _are_param_groups(text: str) -> bool:
    """Whether text is the JSON of one AdamW parameter group, as save_checkpoint writes it."""
    try:
        groups = json.loads(text)
    except ValueError:
        return False
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and isinstance(groups[0].get("params"), list) and all(type(i) is int for i in groups[0]["params"])
            and all(number(groups[0].get(k)) for k in ("lr", "eps", "weight_decay"))
            and isinstance(groups[0].get("betas"), list) and len(groups[0]["betas"]) == 2
            and all(number(b) for b in groups[0]["betas"]))


def resumable_checkpoint(run_dir: Path, say: Callable[[str], None], config: UNetConfig | None = None) -> Path:
    """The newest checkpoint that can be resumed from; damaged newer ones are named and skipped. With
    the run's `config`, one whose tensors do not fit it is refused (another architecture's weights:
    not damage, never deleted)."""
    files = checkpoint_files(run_dir)
    ledger = Ledger(Path(run_dir) / CHECKPOINTS)
    for path in reversed(files):
        problem = checkpoint_problem(path)
        if problem is None:
            if config is not None:
                check_fits(path, config)
            return path
        if ledger.names(path):  # ddimctl's own, damaged since: its step is trained again and saved afresh
            path.unlink()
            say(f"notice: removed {path.name}: {problem}")
        else:
            raise DdimctlError(f"{path}: not a checkpoint ddimctl wrote ({problem}); move it out of the run folder")
    raise DdimctlError(
        f"{run_dir} holds no checkpoint that can be resumed from ({len(files)} damaged); "
        f"start afresh with another {param('out')}"
    )


def check_fits(path: Path, config: UNetConfig) -> None:
    """A checkpoint's model and EMA tensors against the shapes of the run's UNet (read from the file's
    header, built on the meta device: nothing is loaded or allocated)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    with safe_open(str(path), "pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(("model.", "ema."))}
    for prefix in ("model.", "ema."):
        mine = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}
        wrong = sorted(set(mine) ^ set(expected)) or sorted(k for k in mine if mine[k] != expected[k])
        if wrong:
            raise DdimctlError(f"{path} holds weights of another architecture than {path.parent.parent / CONFIG} "
                               f"describes ({prefix}{wrong[0]}); resume it with its own config, or start afresh with "
                               f"another {param('out')}")


# --------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file per save (model, EMA, optimizer), written atomically


def save_checkpoint(run_dir: Path, step: int, model, ema, optimizer, keep: int) -> Path:
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu() for k, v in ema.state_dict().items()})
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().reshape(value.shape)
    metadata = {"step": str(step), "param_groups": json.dumps(optim["param_groups"])}
    path = checkpoint_path(run_dir, step)
    atomic_save_safetensors(tensors, path, metadata)
    ledger = Ledger(path.parent)
    for old in checkpoint_files(run_dir)[:-keep]:
        if ledger.owns(old):  # what ddimctl did not write (or what changed since) stays
            old.unlink()
    return path


def load_checkpoint(path: Path, model, ema, optimizer, device: torch.device) -> int:
    tensors = load_file(str(path), device=str(device))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    except (ValueError, KeyError, TypeError) as e:  # another parameter count: not this run's optimizer
        raise DdimctlError(f"{path}: its optimizer state does not fit this run's model ({e}); resume from another "
                           f"checkpoint or start afresh with another {param('out')}") from e
    return int(meta["step"])
