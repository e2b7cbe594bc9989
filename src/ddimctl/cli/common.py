"""What the commands share: the app, the options, input and output checks, and the runs with
progress (output.py prints)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from .. import __version__, choices
from .. import threads as library_threads
from ..errors import DdimctlError
from .deferred import Deferred, library
from .output import PlainProgress, flag, note, progress_bar, progress_on_interrupt, progress_seconds, say, stderr, stdout  # noqa: F401 (the commands' imports)

torch = Deferred("torch")
data, images, registry, samplers, runners, timesteps, loading = map(
    library, ("data", "io.images", "models.registry", "sampling.samplers", "sampling.runners",
             "sampling.timesteps", "models.loading"))

app = typer.Typer(
    name="ddimctl",
    help="Sample, invert and train DDPM/DDIM image diffusion models (Song et al., ICLR 2021).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: at 80 columns rich's boxed tables squeezed each option's text into ~21 characters.
    rich_markup_mode=None,
)


def show_version(value: bool) -> None:
    if value:
        print(f"ddimctl {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, max=1024,  # far beyond any CPU; 100,000 threads crashed OpenMP
        help="CPU threads for the network (default: the cores not busy with other work; all of them when idle).",
    ),
) -> None:
    """Sample, invert and train DDPM/DDIM image diffusion models (Song et al., ICLR 2021)."""
    progress_seconds()  # a wrong setting is refused before any command starts
    if threads is not None:
        torch.set_num_threads(threads)
        cpu_threads_note.clear()
        library_threads.user_set = True


# What the command line decided about CPU threads (ddimctl.threads), said once a CPU run starts.
cpu_threads_note: list[str] = []


def note_cpu_threads(device: torch.device) -> None:
    if device.type == "cpu" and cpu_threads_note:
        note(cpu_threads_note.pop())


def complete_models(incomplete: str) -> list[str]:
    """Shell completion of --model: the registry's names."""
    return [name for name in registry.registry() if name.startswith(incomplete)]


def complete_samplers(incomplete: str) -> list[str]:
    return [name for name in choices.SAMPLER_NAMES if name.startswith(incomplete)]


def completing(choices) -> Callable[[str], list[str]]:
    """Shell completion from a fixed list of choices."""
    return lambda incomplete: [c for c in choices if c.startswith(incomplete)]


# Options shared by every command that runs the sampler.
ModelOpt = typer.Option(
    None, "--model", "-m", autocompletion=complete_models,
    help="Registry name (`ddimctl models`; digits is bundled), Hub OWNER/NAME[@REV], checkpoint, model or run folder, "
    "RUN@STEP (default: cifar10, from the Hub).",
)


StepsOpt = typer.Option(
    None, "--steps", "-S", min=1, help=f"Network calls per image, any sampler (default {choices.DEFAULT_STEPS}, or "
    "what --timesteps or --latents give).",
)


def steps_list_option(default: str) -> typer.models.OptionInfo:
    """--steps of the commands that run several S (reconstruct, sweep): a comma-separated list."""
    return typer.Option(None, "--steps", "-S", help=f"Comma-separated S values, network calls per image (default {default}).")


def a_sampler(value: str) -> str:
    """--sampler checked by the parser (exit 2, before torch starts)."""
    if value not in choices.SAMPLER_NAMES:
        raise typer.BadParameter(f"{value!r} is not a sampler; choose {choices.sampler_names()}")
    return value


def a_device(value: str) -> str:
    """--device checked by the parser: its form, and cuda only where the system shows an NVIDIA driver
    (torch would take seconds to say there is no GPU)."""
    kind, _, index = value.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu or cuda (cuda:N for one GPU)")
    if kind == "cuda" and os.name == "posix" and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia")):
        raise typer.BadParameter(f"{value} was asked for but this machine shows no NVIDIA GPU driver; use --device cpu")
    return value


