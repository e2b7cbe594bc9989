"""The run folder of `ddimctl train`, one format for the trainer and the loader:

    RUN/config.json                  format "ddimctl-run", the UNet, schedule, skip and training options
    RUN/checkpoints/step-N.safetensors   model, EMA and optimizer state (step in the metadata)
    RUN/samples/step-N.png           a grid of DDIM samples from the EMA weights
    RUN/train.log                    step, loss, learning rate, images/s
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DdimctlError

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
