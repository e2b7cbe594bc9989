"""Speed, fidelity and FLOP utilisation of the sampler, against diffusers on the same card.

Both sides run in the same process on the same weights and the same starting noise; times cover the
whole sampling loop after warm-up (compilation reported separately), median of several runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .models import boundary, registry, loading
from . import metrics
from .sampling import samplers
from .schedule import Schedule
from .models.diffusers_format import diffusers_config
from .errors import DdimctlError
from .models.unet import PRESETS, UNet
from .models.loading import LoadedModel

SCHEDULE = Schedule()  # every benchmark times the public checkpoints' linear schedule

# Dense matrix-unit peaks from the vendors' datasheets (FLOP/s); MFU is reported against these.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


@dataclass
class Measurement:
    name: str
    precision: str
    batch: int
    steps: int  # network calls per image
    seconds: float  # median of the runs, whole loop
    images_per_s: float
    sampler: str = "ddim"
    compile_s: float = 0.0
    peak_memory_gib: float = 0.0
    mfu: float | None = None
    psnr_median: float | None = None
    psnr_min: float | None = None
    finite: bool = True
    ratio: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], torch.Tensor], device: torch.device, runs: int) -> tuple[float, torch.Tensor]:
    seconds, out = [], None
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def run_ours(
    unet: UNet,
    x_T: torch.Tensor,
    settings: samplers.Settings,
    precision: str,
    compile_mode: str | None,
    runs: int,
    alphas_cumprod: torch.Tensor,
) -> tuple[Measurement, torch.Tensor]:
    device = x_T.device
    batch = x_T.shape[0]
    timesteps = settings.timesteps(alphas_cumprod)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eps = boundary.prepare(unet, device, precision, compile_mode, batch)
    compile_s = boundary.warm_up(eps, tuple(x_T.shape), device) if compile_mode else 0.0
    classes = eps.config.example_classes(batch, device)
    run = lambda: settings.run(lambda x, t: eps(x, t, classes), x_T, alphas_cumprod, timesteps)  # noqa: E731
    run()  # warm-up of the whole loop
    seconds, out = time_runs(run, device, runs)
    resolved = boundary.resolve_precision(precision, device)
    label = f"ddimctl{sampler_label(settings)} {resolved}" + (f" compile={compile_mode}" if compile_mode else " eager")
    m = Measurement(label, resolved, batch, settings.steps, seconds, batch / seconds, settings.sampler, compile_s)
    if device.type == "cuda":
        m.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return m, out


def sampler_label(settings: samplers.Settings) -> str:
    return "" if settings.sampler == "ddim" else f" {settings.sampler}"


def follow_grid(scheduler, descending: list[int], alphas_cumprod: torch.Tensor):
    """A diffusers multistep scheduler (DPM-Solver, UniPC) set to walk exactly these timesteps and
    then sigma = 0, with ddimctl's float64 noise levels (its own spacings differ from the paper's)."""
    scheduler.set_timesteps(len(descending))
    abar = alphas_cumprod.double()
    sigmas = [float(((1 - abar[t]) / abar[t]).sqrt()) for t in descending] + [0.0]
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    scheduler.timesteps = torch.tensor(descending, dtype=torch.int64)
    scheduler.alphas_cumprod = abar.clone()
    return scheduler


def no_reference(sampler: str, unet: UNet | None = None) -> str | None:
    """Why diffusers cannot be timed beside this sampler and UNet (not installed, no scheduler, a
    UNet that UNet2DModel cannot hold), or None."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "diffusers is not installed: ddimctl's rows only (pip install diffusers adds its reference row)"
    if reference_scheduler(sampler) is None:
        return f"diffusers has no scheduler for {sampler} on this noise schedule: no reference run"
    if unet is not None:
        try:
            diffusers_config(unet.config)
        except DdimctlError as e:
            return f"diffusers cannot build this UNet ({e}): no reference run"
    return None


def reference_scheduler(sampler: str):
    """diffusers' scheduler for a sampler, walking the same timesteps when S divides T ("leading"),
    or None (iPNDM: diffusers' IPNDMScheduler uses another noise schedule)."""
    import diffusers

    schedule = dict(num_train_timesteps=SCHEDULE.train_steps, beta_start=SCHEDULE.beta_start,
                    beta_end=SCHEDULE.beta_end, beta_schedule="linear")
    multistep = dict(final_sigmas_type="zero", lower_order_final=True, timestep_spacing="leading", steps_offset=0)
    make = {
        "ddim": lambda: diffusers.DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                                timestep_spacing="leading"),
        "dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(**schedule, **multistep, solver_order=2),
        "dpm++3m": lambda: diffusers.DPMSolverMultistepScheduler(**schedule, **multistep, solver_order=3),
        "unipc": lambda: diffusers.UniPCMultistepScheduler(**schedule, **multistep, solver_order=2),
        "plms": lambda: diffusers.PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=0,
                                                timestep_spacing="leading"),
    }
    return make[sampler]() if sampler in make else None


