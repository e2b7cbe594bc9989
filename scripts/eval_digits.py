"""The bundled `digits` model's own small Table 1: the Frechet distance between the pixel statistics
of its samples and of real digits, for eta = 0 and 1 at S = 10, 20, 50, 100. The floor is the
distance between the real data's own train and test splits.

    python scripts/make_digits.py data/digits && python scripts/eval_digits.py data/digits [-n 1437]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddimctl import data, generate, metrics, weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path, help="Folder written by scripts/make_digits.py")
    parser.add_argument("-n", type=int, default=360, help="Samples per cell (default: the test split size, so the floor is comparable)")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model = weights.load_model(args.model)
    c = model.config
    to_unit = lambda x: x.float() / 255  # noqa: E731
    train = to_unit(data.load_folder(args.digits / "train", c.resolution, c.in_channels))
    test = to_unit(data.load_folder(args.digits / "test", c.resolution, c.in_channels))
    train_stats = metrics.gaussian_stats(train)
    floor = metrics.frechet_distance(*metrics.gaussian_stats(test), *train_stats)
    print(f"floor: FD(test split, train split) = {floor:.3f}  ({len(test)} vs {len(train)} images)")
    rows = {"floor": floor, "cells": []}
    for eta in (0.0, 1.0):
        for steps in (10, 20, 50, 100):
            started = time.perf_counter()
            sampler = generate.Sampler.create(model, steps, "uniform", torch.device("cpu"), eta=eta)
            x = torch.cat([x0 for _, x0 in sampler.sample_indices(list(range(args.n)), 0, 500)])
            pixels = ((x + 1) / 2).clamp(0, 1)
            pixels = (pixels * 255).round() / 255  # the 8-bit images a user gets
            fd = metrics.frechet_distance(*metrics.gaussian_stats(pixels), *train_stats)
            rows["cells"].append({"eta": eta, "steps": steps, "fd": fd})
            print(f"eta={eta:g} S={steps:3d}: FD to train = {fd:.3f}  ({time.perf_counter() - started:.0f}s)", flush=True)
    print("\n| eta | S = 10 | S = 20 | S = 50 | S = 100 |\n|---|---|---|---|---|")
    for eta in (0.0, 1.0):
        cells = [f"{r['fd']:.2f}" for r in rows["cells"] if r["eta"] == eta]
        print(f"| {eta:g} | " + " | ".join(cells) + " |")
    print(f"\nfloor (real test split vs train split): {floor:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
