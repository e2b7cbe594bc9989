"""Training with DDPM's "simple" loss: predict the noise added at a uniformly drawn timestep.

One process or many (torchrun, DistributedDataParallel). Every random draw of step n comes from a
generator seeded by (seed, n, rank), so a run killed and resumed from its last checkpoint gives
bit-identical weights to one that ran straight through.
"""

from __future__ import annotations

import copy
import math
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
from .sampling.runners import Runner
from .models.unet import PRESETS, UNet, UNetConfig, count_parameters
from .models.loading import LoadedModel
from .session import Session, TrainCallbacks, learning_rate, record_run


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
# Pure pieces: the loss, data order


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


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast (fp32 master weights and optimizer): asked for, or auto on GPUs and on CPUs
    with native bf16 (1.5x the fp32 images/s on the digits model, docs/benchmarks.md)."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and boundary.cpu_has_native_bf16())
    return precision == "bf16"


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


def smaller_presets(config: UNetConfig) -> list[str]:
    """The presets with fewer parameters than `config` (what a warning may suggest instead)."""
    own = params_for(config)
    return [name for name, preset in PRESETS.items() if params_for(preset) < own]


def params_for(config: UNetConfig) -> int:
    with torch.device("meta"):  # no memory, no arithmetic
        return count_parameters(UNet(config))


__all__ = ["TrainOptions", "train", "diffusion_loss", "batch_indices"]
