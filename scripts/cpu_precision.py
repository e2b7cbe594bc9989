#!/usr/bin/env python3
"""How far bf16 sampling drifts from fp32 on the CPU: PSNR of bf16 against fp32 images from the same
noise (per-image seeds), for the bundled digits model and the CIFAR-10 architecture (random weights:
no trained CIFAR-10 weights offline), at S = 10 and 50, eta = 0 and 1; median and minimum over the
images, and whether any output was non-finite. Also the time of each run.

    python scripts/cpu_precision.py [-n 64] [--json out.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddimctl.models import boundary, families, loading  # noqa: E402
from ddimctl import metrics  # noqa: E402
from ddimctl.sampling import samplers, runners  # noqa: E402
from ddimctl.models.unet import PRESETS, UNet  # noqa: E402


def run(model, steps: int, eta: float, precision: str, n: int, batch: int) -> tuple[torch.Tensor, float]:
    eps = boundary.prepare(model.unet, torch.device("cpu"), precision)
    sampler = runners.Runner.create(model, samplers.Settings("ddim", steps, "uniform", eta), torch.device("cpu"), eps_model=eps)
    started = time.perf_counter()
    x = torch.cat([x0 for _, x0 in sampler.sample_indices(list(range(n)), 0, batch)])
    return x, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--models", default="digits,cifar10")
    parser.add_argument("--steps", default="10,50")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"processor native bf16: {boundary.cpu_has_native_bf16()}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.models.split(","):
        if name == "cifar10":
            torch.manual_seed(0)
            model = loading.LoadedModel(UNet(PRESETS["cifar10"]).eval(), "cifar10-random", "random", dict(families.DEFAULT_SCHEDULE), "uniform")
            batch = 16
        else:
            model, batch = loading.load_model(name), 64
        for steps in [int(s) for s in args.steps.split(",")]:
            for eta in (0.0, 1.0):
                ref, t32 = run(model, steps, eta, "fp32", args.n, batch)
                low, t16 = run(model, steps, eta, "bf16", args.n, batch)
                psnr = metrics.psnr_per_image(low, ref)
                row = {"model": model.name, "steps": steps, "eta": eta, "n": args.n, "psnr_median": float(psnr.median()),
                       "psnr_min": float(psnr.min()), "finite": bool(torch.isfinite(low).all()),
                       "fp32_s": t32, "bf16_s": t16}
                rows.append(row)
                print(f"{model.name} S={steps} eta={eta:g}: PSNR bf16 vs fp32 median {row['psnr_median']:.1f} dB, "
                      f"min {row['psnr_min']:.1f} dB, finite {row['finite']}; fp32 {t32:.1f}s, bf16 {t16:.1f}s "
                      f"({t32 / t16:.2f}x)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
