"""Every bad input and fault of tests/reliability_cases.py ends cleanly: the expected exit status,
one `error:` line that names the problem (or the expected result), no traceback, nothing left behind."""

import pytest
from reliability_cases import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_is_clean(case, tmp_path):
    result = run_case(case, tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == case.code, result.stderr
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    out_last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if case.code:  # ddimctl's own refusals exit 1, the parser's usage errors (click) exit 2
        prefix = "Error: " if case.code == 2 else "error: "
        assert last.startswith(prefix) and case.expect in last, result.stderr
        assert len([line for line in result.stderr.splitlines() if line.lower().startswith("error")]) == 1
    else:
        assert case.expect in last or case.expect in result.stdout, (last, out_last)
    if case.also:
        assert case.also in result.stderr, result.stderr
    if case.leaves:
        assert case.leaves(tmp_path) == []


def test_ctrl_c_says_what_was_written_and_leaves_no_temporaries(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ddimctl", "sample", "--model", "digits", "-n", "5000", "--steps", "20",
                             "--batch-size", "16", "--out", "s/"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "s").glob("*.png")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err
    written = len(list((tmp_path / "s").glob("*.png")))
    assert err.strip().splitlines()[-1] == (
        f"interrupted; {written} of 5000 images written to s; rerun the same command to finish"
    )
    assert not list((tmp_path / "s").glob(".*.tmp"))


def test_broken_pngs_are_redone_and_orphaned_temporaries_removed(tmp_path):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "ddimctl", "sample", "--model", "digits", "-n", "3", "--steps", "2", "--out", "s/"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(args, cwd=tmp_path, env=env, check=True, capture_output=True)
    good = (tmp_path / "s" / "000001.png").read_bytes()
    (tmp_path / "s" / "000001.png").write_bytes(b"")  # 0 bytes
    (tmp_path / "s" / "000002.png").write_bytes(good[:40])  # truncated
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = tmp_path / "s" / f".000000.png.ddimctl-{gone.pid}-abcd1234.tmp"
    orphan.write_bytes(good)
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "1 of 3 images already" in result.stderr
    assert (tmp_path / "s" / "000001.png").read_bytes() == good and not orphan.exists()


def test_sixteen_bit_images_read_at_full_depth(tmp_path):
    """16-bit grayscale (and big-endian I;16B) PNGs give the 8-bit image they were scaled from, not white."""
    import numpy as np
    import torch
    from PIL import Image
    from reliability_cases import THREE

    from ddimctl.io import images

    eight = images.read_pixels(THREE, 16, 1)
    wide = np.asarray(Image.open(THREE), dtype=np.uint32) * 257
    Image.fromarray(wide.astype(np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert torch.equal(images.read_pixels(tmp_path / "g16.png", 16, 1), eight)
    big_endian = Image.frombytes("I;16B", (16, 16), wide.astype(">u2").tobytes())
    converted = images.to_8bit(big_endian)
    assert converted.mode == "L"
    assert torch.equal(torch.frombuffer(bytearray(converted.tobytes()), dtype=torch.uint8).reshape(1, 16, 16), eight)
    rgb = images.read_pixels(tmp_path / "g16.png", 16, 3)  # to RGB: three equal channels
    assert torch.equal(rgb[0], eight[0]) and torch.equal(rgb[2], eight[0])


def test_sixteen_bit_rgb_png_keeps_its_colours(tmp_path):
    """A 48-bit RGB PNG (written by hand: Pillow cannot write one) reads as its 8-bit colours."""
    import struct
    import zlib

    import numpy as np
    import torch

    from ddimctl.io import images

    rgb8 = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint16)
    rgb16 = (rgb8 * 257).astype(">u2")  # 8 -> 16 bits exactly
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)  # 16 bits per channel, RGB
    (tmp_path / "rgb48.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    pixels = images.read_pixels(tmp_path / "rgb48.png", 4, 3)
    assert torch.equal(pixels, torch.from_numpy(rgb8.astype(np.uint8)).permute(2, 0, 1))


def test_interrupted_training_names_its_newest_checkpoint(tmp_path):
    from ddimctl.models import runs

    assert "no checkpoint was written" in runs.interrupted_at(tmp_path / "nothing")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-00000040.safetensors").write_bytes(b"")
    from ddimctl.cli.common import flag
    from ddimctl.errors import spell

    assert spell(runs.interrupted_at(tmp_path), flag) == (  # as Ctrl-C shows it
        "the newest checkpoint is step-00000040.safetensors; resume with the same command and --resume"
    )


def test_a_sixteen_bit_png_reconstructs_exactly_as_its_eight_bit_original(tmp_path):
    """The CLI reads the 16-bit PNG (the 8-bit digit x 257) at full depth: the same pixels, so the
    same round-trip numbers to the last digit (a reader that clipped it to white would differ)."""
    import json

    from helpers import ddimctl
    from reliability_cases import THREE, sixteen_bit

    args = ["reconstruct", "--model", "digits", "--steps", "5", "--json"]
    wide = json.loads(ddimctl(*args, sixteen_bit(tmp_path), cwd=tmp_path).stdout)
    eight = json.loads(ddimctl(*args, THREE, cwd=tmp_path).stdout)
    assert wide["results"][0]["mse"] == eight["results"][0]["mse"] > 0


def test_a_refusal_on_one_torchrun_process_is_one_line_on_every_process(tmp_path):
    """Rank 0 refuses (someone else's PNG where image 0 would go); rank 1, waiting for it at a
    barrier, loses its peer: one line from each, no gloo traceback, the user's file untouched."""
    from helpers import ddimctl

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "000000.png").write_bytes(b"mine")
    result = ddimctl("sample", "--model", "digits", "-n", "4", "--steps", "2", "--out", "photos/", cwd=tmp_path,
                     check=False, torchrun=2)
    # (torchrun's launcher prints its own summary of a failed child; no process of ddimctl's may trace back)
    assert result.returncode != 0 and "[rank0]: Traceback" not in result.stderr, result.stderr
    assert "[rank1]: Traceback" not in result.stderr, result.stderr
    assert "did not write (000000.png)" in result.stderr
    assert "process 1 stopped: another process of this torchrun launch ended first" in result.stderr
    assert (tmp_path / "photos" / "000000.png").read_bytes() == b"mine"
