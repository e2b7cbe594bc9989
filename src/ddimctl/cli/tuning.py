"""`ddimctl tune-steps`: timesteps fitted to one model and sampler, written to a file that
`--skip F.json` (or `--timesteps F.json`) uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import (
    DeviceOpt,
    ModelOpt,
    SamplerOpt,
    app,
    check_output,
    fail,
    load,
    make_output_folder,
    note,
    note_cpu_threads,
    say,
    stderr,
)
from .output import finish
from .deferred import Deferred, library

torch = Deferred("torch")
devices, files, runs, samplers, timesteps, tuning = map(
    library, ("devices", "io.files", "models.runs", "sampling.samplers", "sampling.timesteps", "sampling.tuning"))


@app.command("tune-steps")
def tune_steps(
    model: Optional[str] = ModelOpt,
    sampler: str = SamplerOpt,
    steps: int = typer.Option(5, "--steps", "-S", min=2, help="Network calls per image to fit the timesteps for."),
    out: Path = typer.Option(..., "--out", "-o", help="The timesteps file to write (.json); use it as --skip F.json."),
    trajectories: int = typer.Option(
        128, "--trajectories", min=8, max=4096, help="x_T whose images are compared with the teacher's."
    ),
    seed: int = typer.Option(0, "--seed", help="The trajectories' x_T (a stream of their own, not the images')."),
    device: str = DeviceOpt,
) -> None:
    """Fit the S timesteps of a sampler to a model: the timesteps whose images come closest to a much
    finer solve of the same ODE (UniPC, 100 calls) from the same x_T, searched from the best built-in
    scheme one timestep at a time. Minutes on a CPU for the digits model."""
    folder = Path(out).expanduser().parent
    if folder.name == timesteps.TUNED_FOLDER and not folder.exists() and runs.saved_run(folder.parent) is not None:
        make_output_folder(folder)  # a run's own tuned/ folder, where --skip tuned finds the file
    check_output(out, (".json",), "--out")
    settings = samplers.Settings(sampler, steps)
    if settings.stochastic:
        fail("tune-steps fits the deterministic samplers")
    loaded = load(model, along_ode=True)
    if loaded.class_count:
        fail(f"tune-steps fits unconditional models; {loaded.name} is class-conditional, which it does not fit yet")
    settings = settings.for_model(loaded.train_steps, loaded.skip)
    dev = devices.pick_device(device)
    note_cpu_threads(dev)
    eps = loaded.noise_model(dev)
    abar = loaded.alphas_cumprod
    teacher_calls = trajectories * tuning.TEACHER_CALLS
    say(f"tune-steps: {loaded.name}, {sampler} at S={steps}, {trajectories} trajectories against the teacher "
        f"({tuning.TEACHER.sampler}, {tuning.TEACHER_CALLS} calls: {teacher_calls} network calls first)")
    with stderr.status("computing the teacher's images") as status:
        def progress(what: str, error: float) -> None:
            status.update(f"tuning: {what}, teacher error {error:.5f}")
            if not stderr.is_terminal:
                note(f"{what}: teacher error {error:.5f}")

        with torch.no_grad():
            result = tuning.tune(eps, abar, loaded.image_shape, settings, count=trajectories, seed=seed,
                                 batch=min(trajectories, 256), progress=progress)
    record = {
        "format": timesteps.TUNED_FORMAT,
        "model": loaded.name,
        "weights_sha256": loaded.weights_sha256,
        "sampler": sampler,
        "steps": steps,
        "timesteps": result.timesteps,
        "method": "LD3's objective (teacher distance of the sampler's images), searched one timestep at a time",
        "teacher": {"sampler": tuning.TEACHER.sampler, "steps": tuning.TEACHER_CALLS, "skip": tuning.TEACHER.skip},
        "trajectories": trajectories,
        "seed": seed,
        "start": {"skip": result.start_scheme, "teacher_error": result.start_error},
        "teacher_error": result.error,
        "cost": {"evaluations": result.evaluations, "network_calls": result.network_calls,
                 "seconds": round(result.seconds, 1), "device": str(dev)},
    }
    with files.atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    finish(f"wrote {out}: timesteps {','.join(map(str, result.timesteps))} (teacher error {result.error:.5f}, "
        f"{100 * tuning.relative_gain(result):.0f}% below {result.start_scheme}'s {result.start_error:.5f}) in "
        f"{result.seconds:.0f}s; use it as --skip {out}")
