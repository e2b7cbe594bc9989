"""The `ddimctl` command line: parses options, calls the library, shows progress. No math here."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from . import ddim, distributed, fast, images, metrics, registry, runs, sampling, seeds, weights
from .data import IMAGE_SUFFIXES, find_images, infer_channels
from .errors import DdimctlError
from .files import remove_stale_temporaries

app = typer.Typer(
    name="ddimctl",
    help="Sample, invert and train DDPM/DDIM image diffusion models (Song et al., ICLR 2021).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Outside a terminal rich would wrap at 80 columns; tables piped to a file should keep their rows.
stderr = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def show_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"ddimctl {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Sample, invert and train DDPM/DDIM image diffusion models (Song et al., ICLR 2021)."""


# Options shared by every command that runs the sampler.
ModelOpt = typer.Option(None, "--model", "-m", help="Registry name (see `ddimctl models`) or local checkpoint path.")
StepsOpt = typer.Option(50, "--steps", "-S", help="Number of DDIM steps S.")
SkipOpt = typer.Option(None, "--skip", help="Timestep scheme: uniform or quad (default: the model's).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda.")
BatchOpt = typer.Option(None, "--batch-size", "-b", help="Images per batch (default: from free GPU memory).")
PrecisionOpt = typer.Option(
    "auto", "--precision", help="auto (bf16 on GPUs and on CPUs with native bf16, else fp32), fp32, tf32, bf16, fp16."
)
ScaleOpt = typer.Option(
    None, "--scale", min=1,
    help="Enlarge pictures N times (nearest neighbour). Default: grids, strips and GIFs at least 256 px wide; "
    "one-PNG-per-image folders at the model's resolution.",
)
ExactOpt = typer.Option(
    False, "--exact/--plain", help="Exact inversion: solve each step so that decoding returns the image at any S."
)
TolOpt = typer.Option(1e-3, "--tol", help="Exact inversion: per-step tolerance (RMS change, [-1, 1] scale).")
MaxItersOpt = typer.Option(3, "--max-iters", help="Exact inversion: network calls per step at most.")
ExactPrecisionOpt = typer.Option("fp32", "--precision", help="fp32 (default: inversion wants it), tf32, bf16, fp16.")
CompileOpt = typer.Option(
    None, "--compile/--no-compile", help="torch.compile the UNet (default: on CUDA, for runs big enough to repay it)."
)


# --------------------------------------------------------------------------------------------
# Presentation helpers


class ImagesPerSecond(ProgressColumn):
    """Speed in images per second, from a task counted in image-evaluations."""

    def render(self, task) -> Text:
        per_image = task.fields.get("evals_per_image", 1)
        if not task.speed:
            return Text("-- img/s", style="progress.data.speed")
        return Text(f"{task.speed / per_image:.1f} img/s", style="progress.data.speed")


