"""`invert`, `reconstruct` and `interpolate`: images to latents and back."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .. import choices
from .common import (
    steps_list_option,
    ClassOpt,
    MAX_STRIP_FRAMES,
    BatchOpt,
    DeviceOpt,
    ExactOpt,
    ExactPrecisionOpt,
    MaxItersOpt,
    ModelOpt,
    SamplerOpt,
    ScaleOpt,
    SkipOpt,
    StepsOpt,
    TimestepsOpt,
    TolOpt,
    app,
    check_inputs,
    class_list,
    check_output,
    check_tuned,
    exact_settings,
    fail,
    is_directory_target,
    load,
    make_output_folder,
    make_runner,
    note,
    parse_list,
    progress_bar,
    read_images,
    stdout,
    steps_for,
    timestep_choice,
)
from .output import finish
from .progress import run_decoding, run_inversion
from .deferred import library

files, sample_folders, images, metrics, samplers, runners, latents_file = map(
    library, ("io.files", "sampling.sample_folders", "io.images", "metrics", "sampling.samplers",
             "sampling.runners", "sampling.latents"))


def finite_or_null(value):
    """JSON has no Infinity or NaN: a perfect round trip's PSNR (MSE 0) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


@app.command()
def invert(
    image_paths: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Images (or folders of images) to encode."),
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    skip: Optional[str] = SkipOpt,
    device: str = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    out: Path = typer.Option(Path("latents.safetensors"), "--out", "-o", help="Latents file to write."),
    precision: str = ExactPrecisionOpt,
    exact: bool = ExactOpt,
    tol: float = TolOpt,
    max_iters: int = MaxItersOpt,
    class_text: Optional[str] = ClassOpt,
) -> None:
    """Encode images to their DDIM latents x_T (the deterministic eta = 0 path). Inversion follows the
    DDIM ODE whatever sampler decodes later: its exact round trip is defined for the DDIM decoder."""
    how = exact_settings(exact, tol, max_iters)
    given_classes = class_list(class_text)
    skip, _ = timestep_choice(skip, None, model, "ddim", steps)
    settings = samplers.Settings("ddim", steps_for(steps, skip, "ddim"), skip)
    check_output(out, (".safetensors",), "--out")
    image_paths = check_inputs(image_paths)
    loaded = load(model, along_ode=True)
    classes = runners.image_classes(loaded, len(image_paths), given_classes)
    x0 = read_images(image_paths, loaded)
    runner = make_runner(loaded, settings, device, precision=precision, compile_model=False,
                          batch_size=batch_size, count=len(image_paths), classes=classes)
    latents, _ = run_inversion(runner, x0, how)
    latents_file.save_latents(out, latents, loaded.name, runner.settings, sources=[p.name for p in image_paths],
                              **latents_file.inversion_metadata(how),
                              **({"classes": classes.tolist()} if classes is not None else {}))
    table = Table(title=f"latents x_T ({loaded.name}, S={runner.settings.steps})")
    for column in ("image", "mean", "std"):
        table.add_column(column, justify="right" if column != "image" else "left")
    for p, (mean, std) in zip(image_paths, latents_file.moments(latents)):
        table.add_row(p.name, f"{mean:+.3f}", f"{std:.3f}")
    stdout.print(table)
    finish(f"wrote {len(image_paths)} latent{'s' * (len(image_paths) != 1)} to {out} (a Gaussian latent has mean ~0, std ~1)")


