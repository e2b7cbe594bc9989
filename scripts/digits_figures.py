#!/usr/bin/env python3
"""The README's digits figures, from the bundled model: eta = 0 beside eta = 1 (64 samples, S = 20,
the same seeds), plain and exact reconstructions and an interpolation of the test digits three and
seven (the commands a user types; their tables are printed), and the edit demo.

    python scripts/make_digits.py data/digits && python scripts/digits_figures.py data/digits [--out docs]
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddimctl import images, samplers, sampling, weights  # noqa: E402

THREE, SEVEN = ROOT / "tests" / "data" / "digit-three.png", ROOT / "tests" / "data" / "digit-seven.png"


def eta_figure(path: Path, steps: int = 20, count: int = 64, scale: int = 3) -> None:
    model = weights.load_model("digits")
    grids = []
    for eta in (0.0, 1.0):
        sampler = sampling.Sampler.create(model, samplers.Settings("ddim", steps, eta=eta), torch.device("cpu"))
        x0 = sampling.sample_batches(sampler, count, 0)
        grids.append(images.grid(images.to_uint8(x0)))
    gap = torch.zeros((grids[0].shape[0], 8, grids[0].shape[2]), dtype=torch.uint8)
    images.save_image(images.enlarge(torch.cat([grids[0], gap, grids[1]], dim=1), scale), path)


def ddimctl(*args) -> None:
    print("$ ddimctl " + " ".join(str(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path, help="Folder written by scripts/make_digits.py (for the edit demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    eta_figure(args.out / "digits-eta.png")
    common = [THREE, SEVEN, "--model", "digits"]
    ddimctl("reconstruct", *common, "--steps", "10,20,50,100,200", "--scale", 4, "--out", args.out / "digits-recon.png")
    ddimctl("reconstruct", *common, "--steps", "10,20,50", "--exact", "--scale", 4, "--out", args.out / "digits-recon-exact.png")
    ddimctl("interpolate", *common, "--steps", "20", "--frames", "8", "--exact", "--scale", 4, "--out", args.out / "digits-interp.png")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "edit_demo.py"), str(args.digits),
                    "--figure", str(args.out / "digits-edit.png")], check=True)


if __name__ == "__main__":
    main()
