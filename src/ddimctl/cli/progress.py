"""The library's long calls with their progress bars and the line Ctrl-C prints: filling a folder
of samples, inverting and decoding. The commands call these; the library knows nothing of terminals."""

from __future__ import annotations

from pathlib import Path

from .output import note, progress_bar, progress_on_interrupt
from .deferred import Deferred, library

torch = Deferred("torch")
sample_folders, runners = map(
    library, ("sampling.sample_folders", "sampling.runners"))


def fill_with_progress(runner: runners.Runner, plan: sample_folders.FolderPlan, seed: int, world, x_T=None,
                       scale: int = 1) -> float:
    """sample_folders.fill_folder with a progress bar and a line for Ctrl-C; returns the writers' stall."""
    folder, count = plan.folder, plan.count
    progress_on_interrupt.append(
        lambda: f"{sample_folders.images_written(folder, count)} of {count} images written to {folder}; "
        f"rerun the same command to finish"
    )
    with progress_bar(f"sampling {folder.name}", plan.computed, runner.evaluations, enabled=world.is_main) as advance:
        return sample_folders.fill_folder(runner, plan, seed, world, x_T, scale, advance)


def plan_and_fill(runner: runners.Runner, seed: int, count: int, folder: Path, world, x_T=None, scale: int = 1,
                  shard: tuple[int, int] = (0, 1)) -> tuple[int, float]:
    """Plan the folder (noting images already there), fill it; (images all processes wrote, stall)."""
    plan = sample_folders.plan_folder(folder, count, runner.batch, world, shard)
    if plan.already == plan.share and world.is_main:
        note(f"all {plan.share} images are already in {folder}; nothing to do")
    elif plan.already and world.is_main:
        note(f"{plan.already} of {plan.share} images already in {folder}; generating the rest")
    return plan.share - plan.already, fill_with_progress(runner, plan, seed, world, x_T, scale)


def run_inversion(runner: runners.Runner, x0: torch.Tensor, exact=None) -> tuple[torch.Tensor, int]:
    # exact inversion takes a varying number of calls per step: its bar counts steps
    with progress_bar("inverting" + (" (exact)" if exact else ""), x0.shape[0], runner.evaluations,
                      unit="steps" if exact else "calls") as advance:
        return runners.invert_batches(runner, x0, exact, advance)


def run_decoding(runner: runners.Runner, x_T: torch.Tensor, label="decoding") -> torch.Tensor:
    with progress_bar(label, x_T.shape[0], runner.evaluations) as advance:
        return runners.decode_batches(runner, x_T, advance)