def check_eta(sampler: str, eta: float = 0.0, sigma_hat: bool = False) -> None:
    """--eta and --sigma-hat are DDIM's: refused by the parser for another sampler (exit 2)."""
    if sampler not in choices.ETA_SAMPLERS and (eta or sigma_hat):
        option = "--eta" if eta else "--sigma-hat"
        raise typer.BadParameter(f"{option} is a setting of the ddim sampler; {sampler} is deterministic (leave it out)",
                                 param_hint=option)


SamplerOpt = typer.Option(
    "ddim", "--sampler", autocompletion=complete_samplers, callback=a_sampler,
    help=f"{choices.sampler_names()}: DDIM, or a faster solver of its ODE.",
)


SkipOpt = typer.Option(
    None, "--skip", autocompletion=completing((*choices.SKIP_SCHEMES, "tuned")),
    help=f"Timesteps: {', '.join(choices.SKIP_SCHEMES)}, a list, a tune-steps F.json, or tuned (shipped) "
    f"(default: the sampler's).",
)


TimestepsOpt = typer.Option(
    None, "--timesteps", help="Explicit timesteps such as 999,700,450,200,50 (either order), or a tune-steps file F.json; "
    "--steps follows from them.",
)


def timestep_choice(skip: str | None, given: str | None, model: str | None = None, sampler: str = "ddim",
                    steps: int | None = None) -> tuple[str | None, timesteps.Tuned | None]:
    """--skip and --timesteps as the one value Settings.skip holds (a scheme or an explicit list), and
    the tune-steps file it came from, if any (checked against the model once it is loaded); `--skip
    tuned` is the file ddimctl ships for a registry model, sampler and S."""
    if skip is not None and given is not None:
        fail("give --skip or --timesteps, not both")
    value = given if given is not None else skip
    if value is None:
        return None, None
    if value == "tuned" or value.lower().endswith(".json"):
        path = (timesteps.tuned_file(model or registry.default_model(), sampler, steps) if value == "tuned"
                else Path(value).expanduser())
        tuned = timesteps.read_tuned(path)
        return timesteps.canonical(tuned.timesteps), tuned
    if given is not None or timesteps.is_list(value):
        try:
            return timesteps.canonical(timesteps.parse_list(value)), None
        except ValueError as e:
            fail(f"--timesteps {value}: {e}")
    return value, None


def steps_for(steps: int | None, skip: str | None, sampler: str) -> int:
    """--steps as given, else as many network calls as explicit timesteps take, else the default."""
    if steps is not None:
        return steps
    return samplers.steps_from(skip, sampler) or choices.DEFAULT_STEPS


def check_tuned(tuned: timesteps.Tuned | None, loaded: loading.LoadedModel, sampler: str) -> None:
    if tuned is not None:
        tuned.check(loaded.name, loaded.weights_sha256, sampler)


DeviceOpt = typer.Option("auto", "--device", autocompletion=completing(("auto", "cpu", "cuda")), callback=a_device,
                         help="auto, cpu or cuda.")

ClassOpt = typer.Option(
    None, "--class", help="Class-conditional models: one class, or one per image (default: from each image's seed)."
)


BatchOpt = typer.Option(None, "--batch-size", "-b", min=1, help="Images per batch (default: from free GPU memory on CUDA; "
                        "16 of 32x32 on the CPU, fewer for larger images).")


PrecisionOpt = typer.Option(
    "auto", "--precision", autocompletion=completing(choices.PRECISIONS), help="auto (bf16 on GPUs, fp32 on CPUs: a seed gives the same image on every CPU), fp32, tf32, bf16, fp16."
)


ScaleOpt = typer.Option(
    None, "--scale", min=1, max=64,  # 64x already makes a 256-pixel image 16,384 pixels wide
    help="Enlarge pictures N times (default: pictures to 256 px at least, folders of PNGs at the model's size).",
)


ExactOpt = typer.Option(
    False, "--exact/--plain",
    help="Exact inversion: solve each step so that DDIM decoding returns the image (from about S = 10 up; at "
    "S = 5 the iteration does not converge on digits).",
)


