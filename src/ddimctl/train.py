"""Training with DDPM's "simple" loss: predict the noise added at a uniformly drawn timestep.

One process or many (torchrun, DistributedDataParallel). Every random draw of step n comes from a
generator seeded by (seed, n, rank), so a run killed and resumed from its last checkpoint gives
bit-identical weights to one that ran straight through.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import choices, distributed, seeds
from .devices import check_batch_fits
from .models import boundary, runs
from .io import images
from .sampling import samplers
from .schedule import prediction_target, PREDICTIONS, Schedule
from .errors import DdimctlError, param
from .io.fields import Fields
from .models.layouts import unet_config_from
from .io.files import atomic_path, hold_folder, remove_stale_temporaries
from .sampling.runners import Runner
from .models.unet import PRESETS, UNet, UNetConfig, count_parameters
from .models.loading import LoadedModel


DEFAULT_PRESET = "small"  # the architecture when neither a preset nor --init is given


@dataclass
class TrainOptions:
    data: str
    out: str
    preset: str | None = None  # None: DEFAULT_PRESET, or the architecture of `init`
    unet: dict = field(default_factory=dict)  # overrides of the preset's UNetConfig fields
    init: str | None = None  # start from these weights (a model name or path): fine-tuning
    steps: int = 10_000
    batch_size: int = 64  # images per optimizer step, over all processes
    lr: float = 2e-4
    warmup: int | None = None  # None: fitted to the run (fitted_defaults)
    lr_schedule: str = "constant"  # choices.LR_SCHEDULES
    grad_clip: float = 1.0
    ema_decay: float | None = None  # None: fitted to the run
    flip: bool = True
    save_every: int = 1000
    keep: int = 3
    sample_count: int = 16
    sample_steps: int = choices.DEFAULT_STEPS  # DDIM steps of the sample grids
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32
    compile: bool = False
    log_every: int = 10
    prediction: str = "epsilon"  # what the network learns to predict (PREDICTIONS)
    noise_schedule: str = "linear"  # choices.NOISE_SCHEDULES

    def fitted(self) -> TrainOptions:
        """These options with warm-up and EMA decay fitted to the run's length where not given: a
        tenth of the run each (warm-up at most DDPM's 1,000 steps; the EMA's horizon 1 / (1 - decay)
        from 10 to 10,000 steps, decay 0.9999 for runs of 100,000 steps and more). Every option is typed
        first: a resumed run's come from its config.json, which anyone may have edited."""
        self._check_types()
        warmup = self.warmup if self.warmup is not None else min(1000, self.steps // 10)
        horizon = min(10_000, max(10, self.steps // 10))
        decay = self.ema_decay if self.ema_decay is not None else round(1 - 1 / horizon, 6)
        preset = self.preset if self.preset is not None or self.init is not None else DEFAULT_PRESET  # recorded as used
        return replace(self, warmup=warmup, ema_decay=decay, preset=preset)

    def misfits(self) -> list[str]:
        """Given warm-up and EMA values that do not fit the run's length, each with its fix (the
        fitted defaults always fit)."""
        o, default = self.fitted(), replace(self, warmup=None, ema_decay=None).fitted()
        out = []
        if o.warmup >= o.steps > 1 and o.warmup != default.warmup:
            out.append(f"the warm-up ({o.warmup} steps) is as long as the run ({o.steps} steps), so the learning rate "
                       f"never reaches {o.lr:g}; use {param('warmup')} {o.steps // 10} or leave it out")
        horizon = 1 / (1 - o.ema_decay) if o.ema_decay < 1 else math.inf
        if horizon > o.steps / 2 and o.steps >= 20 and o.ema_decay != default.ema_decay:
            out.append(f"an EMA decay of {o.ema_decay:g} averages over about {horizon:,.0f} steps, more than half of "
                       f"this {o.steps}-step run, so the EMA weights (which are sampled) stay close to early ones; "
                       f"use {param('ema_decay')} {1 - 10 / o.steps:g} or leave it out")
        return out

    def check(self) -> None:
        """Every option, before anything is created on disk."""
        self = self.fitted()
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        channels = self.unet.get("in_channels", 3)
        rules = [
            (channels in (1, 3), f"{param('channels')} must be 1 or 3, got {channels}"),
            (finite(self.lr) and self.lr > 0, f"learning rate must be a finite number > 0, got {self.lr}"),
            (finite(self.grad_clip) and self.grad_clip > 0, f"gradient clipping must be a finite number > 0, got {self.grad_clip}"),
            (finite(self.ema_decay) and 0 <= self.ema_decay < 1, f"EMA decay must be in [0, 1), got {self.ema_decay}"),
            (self.warmup >= 0, f"warm-up steps must be >= 0, got {self.warmup}"),
            *[(value >= 1, f"{param(name)} must be at least 1, got {value}") for name, value in [
                ("steps", self.steps), ("batch_size", self.batch_size), ("save_every", self.save_every), ("keep", self.keep),
                ("log_every", self.log_every)]],
            (self.sample_count >= 0 and self.sample_steps >= 1, "sample grids need a count >= 0 and steps >= 1"),
            (self.precision in ("auto", "fp32", "bf16"),
             f"{param('precision')} for training must be auto, fp32 or bf16, got {self.precision!r}"),
        ]
        for ok, message in rules:
            if not ok:
                raise DdimctlError(message)

    def _check_types(self) -> None:
        """Every option of its type: a resumed run's come from a file anyone may have edited."""
        f = Fields(asdict(self), "the run's training options")
        for name in ("steps", "batch_size", "save_every", "keep", "sample_count", "sample_steps", "seed", "log_every"):
            f.integer(name)
        if self.warmup is not None:
            f.integer("warmup")
        for name in ("lr", "grad_clip", "ema_decay"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (int, float)):
                f.number(name)  # NaN and infinities are named by check()'s rules
        for name in ("flip", "compile"):
            f.flag(name)
        for name in ("data", "out", "lr_schedule", "precision", "prediction", "noise_schedule"):
            f.text(name)
        for name in ("preset", "init"):
            if getattr(self, name) is not None:
                f.text(name)
        f.table("unet")

    @property
    def schedule(self) -> dict:
        """The run's noise schedule (Schedule.to_dict)."""
        return Schedule(kind=choices.NOISE_SCHEDULES[self.noise_schedule]).to_dict()

    def architecture(self) -> tuple[UNetConfig, dict[str, torch.Tensor] | None]:
        """The run's UNet config, every value checked, and with --init the weights it starts from
        (loaded once here: callers that need both ask for both)."""
        self.check()
        if self.lr_schedule not in choices.LR_SCHEDULES:
            raise DdimctlError(f"unknown learning-rate schedule {self.lr_schedule!r}; use {' or '.join(choices.LR_SCHEDULES)}")
        if self.noise_schedule not in choices.NOISE_SCHEDULES:
            raise DdimctlError(f"unknown noise schedule {self.noise_schedule!r}; use {' or '.join(choices.NOISE_SCHEDULES)}")
        if self.prediction not in PREDICTIONS:
            raise DdimctlError(f"unknown prediction {self.prediction!r}; use one of {', '.join(PREDICTIONS)}")
        preset = self.preset or DEFAULT_PRESET
        state = None
        if self.init is not None:
            config, state = initial_weights(self.init, self.preset, self.unet, self.prediction, self.schedule)
        elif preset in PRESETS:
            config = {**PRESETS[preset].to_dict(), **self.unet}
        else:
            raise DdimctlError(f"unknown {param('preset')} {preset!r}; choose from {', '.join(PRESETS)}")
        try:
            config = config if isinstance(config, UNetConfig) else UNetConfig(**config)
            config.check()
        except ValueError as e:
            raise DdimctlError(f"this architecture cannot take the run's settings: {e}") from e
        except TypeError:  # a resumed run's overrides come from its config.json: name the field that is wrong
            unet_config_from(Fields({**PRESETS[preset].to_dict(), **self.unet}, "the run's architecture"))
            raise
        return config, state


def options_for_run(given: dict, resume: bool) -> TrainOptions:
    """TrainOptions from the options a user gave (data and out at least); on resume, every option not
    given comes from the run being resumed, so that it continues the same run."""
    fields = set(TrainOptions.__dataclass_fields__)
    base = {}
    if resume:
        saved = runs.saved_run(Path(given["out"])) or {}
        base = {k: v for k, v in saved.get("train", {}).items() if k in fields}
        saved_unet = base.get("unet", {})
        if not isinstance(saved_unet, dict):
            raise DdimctlError(f"{Path(given['out']) / runs.CONFIG}: its train.unet is not an object of fields; "
                               f"start afresh with another {param('out')}")
        given = {**given, "unet": {**saved_unet, **given.get("unet", {})}}
    return TrainOptions(**{**base, **given}).fitted()


# Where a UNetConfig field is set from, for the message when --init forbids it.
_OVERRIDE_NAMES = {"in_channels": "channels", "out_channels": "channels", "num_res_blocks": "res_blocks",
                   "attention_resolutions": "attention"}


def initial_weights(spec: str, preset: str | None, overrides: dict, prediction: str,
                    schedule: dict) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """The architecture and weights a fine-tuning run starts from. The weights fix the architecture
    (only dropout may change) and must predict what the run trains, under its noise schedule."""
    from .models.loading import load_model

    loaded = load_model(spec)
    config = UNetConfig(**{**loaded.config.to_dict(), **overrides})
    differ = sorted({_OVERRIDE_NAMES.get(k, k) for k in overrides if getattr(config, k) != getattr(loaded.config, k)} - {"dropout"})
    if preset is not None or differ:
        named = ", ".join(param(name) for name in (["preset"] if preset is not None else []) + differ)
        raise DdimctlError(
            f"{param('init')} {spec} fixes the architecture ({loaded.config.in_channels} channel(s), "
            f"{loaded.config.resolution}x{loaded.config.resolution}); leave out {named}"
        )
    if loaded.prediction != prediction:
        raise DdimctlError(f"{param('init')} {spec} predicts {loaded.prediction!r} and this run trains {prediction!r}; "
                           f"give {param('prediction')} {prediction_option(loaded.prediction)}")
    if loaded.config.learned_variance:
        raise DdimctlError(f"{param('init')} {spec} also predicts variances, which ddimctl's loss does not train; "
                           f"start from a model without them")
    if loaded.class_count or loaded.timestep_scale != 1:
        raise DdimctlError(f"{param('init')} {spec} takes class labels or rescaled timesteps, which ddimctl's "
                           f"training does not give it")
    if Schedule.from_dict(loaded.schedule) != Schedule.from_dict(schedule):
        raise DdimctlError(f"{param('init')} {spec} was trained with another noise schedule than this run's "
                           f"(training offers {param('noise_schedule')} {' or '.join(choices.NOISE_SCHEDULES)})")
    return config, loaded.unet.state_dict()


# --------------------------------------------------------------------------------------------
# Pure pieces: the loss, the learning rate, EMA, data order


def diffusion_loss(model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor,
                   prediction: str = "epsilon") -> torch.Tensor:
    """|| target - f_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2: DDPM's L_simple, whose target
    is the noise eps, or the clean image x0 or v (prediction_target) for those predictions."""
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(model(x_t, t).float(), prediction_target(prediction, x0, noise, a))


def prediction_option(prediction: str) -> str:
    """--prediction's name (eps, v, x0) of a prediction by its schedule.PREDICTIONS name."""
    return next(short for short, name in choices.PREDICTIONS.items() if name == prediction)


def optimizer_step(model, trained, optimizer, x0, t, noise, abar, use_bf16: bool, grad_clip: float,
                   prediction: str = "epsilon") -> torch.Tensor:
    """One step of training: the loss (bf16 autocast if asked), its gradients clipped, AdamW's update.
    `trained` is the model as called (DDP-wrapped or compiled), `model` the module itself."""
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss = diffusion_loss(trained, x0, t, noise, abar, prediction)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss


def learning_rate(step: int, base: float, warmup: int, total: int = 0, schedule: str = "constant") -> float:
    """Linear warm-up over `warmup` steps, then constant or a half cosine that reaches 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        progress = min(1.0, (step - warmup) / (total - warmup))
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast (fp32 master weights and optimizer): asked for, or auto on GPUs and on CPUs
    with native bf16 (1.5x the fp32 images/s on the digits model, docs/benchmarks.md)."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and boundary.cpu_has_native_bf16())
    return precision == "bf16"


def ema_decay(step: int, decay: float) -> float:
    """The configured decay, ramped up early so the average is not dominated by the random init."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach().float() for p in model.parameters()], 1 - decay)


def batch_indices(n: int, step: int, global_batch: int, seed: int, world: distributed.World) -> torch.Tensor:
    """This process's share of step `step`'s batch: epochs are seeded permutations of the data."""
    positions = torch.arange(step * global_batch, (step + 1) * global_batch)
    out = torch.empty_like(positions)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=seeds.epoch_order(seed, epoch))
        here = positions.div(n, rounding_mode="floor") == epoch
        out[here] = perm[positions[here] % n]
    return out[world.rank :: world.size]


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainCallbacks:
    """Callbacks a front end can supply; all optional."""

    on_data: Callable[[int, int], None] | None = None  # (files done, files total)
    on_step: Callable[[int, float, float, str], None] | None = None  # (step, loss, images/s, more rates)
    on_message: Callable[[str], None] | None = None


def train(options: TrainOptions, device: torch.device, resume: bool = False, progress: TrainCallbacks | None = None,
          architecture: tuple[UNetConfig, dict[str, torch.Tensor] | None] | None = None) -> Path:
    """Train a UNet; returns the newest checkpoint. Only rank 0 logs, samples and writes checkpoints.
    `architecture`: options.architecture() when the caller has it already (with --init it reads weights)."""
    session, data = open_training(options, device, resume, progress or TrainCallbacks(), architecture)
    abar = Schedule.from_dict(options.schedule).alphas_cumprod().float().to(session.device)
    use_bf16 = uses_bf16(options.precision, session.device)
    try:
        while session.step < options.steps:
            x0, t, noise = (v.to(session.device) for v in draw_batch(data, session.step, options, session.world, len(abar)))
            lr = session.set_learning_rate(learning_rate(session.step, options.lr, options.warmup, options.steps,
                                                         options.lr_schedule))
            loss = optimizer_step(session.model, session.trained, session.optimizer, x0, t, noise, abar, use_bf16,
                                  options.grad_clip, options.prediction)
            session.end_step(loss, lr, options.batch_size)
    except KeyboardInterrupt:
        session.interrupted()
        raise
    return session.close()


def open_training(options: TrainOptions, device: torch.device, resume: bool, progress: TrainCallbacks,
                  architecture: tuple[UNetConfig, dict[str, torch.Tensor] | None] | None) -> tuple[Session, torch.Tensor]:
    """Everything before the first step, every refusal first: the options against the run folder, the
    data read (before anything is written: unreadable data must not leave a run folder behind), the
    run recorded, the model built or resumed. Returns the open session and the training images."""
    say = progress.on_message or (lambda m: None)
    world = distributed.init(device)
    device = distributed.local_device(device, world)
    run_dir = Path(options.out)
    options = options.fitted()
    changes = runs.resume_changes(run_dir, asdict(options)) if resume else {}
    config, initial_state = architecture or options.architecture()
    if options.batch_size % world.size:
        raise DdimctlError(f"{param('batch_size')} {options.batch_size} is not divisible by the {world.size} processes")
    check_batch_fits(config.activation_bytes(training=True), options.batch_size // world.size, device)
    resume_from = runs.prepare_run_dir(run_dir, config, resume)
    if resume_from is not None:
        resume_from = runs.resumable_checkpoint(run_dir, say if world.is_main else (lambda m: None), config)
    from .data import load_folder

    data = load_folder(Path(options.data), config.resolution, config.in_channels, progress.on_data if world.is_main else None,
                       say if world.is_main else None, exclude=run_dir)
    if world.is_main:
        say(f"{data.shape[0]} training images at {config.resolution}x{config.resolution}, {config.in_channels} channel(s)")
        record_run(run_dir, runs.run_config(asdict(options), config, options.schedule, options.prediction),
                   resume_from, changes, device, say)
    world.barrier()
    model, ema, optimizer, step = build_model(options, config, initial_state, resume_from, device, world.is_main, say)
    trained = DistributedDataParallel(model) if world.distributed else model
    if options.compile:
        boundary.use_persistent_compile_cache()
        trained = torch.compile(trained)
    grids = lambda at, weights: write_samples(run_dir, at, weights, options, device)  # noqa: E731
    session = Session(run_dir, world, device, model, trained, ema, optimizer, step, options, options.steps, progress, grids,
                      resume_from)
    session.resumed(resume_from, changes)
    return session, data


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


def build_model(options: TrainOptions, config: UNetConfig, initial_state: dict | None, resume_from: Path | None,
                device: torch.device, is_main: bool, say: Callable[[str], None]):
    """(model, EMA, optimizer, step): fresh from the seed, from --init's weights, or as a checkpoint left them."""
    run_dir = Path(options.out)
    torch.manual_seed(options.seed)  # the initial weights
    model = UNet(config)
    if options.init is not None and resume_from is None:
        model.load_state_dict(initial_state)
        if is_main:
            say(f"starting from the weights of {options.init}")
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # One fused kernel on CUDA: the small models are bound by kernel launches there.
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.0, fused=device.type == "cuda")
    step = 0
    if resume_from is not None:
        step = runs.load_checkpoint(resume_from, model, ema, optimizer, device)
        if is_main:
            say(f"resuming from {resume_from.name} (step {step})")
            if not runs.sample_grid_path(run_dir, step).exists():  # killed between the checkpoint and its grid
                write_samples(run_dir, step, ema, options, device)
    return model, ema, optimizer, step


def draw_batch(data: torch.Tensor, step: int, options: TrainOptions, world: distributed.World,
               train_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's (x0 on [-1, 1], t, noise) of one step, from the step's own streams (seeds.py);
    the dropout stream of the step is set here too, so that the draws happen in one order always."""
    rng = seeds.training_batch(options.seed, step, world.rank)
    torch.manual_seed(seeds.dropout(options.seed, step, world.rank))
    idx = batch_indices(data.shape[0], step, options.batch_size, options.seed, world)
    x0 = data[idx].float().div(127.5).sub(1)
    if options.flip:
        flip = torch.rand(x0.shape[0], generator=rng) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
    t = torch.randint(0, train_steps, (x0.shape[0],), generator=rng)
    noise = torch.randn(x0.shape, generator=rng)
    return x0, t, noise


def check_loss(value: float, step: int, lr: float, newest: Path | None) -> None:
    """Stop a run whose loss is no longer a number: its weights are lost, and no checkpoint of them is written."""
    if not math.isfinite(value):
        kept = f"the newest good checkpoint is {newest.name}" if newest is not None else "no checkpoint was written"
        raise DdimctlError(f"the training loss became {value} by step {step} (learning rate {lr:.3g}); the run stopped and "
                           f"{kept}; start again with a lower {param('lr')} (or {param('precision')} fp32)")


# The sample grids' two panels, from the same x_T: what `ddimctl sample --model RUN` gives (DDIM, eta = 0),
# and what the model has learnt so far. A young model's unclipped samples saturate into flat colour and
# noise long after eta = 1 with x0 clipped shows the data (200 coloured shapes, tiny preset: 0-6% shapes
# unclipped at every save to 4,000 steps, 75% from 1,000 steps clipped at eta = 1; docs/shapes-tiny.json).
GRID_PANELS = (("eta 0", 0.0, False), ("eta 1, --clip", 1.0, True))


@torch.no_grad()
def write_samples(run_dir: Path, step: int, ema: UNet, options: TrainOptions, device: torch.device) -> None:
    """The GRID_PANELS of DDIM samples from the EMA weights side by side, the same noise at every save."""
    if options.sample_count <= 0:
        return
    loaded = LoadedModel(ema, "ema", str(run_dir), options.schedule, "uniform", prediction=options.prediction)
    steps = min(options.sample_steps, loaded.train_steps)
    panels = []
    for _, eta, clip in GRID_PANELS:
        runner = Runner.create(loaded, samplers.Settings("ddim", steps, "uniform", eta, clip=clip), device)
        batches = runner.sample_indices(list(range(options.sample_count)), 0, options.sample_count)
        panels.append(images.grid(images.to_uint8(torch.cat([x for _, x in batches]))))
    labels = [label for label, _, _ in GRID_PANELS]
    images.save_picture(images.strip(*[p[None] for p in panels]), runs.sample_grid_path(run_dir, step),  # >= 256 px
                        labels=labels, tile=panels[0].shape[1])


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


def smaller_presets(config: UNetConfig) -> list[str]:
    """The presets with fewer parameters than `config` (what a warning may suggest instead)."""
    own = params_for(config)
    return [name for name, preset in PRESETS.items() if params_for(preset) < own]


def params_for(config: UNetConfig) -> int:
    with torch.device("meta"):  # no memory, no arithmetic
        return count_parameters(UNet(config))


__all__ = ["TrainOptions", "train", "diffusion_loss", "batch_indices", "learning_rate", "ema_decay"]
