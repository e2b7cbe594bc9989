"""`sample` and `edit`: generating and editing images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .common import (
    check_eta,
    ClassOpt,
    BatchOpt,
    CompileOpt,
    DeviceOpt,
    ExactPrecisionOpt,
    MaxItersOpt,
    ModelOpt,
    PrecisionOpt,
    SamplerOpt,
    ScaleOpt,
    SkipOpt,
    StepsOpt,
    TolOpt,
    TimestepsOpt,
    app,
    check_inputs,
    class_list,
    check_tuned,
    exact_settings,
    fail,
    is_directory_target,
    load,
    make_output_folder,
    make_runner,
    note,
    progress_bar,
    read_images,
    steps_for,
    timestep_choice,
)
from .output import finish
from .progress import plan_and_fill
from .deferred import library

devices, distributed, files, sample_folders, images, samplers, runners, timesteps, latents_file = map(
    library, ("devices", "distributed", "io.files", "sampling.sample_folders", "io.images", "sampling.samplers",
             "sampling.runners", "sampling.timesteps", "sampling.latents"))


@app.command()
def sample(
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    sampler: str = SamplerOpt,
    eta: float = typer.Option(0.0, "--eta", help="ddim only: 0 = deterministic, 1 = DDPM posterior variance."),
    skip: Optional[str] = SkipOpt,
    timesteps_given: Optional[str] = TimestepsOpt,
    num: int = typer.Option(16, "--num", "-n", min=1, help="Number of images."),
    batch_size: Optional[int] = BatchOpt,
    seed: int = typer.Option(0, "--seed", help="Image i depends only on (seed, i)."),
    device: str = DeviceOpt,
    out: str = typer.Option("samples.png", "--out", "-o", help="A .png grid, or a folder (ending in /) of PNGs."),
    latents: Optional[Path] = typer.Option(None, "--latents", help="Decode these x_T (from `ddimctl invert`)."),
    sigma_hat: bool = typer.Option(False, "--sigma-hat", help="ddim only: DDPM with the larger variance (Table 1's last row)."),
    clip: bool = typer.Option(
        False, "--clip", help="Clip the predicted x0 to [-1, 1] at every step, with the noise it implies "
        "(guided-diffusion's clip_denoised): a young model's images stay in range.",
    ),
    clip_sample: bool = typer.Option(
        False, "--clip-sample", help="ddim only: clip x0 in each update, keep the network's noise (diffusers' "
        "clip_sample).",
    ),
    precision: str = PrecisionOpt,
    compile_model: Optional[bool] = CompileOpt,
    scale: Optional[int] = ScaleOpt,
    class_text: Optional[str] = ClassOpt,
    shard_text: Optional[str] = typer.Option(
        None, "--shard", metavar="I/N", help="Folders only, with --batch-size: the run's batches k with k % N == I "
        "(N shards' folders hold a straight run's images; fid takes them together)."),
) -> None:
    """Generate images: DDIM with S steps and any eta, or a fast solver (--sampler)."""
    check_eta(sampler, eta, sigma_hat)
    steps_given = steps is not None
    runners.check_settings(batch_size=batch_size, num=None if latents else num)
    given_classes = class_list(class_text)
    made = latents_file.latents_settings(latents) if latents is not None else {}
    if given_classes is None and "classes" in made:  # latents decode with the classes they were inverted with
        given_classes = made["classes"]
    skip, tuned = timestep_choice(skip, timesteps_given, model or made.get("model"), sampler, steps)
    if skip is not None and timesteps.is_list(skip):
        steps = steps_for(steps, skip, sampler)
    settings = (latents_file.decoding_settings(made, sampler, steps, skip, eta, sigma_hat, clip, clip_sample)
                if latents is not None else
                samplers.Settings(sampler, steps_for(steps, skip, sampler), skip, eta, sigma_hat, clip, clip_sample))
    out_path = Path(out).expanduser()
    to_folder = is_directory_target(out_path, out)
    if not to_folder and out_path.suffix.lower() not in images.PICTURE_SUFFIXES:
        fail(f"--out {out}: give an image file such as samples.png, or a folder ending in /")
    shard = parse_shard(shard_text, to_folder, batch_size)
    if to_folder:
        make_output_folder(out_path)
    images.check_writable(out_path if not to_folder else out_path / "x")

    world = distributed.init(devices.pick_device(device))
    if world.distributed and not to_folder:
        fail("under torchrun, sample writes one PNG per image: pass a folder such as --out samples/")
    # Latents decode with the model, S and skip they were made with, unless told otherwise.
    loaded = load(model or made.get("model"))
    if latents is not None and loaded.student is not None:
        fail(f"{loaded.name} is a student: latents were inverted along its teacher's ODE; decode them with "
             f"--model {loaded.student.teacher}")
    check_tuned(tuned, loaded, settings.sampler)
    settings = runners.settings_for(loaded, settings, steps_given)
    x_T = latents_file.load_latents(latents, loaded.image_shape) if latents is not None else None
    if latents is not None and world.is_main:
        for line in latents_file.decoding_notes(latents.name, made, loaded.name, settings):
            note(line)
    count = x_T.shape[0] if x_T is not None else num
    if class_text is None and "classes" in made and loaded.class_count is None:
        fail(f"{latents} were inverted with class labels ({','.join(map(str, made['classes'][:5]))}"
             f"{',...' if len(made['classes']) > 5 else ''}) by a class-conditional model; {loaded.name} is not one: "
             f"decode them with the model they name ({made.get('model')})")
    classes = runners.image_classes(loaded, count, given_classes, seed)
    runners.check_batch(loaded, batch_size, count, devices.pick_device(device))
    if not to_folder:
        images.check_grid_size(count, loaded.image_shape, scale)
    if to_folder and world.is_main:
        files.hold_folder(out_path)  # one run in a folder at a time
        files.remove_stale_temporaries(out_path)
        sample_folders.claim_folder(out_path, sample_folders.run_record(
            loaded, settings, seed, latents,
            runners.run_precision(precision, devices.pick_device(device), settings), scale or 1, given_classes, shard,
            batch_size), count)
    world.barrier()
    runner = make_runner(loaded, settings, device, precision=precision, compile_model=compile_model,
                          batch_size=batch_size, count=count, classes=classes)

    started = time.perf_counter()
    stalled = None
    if to_folder:
        done, stalled = plan_and_fill(runner, seed, count, out_path, world, x_T, scale or 1, shard)
    else:
        with progress_bar("sampling", count, runner.evaluations) as advance:
            x0 = runners.sample_batches(runner, count, seed, x_T, advance)
        images.save_picture(images.grid(images.to_uint8(x0)), out_path, scale)
        done = count
    distributed.shutdown()
    elapsed = time.perf_counter() - started
    if world.is_main:
        where = f"{out_path}/ (one PNG each)" if to_folder else f"{out_path} (grid)"
        what = f"{done} image{'s' * (done != 1)}" + (f" ({world.size} processes)" if world.size > 1 else "") + (
            f" (shard {shard[0]} of {shard[1]})" if shard[1] > 1 else "")
        done_before = f"{out_path}/ already held all {count} images; nothing written " if to_folder and done == 0 else ""
        finish(
            (done_before or f"wrote {what} to {where} in {elapsed:.1f}s ") +
            f"[{loaded.name}, {settings.describe()}, seed={seed}, {runner.device}, {runner.precision}, batch {runner.batch}]"
        )
        if stalled is not None and stalled >= 0.05:  # only worth saying when the writers held sampling up
            note(f"sampling waited {stalled:.2f}s for the PNG writers")


def parse_shard(text: str | None, to_folder: bool, batch_size: int | None) -> tuple[int, int]:
    """--shard I/N as (I, N); (0, 1) when not given."""
    if text is None:
        return 0, 1
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        fail(f"--shard {text}: give I/N with 0 <= I < N, such as 0/4")
    if not to_folder or batch_size is None:
        fail("--shard writes a folder of PNGs (--out DIR/) and needs --batch-size: the shards split the run's batches, "
             "which must be the same in every shard")
    return int(index), int(count)


@app.command()
def edit(
    image_paths: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Images (or folders of images) to edit."),
    strength: float = typer.Option(
        ..., "--strength", help="0..1: where the edit starts (t0 at this fraction of the S steps); higher changes more."
    ),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Inpainting mask: white = regenerate, black = keep."),
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    sampler: str = SamplerOpt,
    skip: Optional[str] = SkipOpt,
    timesteps_given: Optional[str] = TimestepsOpt,
    eta: float = typer.Option(0.0, "--eta", help="ddim only: 0 = deterministic, 1 = DDPM posterior variance."),
    seed: int = typer.Option(0, "--seed", help="Image i's noise depends only on (seed, i)."),
    exact: bool = typer.Option(False, "--exact/--noise", help="Start from the exact inversion to t0, not fresh noise."),
    tol: float = TolOpt,
    max_iters: int = MaxItersOpt,
    out: str = typer.Option("edited/", "--out", "-o", help="A folder (one PNG per input, named like it), or a .png for one image."),
    strip: bool = typer.Option(False, "--strip", help="Also write input | edited side by side (labelled, enlarged) as NAME-strip.png."),
    scale: Optional[int] = ScaleOpt,
    device: str = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    precision: str = ExactPrecisionOpt,
    class_text: Optional[str] = ClassOpt,
) -> None:
    """SDEdit: noise the images to t0 and denoise them back (with --sampler), or inpaint the masked part."""
    check_eta(sampler, eta)
    how = exact_settings(exact, tol, max_iters)
    given_classes = class_list(class_text)
    skip, tuned = timestep_choice(skip, timesteps_given, model, sampler, steps)
    settings = samplers.Settings(sampler, steps_for(steps, skip, sampler), skip, eta)
    runners.check_settings(batch_size=batch_size, strength=strength)
    out_path = Path(out).expanduser()
    image_paths = check_inputs(image_paths)
    to_folder = is_directory_target(out_path, out)
    if not to_folder and (out_path.suffix.lower() != ".png" or len(image_paths) != 1):
        fail(f"--out {out}: give a folder ending in / (one PNG per input), or a .png file for a single image")
    names = [p.stem + ".png" for p in image_paths]
    written = names + [p.stem + "-strip.png" for p in image_paths] * strip
    if to_folder and len(set(written)) < len(written):
        fail("two inputs have the same name, and their outputs would overwrite each other; edit them separately")
    if mask is not None and not mask.is_file():
        fail(f"--mask {mask}: no such image file")
    targets = [out_path / n for n in names] if to_folder else [out_path]
    strips = [t.with_name(t.stem + "-strip.png") for t in targets] if strip else []
    if to_folder:
        make_output_folder(out_path)
        files.hold_folder(out_path)
    images.check_writable(targets[0])
    files.refuse_foreign(targets + strips, ledger=to_folder)  # `edit pics/ --out pics/` would replace the inputs themselves
    loaded = load(model, along_ode=True)
    check_tuned(tuned, loaded, settings.sampler)
    classes = runners.image_classes(loaded, len(image_paths), given_classes, seed)
    x0 = read_images(image_paths, loaded)
    channels, resolution, _ = loaded.image_shape
    regenerate = None  # the mask: 1 where the edit draws new pixels
    if mask is not None:
        regenerate = images.load_mask(mask, resolution, notice=note)
    runner = make_runner(loaded, settings, device, precision=precision, compile_model=False,
                          batch_size=batch_size, count=len(image_paths), classes=classes)
    walked = runners.edit_steps(strength, len(runner.timesteps))
    with progress_bar("editing", len(image_paths), max(runner.settings.network_calls(walked), 1)) as advance:
        edited = runners.edit_batches(runner, x0, strength, seed, regenerate, how, advance)
    pixels, inputs = images.to_uint8(edited), images.to_uint8(x0)
    for i, (target, before, after) in enumerate(zip(targets, inputs, pixels)):
        # one image: enlarged like every picture (--scale 1 for the model's size); folders stay native
        images.save_image(images.enlarge(after, scale or (1 if to_folder else images.display_scale(resolution))), target,
                          alone=not to_folder)
        if strip:
            images.save_picture(images.strip(before[None], after[None]), strips[i], scale, ["input", "edited"],
                                tile=resolution)
    t0 = int(runner.timesteps[walked - 1]) if walked else None
    where = f"{out_path}/" if to_folder else str(out_path)
    finish(f"wrote {len(targets)} edited image(s){' and their strips' * strip} to {where} [{loaded.name}, {settings.sampler}, strength {strength:g}: "
        f"{walked} of {len(runner.timesteps)} steps from t0 = {t0}{f', eta={settings.eta_text}' if settings.spec.takes_eta else ''}, "
        f"{'exact inversion' if exact else f'seed={seed}'}{', masked' if mask else ''}]")