TolOpt = typer.Option(1e-3, "--tol", help="Exact inversion: per-step tolerance (RMS change, [-1, 1] scale).")


MaxItersOpt = typer.Option(4, "--max-iters", help="Exact inversion: network calls per step at most (about 3 S in all).")


ExactPrecisionOpt = typer.Option("fp32", "--precision", autocompletion=completing(choices.PRECISIONS[1:]), help="fp32 (default: inversion wants it), tf32, bf16, fp16.")


CompileOpt = typer.Option(
    None, "--compile/--no-compile", help="torch.compile the UNet (default: on CUDA, for runs big enough to repay it)."
)


def fail(message: str) -> None:
    raise DdimctlError(message)


# The output folders this command created, so a command that fails leaves no empty folder behind.
made_folders: list[Path] = []


def make_output_folder(path: Path, option: str = "--out") -> None:
    """Create `path` (and missing parents), remembering which of them this command made."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{option} {path}: cannot create the folder ({e.strerror})")
    made_folders.extend(missing)  # deepest first


def remove_made_folders() -> None:
    """After a failure: the folders this command made that are still empty (never anything in them)."""
    for folder in made_folders:
        try:
            folder.rmdir()  # only succeeds on an empty folder
        except OSError:
            pass
    made_folders.clear()


def load(model: str | None, along_ode: bool = False) -> loading.LoadedModel:
    """The model --model names (the registry's default if none); along_ode: for a command that follows
    its ODE (invert, reconstruct, interpolate, edit, tune-steps), which a distilled student has not."""
    spec = model or registry.default_model()
    with stderr.status(f"loading {spec}"):
        loaded = loading.load_model(spec, notify=note)  # (a model the network would bring says what works without it)
    if along_ode:
        runners.check_invertible(loaded)
    return loaded


def make_runner(model: loading.LoadedModel, settings: samplers.Settings, device: str, **options) -> runners.Runner:
    """runners.make_runner, with its decisions shown as notes."""
    runner = runners.make_runner(model, settings, device, notify=note, **options)
    note_cpu_threads(runner.device)
    return runner


def is_directory_target(out: Path, raw: str) -> bool:
    return raw.endswith(("/", "\\")) or out.is_dir()


def expand_images(paths: list[Path]) -> list[Path]:
    """Image files as given; a folder stands for the images in it (recursively, sorted)."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(data.find_images(p))
        else:
            out.append(p)
    return out


MAX_STRIP_FRAMES = 256


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


def read_images(paths: list[Path], model: loading.LoadedModel) -> torch.Tensor:
    channels, resolution, _ = model.image_shape
    return images.load_images(paths, resolution, channels, notice=note)


def parse_list(text: str, option: str, kind=int, allow_empty: bool = False, any_integer: bool = False) -> list:
    """A comma-separated option value such as 10,20,50 (positive for int, or any integer with
    any_integer; non-negative for float)."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    smallest = -math.inf if any_integer else (1 if kind is int else 0)
    if values is None or (not values and not allow_empty) or any(not (v >= smallest and math.isfinite(v)) for v in values):
        what = "integers" if any_integer else "positive integers" if kind is int else "non-negative numbers"
        fail(f"{option} takes {what} separated by commas, such as {'1,2' if any_integer else '10,20,50'}, got {text!r}")
    return values


def class_list(text: str | None) -> list[int] | None:
    """--class: one class label or a comma-separated list (checked against the model later)."""
    return parse_list(text, "--class", any_integer=True) if text is not None else None


def parse_names(text: str, option: str) -> list[str]:
    """A comma-separated list of names such as ddim,dpm++2m."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        fail(f"{option} takes names separated by commas, such as ddim,dpm++2m, got {text!r}")
    return names


def exact_settings(exact: bool, tol: float, max_iters: int) -> runners.ExactInversion | None:
    return runners.ExactInversion(tol, max_iters) if exact else None
