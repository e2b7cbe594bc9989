"""The run folder of `ddimctl train`, one format for the trainer and the loader:

    RUN/config.json                  format "ddimctl-run", the UNet, schedule, skip and training options
    RUN/checkpoints/step-N.safetensors   model, EMA and optimizer state (step in the metadata)
    RUN/samples/step-N.png           a grid of DDIM samples from the EMA weights
    RUN/train.log                    step, loss, learning rate, images/s
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

from .errors import DdimctlError, param

RUN_FORMAT = "ddimctl-run"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
LOG = "train.log"


def is_run_config(cfg: dict) -> bool:
    return cfg.get("format") == RUN_FORMAT


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((Path(run_dir) / CHECKPOINTS).glob("step-*.safetensors"))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}.safetensors"


def sample_grid_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SAMPLES / f"step-{step:08d}.png"


def newest_checkpoint(run_dir: Path) -> Path:
    found = checkpoint_files(run_dir)
    if not found:
        raise DdimctlError(f"{run_dir}: this training run has no checkpoint yet; train longer or wait for the first save")
    return found[-1]


def saved_config(run_dir: Path | str) -> dict | None:
    """config.json of an existing run folder, or None."""
    try:
        saved = json.loads((Path(run_dir) / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if is_run_config(saved) and "unet" in saved else None


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
    return None


def resumable_checkpoint(run_dir: Path, say: Callable[[str], None]) -> Path:
    """The newest checkpoint that can be resumed from; damaged newer ones are named and skipped."""
    files = checkpoint_files(run_dir)
    for path in reversed(files):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        say(f"notice: skipping {path.name}: {problem}")
    raise DdimctlError(
        f"{run_dir} holds no checkpoint that can be resumed from ({len(files)} damaged); "
        f"start afresh with another {param('out')}"
    )
