#!/usr/bin/env python3
"""Run the README's example commands on the bundled digits model and write what they print into the
README, between the `<!-- examples:begin -->` and `<!-- examples:end -->` markers, so the examples
cannot drift from the program. Progress lines (stderr) are left out; the machine is named.

    python scripts/readme_examples.py [--readme README.md]
"""

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREE, SEVEN = ROOT / "tests" / "data" / "digit-three.png", ROOT / "tests" / "data" / "digit-seven.png"

EXAMPLES = [
    "ddimctl sample --model digits -n 64 --steps 20 --seed 3 --out grid.png",
    "ddimctl sample --model digits -n 64 --sampler dpm++2m --steps 5 --seed 3 --out fast.png",
    "ddimctl invert three.png seven.png --model digits --steps 100",
    "ddimctl reconstruct three.png seven.png --model digits --steps 10,20,50 --exact",
    "ddimctl interpolate three.png seven.png --model digits --steps 20 --frames 8 --gif interp.gif",
]
KEPT_STDERR = ("wrote ", "error: ", "notice", "the end frames")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def run(command: str, folder: Path) -> str:
    env = {**os.environ, "COLUMNS": "100", "HF_HUB_OFFLINE": "1"}
    args = shlex.split(command)
    done = subprocess.run([sys.executable, "-m", "ddimctl", *args[1:]], cwd=folder, env=env, capture_output=True,
                          text=True, check=True)
    lines = done.stdout.rstrip().splitlines()
    lines += [line for line in done.stderr.splitlines() if line.startswith(KEPT_STDERR)]
    return "\n".join(f"    $ {command}" if i == 0 else line for i, line in enumerate([command, *lines]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(THREE, folder / "three.png")
        shutil.copy(SEVEN, folder / "seven.png")
        blocks = []
        for command in EXAMPLES:
            text = run(command, folder)
            blocks.append("\n".join(("    " + line if not line.startswith("    $") else line) for line in text.splitlines()))
            print(blocks[-1], flush=True)
    body = (f"What they print, with the bundled digits model ({machine()}; progress bars and notes go to\n"
            f"stderr and are left out, tables and each command's last line, what it wrote, go to stdout;\n"
            f"`three.png` and `seven.png` are `tests/data/digit-three.png` and `digit-seven.png`,\n"
            f"test-split digits; written by `python scripts/readme_examples.py`):\n\n" + "\n\n".join(blocks) + "\n")
    readme = args.readme.read_text()
    begin, end = "<!-- examples:begin -->\n", "<!-- examples:end -->"
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    args.readme.write_text(head + begin + body + end + tail)


if __name__ == "__main__":
    main()