@app.command()
def reconstruct(
    image_paths: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Images (or folders of images) to encode and decode."),
    model: Optional[str] = ModelOpt,
    steps: Optional[str] = steps_list_option(str(choices.DEFAULT_STEPS)),
    skip: Optional[str] = SkipOpt,
    device: str = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Side-by-side PNG: input | reconstructions (default recon.png; with --json none "
        "unless given)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON only."),
    precision: str = ExactPrecisionOpt,
    scale: Optional[int] = ScaleOpt,
    exact: bool = ExactOpt,
    tol: float = TolOpt,
    max_iters: int = MaxItersOpt,
    class_text: Optional[str] = ClassOpt,
) -> None:
    """Invert then decode with the same S along the DDIM ODE: per-image MSE (paper's Table 2) and PSNR.
    A folder counts as all the images in it."""
    how = exact_settings(exact, tol, max_iters)
    given_classes = class_list(class_text)
    steps_list = parse_list(steps, "--steps") if steps is not None else [choices.DEFAULT_STEPS]
    all_settings = [samplers.Settings("ddim", s, skip) for s in steps_list]
    if out is None and not as_json:
        out = Path("recon.png")
    if out is not None:
        check_output(out, images.PICTURE_SUFFIXES, "--out")
    image_paths = check_inputs(image_paths)
    loaded = load(model, along_ode=True)
    classes = runners.image_classes(loaded, len(image_paths), given_classes)
    x0 = read_images(image_paths, loaded)
    columns = [images.to_uint8(x0)]
    results = []
    for settings in all_settings:
        s = settings.steps
        runner = make_runner(loaded, settings, device, precision=precision, compile_model=False,
                              batch_size=batch_size, count=len(image_paths), classes=classes)
        latents, evaluations = run_inversion(runner, x0, how)
        recon = run_decoding(runner, latents, f"decoding S={s}")
        columns.append(images.to_uint8(recon))
        # evaluations: network calls per image of the inversion
        results.append({"steps": s, "evaluations": evaluations,
                        **metrics.round_trip_errors(recon, x0, [str(p) for p in image_paths])})
    # One row per image (the first 32): the input, then its reconstruction for each S.
    labels = ["input"] + [f"S={s}" for s in steps_list]
    if out is not None:
        images.save_picture(images.columns_grid(columns), out, scale, labels, tile=loaded.config.resolution)

    report = {"model": loaded.name, "skip": runner.settings.skip, "inversion": "exact" if how else "plain",
              **({"tol": how.tol, "max_iters": how.max_iters} if how else {}), "results": results}
    if as_json:
        sys.stdout.write(json.dumps(finite_or_null(report), indent=2, allow_nan=False) + "\n")
        return
    table = Table(title=f"reconstruction ({loaded.name}, {'exact' if how else 'plain'} inversion, MSE per pixel on [0, 1])")
    table.add_column("S", justify="right")
    table.add_column("inversion calls", justify="right")
    table.add_column("mean MSE", justify="right")
    table.add_column("PSNR of the mean MSE (dB)", justify="right")
    shown = image_paths[:6]
    for p in shown:
        table.add_column(f"MSE {p.name}", justify="right")
    for r in results:
        table.add_row(str(r["steps"]), str(r["evaluations"]), f"{r['mse']:.2e}", f"{r['psnr']:.2f}",
                      *[f"{im['mse']:.2e}" for im in r["images"][:6]])  # exact round trips reach 1e-6
    stdout.print(table)
    if out is not None:
        finish(f"wrote {out} (rows: images; columns: input, then S = {', '.join(map(str, steps_list))})")


