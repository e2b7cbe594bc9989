"""The bundled `digits` model's own small Tables 1 and 2.

Table 1: the Frechet distance between the pixel statistics of its samples and of real digits, for
eta = 0 and 1 at S = 10, 20, 50, 100; every cell is sampled with the same --seeds (image i of seed k
has the same x_T in every cell), and the spread over seeds is the metric's noise. The floor is the
distance between the real data's own train and test splits.
Table 2: plain DDIM invert-then-sample of test-split digits, MSE per pixel on [0, 1], per S.
Broken tiles (all black, all white, or noise-like) are counted in every cell, and faint ones (no
pixel as bright as 0.8, where every training digit reaches 0.9).

    python scripts/make_digits.py data/digits && python scripts/eval_digits.py data/digits [-n 360] [--seeds 5]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddimctl import data, metrics  # noqa: E402
from ddimctl.sampling import samplers, runners  # noqa: E402
from ddimctl.models import loading  # noqa: E402

STEPS = (10, 20, 50, 100)


def broken_tiles(pixels: torch.Tensor) -> int:
    """Tiles a person would call broken: nearly all black, nearly all white, or salt-and-pepper noise
    (mean absolute difference between horizontal neighbours above any real digit's)."""
    flat = pixels.flatten(1)
    black = flat.max(1).values < 0.1
    white = flat.min(1).values > 0.9
    noisy = (pixels[..., 1:] - pixels[..., :-1]).abs().flatten(1).mean(1) > 0.3
    return int((black | white | noisy).sum())


def sample_cell(model, steps: int, eta: float, n: int, seed: int, device: torch.device) -> torch.Tensor:
    sampler = runners.Runner.create(model, samplers.Settings("ddim", steps, "uniform", eta), device)
    x = torch.cat([x0 for _, x0 in sampler.sample_indices(list(range(n)), seed, 512)])
    return ((x + 1) / 2).clamp(0, 1).mul(255).round().div(255)  # the 8-bit images a user gets


def faint_tiles(pixels: torch.Tensor) -> int:
    """Tiles whose brightest pixel is below 0.8: every training digit reaches at least 0.9."""
    return int((pixels.flatten(1).max(1).values < 0.8).sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path, help="Folder written by scripts/make_digits.py")
    parser.add_argument("-n", type=int, default=360, help="Samples per cell and seed (default: the test split size)")
    parser.add_argument("--seeds", type=int, default=5, help="Seeds per cell (0, 1, ...); their spread is the noise")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recon", type=int, default=20, help="Test digits for the reconstruction table")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    model = loading.load_model(args.model)
    c = model.config
    train = data.load_folder(args.digits / "train", c.resolution, c.in_channels).float() / 255
    test = data.load_folder(args.digits / "test", c.resolution, c.in_channels).float() / 255
    train_stats = metrics.gaussian_stats(train)
    floor = metrics.frechet_distance(*metrics.gaussian_stats(test), *train_stats)
    print(f"floor: FD(test split, train split) = {floor:.3f}  ({len(test)} vs {len(train)} images)")
    rows = {"model": args.model, "n": args.n, "seeds": args.seeds, "floor": floor, "cells": [], "recon": []}
    for eta in (0.0, 1.0):
        for steps in STEPS:
            started = time.perf_counter()
            fds, broken, faint = [], [], []
            for seed in range(args.seeds):
                pixels = sample_cell(model, steps, eta, args.n, seed, device)
                fds.append(metrics.frechet_distance(*metrics.gaussian_stats(pixels), *train_stats))
                broken.append(broken_tiles(pixels))
                faint.append(faint_tiles(pixels))
            mean, std = statistics.mean(fds), statistics.stdev(fds) if len(fds) > 1 else 0.0
            rows["cells"].append({"eta": eta, "steps": steps, "fd": mean, "fd_std": std, "fd_seeds": fds,
                                  "broken": broken, "faint": faint})
            print(f"eta={eta:g} S={steps:3d}: FD {mean:.3f} +- {std:.3f} over {args.seeds} seed(s), broken {broken}, "
                  f"faint {faint}  ({time.perf_counter() - started:.0f}s)", flush=True)

    x_0 = test[: args.recon] * 2 - 1
    for steps in STEPS:
        sampler = runners.Runner.create(model, samplers.Settings("ddim", steps, "uniform"), device)
        back = sampler.sample(sampler.invert(x_0)[0], None).cpu()
        mse = ((back + 1) / 2).clamp(0, 1).sub((x_0 + 1) / 2).pow(2).flatten(1).mean(1)
        rows["recon"].append({"steps": steps, "mse_mean": float(mse.mean()), "mse_max": float(mse.max())})

    print("\n| eta | " + " | ".join(f"S = {s}" for s in STEPS) + " |\n|---|---|---|---|---|")
    for eta in (0.0, 1.0):
        cells = [f"{r['fd']:.2f} +- {r['fd_std']:.2f}" for r in rows["cells"] if r["eta"] == eta]
        print(f"| {eta:g} | " + " | ".join(cells) + " |")
    total = args.n * args.seeds
    print(f"\nFD: mean +- standard deviation over {args.seeds} seed(s) of {args.n} samples; floor (real test split vs "
          f"train split): {floor:.2f}; broken tiles: {sum(sum(r['broken']) for r in rows['cells'])}, faint tiles: "
          f"{sum(sum(r['faint']) for r in rows['cells'])} in all {len(rows['cells'])} cells of {total} samples")
    print(f"\nreconstruction of {len(x_0)} test digits, MSE on [0, 1]: " + ", ".join(
        f"S={r['steps']}: {r['mse_mean']:.5f} (max {r['mse_max']:.4f})" for r in rows["recon"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
