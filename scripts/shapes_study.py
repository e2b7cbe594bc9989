"""How many training steps a small data set of coloured shapes needs, and which sample grid shows it.

A new user's first own model: a few hundred PNGs of one coloured shape (circle, square, triangle) on
a plain background, the default preset, a few hundred to a few thousand steps. This script makes such
a data set, trains on it with `ddimctl train` (checkpoints every --save-every steps) and scores every
checkpoint's samples for several sampler settings by the share of samples a person would call "a
shape on a background":

- two colours explain the image: a 2-means clustering of its pixels leaves an RMS residual under
  0.15 (on [0, 1]; the training images leave 0, the same blurred by a 3x3 box 0.13, with noise of
  standard deviation 0.08 per channel 0.13; uniform colour noise 0.3 and more),
- the two colours differ (centroid distance over 0.25), and
- the smaller cluster covers 3-60% of the image (a flat colour field has no shape), and
- it is one blob: its largest 4-connected piece holds at least 80% of its pixels (specks are no shape).

    python scripts/shapes_study.py data/shapes runs/shapes [--steps 4000] [--save-every 500] [--json F]
"""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddimctl.models import runs, loading  # noqa: E402
from ddimctl.sampling import samplers, runners  # noqa: E402

SIZE = 32
CELLS = (("ddim", 50, 0.0, False), ("ddim", 50, 1.0, False), ("ddim", 50, 0.0, True), ("ddim", 50, 1.0, True))
# (sampler, S, eta, x0 clipped)


def make_shapes(folder: Path, count: int, seed: int = 0) -> None:
    """`count` PNGs of SIZE px: one shape of random kind, size, place and colour on a plain background."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        background = tuple(rng.randrange(256) for _ in range(3))
        while True:
            colour = tuple(rng.randrange(256) for _ in range(3))
            if sum(abs(a - b) for a, b in zip(colour, background)) > 200:  # visible on its background
                break
        img = Image.new("RGB", (SIZE, SIZE), background)
        draw = ImageDraw.Draw(img)
        r = rng.uniform(5, 12)
        cx, cy = rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r)
        kind = rng.choice(("circle", "square", "triangle"))
        if kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        img.save(folder / f"shape-{i:04d}.png")


def two_colour_split(pixels: torch.Tensor, iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-means of each image's pixels (N, 3, H, W) in [0, 1]: RMS residual, centroid distance and the
    smaller cluster's share, each (N,)."""
    x = pixels.flatten(2).transpose(1, 2)  # (N, P, 3)
    far = (x - x.mean(1, keepdim=True)).norm(dim=2).argmax(1)
    c0 = x[torch.arange(len(x)), far]  # start from the pixel farthest from the mean, and the farthest from it
    c1 = x[torch.arange(len(x)), (x - c0[:, None]).norm(dim=2).argmax(1)]
    for _ in range(iterations):
        to_c1 = (x - c1[:, None]).norm(dim=2) < (x - c0[:, None]).norm(dim=2)
        weight = to_c1.float().unsqueeze(2)
        c1 = (x * weight).sum(1) / weight.sum(1).clamp(min=1)
        c0 = (x * (1 - weight)).sum(1) / (1 - weight).sum(1).clamp(min=1)
    nearest = torch.where(to_c1.unsqueeze(2), c1[:, None], c0[:, None])
    residual = (x - nearest).pow(2).sum(2).mean(1).sqrt()
    share = to_c1.float().mean(1)
    smaller = torch.where((share <= 0.5)[:, None], to_c1, ~to_c1).view(len(x), *pixels.shape[2:])
    return residual, (c1 - c0).norm(dim=1), torch.minimum(share, 1 - share), smaller


def one_blob(mask: torch.Tensor) -> bool:
    """Whether the largest 4-connected piece of a (H, W) mask holds at least 80% of its pixels."""
    pieces, count = ndimage.label(mask.numpy())
    if count == 0:
        return False
    return numpy.bincount(pieces.ravel())[1:].max() >= 0.8 * mask.sum().item()


def shape_share(pixels: torch.Tensor) -> float:
    """The share of images that are a shape on a background (the module docstring's four tests)."""
    residual, distance, minority, smaller = two_colour_split(pixels)
    ok = (residual < 0.15) & (distance > 0.25) & (minority > 0.03) & (minority < 0.6)
    return sum(bool(o) and one_blob(m) for o, m in zip(ok, smaller)) / len(ok)


def sample_pixels(model, sampler: str, steps: int, eta: float, clip: bool, n: int, seed: int) -> torch.Tensor:
    runner = runners.Runner.create(model, samplers.Settings(sampler, steps, "uniform", eta, clip=clip), torch.device("cpu"))
    x = torch.cat([x0 for _, x0 in runner.sample_indices(list(range(n)), seed, 64)])
    return ((x + 1) / 2).clamp(0, 1).mul(255).round().div(255)  # the 8-bit images a user gets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--count", type=int, default=200, help="Training images")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--preset", default="small")
    parser.add_argument("-n", type=int, default=32, help="Samples per cell")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.data.exists():
        make_shapes(args.data, args.count)
    real = torch.stack([torch.from_numpy(numpy.array(Image.open(p))).permute(2, 0, 1)
                        for p in sorted(args.data.glob("*.png"))]).float() / 255
    result = {"data": {"count": args.count, "size": SIZE, "shape_share": shape_share(real)}, "checkpoints": []}
    print(f"training images: {result['data']['shape_share']:.0%} are a shape on a background", flush=True)
    if not args.run.exists():
        subprocess.run([sys.executable, "-m", "ddimctl", "train", str(args.data), "--out", str(args.run),
                        "--preset", args.preset, "--steps", str(args.steps), "--save-every", str(args.save_every),
                        "--keep", str(args.steps // args.save_every), "--sample-count", "0"], check=True)
    for checkpoint in runs.checkpoint_files(args.run):
        model = loading.load_model(str(checkpoint))
        row = {"step": runs.step_of(checkpoint)}
        for sampler, steps, eta, clip in CELLS:
            cell = f"{sampler} S={steps} eta={eta:g}{' clip' if clip else ''}"
            row[cell] = shape_share(sample_pixels(model, sampler, steps, eta, clip, args.n, 0))
        result["checkpoints"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
