#!/usr/bin/env python3
"""Train candidates for the bundled `digits` model side by side within a time budget, then score each
with scripts/eval_digits.py. Made for one call on a lent GPU, where the small model is bound by kernel
launches and several runs share the card; it runs on a CPU too (slowly).

    python scripts/make_digits.py data/digits
    python scripts/train_digits.py data/digits --seconds 180 --out results/

Each candidate is a plain `ddimctl train` command (printed, and kept in results.json). Its step count
is set from a short probe of all candidates running together, so that the cosine learning-rate
schedule ends at the budget. Written to --out: results.json (commands, evaluation tables, a thinned
loss log) and each candidate's EMA weights as digits-NAME.safetensors, the bundled file's format.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}

COMMON = ["--preset", "digits", "--no-flip", "--lr-schedule", "cosine", "--warmup", "500", "--keep", "1", "--seed", "0"]
CANDIDATES = {
    "b128-lr4e-4-ema9995": ["--batch-size", "128", "--lr", "4e-4", "--ema-decay", "0.9995"],
    "b256-lr6e-4-ema9995": ["--batch-size", "256", "--lr", "6e-4", "--ema-decay", "0.9995"],
    "b128-lr4e-4-ema9999": ["--batch-size", "128", "--lr", "4e-4", "--ema-decay", "0.9999"],
    # Side by side, three runs shared the GPU badly (run 3: 12 steps/s each); alone, one large batch.
    "b512-lr1e-3-ema9995": ["--batch-size", "512", "--lr", "1e-3", "--ema-decay", "0.9995"],
}


def log(message: str) -> None:
    print(f"[train_digits] {message}", flush=True)


def train_command(data: Path, run: Path, extra: list[str], steps: int, device: str) -> list[str]:
    return [
        sys.executable, "-m", "ddimctl", "train", str(data / "train"), "--out", str(run), *COMMON, *extra,
        "--steps", str(steps), "--save-every", str(max(1, steps // 5)), "--device", device,
    ]


def run_all(commands: dict[str, list[str]], limit_s: float) -> dict[str, float]:
    """Run the commands side by side; return each one's wall time (inf when it was stopped)."""
    started = time.perf_counter()
    procs = {name: subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    walls = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=max(1.0, limit_s - (time.perf_counter() - started)))
            walls[name] = time.perf_counter() - started
            if proc.returncode:
                log(f"{name} failed: {err[-800:]}")
                walls[name] = float("inf")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            walls[name] = float("inf")
            log(f"{name}: stopped at the time limit")
    return walls


def images_per_s(run: Path) -> float:
    """The last logged images/s of a run (measured from its first step, so a safe estimate)."""
    last = (run / "train.log").read_text().splitlines()[-1]
    return float(dict(kv.split("=") for kv in last.split())["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path, help="Folder written by scripts/make_digits.py")
    parser.add_argument("--seconds", type=float, default=180.0, help="Training budget for the candidates together.")
    parser.add_argument("--out", type=Path, default=Path("digits-candidates"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddimctl-digits"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--eval-n", default="360", help="Samples per evaluation cell.")
    parser.add_argument("--only", default="", help="Comma list of candidate names (default: all).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    batch = {n: int(CANDIDATES[n][CANDIDATES[n].index("--batch-size") + 1]) for n in names}

    probe_steps = 150
    probes = {n: train_command(args.digits, args.work / f"probe-{n}", CANDIDATES[n], probe_steps, args.device) for n in names}
    for n in names:
        probes[n] += ["--sample-count", "0"]
    started = time.perf_counter()
    run_all(probes, 120)
    probe_wall = time.perf_counter() - started
    steps = {}
    for n in names:
        speed = images_per_s(args.work / f"probe-{n}")
        steps[n] = int(0.9 * args.seconds * speed / batch[n])
        log(f"{n}: {speed:.0f} images/s side by side -> {steps[n]} steps in {args.seconds:.0f}s")
    log(f"probe took {probe_wall:.0f}s")

    commands = {n: train_command(args.digits, args.work / n, CANDIDATES[n], steps[n], args.device) for n in names}
    walls = run_all(commands, args.seconds * 1.25 + 30)
    results = {"budget_s": args.seconds, "candidates": {}}
    from safetensors.torch import load_file, save_file

    for n in names:
        run = args.work / n
        entry = {"command": " ".join(["ddimctl", *commands[n][3:]]), "steps": steps[n], "wall_s": walls[n]}
        log_lines = (run / "train.log").read_text().splitlines() if (run / "train.log").exists() else []
        entry["loss_log"] = log_lines[:: max(1, len(log_lines) // 200)] + log_lines[-1:]
        ckpts = sorted((run / "checkpoints").glob("step-*.safetensors"))
        if ckpts:
            tensors = load_file(str(ckpts[-1]))
            ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
            step = ckpts[-1].stem.split("-")[1].lstrip("0")
            save_file(ema, str(args.out / f"digits-{n}.safetensors"),
                      metadata={"format": "pt", "source": f"ddimctl train, step {step}, EMA weights"})
            evaluation = args.work / f"eval-{n}.json"
            proc = subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "eval_digits.py"), str(args.digits), "--model", str(run),
                 "--device", args.device, "-n", args.eval_n, "--json", str(evaluation)],
                env=ENV, capture_output=True, text=True,
            )
            print(proc.stdout[-1500:], proc.stderr[-800:], flush=True)
            if evaluation.exists():
                entry["eval"] = json.loads(evaluation.read_text())
        results["candidates"][n] = entry
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    log(f"done in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
