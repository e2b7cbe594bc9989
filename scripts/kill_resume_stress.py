#!/usr/bin/env python3
"""Kill `ddimctl train` at random moments (SIGKILL or SIGTERM), resume it each time, and compare the
final checkpoint with a straight run's, tensor by tensor: the README promises bit-identical weights
at the same thread count on the same kind of processor.

    python scripts/kill_resume_stress.py [--kills 10] [--steps 12] [--seed 0] [--json out.json]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

TRAIN = ["--preset", "tiny", "--channels", "1", "--batch-size", "4", "--save-every", "2", "--keep", "50",
         "--sample-count", "0", "--warmup", "2", "--lr", "1e-3", "--ema-decay", "0.9"]


def train(folder: Path, out: str, steps: int, resume: bool, env: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "ddimctl", "train", "data", "--out", out, "--steps", str(steps), *TRAIN]
    return subprocess.Popen(args + (["--resume"] if resume else []), cwd=folder, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def newest(run: Path) -> dict:
    return load_file(str(sorted((run / "checkpoints").glob("*.safetensors"))[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "data").mkdir()
        pixels = np.random.default_rng(0).random((16, 16, 16))
        for i, image in enumerate(pixels):
            Image.fromarray((image * 255).astype("uint8"), "L").save(folder / "data" / f"{i}.png")
        started = time.perf_counter()
        assert train(folder, "straight", args.steps, False, env).wait() == 0
        straight_s = time.perf_counter() - started
        reference = newest(folder / "straight")

        kills, resumed = [], False
        while len(kills) < args.kills:
            proc = train(folder, "killed", args.steps, resumed, env)
            delay = rng.uniform(0.5, straight_s)
            how = rng.choice([signal.SIGKILL, signal.SIGTERM])
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(how)
                kills.append({"after_s": round(delay, 2), "signal": how.name})
            code = proc.wait()
            err = proc.stderr.read()
            assert "Traceback" not in err, err
            resumed = resumed or (folder / "killed" / "checkpoints").is_dir()
            if code == 0:  # finished before the kill: start the killed run over
                kills.append({"after_s": round(delay, 2), "signal": "none: the run finished first"})
                subprocess.run(["rm", "-rf", str(folder / "killed")], check=True)
                resumed = False
        if resumed:
            assert train(folder, "killed", args.steps, True, env).wait() == 0
        else:
            assert train(folder, "killed", args.steps, False, env).wait() == 0
        final = newest(folder / "killed")
    differ = sorted(k for k in reference if not (reference[k].shape == final[k].shape and (reference[k] == final[k]).all()))
    report = {"kills": kills, "tensors": len(reference), "differ": len(differ), "first_differing": differ[:5],
              "threads": os.environ.get("OMP_NUM_THREADS", "all cores")}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
