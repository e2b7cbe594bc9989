"""Every sampler on the bundled digits model at 5, 10, 20 and 50 network calls, several seeds each.

Two distances to the training digits, lower is better: the Frechet distance of the pixel statistics
(eval_digits.py's), and the Frechet distance in the hidden features of a small digit classifier
trained here on the training split (scikit-learn's MLP; its test accuracy is printed), which sees
strokes rather than pixels. Every cell uses the same x_T for image i of seed k. Then the skip study:
uniform against quad at 5 and 10 calls, the measurement behind each sampler's default --skip.

    python scripts/make_digits.py data/digits && python scripts/eval_samplers.py data/digits [--json docs/samplers-eval.json]

--timesteps-study scores every built-in timestep scheme, and the tuned files given with --tuned,
for the fast samplers at --study-calls, beside DDIM at 5 and 50 calls (docs/timesteps-eval.json):

    python scripts/eval_samplers.py data/digits --timesteps-study --tuned src/ddimctl/bundled/tuned/*.json \
        --json docs/timesteps-eval.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddimctl import data, metrics  # noqa: E402
from ddimctl.sampling import samplers, runners, timesteps  # noqa: E402
from ddimctl.models import loading  # noqa: E402

CALLS = (5, 10, 20, 50)


def digit_features(train: torch.Tensor, labels: list[int], test: torch.Tensor, test_labels: list[int]):
    """A function from [0, 1] images to the hidden features of an MLP digit classifier."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=400, random_state=0)
    clf.fit(train.flatten(1).numpy(), labels)
    accuracy = clf.score(test.flatten(1).numpy(), test_labels)
    w, b = clf.coefs_[0], clf.intercepts_[0]

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.maximum(x.flatten(1).double().numpy() @ w + b, 0.0))

    return features, accuracy


def labelled(folder: Path, resolution: int, channels: int) -> tuple[torch.Tensor, list[int]]:
    """The digits of make_digits.py's folders (one folder per digit), in [0, 1], with their labels."""
    images, labels = [], []
    for digit in sorted(p for p in folder.iterdir() if p.is_dir()):
        x = data.load_folder(digit, resolution, channels).float() / 255
        images.append(x)
        labels += [int(digit.name)] * len(x)
    return torch.cat(images), labels


def sample_cell(model, settings: samplers.Settings, n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    sampler = runners.Runner.create(model, settings, torch.device(device))
    x = torch.cat([x0.cpu() for _, x0 in sampler.sample_indices(list(range(n)), seed, 512)])
    return ((x + 1) / 2).clamp(0, 1).mul(255).round().div(255)  # the 8-bit images a user gets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path, help="Folder written by scripts/make_digits.py")
    parser.add_argument("-n", type=int, default=360, help="Samples per cell and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-study", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--timesteps-study", action="store_true", help="Only the timestep schemes and tuned files")
    parser.add_argument("--tuned", type=Path, nargs="*", default=[], help="tune-steps files to score")
    parser.add_argument("--study-calls", default="5,10", help="Network calls of the timesteps study")
    parser.add_argument("--study-samplers", default="unipc,dpm++2m,ipndm")
    args = parser.parse_args()

    model = loading.load_model(args.model)
    c = model.config
    train, train_labels = labelled(args.digits / "train", c.resolution, c.in_channels)
    test, test_labels = labelled(args.digits / "test", c.resolution, c.in_channels)
    features, accuracy = digit_features(train, train_labels, test, test_labels)
    ref_pixels, ref_features = metrics.gaussian_stats(train), metrics.gaussian_stats(features(train))
    floor = {"pixels": metrics.frechet_distance(*metrics.gaussian_stats(test), *ref_pixels),
             "features": metrics.frechet_distance(*metrics.gaussian_stats(features(test)), *ref_features)}
    print(f"classifier test accuracy {accuracy:.3f}; floor (test split vs train split): pixels {floor['pixels']:.3f}, "
          f"features {floor['features']:.3f}", flush=True)
    report = {"model": args.model, "n": args.n, "seeds": args.seeds, "classifier_accuracy": accuracy,
              "floor": floor, "cells": [], "skip_study": []}

    def score(settings: samplers.Settings) -> dict:
        started = time.perf_counter()
        pixels_fd, features_fd = [], []
        for seed in range(args.seeds):
            x = sample_cell(model, settings, args.n, seed)
            pixels_fd.append(metrics.frechet_distance(*metrics.gaussian_stats(x), *ref_pixels))
            features_fd.append(metrics.frechet_distance(*metrics.gaussian_stats(features(x)), *ref_features))
        cell = {"sampler": settings.sampler, "eta": settings.eta, "steps": settings.steps, "skip": settings.skip,
                "pixels": statistics.mean(pixels_fd), "pixels_std": statistics.stdev(pixels_fd),
                "features": statistics.mean(features_fd), "features_std": statistics.stdev(features_fd),
                "seconds": time.perf_counter() - started}
        print(f"{settings.label():12s} S={settings.steps:3d} skip={settings.skip:7s}  pixels {cell['pixels']:.3f} "
              f"+- {cell['pixels_std']:.3f}  features {cell['features']:.3f} +- {cell['features_std']:.3f}  "
              f"({cell['seconds']:.0f}s)", flush=True)
        return cell

    if args.timesteps_study:
        timesteps_study(args, model, score, report)
        return
    runs = [("ddim", 0.0), ("ddim", 1.0), *[(name, 0.0) for name in samplers.SAMPLERS if name != "ddim"]]
    for name, eta in runs:  # each sampler with its default skip for this model
        for calls in CALLS:
            report["cells"].append(score(samplers.Settings(name, calls, None, eta).for_model(1000, model.skip)))
    report["cells"].append(score(samplers.Settings("ddim", 100, None).for_model(1000, model.skip)))
    if args.skip_study:  # the other scheme at 5 and 10 calls: what the defaults were chosen by
        for name in samplers.SAMPLERS:
            default = samplers.Settings(name, 5).for_model(1000, model.skip).skip
            for calls in (5, 10):
                other = "quad" if default == "uniform" else "uniform"
                report["skip_study"].append(score(samplers.Settings(name, calls, other)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    print("\n| sampler | " + " | ".join(f"{k} calls" for k in CALLS) + " |\n|---|" + "---|" * len(CALLS))
    for name, eta in runs:
        label = samplers.Settings(name, 5, None, eta).label()
        cells = [c for c in report["cells"] if c["sampler"] == name and c["eta"] == eta and c["steps"] in CALLS]
        print(f"| {label} | " + " | ".join(f"{c['features']:.2f} +- {c['features_std']:.2f}" for c in cells) + " |")


def timesteps_study(args, model, score, report) -> None:
    """Every scheme of timesteps.SCHEMES and every tuned file, for the study's samplers and calls."""
    report["timesteps_study"] = []
    for calls in (5, 50):
        report["timesteps_study"].append(score(samplers.Settings("ddim", calls).for_model(1000, model.skip)))
    for name in args.study_samplers.split(","):
        for calls in map(int, args.study_calls.split(",")):
            for scheme in timesteps.SCHEMES:
                settings = samplers.Settings(name, calls, scheme)
                if len(settings.timesteps(model.alphas_cumprod)) == calls - settings.spec.extra_calls:
                    report["timesteps_study"].append(score(settings))
    for path in args.tuned:
        tuned = timesteps.read_tuned(path)
        tuned.check(args.model, model.weights_sha256, tuned.sampler)
        cell = score(samplers.Settings(tuned.sampler, tuned.steps, timesteps.canonical(tuned.timesteps)))
        report["timesteps_study"].append({**cell, "tuned_file": str(path)})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
