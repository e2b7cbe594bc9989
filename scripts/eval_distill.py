"""Distilled students of the bundled digits model against DDIM at 50 calls and every training-free
sampler at the same few calls, in eval_samplers.py's metric (Frechet distances to the training
digits in a classifier's features and in pixels; 360 samples x 3 seeds, the same x_T for image i of
seed k in every cell).

    python scripts/make_digits.py data/digits
    ddimctl distill --model digits --steps 2 --out runs/digits-2step        # (the README's commands)
    python scripts/eval_distill.py data/digits runs/digits-1step runs/digits-2step --json docs/distill-digits.json

--checkpoints also scores each run's every kept checkpoint (the student's distance against its
updates); --baselines 0 leaves the training-free samplers out.
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from eval_samplers import digit_features, labelled, sample_cell  # noqa: E402

from ddimctl import metrics  # noqa: E402
from ddimctl.models import loading, runs  # noqa: E402
from ddimctl.sampling import runners, samplers  # noqa: E402

BASELINE_CALLS = (1, 2, 3, 4)


def run_seconds(run: Path) -> float | None:
    """The distillation's own time, from train.log's last rate line (updates x batch / images per s)."""
    lines = [line for line in (run / runs.LOG).read_text().splitlines() if line.startswith("step=")]
    if not lines:
        return None
    step, rate = (float(re.search(pattern, lines[-1]).group(1)) for pattern in (r"step=(\d+)", r"images_per_s=([\d.]+)"))
    batch = json.loads((run / runs.CONFIG).read_text())["train"]["batch_size"]
    return step * batch / rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path, help="Folder written by scripts/make_digits.py")
    parser.add_argument("runs", type=Path, nargs="*", help="Student run folders of `ddimctl distill`")
    parser.add_argument("-n", type=int, default=360)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--baselines", type=int, default=1)
    parser.add_argument("--checkpoints", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu", help="Where the cells are sampled (fp32 either way)")
    args = parser.parse_args()

    teacher = loading.load_model("digits")
    c = teacher.config
    train, train_labels = labelled(args.digits / "train", c.resolution, c.in_channels)
    test, test_labels = labelled(args.digits / "test", c.resolution, c.in_channels)
    features, accuracy = digit_features(train, train_labels, test, test_labels)
    reference = metrics.gaussian_stats(features(train)), metrics.gaussian_stats(train)
    report = {"n": args.n, "seeds": args.seeds, "classifier_accuracy": accuracy, "cells": []}

    def score(model, settings: samplers.Settings, label: str, **extra) -> None:
        feats, pixels = [], []
        for seed in range(args.seeds):
            x = sample_cell(model, settings, args.n, seed, args.device)
            feats.append(metrics.frechet_distance(*metrics.gaussian_stats(features(x)), *reference[0]))
            pixels.append(metrics.frechet_distance(*metrics.gaussian_stats(x), *reference[1]))
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        spread = lambda v: (sum((a - mean(v)) ** 2 for a in v) / max(len(v) - 1, 1)) ** 0.5  # noqa: E731
        cell = {"label": label, "calls": settings.steps, "sampler": settings.sampler, "skip": settings.skip,
                "features": mean(feats), "features_std": spread(feats), "pixels": mean(pixels), **extra}
        report["cells"].append(cell)
        print(f"{label:40s} calls {settings.steps}  features {cell['features']:.2f} +- {cell['features_std']:.2f}  "
              f"pixels {cell['pixels']:.3f}", flush=True)

    score(teacher, samplers.Settings("ddim", 50, "uniform"), "ddim, uniform, 50 calls")
    for run in args.runs:
        paths = runs.checkpoint_files(run) if args.checkpoints else [runs.checkpoint_files(run)[-1]]
        for path in paths:
            student = loading.load_model(str(path))
            settings = runners.settings_for(student, samplers.Settings(), steps_given=False)
            score(student, settings, f"student {run.name} @ {runs.step_of(path)}", run=str(run),
                  updates=runs.step_of(path), seconds=run_seconds(run) if path == paths[-1] else None)
    if args.baselines:
        for calls in BASELINE_CALLS:
            for name, spec in samplers.SAMPLERS.items():
                if calls < spec.min_steps:
                    continue
                for skip in dict.fromkeys([samplers.Settings(name, calls).for_model(1000, teacher.skip).skip, "trailing"]):
                    settings = samplers.Settings(name, calls, skip)
                    if len(settings.timesteps(teacher.alphas_cumprod)) == calls - spec.extra_calls:
                        score(teacher, settings, f"{name}, {skip}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
