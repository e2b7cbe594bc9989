"""A training run in its folder: what train's loop and distill's share. The learning rate's warm-up
and the EMA (pure), the Session that follows every optimizer step (the EMA, the loss checked and logged,
a checkpoint and a picture at each save, Ctrl-C) and the run's config.json, and the CPU estimate of a
run's time from one timed training step."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .errors import DdimctlError, param
from .io.files import atomic_path, hold_folder, remove_stale_temporaries
from .models import runs
from .models.unet import UNet, UNetConfig

# --------------------------------------------------------------------------------------------
# Pure pieces: the learning rate and the EMA


def learning_rate(step: int, base: float, warmup: int, total: int = 0, schedule: str = "constant") -> float:
    """Linear warm-up over `warmup` steps, then constant or a half cosine that reaches 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        progress = min(1.0, (step - warmup) / (total - warmup))
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base


def ema_decay(step: int, decay: float) -> float:
    """The configured decay, ramped up early so the average is not dominated by the random init."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach().float() for p in model.parameters()], 1 - decay)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainCallbacks:
    """Callbacks a front end can supply; all optional."""

    on_data: Callable[[int, int], None] | None = None  # (files done, files total)
    on_step: Callable[[int, float, float, str], None] | None = None  # (step, loss, images/s, more rates)
    on_message: Callable[[str], None] | None = None


class Session:
    """A run being trained in its folder: what every loop of ddimctl's does after an optimizer step
    (the EMA, the loss checked and logged, a checkpoint and a picture at each save) and when it stops.
    Only rank 0 logs, samples and writes; every rank steps. `options` gives ema_decay, log_every,
    save_every and keep; `total` is the run's last step; `samples(step, ema)` writes the run's picture."""

    def __init__(self, run_dir: Path, world: distributed.World, device: torch.device, model: torch.nn.Module,
                 trained, ema: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, options, total: int,
                 progress: TrainCallbacks, samples: Callable[[int, torch.nn.Module], None], newest: Path | None):
        self.run_dir, self.world, self.device, self.options, self.progress = run_dir, world, device, options, progress
        self.total = total
        self.model, self.trained, self.ema, self.optimizer, self.step = model, trained, ema, optimizer, step
        self.samples, self.newest = samples, newest
        self.log = open(run_dir / runs.LOG, "a") if world.is_main else None
        self.started, self.images_seen = time.perf_counter(), 0
        model.train()

    def resumed(self, resume_from: Path | None, changes: dict) -> None:
        if self.log and resume_from is not None:  # later lines may repeat steps the lost run had logged
            change = "".join(f", {k} {old} -> {new}" for k, (old, new) in changes.items())
            self.log.write(f"resumed from {resume_from.name} (step {self.step}){change}\n")

    def set_learning_rate(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_step(self, loss: torch.Tensor, lr: float, images: int, rates: Callable[[], str] = lambda: "") -> None:
        """After the optimizer's step: the EMA follows, and every log_every steps (reading the loss waits
        for the device) the loss is checked and logged with `rates()`; at each save a checkpoint and a picture."""
        o = self.options
        update_ema(self.ema, self.model, ema_decay(self.step, o.ema_decay))
        self.step += 1
        self.images_seen += images
        saving = self.step % o.save_every == 0 or self.step == self.total
        if saving or self.step % o.log_every == 0:
            check_loss(loss.item(), self.step, lr, self.newest)
        if self.world.is_main and (self.step % o.log_every == 0 or self.step == self.total):
            speed, value, more = self.images_seen / (time.perf_counter() - self.started), loss.item(), rates()
            if self.progress.on_step:
                self.progress.on_step(self.step, value, speed, more)
            self.log.write(f"step={self.step} loss={value:.5f} lr={lr:.3g} images_per_s={speed:.1f}{more and ' ' + more}\n")
            self.log.flush()
        if saving:
            if self.world.is_main:
                self.newest = runs.save_checkpoint(self.run_dir, self.step, self.model, self.ema, self.optimizer, o.keep)
                self.samples(self.step, self.ema)
            self.world.barrier()

    def interrupted(self) -> None:
        """Ctrl-C: the log says where the run stopped (the newest checkpoint is where --resume starts)."""
        if self.log:
            kept = runs.checkpoint_files(self.run_dir)
            self.log.write(f"interrupted at step {self.step}; newest checkpoint {kept[-1].name if kept else 'none'}\n")
            self.log.close()

    def close(self) -> Path:
        """The finished run: the log closed, the processes parted; returns the newest checkpoint."""
        if self.log:
            self.log.close()
        self.world.barrier()
        distributed.shutdown()
        return self.newest or runs.checkpoint_files(self.run_dir)[-1]


def record_run(run_dir: Path, record: dict, resume_from: Path | None, changes: dict, device: torch.device,
               say: Callable[[str], None]) -> None:
    """The run folder made ready and its config.json written (rank 0): `record` (runs.run_config), the
    thread count on a CPU, and on a resume its history of what each resume changed."""
    for folder in (run_dir, run_dir / runs.CHECKPOINTS, run_dir / runs.SAMPLES):
        if folder.is_dir():
            remove_stale_temporaries(folder)  # left by a process killed while saving
    run_dir.mkdir(parents=True, exist_ok=True)
    hold_folder(run_dir)  # one run in a folder at a time: a second is refused before it writes anything
    (run_dir / runs.SAMPLES).mkdir(exist_ok=True)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    record = {**record, **({"cpu_threads": threads} if threads else {})}
    before = runs.saved_run(run_dir) if resume_from is not None else None
    if threads and (change := runs.thread_change(before, threads)):
        say(f"notice: {change}")
    if before is not None:  # the run's history of resumes, and what each changed
        record["resumes"] = [*before.get("resumes", []), {"from": resume_from.name, "changed": changes}]
    with atomic_path(run_dir / runs.CONFIG) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def check_loss(value: float, step: int, lr: float, newest: Path | None) -> None:
    """Stop a run whose loss is no longer a number: its weights are lost, and no checkpoint of them is written."""
    if not math.isfinite(value):
        kept = f"the newest good checkpoint is {newest.name}" if newest is not None else "no checkpoint was written"
        raise DdimctlError(f"the training loss became {value} by step {step} (learning rate {lr:.3g}); the run stopped and "
                           f"{kept}; start again with a lower {param('lr')} (or {param('precision')} fp32)")


# --------------------------------------------------------------------------------------------
# The CPU estimate


def estimate_seconds(config: UNetConfig, batch_size: int, steps: int, device: torch.device, probe: int = 16) -> float:
    """About how long `steps` optimizer steps of `batch_size` images take on `device`, with the threads
    this run has: one forward and backward pass of up to `probe` images timed (after one of the same
    shape, which pays for allocations), scaled to the batch and the steps. (A 2-image forward pass
    scaled up overestimated a tiny run 70-fold: its cost is mostly per call, not per image.)"""
    images = min(batch_size, probe)
    model = UNet(config).to(device).train()
    x, t, classes = config.example_inputs(images, device)
    seconds = 0.0
    for _ in range(2):
        started = time.perf_counter()
        (model(x, t) if classes is None else model(x, t, classes)).float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return seconds * batch_size / images * steps


__all__ = ["learning_rate", "ema_decay", "update_ema", "TrainCallbacks", "Session", "record_run", "check_loss",
           "estimate_seconds"]