class PlainProgress:
    """Progress for logs and pipes: a plain line every few seconds (rich draws nothing there until
    the end), with done/total, rate, elapsed and time left."""

    def __init__(self, description: str, total: int, per_image: int = 1, unit: str = "evals"):
        self.description, self.total, self.per_image, self.unit = description, total, per_image, unit
        self.every = float(os.environ.get("DDIMCTL_PROGRESS_SECONDS", "5"))
        self.started = self.last = time.perf_counter()
        self.done = 0

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.update(self.done + n, extra)

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last, elapsed = now, now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        speed = f"{rate / self.per_image:.1f} img/s" if self.unit == "evals" else f"{rate:.1f} {self.unit}/s"
        print(f"{self.description}: {done}/{self.total} {self.unit}, {speed}{extra}, elapsed {clock(elapsed)}, "
              f"left {clock(left)}", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


@contextmanager
def progress_bar(description: str, images_count: int, evals_per_image: int, enabled: bool = True):
    """A bar over every model evaluation; yields advance(n_images) for one evaluation of a batch."""
    if not stderr.is_terminal:
        plain = PlainProgress(description, images_count * evals_per_image, evals_per_image)
        yield plain.advance if enabled else (lambda n: None)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("evals"),
        ImagesPerSecond(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
        disable=not enabled,
    ) as bar:
        task = bar.add_task(description, total=images_count * evals_per_image, evals_per_image=evals_per_image)
        yield lambda n: bar.advance(task, n)


def note(message: str) -> None:
    stderr.print(Text(message, style="dim"))


def say(message: str) -> None:
    stderr.print(message, markup=False, highlight=False)


def fail(message: str) -> None:
    raise DdimctlError(message)


# --------------------------------------------------------------------------------------------
# Option checks shared by the commands


def load(model: str | None) -> weights.LoadedModel:
    spec = model or registry.default_model()
    with stderr.status(f"loading {spec}"):
        return weights.load_model(spec)


def make_sampler(model: weights.LoadedModel, steps: int, skip: str | None, device: str, *args, **options):
    """sampling.prepare, with its decisions shown as notes."""
    return sampling.prepare(model, steps, skip, device, *args, notify=note, **options)


def is_directory_target(out: Path, raw: str) -> bool:
    return raw.endswith(("/", "\\")) or out.is_dir()


def expand_images(paths: list[Path]) -> list[Path]:
    """Image files as given; a folder stands for the images in it (recursively, sorted)."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(find_images(p))
        else:
            out.append(p)
    return out


MAX_STRIP_FRAMES = 256
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_output(path: Path, suffixes: tuple[str, ...], option: str) -> None:
    """An output file's name and folder, checked before any model work."""
    if Path(path).suffix.lower() not in suffixes:
        fail(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    images.check_writable(path)


def check_inputs(paths: list[Path]) -> list[Path]:
    """Image files (folders expanded), every one checked to exist before a model is loaded."""
    paths = expand_images(paths)
    for p in paths:
        if not p.is_file():
            fail(f"{p}: no such image file")
    return paths


def read_images(paths: list[Path], model: weights.LoadedModel) -> torch.Tensor:
    channels, resolution, _ = model.image_shape
    return torch.stack([images.load_image(p, resolution, channels, notice=note) for p in paths])


# --------------------------------------------------------------------------------------------
# Commands


@app.command()
def sample(
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = typer.Option(
        None, "--steps", "-S", help="Number of DDIM steps S (default 50, or the S that --latents were made with)."
    ),
    eta: float = typer.Option(0.0, "--eta", help="0 = deterministic DDIM, 1 = DDPM posterior variance."),
    skip: Optional[str] = SkipOpt,
    num: int = typer.Option(16, "--num", "-n", help="Number of images."),
    batch_size: Optional[int] = BatchOpt,
    seed: int = typer.Option(0, "--seed", help="Image i depends only on (seed, i)."),
    device: str = DeviceOpt,
    out: str = typer.Option("samples.png", "--out", "-o", help="A .png grid, or a folder (ending in /) of PNGs."),
    latents: Optional[Path] = typer.Option(None, "--latents", help="Decode these x_T (from `ddimctl invert`)."),
    sigma_hat: bool = typer.Option(False, "--sigma-hat", help="DDPM with the larger variance (Table 1's last row)."),
    precision: str = PrecisionOpt,
    compile_model: Optional[bool] = CompileOpt,
    scale: Optional[int] = ScaleOpt,
) -> None:
    """Generate images with DDIM: S steps, any eta."""
    if not (math.isfinite(eta) and eta >= 0):
        fail(f"--eta must be a finite number >= 0, got {eta}")
    if num < 1 and latents is None:
        fail(f"--num must be at least 1, got {num}")
    out_path = Path(out).expanduser()
    to_folder = is_directory_target(out_path, out)
    if not to_folder and out_path.suffix.lower() not in IMAGE_SUFFIXES:
        fail(f"--out {out}: give an image file such as samples.png, or a folder ending in /")
    if to_folder:
        try:
            out_path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(f"--out {out}: cannot create the folder ({e.strerror})")
    images.check_writable(out_path if not to_folder else out_path / "x")

    world = distributed.init(sampling.pick_device(device))
    if world.distributed and not to_folder:
        fail("under torchrun, sample writes one PNG per image: pass a folder such as --out samples/")
    # Latents decode with the model, S and skip they were made with, unless told otherwise.
    made = sampling.latents_settings(latents) if latents is not None else {}
    loaded = load(model or made.get("model"))
    steps = steps if steps is not None else int(made.get("steps", 50))
    skip = skip or made.get("skip")
    x_T = sampling.load_latents(latents, loaded.image_shape) if latents is not None else None
    if latents is not None and world.is_main:
        asked = {"model": loaded.name, "steps": str(steps), "skip": skip or loaded.skip, "eta": f"{eta:g}"}
        differ = sampling.latents_differences(made, asked)
        if differ:
            note(f"{latents.name} was inverted with {', '.join(differ)}: decoding will not return the images exactly")
        elif made.get("inversion", "plain") == "plain":
            note(f"{latents.name} came from plain inversion: the images return approximately (more exactly as S "
                 f"grows); `ddimctl invert --exact` makes latents that decode back exactly")
    count = x_T.shape[0] if x_T is not None else num
    if to_folder and world.is_main:
        remove_stale_temporaries(out_path)
        sampling.claim_folder(out_path, {
            "model": loaded.source, "steps": steps, "skip": skip or loaded.skip, "eta": f"{eta:g}",
            "sigma_hat": sigma_hat, "seed": seed, "latents": str(latents) if latents else None,
            "precision": fast.resolve_precision(precision, sampling.pick_device(device)), "scale": scale or 1,
        })
    world.barrier()
    sampler, batch = make_sampler(
        loaded, steps, skip, device, eta, sigma_hat, precision, compile_model, batch_size, math.ceil(count / world.size)
    )

    started = time.perf_counter()
    stalled = None
    if to_folder:
        done, stalled = sample_to_folder(sampler, batch, seed, count, out_path, world, x_T, scale or 1)
    else:
        collected = []
        with progress_bar("sampling", count, sampler.evaluations) as advance:
            for _, x0 in sampler.sample_indices(list(range(count)), seed, batch, x_T, advance):
                collected.append(images.to_uint8(x0))
        images.save_picture(images.grid(torch.cat(collected)), out_path, scale)
        done = count
    distributed.shutdown()
    elapsed = time.perf_counter() - started
    if world.is_main:
        where = f"{out_path}/ (one PNG each)" if to_folder else f"{out_path} (grid)"
        what = f"{done} images" if world.size == 1 else f"{done} images per process x {world.size} processes"
        say(
            f"wrote {what} to {where} in {elapsed:.1f}s "
            f"[{loaded.name}, S={steps}, eta={eta}, skip={skip or loaded.skip}, seed={seed}, {sampler.device}, "
            f"{fast.resolve_precision(precision, sampler.device)}, batch {batch}]"
        )
        if stalled is not None and stalled >= 0.05:  # only worth saying when the writers held sampling up
            note(f"sampling waited {stalled:.2f}s for the PNG writers")


def sample_to_folder(sampler, batch, seed, count, folder, world, x_T=None, scale=1) -> tuple[int, float]:
    """sampling.sample_to_folder with a progress bar and a line for Ctrl-C."""
    progress_on_interrupt.append(
        lambda: f"{sampling.images_written(folder, count)} of {count} images written to {folder}; "
        f"rerun the same command to finish"
    )
    with progress_bar(f"sampling {folder.name}", math.ceil(count / world.size), sampler.evaluations,
                      enabled=world.is_main) as advance:
        return sampling.sample_to_folder(sampler, batch, seed, count, folder, world, x_T, scale, advance, notify=note)


@app.command()
def models() -> None:
    """List the pretrained models of the registry (weights.toml)."""
    table = Table(title="ddimctl models (weights.toml)")
    for column in ("name", "resolution", "parameters", "skip", "source", "licence", "cached"):
        table.add_column(column)
    default = registry.default_model()
    for entry in registry.registry().values():
        name = entry.name + (" (default)" if entry.name == default else "")
        cached = "yes" if weights.is_cached(entry) else "no"
        params = f"{entry.params / 1e6:.1f}M" if entry.params else "?"
        table.add_row(name, f"{entry.resolution}", params, entry.skip, entry.source, entry.license, cached)
    stdout.print(table)


@app.command()
def invert(
    image_paths: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Images (or folders of images) to encode."),
    model: Optional[str] = ModelOpt,
    steps: int = StepsOpt,
    skip: Optional[str] = SkipOpt,
    device: str = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    out: Path = typer.Option(Path("latents.safetensors"), "--out", "-o", help="Latents file to write."),
    precision: str = ExactPrecisionOpt,
    exact: bool = ExactOpt,
    tol: float = TolOpt,
    max_iters: int = MaxItersOpt,
) -> None:
    """Encode images to their DDIM latents x_T (the deterministic eta = 0 path)."""
    how = exact_settings(exact, tol, max_iters)
    check_output(out, (".safetensors",), "--out")
    image_paths = check_inputs(image_paths)
    loaded = load(model)
    x0 = read_images(image_paths, loaded)
    sampler, batch = make_sampler(loaded, steps, skip, device, precision=precision, compile_model=False,
                                  batch_size=batch_size, count=len(image_paths))
    latents, _ = run_inversion(sampler, x0, batch, how)
    sampling.save_latents(
        out, latents, model=loaded.name, steps=str(steps), skip=skip or loaded.skip, eta="0",
        sources=[p.name for p in image_paths], **sampling.inversion_metadata(how),
    )
    table = Table(title=f"latents x_T ({loaded.name}, S={steps})")
    for column in ("image", "mean", "std"):
        table.add_column(column, justify="right" if column != "image" else "left")
    for p, z in zip(image_paths, latents):
        table.add_row(p.name, f"{z.mean():+.3f}", f"{z.std():.3f}")
    stdout.print(table)
    say(f"wrote {len(image_paths)} latents to {out} (a Gaussian latent has mean ~0, std ~1)")


def exact_settings(exact: bool, tol: float, max_iters: int) -> sampling.ExactInversion | None:
    return sampling.ExactInversion(tol, max_iters) if exact else None


def run_inversion(sampler: sampling.Sampler, x0: torch.Tensor, batch: int, exact=None) -> tuple[torch.Tensor, int]:
    with progress_bar("inverting" + (" (exact)" if exact else ""), x0.shape[0], sampler.evaluations) as advance:
        return sampling.invert_batches(sampler, x0, batch, exact, advance)


def run_decoding(sampler: sampling.Sampler, x_T: torch.Tensor, batch: int, label="decoding") -> torch.Tensor:
    with progress_bar(label, x_T.shape[0], sampler.evaluations) as advance:
        return sampling.decode_batches(sampler, x_T, batch, advance)


@app.command()
def reconstruct(
    image_paths: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Images (or folders of images) to encode and decode."),
    model: Optional[str] = ModelOpt,
    steps: str = typer.Option("50", "--steps", "-S", help="S, or a list such as 10,20,50,100."),
    skip: Optional[str] = SkipOpt,
    device: str = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    out: Path = typer.Option(Path("recon.png"), "--out", "-o", help="Side-by-side PNG: input | reconstructions."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON only."),
    precision: str = ExactPrecisionOpt,
    scale: Optional[int] = ScaleOpt,
    exact: bool = ExactOpt,
    tol: float = TolOpt,
    max_iters: int = MaxItersOpt,
) -> None:
    """Invert then decode with the same S: per-image MSE (paper's Table 2) and PSNR. A folder counts
    as all the images in it."""
    how = exact_settings(exact, tol, max_iters)
    steps_list = parse_list(steps, "--steps")
    check_output(out, PICTURE_SUFFIXES, "--out")
    image_paths = check_inputs(image_paths)
    loaded = load(model)
    x0 = read_images(image_paths, loaded)
    columns = [images.to_uint8(x0)]
    results = []
    for s in steps_list:
        sampler, batch = make_sampler(loaded, s, skip, device, precision=precision, compile_model=False,
                                      batch_size=batch_size, count=len(image_paths))
        latents, evaluations = run_inversion(sampler, x0, batch, how)
        recon = run_decoding(sampler, latents, batch, f"decoding S={s}")
        columns.append(images.to_uint8(recon))
        mse = metrics.mse_per_image(recon, x0)
        per_image = [
            {"image": str(p), "mse": float(m), "psnr": metrics.psnr(float(m))} for p, m in zip(image_paths, mse)
        ]
        results.append(
            {
                "steps": s,
                "evaluations": evaluations,  # network calls per image of the inversion
                "mse": float(mse.mean()),
                "psnr": metrics.psnr(float(mse.mean())),
                "images": per_image,
            }
        )
    # One row per image (the first 32): the input, then its reconstruction for each S.
    tiles = torch.stack([c[:32] for c in columns], dim=1).flatten(0, 1)
    labels = ["input"] + [f"S={s}" for s in steps_list]
    images.save_picture(images.grid(tiles, columns=len(columns)), out, scale, labels, tile=loaded.config.resolution)

    report = {"model": loaded.name, "skip": skip or loaded.skip, **sampling.inversion_metadata(how), "results": results}
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table(title=f"reconstruction ({loaded.name}, MSE per pixel on [0, 1])")
    table.add_column("S", justify="right")
    table.add_column("mean MSE", justify="right")
    table.add_column("PSNR of the mean MSE (dB)", justify="right")
    shown = image_paths[:6]
    for p in shown:
        table.add_column(f"MSE {p.name}", justify="right")
    for r in results:
        table.add_row(
            str(r["steps"]), f"{r['mse']:.5f}", f"{r['psnr']:.2f}", *[f"{im['mse']:.5f}" for im in r["images"][:6]]
        )
    stdout.print(table)
    say(f"wrote {out} (rows: images; columns: input, then S = {', '.join(map(str, steps_list))})")


@app.command()
def interpolate(
    image_paths: list[Path] = typer.Argument(None, metavar="[A B]", help="Two images to blend."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Blend two random latents instead, e.g. --seeds 1,2."),
    model: Optional[str] = ModelOpt,
    steps: int = StepsOpt,
    skip: Optional[str] = SkipOpt,
    device: str = DeviceOpt,
    frames: int = typer.Option(8, "--frames", help="Frames including both ends."),
    out: str = typer.Option(
        "interp.png", "--out", "-o", help=f"Strip PNG of all frames (up to {MAX_STRIP_FRAMES}), or a folder (ending in /) for one PNG per frame."
    ),
    gif: Optional[Path] = typer.Option(None, "--gif", help="Also write an animated GIF."),
    batch_size: Optional[int] = BatchOpt,
    precision: str = ExactPrecisionOpt,
    scale: Optional[int] = ScaleOpt,
    exact: bool = typer.Option(
        True, "--exact/--plain", help="Exact inversion (default: the end frames are the input images at any S)."
    ),
    tol: float = TolOpt,
    max_iters: int = MaxItersOpt,
) -> None:
    """Slerp between the latents of two images (or two seeds) and decode every frame with eta = 0."""
    how = exact_settings(exact, tol, max_iters)
    paths = check_inputs(image_paths or [])
    if seeds is not None:
        try:
            seeds = [int(v) for v in seeds.split(",")]
        except ValueError:
            seeds = []
        if len(seeds) != 2:
            fail("--seeds takes two integers separated by a comma, such as --seeds 1,2")
    if seeds is None and len(paths) != 2:
        fail(f"interpolate takes two images A B, or --seeds S1,S2; got {len(paths)} image(s)")
    if seeds is not None and paths:
        fail("give either two images or --seeds, not both")
    if frames < 2:
        fail(f"--frames must be at least 2, got {frames}")
    to_folder = is_directory_target(Path(out), out)
    out = Path(out).expanduser()
    if to_folder:
        out.mkdir(parents=True, exist_ok=True)
        images.check_writable(out / "x.png")
    else:
        check_output(out, PICTURE_SUFFIXES, "--out")
    if (gif or not to_folder) and frames > MAX_STRIP_FRAMES:
        fail(f"--frames {frames}: a strip or GIF holds at most {MAX_STRIP_FRAMES} frames; write them one PNG each "
             f"with --out FOLDER/ (and no --gif)")
    if gif:
        check_output(gif, (".gif",), "--gif")
    loaded = load(model)
    x0 = read_images(paths, loaded) if seeds is None else None
    sampler, batch = make_sampler(loaded, steps, skip, device, precision=precision, compile_model=False,
                                  batch_size=batch_size, count=frames)
    if seeds is not None:
        ends = torch.cat([seeds.initial_noise(seeds.image_generators(s, [0]), loaded.image_shape) for s in seeds])
    else:
        ends, _ = run_inversion(sampler, x0, batch, how)
    alphas = torch.linspace(0, 1, frames).tolist()
    if to_folder:  # streamed batch by batch: memory does not grow with the number of frames
        width = max(6, len(str(frames - 1)))
        with images.BackgroundWriter() as writer, progress_bar("decoding", frames, sampler.evaluations) as advance:
            for start in range(0, frames, batch):
                z = torch.cat([ddim.slerp(ends[:1], ends[1:], a) for a in alphas[start : start + batch]])
                x = sampling.check_finite(list(range(start, start + len(z))), sampler.sample(z, None, advance).cpu())
                writer.submit([(p, out / f"{start + i:0{width}d}.png")
                               for i, p in enumerate(images.enlarge(images.to_uint8(x), scale or 1))])
        say(f"wrote {frames} frames to {out}/ (one PNG each)")
        return
    z = torch.cat([ddim.slerp(ends[:1], ends[1:], a) for a in alphas])
    pixels = images.to_uint8(run_decoding(sampler, z, batch))
    labels = [f"{a:.2f}" for a in alphas]
    strip = pixels
    if x0 is not None:  # the input images at the ends, to compare with the end frames
        inputs = images.to_uint8(x0)
        strip = torch.cat([inputs[:1], pixels, inputs[1:]])
        labels = ["input", *labels, "input"]
    images.save_picture(images.grid(strip, columns=len(strip)), out, scale, labels, tile=loaded.config.resolution)
    if gif:
        images.save_gif(list(pixels), gif, scale=scale)
    say(f"wrote {frames} frames to {out}" + (" (inputs at both ends)" if x0 is not None else "") + (f" and {gif}" if gif else ""))


@app.command()
def edit(
    image_paths: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Images (or folders of images) to edit."),
    strength: float = typer.Option(
        ..., "--strength", help="0..1: where the edit starts (t0 at this fraction of the S steps); higher changes more."
    ),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Inpainting mask: white = regenerate, black = keep."),
    model: Optional[str] = ModelOpt,
    steps: int = StepsOpt,
    skip: Optional[str] = SkipOpt,
    eta: float = typer.Option(0.0, "--eta", help="0 = deterministic DDIM, 1 = DDPM posterior variance."),
    seed: int = typer.Option(0, "--seed", help="Image i's noise depends only on (seed, i)."),
    exact: bool = typer.Option(False, "--exact/--noise", help="Start from the exact inversion to t0, not fresh noise."),
    tol: float = TolOpt,
    max_iters: int = MaxItersOpt,
    out: str = typer.Option("edited/", "--out", "-o", help="A folder (one PNG per input, named like it), or a .png for one image."),
    strip: bool = typer.Option(False, "--strip", help="Write input | edited side by side (labelled, enlarged)."),
    scale: Optional[int] = ScaleOpt,
    device: str = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    precision: str = ExactPrecisionOpt,
) -> None:
    """SDEdit with DDIM: noise the images to t0 and denoise them back, or inpaint the masked part."""
    how = exact_settings(exact, tol, max_iters)
    if not 0 <= strength <= 1:
        fail(f"--strength must be between 0 and 1, got {strength}")
    if not (eta >= 0 and math.isfinite(eta)):
        fail(f"--eta must be a finite number >= 0, got {eta}")
    out_path = Path(out).expanduser()
    image_paths = check_inputs(image_paths)
    to_folder = is_directory_target(out_path, out)
    if not to_folder and (out_path.suffix.lower() != ".png" or len(image_paths) != 1):
        fail(f"--out {out}: give a folder ending in / (one PNG per input), or a .png file for a single image")
    names = [p.stem + ".png" for p in image_paths]
    if to_folder and len(set(names)) < len(names):
        fail("two inputs have the same name, and their outputs would overwrite each other; edit them separately")
    if mask is not None and not mask.is_file():
        fail(f"--mask {mask}: no such image file")
    targets = [out_path / n for n in names] if to_folder else [out_path]
    if to_folder:
        out_path.mkdir(parents=True, exist_ok=True)
    images.check_writable(targets[0])
    loaded = load(model)
    x0 = read_images(image_paths, loaded)
    channels, resolution, _ = loaded.image_shape
    keep = None
    if mask is not None:
        keep = (images.load_image(mask, resolution, 1, notice=note)[None] > 0).float()  # 1 = regenerate
    sampler, batch = make_sampler(loaded, steps, skip, device, eta=eta, precision=precision, compile_model=False,
                                  batch_size=batch_size, count=len(image_paths))
    walked = sampling.edit_steps(strength, len(sampler.timesteps))
    edited = []
    with progress_bar("editing", len(image_paths), max(walked, 1)) as advance:
        for start in range(0, len(image_paths), batch):
            generators = seeds.image_generators(seed, range(start, min(start + batch, len(image_paths))))
            edited.append(sampler.edit(x0[start : start + batch], strength, generators, keep, how, advance).cpu())
    pixels, inputs = images.to_uint8(torch.cat(edited)), images.to_uint8(x0)
    for target, before, after in zip(targets, inputs, pixels):
        if strip:
            images.save_picture(images.grid(torch.stack([before, after]), columns=2), target, scale,
                                ["input", "edited"], tile=resolution)
        else:
            images.save_image(images.enlarge(after, scale or 1), target)
    t0 = int(sampler.timesteps[walked - 1]) if walked else None
    where = f"{out_path}/" if to_folder else str(out_path)
    say(f"wrote {len(targets)} edited image(s) to {where} [{loaded.name}, strength {strength:g}: "
        f"{walked} of {len(sampler.timesteps)} steps from t0 = {t0}, eta={eta:g}, "
        f"{'exact inversion' if exact else f'seed={seed}'}{', masked' if mask else ''}]")


@app.command()
def train(
    data: Path = typer.Argument(..., help="Folder of training images (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config, checkpoints, samples, log."),
    preset: str = typer.Option(
        "small", "--preset", help="Architecture: cifar10, celeba64, ddpm256, digits, small, tiny."
    ),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image size (default: the preset's)."),
    channels: Optional[int] = typer.Option(
        None, "--channels", help="1 (grayscale) or 3 (RGB); default: 1 when every image is grayscale."
    ),
    base_channels: Optional[int] = typer.Option(None, "--base-channels", help="Width of the first level."),
    channel_mult: Optional[str] = typer.Option(None, "--channel-mult", help="Width multipliers, e.g. 1,2,2,2."),
    res_blocks: Optional[int] = typer.Option(None, "--res-blocks", help="Residual blocks per level."),
    attention: Optional[str] = typer.Option(None, "--attention", help="Resolutions with attention, e.g. 16."),
    dropout: Optional[float] = typer.Option(None, "--dropout"),
    steps: int = typer.Option(10_000, "--steps", help="Optimizer steps in all."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per step, over all processes."),
    lr: float = typer.Option(2e-4, "--lr"),
    warmup: int = typer.Option(1000, "--warmup", help="Steps of linear learning-rate warm-up."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant, or cosine (decays to 0 at --steps)."),
    ema_decay: float = typer.Option(0.9999, "--ema-decay"),
    flip: bool = typer.Option(
        True, "--flip/--no-flip", help="Random horizontal flips (turn off for digits, text, anything with a handedness)."
    ),
    save_every: int = typer.Option(1000, "--save-every", help="Checkpoint and sample grid every N steps."),
    keep: int = typer.Option(3, "--keep", help="Checkpoints kept."),
    sample_steps: int = typer.Option(50, "--sample-steps", help="DDIM steps of the sample grids."),
    sample_count: int = typer.Option(16, "--sample-count", help="Images in each sample grid (0: none)."),
    seed: int = typer.Option(0, "--seed"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on GPUs and on CPUs with native bf16), fp32 or bf16."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the UNet."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    device: str = DeviceOpt,
) -> None:
    """Train a DDPM denoiser on a folder of images (torchrun for several processes)."""
    from . import train as training

    if channels is not None and channels not in (1, 3):
        fail(f"--channels must be 1 or 3, got {channels}")
    data_files = find_images(data)  # a missing or empty folder fails here, before any progress bar
    training.check_run_dir(out)
    channels_note = None
    if channels is None:
        saved = runs.saved_config(out) if resume else None
        if saved is not None:
            channels = saved["unet"]["in_channels"]
        else:
            channels = infer_channels(data_files)
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
    for name, value in [("--steps", steps), ("--batch-size", batch_size), ("--save-every", save_every), ("--keep", keep)]:
        if value < 1:
            fail(f"{name} must be at least 1, got {value}")
    if precision not in ("auto", "fp32", "bf16"):
        fail(f"--precision for training must be auto, fp32 or bf16, got {precision!r}")
    options = training.TrainOptions(
        data=str(data), out=str(out), preset=preset, unet=overrides, steps=steps, batch_size=batch_size, lr=lr,
        warmup=warmup, lr_schedule=lr_schedule, ema_decay=ema_decay, flip=flip, save_every=save_every, keep=keep,
        sample_steps=sample_steps, sample_count=sample_count, seed=seed, precision=precision, compile=compile_model,
    )
    config = options.unet_config()
    main_process = distributed.from_env().is_main
    train_device = sampling.pick_device(device)
    if main_process:
        how = "bf16 autocast" if training.uses_bf16(precision, train_device) else "fp32"
        say(f"training a {training.params_for(config) / 1e6:.2f}M-parameter UNet ({preset} preset) on "
            f"{len(data_files)} images into {out} ({train_device}, {how})")
        if channels_note:
            say(f"{channels_note} (--channels overrides)")
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(), console=stderr, disable=not main_process,
    ) as bar:
        reading = bar.add_task("reading data", total=None, status="")
        task = bar.add_task("training", total=steps, status="", visible=False)

        def on_data(done: int, total: int) -> None:
            bar.update(reading, completed=done, total=total)

        plain = PlainProgress("training", steps, unit="steps") if not stderr.is_terminal and main_process else None

        def on_step(step: int, loss: float, speed: float) -> None:
            bar.update(task, completed=step, status=f"loss {loss:.4f}  {speed:.1f} img/s", visible=True)
            if plain is not None:
                plain.update(step, f", loss {loss:.4f}, {speed:.1f} img/s")

        started = time.perf_counter()
        progress_on_interrupt.append(lambda: training.interrupted_at(out))
        newest = training.train(
            options, train_device, resume,
            training.TrainCallbacks(on_data=on_data, on_step=on_step, on_message=lambda m: bar.console.print(m, markup=False)),
        )
    if main_process:
        say(f"done in {time.perf_counter() - started:.0f}s; newest checkpoint {newest}; use it with --model {out}")


def parse_list(text: str, option: str, kind=int, allow_empty: bool = False) -> list:
    """A comma-separated option value such as 10,20,50 (positive for int, non-negative for float)."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    smallest = 1 if kind is int else 0
    if values is None or (not values and not allow_empty) or any(not (v >= smallest and math.isfinite(v)) for v in values):
        what = "positive integers" if kind is int else "non-negative numbers"
        fail(f"{option} takes {what} separated by commas, such as 10,20,50, got {text!r}")
    return values


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A training run folder, or any checkpoint --model accepts."),
    out: Path = typer.Argument(..., help="Folder to write: a diffusers DDIMPipeline (UNet2DModel + DDIMScheduler)."),
) -> None:
    """Write a model as a diffusers pipeline folder (DDIMPipeline.from_pretrained loads it)."""
    from .export import export_diffusers

    loaded = weights.load_model(str(run_dir))
    export_diffusers(loaded, out)
    say(f"wrote {out}/ (model_index.json, unet/, scheduler/): diffusers.DDIMPipeline.from_pretrained({str(out)!r})")


@app.command()
def fid(
    samples: Optional[Path] = typer.Argument(None, help="Folder of generated images (or use --model to sample now)."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Folder, .npz statistics, or a name torch-fidelity knows (cifar10-train)."),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="Write the FID statistics of SAMPLES to this .npz."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Sample from this model instead of reading SAMPLES."),
    num: int = typer.Option(10_000, "--num", "-n", help="With --model: images to sample."),
    steps: int = StepsOpt,
    eta: float = typer.Option(0.0, "--eta"),
    skip: Optional[str] = SkipOpt,
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Feature-extraction batch."),
    feature_extractor: Optional[str] = typer.Option(None, "--feature-extractor", help="Default: torch-fidelity's inception-v3-compat."),
) -> None:
    """FID via torch-fidelity (pip install 'ddimctl\\[eval]'): a folder of samples, or a model sampled now,
    against a reference folder, a saved statistics file or a named data set."""
    import tempfile

    from . import evaluate

    evaluate.fidelity()
    dev = sampling.pick_device(device)
    if (samples is None) == (model is None):
        fail("give SAMPLES (a folder of images) or --model to sample from, not both")
    if save_stats is not None:
        if samples is None:
            fail("--save-stats writes the statistics of a folder: give SAMPLES")
        evaluate.save_statistics(evaluate.statistics(str(samples), dev, batch_size, feature_extractor), save_stats)
        say(f"wrote the FID statistics of {samples} to {save_stats}")
        return
    if ref is None:
        fail("--ref is needed: a folder of images, a .npz from --save-stats, or a name such as cifar10-train")
    with tempfile.TemporaryDirectory(prefix="ddimctl-fid-") as tmp:
        if model is not None:
            if num < 2:
                fail(f"--num must be at least 2 for FID, got {num}")
            loaded = load(model)
            sampler, batch = make_sampler(loaded, steps, skip, device, eta, count=num)
            samples = Path(tmp)
            sample_to_folder(sampler, batch, seed, num, samples, distributed.World())
        value = evaluate.compute_fid(samples, ref, dev, batch_size, feature_extractor)
    sys.stdout.write(f"{value:.4f}\n")


@app.command()
def sweep(
    model: Optional[str] = ModelOpt,
    steps: str = typer.Option("10,20,50,100", "--steps", "-S", help="Comma-separated S values."),
    etas: str = typer.Option("0,0.2,0.5,1", "--eta", help="Comma-separated eta values."),
    sigma_hat: bool = typer.Option(False, "--sigma-hat", help="Add Table 1's last row (DDPM, larger variance)."),
    num: int = typer.Option(50_000, "--num", "-n", help="Images per cell."),
    ref: str = typer.Option(..., "--ref", help="Reference for FID: a folder or a name (cifar10-train)."),
    out: Path = typer.Option(Path("sweep"), "--out", "-o", help="Folder for the cells' images and the tables."),
    skip: Optional[str] = SkipOpt,
    seed: int = typer.Option(0, "--seed"),
    batch_size: Optional[int] = BatchOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    compile_model: Optional[bool] = CompileOpt,
    feature_extractor: Optional[str] = typer.Option(None, "--feature-extractor", help="Default: inception-v3-compat."),
) -> None:
    """Table 1 of the paper: samples for every (eta, S) cell, streamed to disk and resumable, then FID."""
    from . import evaluate

    evaluate.fidelity()  # fail before hours of sampling, not after
    steps_list = parse_list(steps, "--steps")
    eta_list = parse_list(etas, "--eta", float)
    if num < 2:
        fail(f"--num must be at least 2 for FID, got {num}")
    out.mkdir(parents=True, exist_ok=True)
    world = distributed.init(sampling.pick_device(device))
    loaded = load(model)
    rows: list[float | None] = eta_list + ([None] if sigma_hat else [])
    cells, first = [], None
    for s in steps_list:
        for eta in rows:
            sampler, batch = make_sampler(
                loaded, s, skip, device, eta or 0.0, eta is None, precision, compile_model, batch_size,
                math.ceil(num / world.size), reuse=first,
            )
            first = first or sampler
            folder = out / evaluate.cell_name(eta, s)
            folder.mkdir(exist_ok=True)
            sample_to_folder(sampler, batch, seed, num, folder, world)
            if world.is_main:
                value = evaluate.compute_fid(folder, ref, sampler.device, feature_extractor=feature_extractor)
                cells.append({"row": "sigma-hat" if eta is None else f"{eta:g}", "eta": eta, "steps": s, "fid": value,
                              "images": num, "folder": str(folder)})
                say(f"{folder.name}: FID {value:.3f}")
                evaluate.write_tables(out, loaded.name, cells)
    distributed.shutdown()
    if world.is_main:
        say(f"wrote {out / 'table.md'}, {out / 'results.json'}" + (f", {out / 'fid.png'}" if (out / "fid.png").exists() else ""))
        stdout.print((out / "table.md").read_text(), markup=False, highlight=False)


@app.command()
def bench(
    model: Optional[str] = typer.Option("cifar10", "--model", "-m", help="Registry name, path, or a preset (random weights)."),
    steps: int = typer.Option(50, "--steps", "-S"),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Default: 256 on GPUs, 4 on CPU."),
    precision: str = PrecisionOpt,
    compile_mode: Optional[str] = typer.Option(
        None, "--compile-mode", help="torch.compile mode, or 'none' (default: the sampler's default on CUDA)."
    ),
    runs: int = typer.Option(3, "--runs", help="Timed runs; the median is reported."),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Also time diffusers, if installed."),
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON only."),
) -> None:
    """Time the sampler (and diffusers' DDIM on the same weights and noise): images/s, MFU, memory, PSNR."""
    from . import bench as benchmarks
    from .unet import PRESETS, UNet

    dev = sampling.pick_device(device)
    if model in PRESETS or (model in registry.registry() and not weights.is_cached(registry.registry()[model])):
        arch = PRESETS[model] if model in PRESETS else PRESETS[registry.registry()[model].architecture]
        torch.manual_seed(0)
        unet = UNet(arch).eval()
        source = f"random weights in the {model} architecture (speed does not depend on the values)"
    else:
        unet = load(model).unet
        source = model
    mode = compile_mode if compile_mode is not None else (fast.DEFAULT_COMPILE_MODE if dev.type == "cuda" else "none")
    if mode not in (*fast.COMPILE_MODES, "none"):
        fail(f"--compile-mode must be one of {', '.join(fast.COMPILE_MODES)} or none, got {mode!r}")
    batch = batch_size or (256 if dev.type == "cuda" else 4)
    if steps < 1 or steps > 1000:
        fail(f"--steps must be between 1 and 1000, got {steps}")
    if not as_json:
        say(f"bench: {source}; {dev}; batch {batch}; S={steps}; {runs} timed runs each")
    results = benchmarks.run_benchmark(
        unet, dev, steps, batch, precision, None if mode == "none" else mode, runs, reference,
        log=(lambda m: None) if as_json else note,
    )
    if as_json:
        payload = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   "torch": torch.__version__, "source": source, "results": [m.to_dict() for m in results]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    table = Table(title=f"ddimctl bench ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__})")
    for column in benchmarks.SUMMARY_HEADER:
        table.add_column(column)
    for row in benchmarks.summary_rows(results):
        table.add_row(*row)
    stdout.print(table)


# What a command has done so far, for the line Ctrl-C prints (set by long-running commands).
progress_on_interrupt: list = []


def main() -> None:
    try:
        from typer._click.exceptions import ClickException  # typer >= 0.2x carries its own click
    except ImportError:
        from click import ClickException
    def interrupted() -> None:
        done = progress_on_interrupt[-1]() if progress_on_interrupt else ""
        print(f"interrupted{'; ' + done if done else ''}", file=sys.stderr)
        sys.exit(130)

    try:
        # click's standalone mode would turn Ctrl-C into a silent exit 130 (typer) or "Aborted!".
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        interrupted()
    except ClickException as e:  # usage errors: click's usage line and message
        e.show()
        sys.exit(e.exit_code)
    except DdimctlError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, permissions, ...: say what failed, in one line
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        sys.exit(1)
    if code == 130:  # typer's way of reporting a KeyboardInterrupt in non-standalone mode
        interrupted()
    sys.exit(code if isinstance(code, int) else 0)
