#!/usr/bin/env python3
"""The README's digits figures, from the bundled model: eta = 0 beside eta = 1 (64 samples, S = 20,
the same seeds), every sampler at 5 network calls beside DDIM at 100, plain and exact reconstructions and an interpolation of the test digits three and
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

from ddimctl.io import images  # noqa: E402
from ddimctl.sampling import samplers, runners  # noqa: E402
from ddimctl.models import loading  # noqa: E402

THREE, SEVEN = ROOT / "tests" / "data" / "digit-three.png", ROOT / "tests" / "data" / "digit-seven.png"


def eta_figure(path: Path, steps: int = 20, count: int = 64, scale: int = 3) -> None:
    model = loading.load_model("digits")
    grids = []
    for eta in (0.0, 1.0):
        sampler = runners.Runner.create(model, samplers.Settings("ddim", steps, eta=eta), torch.device("cpu"))
        x0 = runners.sample_batches(sampler, count, 0)
        grids.append(images.grid(images.to_uint8(x0)))
    gap = torch.zeros((grids[0].shape[0], 8, grids[0].shape[2]), dtype=torch.uint8)
    images.save_image(images.enlarge(torch.cat([grids[0], gap, grids[1]], dim=1), scale), path)


def samplers_figure(path: Path, count: int = 36, scale: int = 3) -> None:
    """The same 36 x_T through every sampler at 5 network calls, beside DDIM at 100: one labelled
    grid per sampler, left to right."""
    from PIL import Image, ImageDraw

    model = loading.load_model("digits")
    panels = [("ddim, 100 calls", samplers.Settings("ddim", 100))]
    panels += [(f"{name}, 5 calls", samplers.Settings(name, 5)) for name in samplers.SAMPLERS]
    tiles = []
    for label, settings in panels:
        sampler = runners.Runner.create(model, settings, torch.device("cpu"))
        grid = images.grid(images.to_uint8(runners.sample_batches(sampler, count, 0)))
        tile = images.to_pil(images.enlarge(grid, scale))
        band = Image.new("L", (tile.width, tile.height + 14), 255)
        band.paste(tile, (0, 14))
        ImageDraw.Draw(band).text((4, 1), label, fill=0)
        tiles.append(band)
    columns = 4
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("L", (columns * (tiles[0].width + 8), rows * (tiles[0].height + 8)), 255)
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (tile.width + 8), (i // columns) * (tile.height + 8)))
    sheet.save(path)


def ddimctl(*args) -> None:
    print("$ ddimctl " + " ".join(str(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path, help="Folder written by scripts/make_digits.py (for the edit demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    eta_figure(args.out / "digits-eta.png")
    samplers_figure(args.out / "digits-samplers.png")
    common = [THREE, SEVEN, "--model", "digits"]
    ddimctl("reconstruct", *common, "--steps", "10,20,50,100,200", "--scale", 4, "--out", args.out / "digits-recon.png")
    ddimctl("reconstruct", *common, "--steps", "10,20,50", "--exact", "--scale", 4, "--out", args.out / "digits-recon-exact.png")
    ddimctl("interpolate", *common, "--steps", "20", "--frames", "8", "--exact", "--scale", 4, "--out", args.out / "digits-interp.png")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "edit_demo.py"), str(args.digits),
                    "--figure", str(args.out / "digits-edit.png")], check=True)


if __name__ == "__main__":
    main()
