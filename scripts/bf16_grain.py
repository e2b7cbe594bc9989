"""Which samplers bf16 leaves as fp32 would, to the eye, on the bundled digits model (README, Precision).

For each (sampler, skip, S): 128 digits sampled in fp32 and in bf16 on the CPU from the same x_T,
their PSNR (median, minimum) and the mean absolute difference of horizontal neighbours ("contrast":
grain raises it; the training digits: 0.138). Then, for plms and ddim on the uniform grid at 10 calls,
the PSNR when a single network call is made in bf16: where the rounding grows.

The bf16 cells run with run_precision's fp32 rule switched off (they are what that rule is decided from).

    python scripts/bf16_grain.py [--json docs/bf16-grain.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddimctl.sampling import ddim, samplers, solvers, timesteps  # noqa: E402
from ddimctl.models import loading  # noqa: E402

CELLS = [("plms", "uniform", s) for s in (5, 8, 10, 12, 15, 20)] + [
    ("plms", "quad", 10), ("ipndm", "uniform", 10), ("ipndm", "uniform", 20), ("ipndm", "quad", 5), ("ipndm", "quad", 10),
    ("ddim", "uniform", 10), ("dpm++2m", "quad", 5), ("unipc", "quad", 5)]


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1).mul(255).round().div(255)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (to_8bit(a) - to_8bit(b)).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1 / mse)


def contrast(x: torch.Tensor) -> float:
    pixels = to_8bit(x)
    return (pixels[..., 1:] - pixels[..., :-1]).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = loading.load_model("digits")
    cpu = torch.device("cpu")
    nets = {p: model.noise_model(cpu, p) for p in ("fp32", "bf16")}
    abar = model.alphas_cumprod
    x_T = torch.randn((args.n, *model.image_shape), generator=torch.Generator().manual_seed(0))
    rows = []
    for sampler, skip, steps in CELLS:
        settings = samplers.Settings(sampler, steps, skip)
        ts = timesteps.sequence(skip, steps - settings.spec.extra_calls, abar)
        fn = settings.spec.function
        a, b = fn(nets["fp32"], x_T, abar, ts), fn(nets["bf16"], x_T, abar, ts)
        p = psnr(a, b)
        row = {"sampler": sampler, "skip": skip, "steps": steps, "psnr_median": p.median().item(), "psnr_min": p.min().item(),
               "contrast_fp32": contrast(a), "contrast_bf16": contrast(b), "fp32_by_rule": not settings.half_precision_ok}
        rows.append(row)
        print(json.dumps(row), flush=True)
    single = {}
    for name, fn, steps in (("plms", solvers.sample_plms, 9), ("ddim", ddim.sample, 10)):
        ts = timesteps.sequence("uniform", steps, abar)
        reference = fn(nets["fp32"], x_T, abar, ts)
        single[name] = {}
        for k in map(int, ts):
            def one_call_in_bf16(x, t, k=k):
                return nets["bf16" if int(t[0]) == k else "fp32"](x, t)
            single[name][k] = psnr(reference, fn(one_call_in_bf16, x_T, abar, ts)).median().item()
        print(name, {k: round(v, 1) for k, v in single[name].items()}, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": "digits", "n": args.n, "cells": rows, "single_call_bf16_psnr_median": single},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
