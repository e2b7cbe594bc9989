"""`ddimctl distill`: a student that samples in K network calls, learnt from a model (its teacher)
without any data, by trajectory distillation in the manner of SFD (Zhou et al., "Simple and Fast
Distillation of Diffusion Models", NeurIPS 2024).

The student starts as a copy of the teacher and samples with DDIM (eta = 0) at its K timesteps.
Each update draws x_T from the trajectories' own seed streams and solves the teacher's ODE finely
from it (DPM-Solver++(2M) on diffusers' trailing grid joined with the student's timesteps, so that it passes
through them). The student is trained only at its own K timesteps: its DDIM step from the
teacher's point at a step's start (x_T for the first) must land on the teacher's point at the step's
end (the clean image for the last). The loss is the mean squared error of the landing points, over
the K steps: an error in the point where the next step starts counts as it will in the image
(measured on digits, this beat the error of the noise, which weighs every step alike:
docs/distill-digits.json).

The student's first call is not at T: x_T goes in at its top timestep as it is (SFD's analytic first
step: from pure noise the mean of the data is all a network could add, and the student learns that).
A lower top makes the network's output far better conditioned: at t = T - 1 an error e in the noise
moves the predicted image by e / sqrt(abar) = 156 e on DDPM's schedule, at t = 700 by 12 e.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed, seeds
from .devices import WorkTimer, check_batch_fits
from .errors import DdimctlError, param
from .io import images
from .io.fields import Fields
from .models import boundary, runs
from .models.loading import LoadedModel, load_model
from .models.unet import UNet
from .sampling import ddim, solvers, timesteps
from .sampling.runners import Runner, image_classes, settings_for
from .sampling.samplers import Settings
from .session import Session, TrainCallbacks, learning_rate, record_run
from .session import estimate_seconds as training_step_seconds

MAX_STEPS = 4  # the calls a student is distilled for here (runs.MAX_STUDENT_STEPS bounds what a run may record)
# The teacher's solver: as good as UniPC from 10 calls on digits (docs/timesteps-eval.json), and the points its
# callback sees are its trajectory's (UniPC's are corrected after the callback)
TEACHER = "dpm++2m"
RESUME_MAY_CHANGE = ("updates", "save_every", "keep", "sample_count", "log_every", "compile", "out")


@dataclass
class DistillOptions:
    model: str  # the teacher, anything --model loads
    out: str
    steps: int = 2  # K: the student's network calls per image
    timesteps: tuple[int, ...] | None = None  # the student's timesteps (increasing); None: default_timesteps
    updates: int = 2000  # optimizer steps of the student
    batch_size: int = 64  # teacher trajectories per update, over all processes
    lr: float = 5e-5  # SFD's; 1e-4 learnt no faster on digits
    warmup: int | None = None  # None: fitted to the run
    grad_clip: float = 1.0
    ema_decay: float | None = None  # None: fitted to the run
    teacher_steps: int = 10  # the teacher's network calls per trajectory beyond the student's timesteps
    save_every: int = 500
    keep: int = 3
    sample_count: int = 16
    seed: int = 0
    precision: str = "auto"  # auto: bf16 (teacher and student's autocast) on CUDA, fp32 on CPUs
    compile: bool = False
    log_every: int = 10

    def fitted(self) -> DistillOptions:
        """Warm-up and EMA fitted to the run's length where not given (train's rule: a tenth of the run
        each, the EMA's horizon from 10 to 10,000 updates); every option typed first."""
        self._check_types()
        warmup = self.warmup if self.warmup is not None else min(1000, self.updates // 10)
        decay = self.ema_decay if self.ema_decay is not None else round(1 - 1 / min(10_000, max(10, self.updates // 10)), 6)
        return replace(self, warmup=warmup, ema_decay=decay,
                       timesteps=tuple(self.timesteps) if self.timesteps is not None else None)

    def _check_types(self) -> None:
        f = Fields(asdict(self), "the run's distillation options")
        for name in ("steps", "updates", "batch_size", "teacher_steps", "save_every", "keep", "sample_count", "seed",
                     "log_every"):
            f.integer(name)
        for name in ("lr", "grad_clip"):
            f.number(name)
        for name in ("warmup", "ema_decay"):
            if getattr(self, name) is not None:
                (f.integer if name == "warmup" else f.number)(name)
        if self.timesteps is not None:
            f.integers("timesteps", low=0)
        f.flag("compile")
        for name in ("model", "out", "precision"):
            f.text(name)

    def check(self) -> None:
        """Every option that needs no model, before anything is loaded or written."""
        o = self.fitted()
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        rules = [
            (1 <= o.steps <= MAX_STEPS, f"{param('steps')} must be 1 to {MAX_STEPS} (a student's network calls), got {o.steps}"),
            (finite(o.lr) and o.lr > 0, f"{param('lr')} must be a finite number > 0, got {o.lr}"),
            (finite(o.grad_clip) and o.grad_clip > 0, f"gradient clipping must be a finite number > 0, got {o.grad_clip}"),
            (finite(o.ema_decay) and 0 <= o.ema_decay < 1, f"{param('ema_decay')} must be in [0, 1), got {o.ema_decay}"),
            (o.warmup >= 0, f"{param('warmup')} must be >= 0, got {o.warmup}"),
            *[(value >= 1, f"{param(name)} must be at least 1, got {value}") for name, value in [
                ("updates", o.updates), ("batch_size", o.batch_size), ("teacher_steps", o.teacher_steps),
                ("save_every", o.save_every), ("keep", o.keep), ("log_every", o.log_every)]],
            (o.sample_count >= 0, f"{param('sample_count')} must be at least 0, got {o.sample_count}"),
            (o.precision in ("auto", "fp32", "bf16"), f"{param('precision')} for distillation must be auto, fp32 or bf16, "
                                                      f"got {o.precision!r}"),
            (o.timesteps is None or len(o.timesteps) == o.steps,
             f"{len(o.timesteps or ())} timesteps for {param('steps')} {o.steps}; give one per call"),
        ]
        for ok, message in rules:
            if not ok:
                raise DdimctlError(message)


# --------------------------------------------------------------------------------------------
# The pure pieces: the student's timesteps, the teacher's grid, the loss


def default_timesteps(steps: int, train_steps: int) -> tuple[int, ...]:
    """The student's K timesteps: evenly spaced below 0.7 T, the top at 0.7 T (measured on digits:
    the top at 0.7 T distils far better than at T - 1, docs/distill-digits.json)."""
    top = round(0.7 * train_steps)
    return tuple(sorted({round(top * (i + 1) / steps) for i in range(steps)}))


def teacher_grid(student: tuple[int, ...], teacher_steps: int, alphas_cumprod: torch.Tensor) -> list[int]:
    """The teacher's timesteps: diffusers' trailing grid of `teacher_steps` (its top at T - 1, where x_T
    is) joined with the student's, so that the teacher passes through every point the student lands on."""
    trailing = timesteps.scheme_sequence("trailing", teacher_steps, alphas_cumprod).tolist()
    return sorted(set(trailing) | set(student))


@torch.no_grad()
def teacher_points(teacher: ddim.EpsModel, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, grid: list[int],
                   student: tuple[int, ...]) -> list[torch.Tensor]:
    """Where the teacher's trajectory from x_T (at the top of `grid`) passes each of the student's
    timesteps below its top, highest first, then its clean image: the K points the student's steps
    must land on."""
    below = set(student[:-1])
    passed: dict[int, torch.Tensor] = {}

    def keep(step: ddim.Step) -> None:
        index = grid.index(step.timestep)
        landed = grid[index - 1] if index > 0 else -1
        if landed in below:
            passed[landed] = step.x

    clean = solvers.sample_dpmpp_2m(teacher, x_T, alphas_cumprod, grid, callback=keep)
    return [passed[t] for t in sorted(below, reverse=True)] + [clean]


def student_loss(student: ddim.EpsModel, x_T: torch.Tensor, targets: list[torch.Tensor], alphas_cumprod: torch.Tensor,
                 student_timesteps: tuple[int, ...]) -> torch.Tensor:
    """The mean over the student's K DDIM steps of the squared error of its landing point: step k
    starts from the teacher's point (x_T for the first) at the student's k-th timestep from the top
    and should land on targets[k]."""
    losses = []
    for k, (t, s, abar_t, abar_s) in enumerate(ddim.walk(alphas_cumprod, student_timesteps)):
        x_t = x_T if k == 0 else targets[k - 1]
        landed = ddim.ddim_step(x_t, student(x_t, ddim.batch_timesteps(t, x_t)), abar_t, abar_s)
        losses.append((landed - targets[k]).pow(2).mean())
    return torch.stack(losses).mean()


def trajectory_noise(seed: int, update: int, rows: range, shape: tuple[int, ...]) -> torch.Tensor:
    """x_T of trajectories `rows` of one update, each from its own stream (seeds.derive): the same
    trajectories whatever the number of processes."""
    return seeds.initial_noise([torch.Generator().manual_seed(seeds.derive(seed, "distill", update, j)) for j in rows], shape)


# --------------------------------------------------------------------------------------------
# The run


def options_for_run(given: dict, resume: bool) -> DistillOptions:
    """DistillOptions from what a user gave (out at least); on resume, every option not given comes from
    the run being resumed, so that it continues the same run (its teacher too)."""
    base = {}
    if resume:
        saved = (runs.saved_run(Path(given["out"])) or {}).get("train", {})
        base = {k: v for k, v in saved.items() if k in DistillOptions.__dataclass_fields__}
    merged = {**base, **given}
    if merged.get("model") is None:
        from .models.registry import default_model

        merged["model"] = default_model()
    options = DistillOptions(**merged).fitted()
    options.check()
    if resume:
        runs.resume_changes(Path(options.out), asdict(options), RESUME_MAY_CHANGE, {})  # refused here, before any work
    return options


def student_of(options: DistillOptions, teacher: LoadedModel) -> runs.Student:
    """The student a run makes of this teacher (its timesteps checked against the teacher's schedule)."""
    if teacher.student is not None:
        raise DdimctlError(f"{teacher.name} is a student already; distil its teacher, {param('model')} {teacher.student.teacher}")
    T = teacher.train_steps
    chosen = options.timesteps or default_timesteps(options.steps, T)
    if list(chosen) != sorted(set(chosen)) or not all(0 <= t < T for t in chosen):
        raise DdimctlError(f"{param('timesteps')} {timesteps.canonical(chosen)}: give {options.steps} different timesteps "
                           f"from 0 to {T - 1} (the teacher's train steps)")
    return runs.Student(teacher.name, teacher.weights_sha256, options.steps, tuple(int(t) for t in chosen), "ddim")


def check_same_student(run_dir: Path, student: runs.Student, train_steps: int) -> None:
    """A resume continues the student of the same teacher's weights, calls and timesteps, or nothing."""
    saved = (runs.saved_run(run_dir) or {}).get("student")
    theirs = runs.Student.read(Fields(saved, f"{run_dir / runs.CONFIG}: student"), train_steps) \
        if isinstance(saved, dict) else None
    if theirs is None or theirs.teacher_sha256 != student.teacher_sha256 or theirs.timesteps != student.timesteps:
        raise DdimctlError(f"{run_dir} holds no student of {student.teacher} at timesteps "
                           f"{timesteps.canonical(student.timesteps)} (another teacher's weights, other timesteps, or "
                           f"no student at all); resume with its own {param('model')}, or choose another {param('out')}")


def run_record(options: DistillOptions, teacher: LoadedModel, student: runs.Student) -> dict:
    """config.json of a student's run: the teacher's network, schedule, prediction and time scale
    (the student is a copy of it), the student's own calls and timesteps, the options for a resume."""
    record = runs.run_config(asdict(options), replace(teacher.config, dropout=0.0), teacher.schedule, teacher.prediction)
    return {**record, "timestep_scale": teacher.timestep_scale, "student": student.record()}


def distill(options: DistillOptions, device: torch.device, resume: bool = False, progress: TrainCallbacks | None = None,
            teacher: LoadedModel | None = None) -> Path:
    """Distil a student of `options.model`; returns the newest checkpoint. `teacher`: the loaded model
    when the caller has it already. Only rank 0 logs, draws pictures and writes checkpoints."""
    session, plan = open_distillation(options, device, resume, progress or TrainCallbacks(), teacher)
    o = session.options
    try:
        while session.step < o.updates:
            rows = session.world.share(range(session.step * o.batch_size, (session.step + 1) * o.batch_size))
            x_T = trajectory_noise(o.seed, session.step, rows, plan.shape).to(session.device)
            labels = plan.classes(session.step, rows)
            with plan.teacher_time.measure():
                targets = teacher_points(plan.network(plan.teacher, labels), x_T, plan.abar, plan.grid,
                                         plan.student.timesteps)
            lr = session.set_learning_rate(learning_rate(session.step, o.lr, o.warmup))
            with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=plan.bf16):
                loss = student_loss(plan.network(plan.student_eps, labels), x_T, targets, plan.abar, plan.student.timesteps)
            session.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(session.model.parameters(), o.grad_clip)
            session.optimizer.step()
            session.end_step(loss, lr, o.batch_size, plan.rates)
    except KeyboardInterrupt:
        session.interrupted()
        raise
    return session.close()


@dataclass
class Plan:
    """What a distillation's loop needs beside its session: the teacher as a noise model, the
    student's, the schedule, the teacher's grid, the student record and the run's class labels."""

    teacher: boundary.FastEps
    student_eps: boundary.FastEps
    abar: torch.Tensor
    grid: list[int]
    student: runs.Student
    shape: tuple[int, ...]
    class_count: int | None
    seed: int
    bf16: bool
    teacher_time: WorkTimer
    started: float = 0.0

    def classes(self, update: int, rows: range) -> torch.Tensor | None:
        """A class-conditional teacher's label for each trajectory, from its own stream."""
        if self.class_count is None:
            return None
        return seeds.image_classes(seeds.derive(self.seed, "distill-class", update), rows, self.class_count)

    @staticmethod
    def network(eps: boundary.FastEps, labels: torch.Tensor | None) -> ddim.EpsModel:
        return eps if labels is None else (lambda x, t: eps(x, t, labels.to(x.device)))

    def rates(self) -> str:
        """Where the time goes: the teacher's share of it (its solves) and the student's."""
        total = time.perf_counter() - self.started
        return f"teacher {100 * self.teacher_time.seconds / max(total, 1e-9):.0f}% of the time"


def open_distillation(options: DistillOptions, device: torch.device, resume: bool, progress: TrainCallbacks,
                      teacher: LoadedModel | None) -> tuple[Session, Plan]:
    """Everything before the first update, every refusal first: the options against the run folder,
    the teacher loaded and the student made of it, the run recorded, the student built or resumed."""
    say = progress.on_message or (lambda m: None)
    world = distributed.init(device)
    device = distributed.local_device(device, world)
    run_dir = Path(options.out)
    options = options.fitted()
    options.check()
    if options.batch_size % world.size:
        raise DdimctlError(f"{param('batch_size')} {options.batch_size} is not divisible by the {world.size} processes")
    teacher = teacher or load_model(options.model)
    student = student_of(options, teacher)
    options = replace(options, timesteps=student.timesteps)  # recorded as used
    check_batch_fits(teacher.config.activation_bytes(training=True), options.batch_size // world.size, device)
    changes = runs.resume_changes(run_dir, asdict(options), RESUME_MAY_CHANGE, {}) if resume else {}
    config = replace(teacher.config, dropout=0.0)
    resume_from = runs.prepare_run_dir(run_dir, config, resume)
    if resume_from is not None:
        check_same_student(run_dir, student, teacher.train_steps)
        resume_from = runs.resumable_checkpoint(run_dir, say if world.is_main else (lambda m: None), config)
    if world.is_main:
        record_run(run_dir, run_record(options, teacher, student), resume_from, changes, device, say)
    world.barrier()
    model = UNet(config)
    model.load_state_dict(teacher.unet.state_dict())  # the student starts as the teacher
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.0, fused=device.type == "cuda")
    step = runs.load_checkpoint(resume_from, model, ema, optimizer, device) if resume_from is not None else 0
    if resume_from is not None and world.is_main:
        say(f"resuming from {resume_from.name} (update {step})")
    trained = DistributedDataParallel(model) if world.distributed else model
    if options.compile:
        boundary.use_persistent_compile_cache()
        trained = torch.compile(trained)
    precision = boundary.resolve_precision("bf16" if options.precision == "bf16" else "auto" if options.precision == "auto"
                                           else "fp32", device)
    abar = teacher.alphas_cumprod
    plan = Plan(teacher.noise_model(device, precision), student_eps(trained, teacher), abar,
                teacher_grid(student.timesteps, options.teacher_steps, abar), student, teacher.image_shape,
                teacher.class_count, options.seed, precision == "bf16", WorkTimer(device))
    pictures = lambda at, weights: write_pictures(run_dir, at, weights, teacher, student, options, plan, device)  # noqa: E731
    session = Session(run_dir, world, device, model, trained, ema, optimizer, step, options, options.updates, progress,
                      pictures, resume_from)
    session.resumed(resume_from, changes)
    if resume_from is not None and world.is_main and not runs.sample_grid_path(run_dir, step).exists():
        pictures(step, ema)  # killed between the checkpoint and its picture
    plan.started = time.perf_counter()
    return session, plan


def student_eps(trained, teacher: LoadedModel) -> boundary.FastEps:
    """The student being trained as the noise model its DDIM steps take: the model boundary, whatever
    the teacher predicts (gradients flow through it)."""
    return boundary.FastEps(trained, torch.float32, False, teacher.config.in_channels, teacher.prediction,
                            teacher.alphas_cumprod if teacher.prediction != "epsilon" else None, teacher.timestep_scale,
                            teacher.config)


@torch.no_grad()
def write_pictures(run_dir: Path, step: int, ema: UNet, teacher: LoadedModel, student: runs.Student,
                   options: DistillOptions, plan: Plan, device: torch.device) -> None:
    """The teacher's images beside the student's (its EMA weights, K calls), from the same x_T at every save."""
    if options.sample_count <= 0:
        return
    as_student = replace(teacher, unet=ema.eval(), name="student", student=student)
    teacher_settings = Settings(TEACHER, len(plan.grid), timesteps.canonical(plan.grid))
    panels = []
    for model, settings in ((teacher, teacher_settings), (as_student, settings_for(as_student, Settings(), steps_given=False))):
        runner = Runner.create(model, settings, device, classes=image_classes(model, options.sample_count, seed=0))
        batches = runner.sample_indices(list(range(options.sample_count)), 0, options.sample_count)
        panels.append(images.grid(images.to_uint8(torch.cat([x for _, x in batches]))))
    labels = [f"teacher, {len(plan.grid)} calls", f"student, {student.steps} call{'s' * (student.steps > 1)}"]
    images.save_picture(images.strip(*[p[None] for p in panels]), runs.sample_grid_path(run_dir, step), labels=labels,
                        tile=panels[0].shape[1])


def estimate_seconds(teacher: LoadedModel, options: DistillOptions, device: torch.device) -> float:
    """About how long the run's updates take on `device`: per update, one training step (forward and
    backward, timed: session.estimate_seconds) per student call, and a third of one per teacher call."""
    calls = len(teacher_grid(student_of(options, teacher).timesteps, options.teacher_steps, teacher.alphas_cumprod))
    step = training_step_seconds(teacher.config, options.batch_size, 1, device)
    return step * (options.steps + calls / 3) * options.updates
