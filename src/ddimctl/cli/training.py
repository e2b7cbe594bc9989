"""`train` and `export`."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .. import choices
from .. import threads as library_threads
from .common import (
    DeviceOpt,
    ModelOpt,
    PlainProgress,
    app,
    cpu_threads_note,
    completing,
    fail,
    load,
    parse_list,
    note,
    note_cpu_threads,
    progress_on_interrupt,
    say,
    stderr,
)
from .output import finish
from .deferred import Deferred, library

torch = Deferred("torch")
devices, distributed, runs, loading, image_data = map(
    library, ("devices", "distributed", "models.runs", "models.loading", "data"))


HOPELESS_ON_CPU_S = 6 * 3600  # beyond this a CPU run is worth a warning before it starts


def keep_recorded_threads(run: Path | None, device) -> None:
    """A CPU resume takes the thread count its run recorded (the weights' bits depend on it), unless
    the user chose one; a new run takes the free cores, like every command."""
    count = runs.recorded_threads(runs.saved_run(run)) if run is not None and device.type == "cpu" else None
    if count and not library_threads.user_set and torch.get_num_threads() != count:
        torch.set_num_threads(count)
        cpu_threads_note.clear()
        note(f"resuming with the run's {count} CPU thread(s), as it was trained (its weights' bits depend on the count)")


@contextmanager
def training_progress(what: str, total: int, out: Path, main_process: bool, reading: bool = False, unit: str = "steps"):
    """The progress of a training run (train, distill): a bar on a terminal, plain lines in a log; the
    loss, images/s and the run's own rates; Ctrl-C's line names where the run stopped. Yields the
    callbacks to hand the loop."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(), console=stderr, disable=not main_process or not stderr.is_terminal,  # logs: PlainProgress
    ) as bar:
        data = bar.add_task("reading data", total=None, status="", visible=reading)
        task = bar.add_task(what, total=total, status="", visible=False)

        def on_data(done: int, total: int) -> None:
            bar.update(data, completed=done, total=total)

        plain = PlainProgress(what, total, unit=unit) if not stderr.is_terminal and main_process else None

        def on_step(step: int, loss: float, speed: float, rates: str) -> None:
            status = f"loss {loss:.4f}, {speed:.1f} img/s{rates and ', ' + rates}"
            bar.update(task, completed=step, status=status, visible=True)
            if plain is not None:
                plain.update(step, f", {status}")

        progress_on_interrupt.append(lambda: runs.interrupted_at(out))
        yield library("session").TrainCallbacks(on_data=on_data, on_step=on_step,
                                              on_message=lambda m: bar.console.print(m, markup=False))


def describe_duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    if seconds >= 90:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} seconds"


def note_cpu_estimate(seconds: float, quicker: Callable[[], str]) -> None:
    """How long a CPU run will take, before it starts; a hopeless one is a warning naming what is
    quicker (asked for only then)."""
    estimate = f"about {describe_duration(seconds)} on this CPU (a timed training step, scaled)"
    note(f"warning: {estimate}; {quicker()} is quicker" if seconds > HOPELESS_ON_CPU_S else estimate)


def quicker_training(config) -> str:
    from .. import train as training

    smaller = training.smaller_presets(config)  # never the preset in use
    return f"a CUDA GPU{f', a smaller --preset ({chr(44).join(smaller)})' if smaller else ''}, a lower --resolution or fewer --steps"