def run_reference(
    unet: UNet, x_T: torch.Tensor, settings: samplers.Settings, dtype: torch.dtype, runs: int, tf32: bool = False
) -> tuple[Measurement, torch.Tensor]:
    """diffusers' UNet2DModel with the sampler's scheduler, the loop its pipelines run, on our weights
    and noise (S network calls: PLMS's scheduler takes S - 1 steps)."""
    import diffusers

    device = x_T.device
    steps = settings.steps - settings.spec.extra_calls
    config = {k: v for k, v in diffusers_config(unet.config).items() if not k.startswith("_")}
    ref = diffusers.UNet2DModel(**config)
    ref.load_state_dict(unet.state_dict())
    diffusers.utils.logging.set_verbosity_error()  # its advice on from_pretrained does not apply here
    ref = ref.to(device=device, dtype=dtype).eval()
    scheduler = reference_scheduler(settings.sampler)
    if device.type == "cuda":
        # The reference runs with PyTorch's defaults: fp32 matmuls, but TF32 allowed in cuDNN convs.
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    descending = [int(t) for t in reversed(settings.timesteps(SCHEDULE.alphas_cumprod()))]
    labels = unet.config.example_classes(x_T.shape[0], device)

    @torch.no_grad()
    def run():
        if settings.sampler in ("ddim", "plms"):  # "leading" is the paper's uniform grid when S divides T
            scheduler.set_timesteps(steps)
        else:
            follow_grid(scheduler, descending, SCHEDULE.alphas_cumprod())
        x = x_T.to(dtype)
        for t in scheduler.timesteps:
            eps = ref(x, t, class_labels=labels).sample[:, : unet.config.in_channels]
            x = scheduler.step(eps, t, x).prev_sample
        return x.float()

    run()
    seconds, out = time_runs(run, device, runs)
    name = {torch.float32: "tf32" if tf32 else "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    m = Measurement(f"diffusers{sampler_label(settings)} {name}", name, x_T.shape[0], settings.steps, seconds,
                    x_T.shape[0] / seconds, settings.sampler)
    if device.type == "cuda":
        m.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return m, out


def add_fidelity(m: Measurement, out: torch.Tensor, fp32_out: torch.Tensor) -> None:
    m.finite = bool(torch.isfinite(out).all())
    p = metrics.psnr_per_image(out, fp32_out)
    m.psnr_median, m.psnr_min = float(p.median()), float(p.min())


def add_ratios(measurements: list[Measurement], references: list[Measurement]) -> None:
    """Each of our measurements against the fastest reference of each precision."""
    best: dict[str, float] = {}
    for r in references:
        best[r.precision] = max(best.get(r.precision, 0.0), r.images_per_s)
    for m in measurements:
        if not m.name.startswith("diffusers"):
            m.ratio = {precision: m.images_per_s / speed for precision, speed in best.items()}


def add_mfu(m: Measurement, flops_per_forward: float, device: torch.device) -> None:
    peak = peak_flops(device, m.precision)
    if peak:
        m.mfu = flops_per_forward * m.steps * m.images_per_s / peak