@app.command()
def interpolate(
    image_paths: list[Path] = typer.Argument(None, metavar="[A B]", help="Two images to blend."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Blend two random latents instead, e.g. --seeds 1,2."),
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    sampler: str = SamplerOpt,
    skip: Optional[str] = SkipOpt,
    timesteps_given: Optional[str] = TimestepsOpt,
    device: str = DeviceOpt,
    frames: int = typer.Option(8, "--frames", min=2, help="Frames including both ends."),
    out: str = typer.Option(
        "interp.png", "--out", "-o", help=f"Strip PNG of all frames (up to {MAX_STRIP_FRAMES}), or a folder (ending in /) for one PNG per frame."
    ),
    gif: Optional[Path] = typer.Option(None, "--gif", help="Also write an animated GIF."),
    batch_size: Optional[int] = BatchOpt,
    precision: str = ExactPrecisionOpt,
    scale: Optional[int] = ScaleOpt,
    exact: bool = typer.Option(
        True, "--exact/--plain",
        help="Exact inversion (default), so that the end frames are the input images (from about S = 10 up).",
    ),
    tol: float = TolOpt,
    max_iters: int = MaxItersOpt,
    class_text: Optional[str] = ClassOpt,
) -> None:
    """Slerp between the latents of two images (or two seeds) and decode every frame (DDIM at eta = 0,
    or --sampler). The images are inverted along the DDIM ODE."""
    how = exact_settings(exact, tol, max_iters)
    given_classes = class_list(class_text)
    if given_classes is not None and len(given_classes) != 1:
        fail("--class: interpolate takes one class, for both ends and every frame")
    skip, tuned = timestep_choice(skip, timesteps_given, model, sampler, steps)
    steps = steps_for(steps, skip, sampler)
    decoding, inverting = samplers.Settings(sampler, steps, skip), samplers.Settings("ddim", steps, skip)
    paths = check_inputs(image_paths or [])
    if seeds is not None:
        seeds = parse_list(seeds, "--seeds", any_integer=True)
        if len(seeds) != 2:
            fail("--seeds takes two integers separated by a comma, such as --seeds 1,2")
    if seeds is None and len(paths) != 2:
        fail(f"interpolate takes two images A B, or --seeds S1,S2; got {len(paths)} image(s)")
    if seeds is not None and paths:
        fail("give either two images or --seeds, not both")
    runners.check_settings(batch_size=batch_size, frames=frames)
    to_folder = is_directory_target(Path(out), out)
    out = Path(out).expanduser()
    if to_folder:
        make_output_folder(out)
        images.check_writable(out / "x.png")
        files.refuse_foreign(sample_folders.image_names(out, frames)(i) for i in range(frames))
    else:
        check_output(out, images.PICTURE_SUFFIXES, "--out")
    if (gif or not to_folder) and frames > MAX_STRIP_FRAMES:
        fail(f"--frames {frames}: a strip or GIF holds at most {MAX_STRIP_FRAMES} frames; write them one PNG each "
             f"with --out FOLDER/ (and no --gif)")
    if gif:
        check_output(gif, (".gif",), "--gif")
    loaded = load(model, along_ode=True)
    check_tuned(tuned, loaded, decoding.sampler)
    classes = runners.image_classes(loaded, frames, given_classes)
    x0 = read_images(paths, loaded) if seeds is None else None
    options = dict(precision=precision, compile_model=False, batch_size=batch_size, count=frames, classes=classes)
    runner = make_runner(loaded, decoding, device, **options)
    if seeds is not None:
        ends = runners.seed_latents(seeds, loaded.image_shape)
    else:
        inverter = runner if sampler == "ddim" else make_runner(loaded, inverting, device, **options)
        ends, _ = run_inversion(inverter, x0, how)
        if sampler != "ddim":
            note(f"the end frames are decoded with {sampler}: they return the inputs approximately (the inversion "
                 f"is exact for the ddim decoder)")
    if to_folder:
        with progress_bar("decoding", frames, runner.evaluations) as advance:
            sample_folders.interpolate_to_folder(runner, ends, frames, out, scale or 1, advance)
        finish(f"wrote {frames} frames to {out}/ (one PNG each)")
        return
    alphas = runners.interpolation_alphas(frames)
    z = runners.interpolation_latents(ends, alphas)
    pixels = images.to_uint8(run_decoding(runner, z))
    labels = [f"{a:.2f}" for a in alphas]
    parts = [pixels]
    if x0 is not None:  # the input images at the ends, to compare with the end frames
        inputs = images.to_uint8(x0)
        parts, labels = [inputs[:1], pixels, inputs[1:]], ["input", *labels, "input"]
    images.save_picture(images.strip(*parts), out, scale, labels, tile=loaded.config.resolution)
    if gif:
        images.save_gif(list(pixels), gif, scale=scale)
    earlier_gif = out.with_suffix(".gif")  # an earlier run's animation of this strip: no longer of these frames
    if (gif is None or Path(gif).resolve() != earlier_gif.resolve()) and files.Ledger(out.parent).owns(earlier_gif):
        note(f"{earlier_gif} beside it is an earlier run's animation, not of these frames; --gif {earlier_gif} "
             f"writes this run's")
    ends = " and the two inputs at its ends" if x0 is not None else ""
    finish(f"wrote {frames} frames{ends} to {out}" + (f", and the frames to {gif}" if gif else ""))