@app.command()
def train(
    data: Path = typer.Argument(..., metavar="DATA", help="Folder of training images (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config, checkpoints, samples, log."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Architecture: cifar10, celeba64, ddpm256, digits, small, tiny (default: small)."
    ),
    init: Optional[str] = typer.Option(
        None, "--init", help="Fine-tune: start from this model's weights (a registry name or a checkpoint); "
        "its architecture is kept.",
    ),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image size (default: the preset's)."),
    channels: Optional[int] = typer.Option(
        None, "--channels", help="1 (grayscale) or 3 (RGB); default: 1 when every image is grayscale."
    ),
    base_channels: Optional[int] = typer.Option(None, "--base-channels", help="Width of the first level."),
    channel_mult: Optional[str] = typer.Option(None, "--channel-mult", help="Width multipliers, e.g. 1,2,2,2."),
    res_blocks: Optional[int] = typer.Option(None, "--res-blocks", help="Residual blocks per level."),
    attention: Optional[str] = typer.Option(None, "--attention", help="Resolutions with attention, e.g. 16."),
    dropout: Optional[float] = typer.Option(
        None, "--dropout", help="Dropout in the residual blocks, 0 to <1 (default: the preset's, 0.1 for cifar10)."
    ),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps in all (default 10000)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Images per step, over all processes (default 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (AdamW; default 2e-4)."),
    warmup: Optional[int] = typer.Option(
        None, "--warmup", min=0, help="Steps of linear learning-rate warm-up (default: a tenth of --steps, at most 1000)."
    ),
    lr_schedule: Optional[str] = typer.Option(
        None, "--lr-schedule", autocompletion=completing(choices.LR_SCHEDULES),
        help="constant (default), or cosine (decays to 0 at --steps).",
    ),
    prediction: Optional[str] = typer.Option(
        None, "--prediction", autocompletion=completing(choices.PREDICTIONS),
        help="What the network learns to predict: eps (the noise, default), v or x0.",
    ),
    noise_schedule: Optional[str] = typer.Option(
        None, "--schedule", "--noise-schedule", autocompletion=completing(choices.NOISE_SCHEDULES),
        help="Noise schedule: linear (DDPM's betas, default) or cosine (Nichol & Dhariwal).",
    ),
    ema_decay: Optional[float] = typer.Option(
        None, "--ema-decay",
        help="Decay of the weights' moving average that is sampled (default: averaging over a tenth of --steps; "
        "0.9999 from 100,000 steps).",
    ),
    flip: Optional[bool] = typer.Option(
        None, "--flip/--no-flip",
        help="Random horizontal flips (default on; turn off for digits, text, anything with a handedness).",
    ),
    save_every: Optional[int] = typer.Option(None, "--save-every", min=1, help="Checkpoint and sample grid every N steps (default 1000)."),
    keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Checkpoints kept (default 3)."),
    sample_steps: Optional[int] = typer.Option(None, "--sample-steps", min=1, help="DDIM steps of the sample grids (default 50)."),
    sample_count: Optional[int] = typer.Option(
        None, "--sample-count", min=0, max=1024, help="Images in each panel of the sample grids (default 16; 0: none)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initial weights and every training draw (default 0)."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="auto (default: bf16 autocast on GPUs and on CPUs with native bf16), fp32 or bf16."
    ),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the UNet (default off)."),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue from the newest checkpoint in --out, with the run's settings: only --steps (with a constant "
        "learning rate), --save-every, --keep, --sample-count, --sample-steps, --compile and the data folder may "
        "change (recorded in the run).",
    ),
    device: str = DeviceOpt,
) -> None:
    """Train a DDPM denoiser on a folder of images (torchrun for several processes)."""
    for option, value, offered in (("--prediction", prediction, choices.PREDICTIONS),
                                   ("--schedule", noise_schedule, choices.NOISE_SCHEDULES),
                                   ("--lr-schedule", lr_schedule, choices.LR_SCHEDULES)):
        if value is not None and value not in offered:
            fail(f"{option} {value}: choose {', '.join(offered)}")
    from .. import train as training

    data_files = image_data.find_images(data, exclude=out)  # a missing or empty folder fails here, before any progress bar
    channels_note = None
    continuing = resume and runs.saved_run(out) is not None  # --resume on a folder with no run starts one
    if channels is None and init is None and not continuing:  # a fine-tuning or continued run keeps its channels
        channels = image_data.infer_channels(data_files)
        channels_note = "1 channel: every image is grayscale" if channels == 1 else "3 channels: RGB images found"
    overrides = {}
    for key, value in [("resolution", resolution), ("in_channels", channels), ("out_channels", channels),
                       ("base_channels", base_channels), ("num_res_blocks", res_blocks), ("dropout", dropout)]:
        if value is not None:
            overrides[key] = value
    if channel_mult is not None:
        overrides["channel_mult"] = tuple(parse_list(channel_mult, "--channel-mult"))
    if attention is not None:
        overrides["attention_resolutions"] = tuple(parse_list(attention, "--attention", allow_empty=True))
    given = dict(preset=preset, init=init, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                 prediction=choices.PREDICTIONS.get(prediction), noise_schedule=noise_schedule,
                 lr_schedule=lr_schedule, ema_decay=ema_decay, flip=flip, save_every=save_every, keep=keep,
                 sample_steps=sample_steps, sample_count=sample_count, seed=seed, precision=precision, compile=compile_model)
    given = {"data": str(data.resolve()), "out": str(out), "unet": overrides, **{k: v for k, v in given.items() if v is not None}}
    options = training.options_for_run(given, resume)
    architecture = options.architecture()  # every value checked here, before anything is written (once: --init reads weights)
    config = architecture[0]
    runs.check_run_dir(out)
    main_process = distributed.from_env().is_main
    train_device = devices.pick_device(device)
    keep_recorded_threads(out if continuing else None, train_device)
    if main_process:
        how = "bf16 autocast" if training.uses_bf16(options.precision, train_device) else "fp32"
        start = f"weights of {options.init}" if options.init else f"{options.preset or training.DEFAULT_PRESET} preset"
        say(f"training a {training.params_for(config) / 1e6:.2f}M-parameter UNet ({start}) on "
            f"{len(data_files)} images into {out} ({train_device}, {how}; {options.steps} steps of batch "
            f"{options.batch_size}, lr {options.lr:g} after a {options.warmup}-step warm-up, EMA decay {options.ema_decay:g})")
        for misfit in options.misfits():
            note(f"warning: {misfit}")
        if channels_note:
            say(f"{channels_note} (--channels overrides)")
        note_cpu_threads(train_device)
        if train_device.type == "cpu":  # a run of weeks should say so before it starts, not after
            remaining = options.steps - (runs.step_of(runs.checkpoint_files(out)[-1]) if resume and runs.checkpoint_files(out) else 0)
            seconds = library("session").estimate_seconds(config, options.batch_size, max(remaining, 0), train_device)
            note_cpu_estimate(seconds, lambda: quicker_training(config))
    started = time.perf_counter()
    with training_progress("training", options.steps, out, main_process, reading=True) as callbacks:
        newest = training.train(options, train_device, resume, callbacks, architecture)
    if main_process:
        finish(f"done in {time.perf_counter() - started:.0f}s; newest checkpoint {newest}; use it with --model {out}")


@app.command()
def distill(
    model: Optional[str] = ModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Run folder of the student: config, checkpoints, pictures, log."),
    steps: Optional[int] = typer.Option(None, "--steps", "-S", min=1, max=4,
                                        help="Network calls of the student per image, 1 to 4 (default 2)."),
    timesteps_given: Optional[str] = typer.Option(
        None, "--timesteps", help="The student's timesteps, one per call, such as 350,700 (default: evenly spaced up to "
        "0.7 T)."),
    updates: Optional[int] = typer.Option(None, "--updates", min=1, help="Optimizer steps of the student (default 2000)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1,
                                             help="Teacher trajectories per update, over all processes (default 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (AdamW; default 5e-5)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, help="Warm-up updates (default: a tenth of --updates)."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="Decay of the student's moving average, which is "
                                              "sampled (default: averaging over a tenth of --updates)."),
    teacher_steps: Optional[int] = typer.Option(
        None, "--teacher-steps", min=1, help="The teacher's calls per trajectory on diffusers' trailing grid, beside the "
        "student's timesteps (default 10)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", min=1,
                                             help="Checkpoint and picture every N updates (default 500)."),
    keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Checkpoints kept (default 3)."),
    sample_count: Optional[int] = typer.Option(None, "--sample-count", min=0, max=1024,
                                               help="Images in each panel of the pictures (default 16; 0: none)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every trajectory (default 0)."),
    precision: Optional[str] = typer.Option(None, "--precision", autocompletion=completing(("auto", "fp32", "bf16")),
                                            help="auto (default: bf16 on GPUs, fp32 on CPUs), fp32 or bf16."),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the student (default off)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its own settings: only --updates, "
                                "--save-every, --keep, --sample-count and --compile may change."),
    device: str = DeviceOpt,
) -> None:
    """Distil a student that samples in --steps network calls from a model, without data (trajectory
    distillation, SFD's manner); `ddimctl sample --model OUT` then uses its calls and timesteps."""
    if precision is not None and precision not in ("auto", "fp32", "bf16"):
        fail(f"--precision {precision}: choose auto, fp32 or bf16")
    student_timesteps = None
    if timesteps_given is not None:
        student_timesteps = tuple(sorted(parse_list(timesteps_given, "--timesteps", any_integer=True)))
    from .. import distill as distillation

    given = dict(model=model, steps=steps, timesteps=student_timesteps, updates=updates, batch_size=batch_size, lr=lr,
                 warmup=warmup, ema_decay=ema_decay, teacher_steps=teacher_steps, save_every=save_every, keep=keep,
                 sample_count=sample_count, seed=seed, precision=precision, compile=compile_model)
    options = distillation.options_for_run({"out": str(out), **{k: v for k, v in given.items() if v is not None}}, resume)
    runs.check_run_dir(out)
    main_process = distributed.from_env().is_main
    run_device = devices.pick_device(device)
    teacher = load(options.model)
    student = distillation.student_of(options, teacher)
    if main_process:
        grid = distillation.teacher_grid(student.timesteps, options.teacher_steps, teacher.alphas_cumprod)
        say(f"distilling a {student.steps}-call student of {teacher.name} into {out} (timesteps "
            f"{','.join(map(str, student.timesteps))}; teacher {distillation.TEACHER} at {len(grid)} calls; {run_device}; "
            f"{options.updates} updates of {options.batch_size} trajectories, lr {options.lr:g}, EMA decay {options.ema_decay:g})")
        note_cpu_threads(run_device)
        if run_device.type == "cpu":
            seconds = distillation.estimate_seconds(teacher, options, run_device)
            note_cpu_estimate(seconds, lambda: "a CUDA GPU, fewer --updates or a smaller --batch-size")
    started = time.perf_counter()
    with training_progress("distilling", options.updates, out, main_process, unit="updates") as callbacks:
        newest = distillation.distill(options, run_device, resume, callbacks, teacher)
    if main_process:
        finish(f"done in {time.perf_counter() - started:.0f}s; newest checkpoint {newest}; sample it with "
               f"`ddimctl sample --model {out}` ({student.steps} call{'s' * (student.steps > 1)})")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., metavar="MODEL", help="A training run folder, or any checkpoint --model accepts."),
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write: a diffusers DDIMPipeline (UNet2DModel + DDIMScheduler)."),
) -> None:
    """Write a model as a diffusers pipeline folder (DDIMPipeline.from_pretrained loads it)."""
    from ..models.export import check_target, export_diffusers

    check_target(out)  # before the model loads
    loaded = loading.load_model(str(run_dir))
    export_diffusers(loaded, out)
    calls = f", then num_inference_steps={loaded.student.steps}" if loaded.student else ""
    finish(f"wrote {out}/ (model_index.json, unet/, scheduler/): diffusers.DDIMPipeline.from_pretrained({str(out)!r}){calls}")