def benchmark_training(
    unet_config, device: torch.device, batch: int, precision: str, compile_model: bool, steps: int = 20
) -> dict:
    """Optimizer steps per second of the training loop body on synthetic data (images/s reported)."""
    from .train import optimizer_step

    torch.manual_seed(0)
    model = UNet(unet_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trained = torch.compile(model) if compile_model else model
    abar = SCHEDULE.alphas_cumprod().float().to(device)
    x0, _, _ = unet_config.example_inputs(batch, device)
    use_bf16 = precision == "bf16"
    if device.type == "cuda":
        boundary.set_matmul_precision("fp32")

    def step():
        t = torch.randint(0, SCHEDULE.train_steps, (batch,), device=device)
        optimizer_step(model, trained, optimizer, x0, t, torch.randn_like(x0), abar, use_bf16, grad_clip=1.0)

    started = time.perf_counter()
    for _ in range(3):
        step()
    _sync(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - started
    return {
        "name": f"train {precision}" + (" compile" if compile_model else " eager"),
        "batch": batch,
        "images_per_s": batch * steps / seconds,
        "warmup_s": warm,
    }


def unet_to_time(spec: str, load: Callable[[str], LoadedModel]) -> tuple[UNet, str]:
    """The UNet a benchmark times, and what it is: a registry model that is here (bundled or cached)
    or a local checkpoint is load()ed; one not downloaded yet, or a preset, runs with random weights
    in its architecture (speed does not depend on the values)."""
    entries = registry.registry()
    if spec in entries and loading.is_cached(entries[spec]):
        return load(spec).unet, f"{spec} ({entries[spec].source})"
    if spec in PRESETS or spec in entries:
        torch.manual_seed(0)
        unet = UNet(PRESETS[spec] if spec in PRESETS else PRESETS[entries[spec].architecture]).eval()
        return unet, f"random weights in the {spec} architecture (speed does not depend on the values)"
    return load(spec).unet, spec


def estimate_seconds(unet: UNet, device: torch.device, settings: samplers.Settings, batch: int, runs: int,
                     paths: int) -> float:
    """About how long a benchmark takes: one timed forward pass at the batch size, times every
    network call of every run (and one warm-up) of every path timed."""
    inputs = unet.config.example_inputs(batch, device)
    model = unet.to(device)
    with torch.no_grad():
        _sync(device)
        started = time.perf_counter()
        model(*inputs)
        _sync(device)
    return (time.perf_counter() - started) * settings.steps * (runs + 1) * paths


def check_settings(settings: samplers.Settings, compile_mode: str | None) -> samplers.Settings:
    """What a benchmark can run: S within the schedule's T, and a known compile mode. Returns the
    settings on the uniform grid the reference walks too."""
    boundary.check_compile_mode(compile_mode)
    return settings.for_model(SCHEDULE.train_steps, "uniform")


def run_benchmark(
    unet: UNet,
    device: torch.device,
    settings: samplers.Settings,
    batch: int,
    precision: str = "auto",
    compile_mode: str | None = None,
    runs: int = 3,
    reference: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> list[Measurement]:
    """ddimctl's fp32 path, its fast path, and (when diffusers is installed) the reference in fp32 and,
    on GPUs, fp16, all from the same x_T and with the same sampler. Fidelity of every path is
    measured against ddimctl fp32."""
    settings = check_settings(settings, compile_mode)
    x_T, _, _ = unet.config.example_inputs(batch, device, torch.Generator().manual_seed(0))
    abar = SCHEDULE.alphas_cumprod()
    flops = boundary.forward_flops(unet)
    results = []

    log(f"ddimctl {settings.sampler} fp32 eager (the fidelity baseline)")
    base, base_out = run_ours(unet, x_T, settings, "fp32", None, runs, abar)
    results.append(base)
    mine, mine_out = base, base_out
    if boundary.resolve_precision(precision, device) != "fp32" or compile_mode is not None:
        log(f"ddimctl {boundary.resolve_precision(precision, device)} compile={compile_mode or 'none'}")
        mine, mine_out = run_ours(unet, x_T, settings, precision, compile_mode, runs, abar)
        results.append(mine)
    if reference and no_reference(settings.sampler, unet):
        log(no_reference(settings.sampler, unet))
        reference = False
    refs = []
    if reference:
        dtypes = [torch.float32] + ([torch.float16] if device.type == "cuda" else [])
        for dtype in dtypes:
            log(f"diffusers {str(dtype).removeprefix('torch.')}")
            m, out = run_reference(unet, x_T, settings, dtype, runs)
            add_fidelity(m, out, base_out)
            refs.append(m)
        results.extend(refs)
    base.finite = bool(torch.isfinite(base_out).all())  # the baseline: no PSNR against itself
    if mine is not base:
        add_fidelity(mine, mine_out, base_out)
    for m in results:
        add_mfu(m, flops, device)
    add_ratios(results, refs)
    return results


def summary_rows(measurements: list[Measurement]) -> list[list[str]]:
    rows = []
    for m in measurements:
        rows.append(
            [
                m.name,
                str(m.batch),
                str(m.steps),
                f"{m.images_per_s:.1f}",
                ", ".join(f"{v:.2f}x {k}" for k, v in m.ratio.items()) or "-",
                f"{100 * m.mfu:.1f}%" if m.mfu is not None else "-",
                f"{m.peak_memory_gib:.2f}" if m.peak_memory_gib else "-",
                psnr_cell(m),
                "yes" if m.finite else "NO",
                f"{m.compile_s:.1f}" if m.compile_s else "-",
            ]
        )
    return rows


def psnr_cell(m: Measurement) -> str:
    if m.psnr_median is None:
        return "- (baseline)" if m.name.startswith("ddimctl") and m.name.endswith("fp32 eager") else "-"
    if m.psnr_min >= 120:  # psnr_per_image's ceiling: no pixel differs
        return "identical"
    return f"{m.psnr_median:.1f} / {m.psnr_min:.1f}"


SUMMARY_HEADER = ["setup", "batch", "S", "images/s", "vs reference", "MFU", "peak GiB", "PSNR med/min dB", "finite", "compile s"]
