"""Every checkpoint family ddimctl loads, one row each (as samplers.SAMPLERS is for samplers), with the
same four steps: recognise it, read its network's config, rename its weights into ddimctl's UNet
names, read its noise schedule. Where the weights come from (the registry, a local path, the Hub) is
loading.py's business; it hands each family a `Checkpoint` and loops over FAMILIES.

A new family is one module (its config and layout, as guided.py is) and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import DdimctlError
from ..io.fields import Fields
from ..schedule import PAPER_SKIPS, PREDICTIONS, Schedule
from . import guided
from .diffusers_format import config_from_diffusers, schedule_from_diffusers
from .layouts import MAX_RESOLUTION, infer_config, schedule_from, to_diffusers_names, unet_config_from
from .runs import Student
from .unet import UNetConfig

Notify = Callable[[str], None]
DEFAULT_SCHEDULE = Schedule().to_dict()  # DDPM's linear betas over T = 1000: what a config that names none means


@dataclass(frozen=True)
class Checkpoint:
    """What a source found, untrusted: the tensors of one weights file (a training checkpoint's EMA
    weights already chosen), the config beside them ({} if none) and a diffusers scheduler config."""

    state: dict[str, torch.Tensor]
    weights: str  # the weights' file, for messages
    config: dict
    where: str  # the config's file (or where its sidecar belongs), for messages
    scheduler: dict | None = None
    scheduler_where: str = ""


@dataclass(frozen=True)
class Timing:
    """A model's noise schedule (Schedule.to_dict), what its network predicts (PREDICTIONS), its
    default DDIM skip (PAPER_SKIPS) and the scale of its time input (improved-diffusion's 1000 / T)."""

    schedule: dict
    prediction: str = "epsilon"
    skip: str = "uniform"
    timestep_scale: float = 1.0
    student: Student | None = None  # a distilled student's own calls and timesteps (runs.Student)


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    recognise: Callable[[Checkpoint], bool]
    config: Callable[[Checkpoint], UNetConfig]
    rename: Callable[[Checkpoint, UNetConfig], dict[str, torch.Tensor]]
    timing: Callable[[Checkpoint, Notify], Timing]
    misfit: Callable[[Checkpoint], str] | None = None  # what to say when the weights do not fit the config


# --------------------------------------------------------------------------------------------
# ddimctl's own: a `ddimctl train` run folder, a checkpoint with ddimctl's sidecar, a registry entry


def _own_config(c: Checkpoint) -> UNetConfig:
    return replace(unet_config_from(Fields(c.config, c.where).table("unet")), dropout=0.0)


def _own_timing(c: Checkpoint, notify: Notify) -> Timing:
    fields = Fields(c.config, c.where)
    schedule = schedule_from(fields.table("schedule", None))
    student = Student.read(fields.table("student"), schedule.train_steps) if "student" in c.config else None
    own = Timing(schedule.to_dict(), fields.text("prediction", "epsilon", PREDICTIONS),
                 fields.text("skip", "uniform", PAPER_SKIPS), fields.number("timestep_scale", 1.0, 1e-6, 1e6), student)
    if c.scheduler is None:
        return own
    beside = _scheduler_timing(c, notify)  # a diffusers scheduler config beside the weights has the last word
    return replace(own, schedule=beside.schedule, prediction=beside.prediction)


# --------------------------------------------------------------------------------------------
# diffusers' UNet2DModel (diffusers_format.py), and weights alone (layouts.py)


def _scheduler_timing(c: Checkpoint, notify: Notify) -> Timing:
    """The schedule and prediction of a diffusers scheduler config beside the weights, else DDPM's."""
    if c.scheduler is None:
        return Timing(dict(DEFAULT_SCHEDULE))
    schedule, prediction = schedule_from_diffusers(c.scheduler, c.scheduler_where, notify)
    return Timing(schedule, prediction)


def _weights_alone_config(c: Checkpoint) -> UNetConfig:
    resolution = Fields(c.config, c.where).integer("resolution", None, 1, MAX_RESOLUTION)
    return infer_config(_renamed(c, None), resolution, c.where)


def _renamed(c: Checkpoint, config: UNetConfig | None) -> dict[str, torch.Tensor]:
    try:
        return to_diffusers_names(c.state)
    except DdimctlError as e:
        raise DdimctlError(f"{c.weights}: {e}") from e


# --------------------------------------------------------------------------------------------
# openai's guided-/improved-diffusion (guided.py): their flags in a sidecar


def _sidecar(c: Checkpoint) -> str:
    """Where the flags are, or where their sidecar belongs: NAME.json beside the weights."""
    return c.where if c.config else str(Path(c.weights).with_suffix(".json"))


def _guided_config(c: Checkpoint) -> UNetConfig:
    if not c.config:
        raise DdimctlError(f"{c.weights}: an openai guided-/improved-diffusion checkpoint needs its flags (its README's "
                           f"MODEL_FLAGS and DIFFUSION_FLAGS) in {_sidecar(c)}, improved-diffusion's with rescale_timesteps "
                           f"true; from the weights: {guided.suggested_flags(c.state)}")
    return guided.read_flags(c.config, c.where).config


def _guided_rename(c: Checkpoint, config: UNetConfig) -> dict[str, torch.Tensor]:
    return guided.to_ddimctl_names(c.state, guided.read_flags(c.config, c.where), c.where)


def _guided_timing(c: Checkpoint, notify: Notify) -> Timing:
    flags = guided.read_flags(c.config, c.where)
    return Timing(flags.schedule, flags.prediction, "uniform", flags.timestep_scale)


def _guided_misfit(c: Checkpoint) -> str:
    return f"the flags in {_sidecar(c)} do not match these weights, which suggest {guided.suggested_flags(c.state)}"


FAMILIES: tuple[Family, ...] = (
    Family("guided-diffusion", "openai's guided-/improved-diffusion (ADM) checkpoints, their flags in a sidecar JSON",
           lambda c: guided.is_guided_state(c.state), _guided_config, _guided_rename, _guided_timing, _guided_misfit),
    Family("ddimctl", "ddimctl's own: a train run, a checkpoint with a sidecar of ddimctl's format, a registry entry",
           lambda c: "unet" in c.config, _own_config, _renamed, _own_timing),
    Family("diffusers", "diffusers' UNet2DModel (a pipeline or a UNet folder): config.json and its scheduler config",
           lambda c: "block_out_channels" in c.config, lambda c: config_from_diffusers(c.config, c.where), _renamed,
           _scheduler_timing),
    Family("weights alone", "diffusers-named weights, or the original DDPM layout of the DDIM authors' code (temb.dense), "
           "with no config: the architecture read from the weights", lambda c: True, _weights_alone_config, _renamed,
           _scheduler_timing),
)


def family_of(checkpoint: Checkpoint) -> Family:
    """The first family that recognises the checkpoint (the last row takes weights alone)."""
    return next(f for f in FAMILIES if f.recognise(checkpoint))
