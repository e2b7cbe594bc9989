"""The model boundary: any loaded network as the noise predictor eps(x, t) that every sampler takes
(`prepare`, `FastEps`), whatever it predicts, on its device and precision: reduced precision,
channels_last and torch.compile on CUDA, fp32 eager on the CPU unless asked. The sampler maths
stays the same; only the network call changes.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import choices
from ..schedule import noise_from_prediction
from ..errors import DdimctlError, param
from ..io.files import cache_dir
from .unet import UNet, UNetConfig

PRECISIONS = choices.PRECISIONS
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Chosen by measurement on an H200 (docs/benchmarks.md): "reduce-overhead" (CUDA graphs) was no
# faster at batch 256 or 1024 and compiled slower; "max-autotune" compiled for over 3 minutes.
DEFAULT_COMPILE_MODE = "default"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# Compiling pays for itself only on enough work. On the H200 (docs/benchmarks.md) it took 12-32 s,
# after which CIFAR-10 ran at 535 images/s (50 steps) against about 150 eager in bf16
# (reference/performance.md), i.e. about 330 against 95 TFLOP/s of network work: eager finishes
# first below 20 s / (1/95e12 - 1/330e12), about 2.5 PFLOP (3,000 CIFAR-10 images at 50 steps).
COMPILE_PAYS_OFF_FLOP = 2.5e15


def forward_flops(unet: UNet) -> float:
    """FLOPs of one forward pass for one image (2 per multiply-add), counted on the meta device:
    no arithmetic runs, and attention counts too (the CPU's SDPA kernel has no FLOP formula)."""
    with torch.device("meta"):
        model = UNet(unet.config).eval()
        inputs = unet.config.example_inputs(1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return float(counter.get_total_flops())


def worth_compiling(unet: UNet, evaluations: int) -> bool:
    """Whether `evaluations` single-image network calls are enough work to repay compilation."""
    return evaluations * forward_flops(unet) >= COMPILE_PAYS_OFF_FLOP


def cpu_has_native_bf16() -> bool:
    """Whether the processor does bf16 arithmetic in hardware (AVX512-BF16 or AMX). Elsewhere PyTorch
    emulates bf16, which is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that have it (else fp16), fp32 on every CPU. A CPU's default must give the
    same image for a seed on every processor: with native bf16 (1.3-2.7x faster) single images move
    visibly (median 25-53 dB from fp32 by sampler, 3 of 256 digits change identity at S = 50), so
    there bf16 is asked for by name (docs/benchmarks.md)."""
    if precision not in PRECISIONS:
        raise DdimctlError(f"{param('precision')} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if device.type == "cpu" and precision in ("fp16", "tf32"):
        raise DdimctlError(f"{param('precision')} {precision} needs a CUDA GPU; use fp32 or bf16 on the CPU")
    return precision


def set_matmul_precision(precision: str) -> None:
    """fp32 means true fp32 (PyTorch lets cuDNN use TF32 by default); tf32 allows it everywhere."""
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


@dataclass
class FastEps:
    """eps_theta(x, t) in float32 out, whatever the network runs in. The model boundary: a network
    with learned variances returns the noise and then the variances, and only the noise goes on
    (DDIM and the ODE solvers do not use variances)."""

    model: Callable
    dtype: torch.dtype
    channels_last: bool
    noise_channels: int | None = None  # the output channels that are the noise; None: all
    prediction: str = "epsilon"  # what the network predicts: converted to the noise here, for every caller
    alphas_cumprod: torch.Tensor | None = None  # float64, needed for any prediction but epsilon
    timestep_scale: float = 1.0  # the network sees t * this (improved-diffusion's rescaled timesteps)
    config: UNetConfig | None = None  # the network's (for probe inputs)
    fixed_batch: int | None = None  # compiled graphs keep one shape: smaller batches are padded
    cuda_graphs: bool = False
    compile_seconds: float = 0.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        n, x_t = x.shape[0], x.float()  # the point as the sampler holds it: the noise is made from this one
        if self.fixed_batch and n < self.fixed_batch:
            pad = self.fixed_batch - n
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
            t = torch.cat([t, t.new_zeros(pad)])
            classes = torch.cat([classes, classes.new_zeros(pad)]) if classes is not None else None
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous output has been consumed
        t_in = t * self.timestep_scale if self.timestep_scale != 1 else t
        out = (self.model(x, t_in) if classes is None else self.model(x, t_in, classes))[:n, : self.noise_channels].float()
        if self.prediction != "epsilon":
            abar = self.alphas_cumprod.to(out.device)[t[:n].long()].float().view(-1, *[1] * (out.dim() - 1))
            # with x_t in float32: in bf16 its rounding (0.4%) would enter the noise directly
            out = noise_from_prediction(self.prediction, x_t, out, abar)
        return out.contiguous()  # a fresh tensor: graph outputs are reused buffers


def check_compile_mode(compile_mode: str | None) -> None:
    """None (eager) or one of COMPILE_MODES."""
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise DdimctlError(f"{param('compile_mode')} must be one of {', '.join(COMPILE_MODES)} or none, got {compile_mode!r}")


def prepare(
    unet: UNet,
    device: torch.device,
    precision: str = "auto",
    compile_mode: str | None = None,
    batch_size: int | None = None,
    prediction: str = "epsilon",
    alphas_cumprod: torch.Tensor | None = None,
    timestep_scale: float = 1.0,
) -> FastEps:
    """The UNet as a fast eps model: the noise whatever it predicts (prediction, with the model's
    alphas_cumprod; see FastEps). compile_mode None: eager; otherwise one of torch.compile's
    COMPILE_MODES. The caller's UNet is never changed: a copy is made when the device, precision,
    memory layout or training mode must change."""
    if prediction != "epsilon" and alphas_cumprod is None:
        raise ValueError(f"a network predicting {prediction!r} needs the schedule's alphas_cumprod")
    check_compile_mode(compile_mode)
    precision = resolve_precision(precision, device)
    if device.type == "cuda":
        set_matmul_precision(precision)
    dtype = DTYPES[precision]
    channels_last = device.type == "cuda"
    first = next(unet.parameters())
    if unet.training or first.dtype != dtype or first.device != device or channels_last:
        model = copy.deepcopy(unet).to(device=device, dtype=dtype).eval().requires_grad_(False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    else:
        model = unet
    eps = FastEps(model, dtype, channels_last, unet.config.in_channels, prediction, alphas_cumprod, timestep_scale,
                  unet.config)
    if compile_mode:
        use_persistent_compile_cache()
        eps.model = torch.compile(model, dynamic=False, fullgraph=True, mode=compile_mode)
        eps.fixed_batch = batch_size
        eps.cuda_graphs = compile_mode in ("reduce-overhead", "max-autotune")
    return eps


def use_persistent_compile_cache() -> None:
    """Keep Inductor's compiled kernels in ddimctl's cache rather than /tmp, so that later runs on
    this machine reuse them (the CIFAR-10 UNet: 44 s cold, 5 s warm on 2 CPU cores); a
    TORCHINDUCTOR_CACHE_DIR set by the user wins."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        inductor_default = os.path.abspath(default_cache_dir())
    except ImportError:  # older torch: leave Inductor's choice alone
        inductor_default = None
    # Importing parts of torch._dynamo already fills in the /tmp default: treat that as unset.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, inductor_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    if folder.exists() and not folder.is_dir():
        raise DdimctlError(f"TORCHINDUCTOR_CACHE_DIR={folder} is a file, not a folder; point it at a folder, or leave out "
                           f"{param('compile')}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DdimctlError(f"TORCHINDUCTOR_CACHE_DIR={folder}: cannot create it ({e.strerror}); point it at a "
                           f"writable folder, or leave out {param('compile')}") from e
    if not os.access(folder, os.W_OK):
        raise DdimctlError(f"TORCHINDUCTOR_CACHE_DIR={folder} is not writable; point it at a writable folder, or "
                           f"leave out {param('compile')}")


def warm_up(eps: FastEps, shape: tuple[int, ...], device: torch.device, calls: int = 3) -> float:
    """Run the model a few times (compiling, capturing graphs); return the seconds it took."""
    started = time.perf_counter()
    inputs = eps.config.example_inputs(shape[0], device)
    with torch.no_grad():
        for _ in range(calls):
            eps(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    eps.compile_seconds = time.perf_counter() - started
    return eps.compile_seconds


def auto_batch_size(unet: UNet, device: torch.device, precision: str, limit: int = 1024) -> int:
    """The largest power of two whose inference fits in about half of the free GPU memory."""
    if device.type != "cuda":
        return max(1, (16 * 32 * 32) // unet.config.resolution**2)
    probe = 8
    c = unet.config
    model = prepare(unet, device, precision)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        model(*c.example_inputs(probe, device))
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) / probe)
    del model
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(0.5 * free / per_image)
    size = 1
    while size * 2 <= min(fits, limit):
        size *= 2
    return size
