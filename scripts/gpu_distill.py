#!/usr/bin/env python3
"""The distillation part of the GPU issue in one command, for a lent GPU with no network:

1. the time per 1,000 updates of `ddimctl distill --steps 2` on the CIFAR-10 architecture (35.7M
   parameters, batch 64), bf16 (the default on a GPU; --compiled adds a compiled run). The teacher is a randomly initialised network of that
   architecture: the Hub's weights cannot reach such a machine, and an update's arithmetic does not depend
   on the weights. The rate is the steady one, between log lines after the first third of the updates
   (compilation and warm-up left out); the teacher's share is read from CUDA events.
2. students of the bundled digits model at 1, 2 and 4 calls, trained side by side until --seconds runs
   out (then Ctrl-C: each keeps its checkpoint of every 100th update), then scored by scripts/eval_distill.py against DDIM at 50
   calls (features Frechet distance, 360 samples x 3 seeds: the table in docs/distill.md).

    python scripts/make_digits.py data/digits
    python scripts/gpu_distill.py data/digits --out results/ --seconds 240
    python scripts/gpu_distill.py data/digits --out /tmp/smoke --smoke     # tiny sizes, on a CPU

Written to --out: gpu_distill.json (commands, rates, scores), gpu_distill-2step.png (the 2-call student's
last picture beside its teacher's) and digits-2step/ (that run's config and newest checkpoint: a run
folder `ddimctl sample --model` and eval_distill.py read).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
STARTED = time.perf_counter()
LOG_LINE = re.compile(r"step=(\d+) .*images_per_s=([\d.]+)(?: teacher (\d+)% of the time)?")


def log(message: str) -> None:
    print(f"[gpu_distill {time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


def distill_command(model: str, steps: int, updates: int, out: Path, device: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ddimctl", "distill", "--model", model, "--steps", str(steps), "--updates",
            str(updates), "--out", str(out), "--device", device, *extra]


def steady_rate(run: Path, batch: int) -> dict:
    """Updates per second between the first log line past a third of the run and the last one: train.log's
    images/s is cumulative since the start, so each line gives the time elapsed at its step."""
    points = [(int(m[1]), float(m[2]), m[3]) for m in map(LOG_LINE.match, (run / "train.log").read_text().splitlines())
              if m]
    last = points[-1][0] if points else 0
    late = [p for p in points if p[0] >= last / 3]
    if len(late) < 2:
        return {"updates": last, "updates_per_s": None}
    (a, rate_a, _), (b, rate_b, teacher) = late[0], late[-1]
    elapsed = lambda step, rate: step * batch / rate  # noqa: E731
    per_s = (b - a) / (elapsed(b, rate_b) - elapsed(a, rate_a))
    return {"updates": last, "updates_per_s": per_s, "seconds_per_1k_updates": 1000 / per_s,
            "teacher_share": int(teacher) / 100 if teacher else None, "between_updates": [a, b]}


def run_until(commands: dict[str, list[str]], deadline: float) -> dict[str, dict]:
    """Run the commands side by side; at the deadline, Ctrl-C those still running (they keep their last
    checkpoint). Each one's wall time, exit code and the tail of its output."""
    procs = {name: subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    started, outcome = time.perf_counter(), {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=120)
        outcome[name] = {"command": " ".join(commands[name][2:]), "wall_s": time.perf_counter() - started,
                         "returncode": proc.returncode, "output": output.strip().splitlines()[-4:]}
        log(f"{name}: exit {proc.returncode} after {outcome[name]['wall_s']:.0f} s; {' | '.join(outcome[name]['output'])}")
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("digits", type=Path, help="Folder written by scripts/make_digits.py")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-results")))
    parser.add_argument("--seconds", type=float, default=240.0, help="The whole command's time, scoring included")
    parser.add_argument("--compiled", action="store_true", help="Time a compiled student too (compiling takes a minute)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, to try the script on a CPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/ddimctl-gpu-distill")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from safetensors.torch import save_file

    from ddimctl.distill import DistillOptions
    from ddimctl.models.unet import PRESETS, UNet

    preset, timing_updates, batch = ("tiny", 12, 4) if args.smoke else ("cifar10", 300, 64)
    student_updates = 6 if args.smoke else 2000
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "timing": {}, "students": {}}

    def save() -> None:
        (args.out / "gpu_distill.json").write_text(json.dumps(report, indent=2) + "\n")

    # 1. Time per 1,000 updates on the CIFAR-10 architecture.
    torch.manual_seed(0)
    teacher = work / f"{preset}-random.safetensors"
    weights = UNet(PRESETS[preset]).state_dict()
    weights["conv_out.weight"] *= 0.01  # a noise prediction of a trained network's size keeps the trajectories tame
    save_file(weights, str(teacher))
    teacher.with_suffix(".json").write_text(json.dumps({"unet": PRESETS[preset].to_dict()}))
    variants = {"default": [], **({"compiled": ["--compile"]} if args.compiled else {})}
    for name, extra in variants.items():
        run = work / f"timing-{name}"
        cmd = distill_command(str(teacher), 2, timing_updates, run, args.device, "--batch-size", str(batch),
                              "--save-every", str(timing_updates), "--sample-count", "0", *extra)
        outcome = run_until({name: cmd}, time.perf_counter() + (90 if extra else 40))[name]
        rate = steady_rate(run, batch) if (run / "train.log").exists() else {}
        report["timing"][name] = {**outcome, "batch": batch, "architecture": preset, **rate}
        if rate.get("updates_per_s"):
            log(f"{name}: {rate['seconds_per_1k_updates']:.0f} s per 1,000 updates of {batch} "
                f"(teacher {rate['teacher_share']})")
        save()

    # 2. Digits students at 1, 2 and 4 calls, side by side until the scoring's share of the time is left.
    students = {f"digits-{k}step": distill_command("digits", k, student_updates, work / f"digits-{k}step", args.device,
                                                    "--save-every", "3" if args.smoke else "100", "--keep", "3")
                for k in (1, 2, 4)}
    score_s = 20 if args.smoke else 60
    report["students"] = run_until(students, STARTED + args.seconds - score_s)
    for name in students:
        run = work / name
        report["students"][name]["rate"] = steady_rate(run, DistillOptions.batch_size) if (run / "train.log").exists() else {}
    save()
    runs = [work / name for name in students if list((work / name / "checkpoints").glob("*.safetensors"))]
    scored = work / "scores.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "eval_distill.py"), str(args.digits), *map(str, runs), "--baselines", "0",
           "--device", args.device, "--json", str(scored)] + (["-n", "40", "--seeds", "1"] if args.smoke else [])
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    log(proc.stdout.strip() or proc.stderr[-2000:])
    if scored.exists():
        report["scores"] = json.loads(scored.read_text())
    save()
    two = work / "digits-2step"
    pictures = sorted((two / "samples").glob("*.png"))
    checkpoints = sorted((two / "checkpoints").glob("*.safetensors"))
    if pictures:
        shutil.copy(pictures[-1], args.out / "gpu_distill-2step.png")
    if checkpoints:
        (args.out / two.name / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy(two / "config.json", args.out / two.name / "config.json")
        shutil.copy(checkpoints[-1], args.out / two.name / "checkpoints" / checkpoints[-1].name)
    log(f"done; {args.out / 'gpu_distill.json'}")


if __name__ == "__main__":
    main()
