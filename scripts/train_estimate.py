"""train's CPU estimate against the run's real time, on an idle CPU and on one shared with other work
(CPU burners, as on a user's busy machine), for the presets a CPU trains.

    python scripts/train_estimate.py data/digits [--json docs/train-estimate.json]

Each row runs `ddimctl train DATA --preset P --steps N` as a user would (the command line's own
choice of threads), reads the estimate it prints before it starts ("about ... on this CPU") and the
time it reports at the end ("done in Ns").
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [("tiny", 300), ("small", 30)]


def seconds_of(text: str) -> float:
    number, unit = re.search(r"about (\d+) (seconds|minutes|hours|days) on this CPU", text).groups()
    return float(number) * {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}[unit]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--burners", type=int, default=3, help="Busy processes beside the run in the busy case")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for load in ("idle", "busy"):
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)] \
            if load == "busy" else []
        try:
            time.sleep(2 if burners else 0)
            for preset, steps in RUNS:
                with tempfile.TemporaryDirectory() as tmp:
                    done = subprocess.run([sys.executable, "-m", "ddimctl", "train", str(args.data), "--out", f"{tmp}/run",
                                           "--preset", preset, "--steps", str(steps), "--sample-count", "0",
                                           "--save-every", str(steps), "--no-flip"], capture_output=True, text=True,
                                          check=True)
                estimate = seconds_of(done.stderr)
                real = float(re.search(r"done in (\d+)s", done.stdout).group(1))
                rows.append({"load": load, "preset": preset, "steps": steps, "estimate_s": estimate, "real_s": real,
                             "ratio": estimate / real})
                print(f"{load:5s} {preset:6s} {steps:4d} steps: estimate {estimate:6.0f} s, real {real:6.0f} s, "
                      f"ratio {estimate / real:.2f}", flush=True)
        finally:
            for burner in burners:
                burner.kill()
    if args.json:
        args.json.write_text(json.dumps({"burners": args.burners, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
