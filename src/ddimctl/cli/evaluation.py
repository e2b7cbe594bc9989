"""`models`, `fid`, `sweep` and `bench`: the registry, the paper's tables, speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .. import choices
from .common import (
    steps_list_option,
    BatchOpt,
    CompileOpt,
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    SamplerOpt,
    SkipOpt,
    StepsOpt,
    TimestepsOpt,
    app,
    check_tuned,
    fail,
    load,
    make_output_folder,
    make_runner,
    note,
    parse_list,
    parse_names,
    say,
    stdout,
    steps_for,
    timestep_choice,
)
from .output import finish
from .progress import plan_and_fill
from .deferred import Deferred, library

torch = Deferred("torch")
devices, distributed, files, boundary, sample_folders, registry, samplers, runners, timesteps, unet, loading = map(
    library, ("devices", "distributed", "io.files", "models.boundary", "sampling.sample_folders", "models.registry",
             "sampling.samplers", "sampling.runners", "sampling.timesteps", "models.unet", "models.loading"))

SWEEP_STEPS = (10, 20, 50, 100)  # the paper's Table 1 columns, but for S = 1000


@app.command()
def models() -> None:
    """List the pretrained models of the registry (weights.toml), and the Hub repositories in the cache
    that --model OWNER/NAME loads."""
    from rich import box

    default = registry.default_model()
    entries = list(registry.registry().values())
    licences: dict[str, list[str]] = {}
    for entry in entries:
        licences.setdefault(entry.license, []).append(entry.name)
    caption = "* the default model; licences: " + ", ".join(
        f"{lic} ({', '.join(names) if len(names) <= 2 else f'{len(names)} models'})" for lic, names in licences.items())
    table = Table(title="ddimctl models (weights.toml)", box=box.SIMPLE_HEAD, caption=caption, pad_edge=False,
                  show_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("name", no_wrap=True)
    for column in ("size", "params", "skip", "cached"):
        table.add_column(column, no_wrap=True)
    table.add_column("source", overflow="fold")
    for entry in entries:
        name = entry.name + (" *" if entry.name == default else "")
        cached = "yes" if loading.is_cached(entry) else "no"
        params = f"{entry.params / 1e6:.1f}M" if entry.params else "?"
        gray = entry.architecture in unet.PRESETS and loading.registered_config(entry).in_channels == 1
        size = f"{entry.resolution}" + (", gray" if gray else "")
        table.add_row(name, size, params, entry.skip, cached, entry.source.removeprefix("hf://"))
    stdout.print(table)
    registered = {entry.repo.lower() for entry in entries if entry.repo}
    cached_repos = [row for row in loading.cached_hub_repos() if row[0].lower() not in registered]
    if cached_repos:
        hub_table = Table(title="Hub repositories in the cache (--model OWNER/NAME)", box=box.SIMPLE_HEAD,
                          pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True)
        for column in ("repository", "revisions", "kind"):
            hub_table.add_column(column, no_wrap=column != "revisions")
        for row in cached_repos:
            hub_table.add_row(*row)
        stdout.print(hub_table)


@app.command()
def fid(
    samples_given: Optional[list[Path]] = typer.Argument(
        None, metavar="[SAMPLES]...", help="Folder(s) of generated images, taken together (the shards of a run; or "
        "use --model to sample now)."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Folder, .npz statistics, or a name torch-fidelity knows (cifar10-train)."),
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="Write the FID statistics of SAMPLES to this .npz."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Sample from this model instead of reading SAMPLES."),
    num: int = typer.Option(10_000, "--num", "-n", min=1, help="With --model: images to sample."),
    steps: Optional[int] = StepsOpt,
    sampler: str = SamplerOpt,
    eta: float = typer.Option(0.0, "--eta", help="ddim only."),
    skip: Optional[str] = SkipOpt,
    timesteps_given: Optional[str] = TimestepsOpt,
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Feature-extraction batch."),
    feature_extractor: Optional[str] = typer.Option(None, "--feature-extractor", help="Default: torch-fidelity's inception-v3-compat."),
) -> None:
    """FID via torch-fidelity (pip install '.[eval]' from a clone, see the README): a folder of samples, or a model sampled now,
    against a reference folder, a saved statistics file or a named data set."""
    import tempfile

    from .. import evaluate

    evaluate.fidelity()
    samples = samples_given[0] if samples_given else None
    dev = devices.pick_device(device)
    skip, tuned = timestep_choice(skip, None, model, sampler, steps)
    settings = samplers.Settings(sampler, steps_for(steps, skip, sampler), skip, eta)
    if (samples is None) == (model is None):
        fail("give SAMPLES (a folder of images) or --model to sample from, not both")
    if save_stats is not None:
        if samples is None:
            fail("--save-stats writes the statistics of a folder: give SAMPLES")
        if not save_stats.parent.is_dir():
            fail(f"--save-stats {save_stats}: folder {save_stats.parent} does not exist; create it first")
        files.refuse_foreign([save_stats])
    elif ref is None:
        fail("--ref is needed: a folder of images, a .npz from --save-stats, or a name such as cifar10-train")
    else:
        evaluate.check_reference(ref, feature_extractor)
    with tempfile.TemporaryDirectory(prefix="ddimctl-fid-") as tmp:
        if samples_given and len(samples_given) > 1:  # the shards of one run: their images together
            samples = evaluate.union_folder(samples_given, Path(tmp))
        if save_stats is not None:
            evaluate.save_statistics(evaluate.statistics(str(samples), dev, batch_size, feature_extractor), save_stats)
            finish(f"wrote the FID statistics of {' '.join(map(str, samples_given))} to {save_stats}")
            return
        if model is not None:
            evaluate.check_sample_count(num)
            loaded = load(model)
            check_tuned(tuned, loaded, settings.sampler)
            settings = runners.settings_for(loaded, settings, steps_given=steps is not None)
            runner = make_runner(loaded, settings, device, count=num,
                                 classes=runners.image_classes(loaded, num, None, seed))  # class-conditional: from (seed, i)
            samples = Path(tmp)
            plan_and_fill(runner, seed, num, samples, distributed.World())
        value = evaluate.compute_fid(samples, ref, dev, batch_size, feature_extractor)
    sys.stdout.write(f"{value:.4f}\n")


@app.command()
def sweep(
    model: Optional[str] = ModelOpt,
    steps: Optional[str] = steps_list_option(",".join(map(str, SWEEP_STEPS))),
    sampler: str = typer.Option("ddim", "--sampler", help=f"Comma-separated samplers: {choices.sampler_names()}."),
    etas: str = typer.Option("0,0.2,0.5,1", "--eta", help="Comma-separated eta values (rows of the ddim sampler)."),
    sigma_hat: bool = typer.Option(False, "--sigma-hat", help="Add Table 1's last row (DDPM, larger variance)."),
    num: int = typer.Option(50_000, "--num", "-n", min=1, help="Images per cell."),
    ref: str = typer.Option(..., "--ref", help="Reference for FID: a folder or a name (cifar10-train)."),
    out: Path = typer.Option(Path("sweep"), "--out", "-o", help="Folder for the cells' images and the tables."),
    skip: Optional[str] = SkipOpt,
    timesteps_given: Optional[str] = TimestepsOpt,
    seed: int = typer.Option(0, "--seed"),
    batch_size: Optional[int] = BatchOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    compile_model: Optional[bool] = CompileOpt,
    feature_extractor: Optional[str] = typer.Option(None, "--feature-extractor", help="Default: inception-v3-compat."),
) -> None:
    """Table 1 of the paper: samples for every (sampler or eta, S) cell, streamed to disk and resumable,
    then FID; one line per sampler (and per eta of ddim) against network calls."""
    from .. import evaluate

    evaluate.fidelity()  # fail before hours of sampling, not after
    eta_list = parse_list(etas, "--eta", float)
    sampler_list = parse_names(sampler, "--sampler")
    skip, tuned = timestep_choice(skip, timesteps_given, model, sampler_list[0])
    explicit = skip is not None and timesteps.is_list(skip)
    steps_list = parse_list(steps, "--steps") if steps is not None else (None if explicit else list(SWEEP_STEPS))
    for values, option in ((steps_list or [], "--steps"), (eta_list, "--eta"), (sampler_list, "--sampler")):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            fail(f"{option} lists {twice[0]} twice; each cell is sampled once")
    cells = evaluate.sweep_cells(sampler_list, steps_list, eta_list, sigma_hat, skip)  # every cell checked here
    evaluate.check_sample_count(num)
    evaluate.check_reference(ref, feature_extractor)
    loaded = load(model)
    if loaded.student is not None:  # one cell: the student's own calls and timesteps
        if (steps is not None and steps_list != [loaded.student.steps]) or sampler_list != [loaded.student.sampler] or (
                eta_list not in ([0.0], [0.0, 0.2, 0.5, 1.0])) or sigma_hat or skip is not None:
            fail(f"{loaded.name} is a student: its one cell is its own {loaded.student.steps} call(s); leave out "
                 f"--steps, --sampler, --eta, --sigma-hat and --skip")
        cells = [runners.settings_for(loaded, samplers.Settings(), steps_given=False)]
    for name in sampler_list:  # a tune-steps file is for one model and sampler
        check_tuned(tuned, loaded, name)
    abar = loaded.alphas_cumprod
    for cell in cells:  # every cell against the model (S <= T, its timesteps) before the first is sampled
        cell.for_model(loaded.train_steps, loaded.skip).timesteps(abar)
    classes = runners.image_classes(loaded, num, None, seed)  # a class-conditional model: image i's from (seed, i)
    files.refuse_foreign([out / name for name in evaluate.TABLES])  # every output checked before the first call
    dev = devices.pick_device(device)
    for cell in cells:  # a cell folder of another run, or with someone's files, is refused before any cell is sampled
        resolved = runners.settings_for(loaded, cell)
        record = sample_folders.run_record(loaded, resolved, seed, None, runners.run_precision(precision, dev, resolved), 1)
        if (out / evaluate.cell_name(cell)).is_dir():
            sample_folders.check_folder(out / evaluate.cell_name(cell), record, num)
    make_output_folder(out)
    world = distributed.init(devices.pick_device(device))
    if world.is_main:
        files.hold_folder(out)  # one sweep in a folder at a time

    def prepare_cell(settings, reuse):
        return make_runner(loaded, settings, device, precision=precision, compile_model=compile_model,
                            batch_size=batch_size, count=num, reuse=reuse, classes=classes)

    def fill(runner, folder: Path) -> None:
        if world.is_main:  # a cell's images are its run's only: another sweep's are refused, not scored
            sample_folders.claim_folder(folder, sample_folders.run_record(loaded, runner.settings, seed, None, runner.precision, 1), num)
        world.barrier()
        plan_and_fill(runner, seed, num, folder, world)

    evaluate.run_sweep(loaded.name, cells, num, ref, out, world, prepare_cell, fill, feature_extractor, say)
    distributed.shutdown()
    if world.is_main:
        finish(f"wrote {out / 'table.md'}, {out / 'results.json'}" + (f", {out / 'fid.png'}" if (out / "fid.png").exists() else ""))
        stdout.print((out / "table.md").read_text(), markup=False, highlight=False)


@app.command()
def bench(
    model: Optional[str] = typer.Option("cifar10", "--model", "-m", help="Registry name, path, or a preset (random weights)."),
    steps: Optional[int] = StepsOpt,
    sampler: str = SamplerOpt,
    skip: Optional[str] = SkipOpt,
    timesteps_given: Optional[str] = TimestepsOpt,
    batch_size: int = typer.Option(None, "--batch-size", "-b", min=1, help="Default: 256 on GPUs, 4 on CPU."),
    precision: str = PrecisionOpt,
    compile_mode: Optional[str] = typer.Option(
        None, "--compile-mode", help="torch.compile mode, or 'none' (default: the sampler's default on CUDA)."
    ),
    runs: int = typer.Option(3, "--runs", min=1, max=1000, help="Timed runs; the median is reported."),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Also time diffusers, if installed."),
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON only."),
) -> None:
    """Time a sampler (and diffusers' scheduler for it on the same weights and noise): images/s, MFU,
    memory, PSNR."""
    from .. import bench as benchmarks

    dev = devices.pick_device(device)
    mode = compile_mode if compile_mode is not None else (boundary.DEFAULT_COMPILE_MODE if dev.type == "cuda" else "none")
    skip, _ = timestep_choice(skip, timesteps_given, model, sampler, steps)  # speed does not depend on which model they were tuned for
    steps = steps_for(steps, skip, sampler)
    settings = benchmarks.check_settings(samplers.Settings(sampler, steps, skip), None if mode == "none" else mode)
    unet, source = benchmarks.unet_to_time(model, load)
    batch = batch_size or (256 if dev.type == "cuda" else 4)
    if not as_json:
        say(f"bench: {source}; {dev}; batch {batch}; {settings.sampler}, S={steps}; {runs} timed runs each")
        if dev.type == "cpu":
            paths = 1 + (reference and benchmarks.no_reference(settings.sampler, unet) is None) + (
                boundary.resolve_precision(precision, dev) != "fp32" or mode != "none")
            seconds = benchmarks.estimate_seconds(unet, dev, settings, batch, runs, paths)
            took = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
            note(f"about {took} on this CPU ({paths} setups x {runs + 1} runs x {steps} calls at batch {batch})"
                 + ("; bench is sized for GPUs: a smaller --batch-size or --steps is quicker here" if seconds > 120 else ""))
    results = benchmarks.run_benchmark(
        unet, dev, settings, batch, precision, None if mode == "none" else mode, runs, reference,
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
