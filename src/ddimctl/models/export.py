"""Export to the diffusers on-disk format: a DDIMPipeline folder (UNet2DModel + DDIMScheduler)."""

from __future__ import annotations

import json
from pathlib import Path

from ..schedule import Schedule, TRAINED
from .diffusers_format import PIPELINE_INDEX, PIPELINE_SCHEDULER_CONFIG, UNET_CONFIG, UNET_FOLDER, UNET_WEIGHTS, diffusers_config
from ..errors import DdimctlError
from ..io.files import LEDGER, Ledger, atomic_folder, atomic_save_safetensors, enter_in_ledger
from .loading import LoadedModel


def diffusers_spacing(timesteps: tuple[int, ...], train_steps: int) -> tuple[str, int] | None:
    """(timestep_spacing, steps_offset) with which DDIMScheduler.set_timesteps(K) walks exactly these
    K timesteps, or None: its spacings as diffusers computes them, written out here."""
    k = len(timesteps)
    spacings = {
        "leading": lambda: [i * (train_steps // k) for i in range(k)],
        "trailing": lambda: sorted(round(train_steps - i * train_steps / k) - 1 for i in range(k)),
        "linspace": lambda: sorted(round(v) for v in (i * (train_steps - 1) / max(k - 1, 1) for i in range(k))),
    }
    for name, grid in spacings.items():
        offset = timesteps[0] - grid()[0]
        if 0 <= offset < train_steps and [t + offset for t in grid()] == list(timesteps):
            return name, offset
    return None


def diffusers_scheduler_config(loaded: LoadedModel) -> dict:
    """DDIMScheduler settings that walk the model's schedule as ddimctl does (no clipping, abar = 1
    after the last step); DDIMPipeline converts any scheduler it is given to this class anyway. A
    student's: the spacing and offset that give its own timesteps at num_inference_steps = K."""
    spacing, offset = ("leading", 0) if loaded.student is None else diffusers_spacing(loaded.student.timesteps,
                                                                                    loaded.train_steps)
    s = loaded.schedule
    # DDIMScheduler has no laplace schedule: it goes as the betas themselves, as trained ones do
    given = s.get("kind") in ("laplace", TRAINED)
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": s["train_steps"],
        "beta_start": s["beta_start"],
        "beta_end": s["beta_end"],
        "beta_schedule": "linear" if given else s.get("kind", "linear"),
        "trained_betas": Schedule.from_dict(s).betas().tolist() if given else None,
        "prediction_type": loaded.prediction,
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": offset,
        "timestep_spacing": spacing,
    }


def model_index() -> dict:
    return {
        "_class_name": "DDIMPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }


EXPORTED_WEIGHTS = UNET_FOLDER + UNET_WEIGHTS[0]
EXPORTED_FILES = {PIPELINE_INDEX, UNET_FOLDER + UNET_CONFIG, EXPORTED_WEIGHTS, PIPELINE_SCHEDULER_CONFIG}


def is_earlier_export(folder: Path) -> bool:
    """Whether `folder` holds exactly what an export writes, byte for byte as it wrote it (its
    ledgers say so), and nothing else: replacing it loses nothing of anyone's."""
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir() and p.name != LEDGER}
    folders = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_dir()}
    return (files == EXPORTED_FILES and folders == {str(Path(name).parent) for name in EXPORTED_FILES} - {"."}
            and all(Ledger((folder / name).parent).owns(folder / name) for name in EXPORTED_FILES))


def check_target(out: Path) -> None:
    """Before any work: `out` must be new, an empty folder, or an earlier export (replaced whole)."""
    if out.is_symlink():
        raise DdimctlError(f"{out} is a link; an export replaces only a folder it wrote itself: give the folder's own path "
                           f"or a new one")
    if out.exists() and not out.is_dir():
        raise DdimctlError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not is_earlier_export(out):
        raise DdimctlError(f"{out} holds files that an export of ddimctl's did not write (or that changed since); "
                           f"choose a new or empty output folder")
    if not out.parent.exists():
        raise DdimctlError(f"cannot write {out}: folder {out.parent} does not exist; create it first")


def exported_unet_config(loaded: LoadedModel) -> dict:
    """The unet/config.json of the export, or a one-line refusal naming what diffusers cannot hold."""
    if loaded.timestep_scale != 1:
        raise DdimctlError(f"model {loaded.name!r} cannot be exported to diffusers: its network takes rescaled "
                           f"timesteps (t x {loaded.timestep_scale:g}), which diffusers' schedulers do not give it")
    student = loaded.student
    if student is not None and (student.sampler != "ddim" or diffusers_spacing(student.timesteps, loaded.train_steps) is None):
        raise DdimctlError(f"student {loaded.name!r} cannot be exported to diffusers: DDIMScheduler walks K timesteps "
                           f"spaced leading, trailing or linspace (with an offset), not {','.join(map(str, student.timesteps))}; "
                           f"distil with --timesteps in one of those spacings (such as trailing's "
                           f"{','.join(map(str, sorted(round(loaded.train_steps - i * loaded.train_steps / student.steps) - 1 for i in range(student.steps))))}) "
                           f"to export it")
    try:
        return diffusers_config(loaded.config)
    except DdimctlError as e:
        raise DdimctlError(f"model {loaded.name!r} cannot be exported to diffusers: {e}") from e


def export_diffusers(loaded: LoadedModel, out: Path) -> None:
    """A complete diffusers pipeline folder: DDIMPipeline.from_pretrained(out) loads it, and
    UNet2DModel / DDIMScheduler load its unet/ and scheduler/ subfolders. Written into a temporary
    folder and renamed into place: a kill or a full disk leaves no half-written export."""
    out = Path(out)
    unet_config = exported_unet_config(loaded)
    check_target(out)
    with atomic_folder(out) as tmp:
        (tmp / UNET_FOLDER).mkdir()
        (tmp / PIPELINE_SCHEDULER_CONFIG).parent.mkdir()
        atomic_save_safetensors(loaded.unet.state_dict(), tmp / EXPORTED_WEIGHTS, {"format": "pt"})
        for name, content in (
            (UNET_FOLDER + UNET_CONFIG, unet_config),
            (PIPELINE_SCHEDULER_CONFIG, diffusers_scheduler_config(loaded)),
            (PIPELINE_INDEX, model_index()),
        ):
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
            enter_in_ledger(tmp / name)
