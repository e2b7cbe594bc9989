#!/usr/bin/env python3
"""Plain and exact DDIM inversion of two fixed sets of 20 test-split digits: A, the first 20 files
of data/digits/test in sorted order, and B, the next 20. Round-trip MSE per pixel on [0, 1] after
8-bit rounding's clamp, and network calls per image of the inversion, at S = 10 and 20.

    python scripts/make_digits.py data/digits && python scripts/exact_inversion.py data/digits [--json F]

--skips uniform,trailing,... repeats it on other timesteps (any --skip value, explicit lists with ';'
between them), to see whether they make exact inversion cheaper.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddimctl import data  # noqa: E402
from ddimctl.sampling import samplers, runners  # noqa: E402
from ddimctl.models import loading  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skips", default="uniform", help="Timesteps to compare, e.g. uniform;trailing;quad")
    parser.add_argument("--steps", default="10,20")
    parser.add_argument("--max-iters", type=int, default=runners.ExactInversion().max_iters)
    args = parser.parse_args()
    model = loading.load_model("digits")
    test = data.load_folder(args.digits / "test", 16, 1).float() / 127.5 - 1  # sorted file order
    sets = {"A": test[:20], "B": test[20:40]}
    rows = []
    for name, x_0 in sets.items():
        for steps, skip in [(int(s), k) for s in args.steps.split(",") for k in args.skips.split(";")]:
            sampler = runners.Runner.create(model, samplers.Settings("ddim", steps, skip), torch.device("cpu"))
            for how in (None, runners.ExactInversion(max_iters=args.max_iters)):
                with torch.no_grad():
                    x_T, calls = sampler.invert(x_0, exact=how)
                    back = sampler.sample(x_T, None)
                mse = float((((back + 1) / 2).clamp(0, 1) - (x_0 + 1) / 2).pow(2).mean())
                rows.append({"set": name, "steps": steps, "skip": skip, "inversion": "exact" if how else "plain",
                             "mse": mse, "calls": calls})
                print(f"set {name} S={steps} {skip} {rows[-1]['inversion']:5s}: MSE {mse:.2e}, {calls} calls per image "
                      f"({calls / steps:.1f} S)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
