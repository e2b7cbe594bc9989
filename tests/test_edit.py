"""`ddimctl edit` and exact inversion through the command line, on the bundled digits model."""


import numpy as np
import pytest
from conftest import DATA
from helpers import assert_one_line_error, ddimctl
from PIL import Image
from safetensors import safe_open

THREE, SEVEN = DATA / "digit-three.png", DATA / "digit-seven.png"


def gray(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def test_masked_edit_keeps_the_unmasked_pixels(tmp_path):
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255  # regenerate the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    ddimctl("edit", THREE, SEVEN, "--model", "digits", "--strength", "0.8", "--steps", "10", "--mask", "mask.png",
            "--eta", "1", "--out", "out/", cwd=tmp_path)
    for source in (THREE, SEVEN):
        before, after = gray(source), gray(tmp_path / "out" / source.name)
        assert np.abs(after[:, :8] - before[:, :8]).max() <= 2  # kept: the input, to PNG rounding
        assert np.abs(after[:, 8:] - before[:, 8:]).mean() > 1  # regenerated


def test_edit_strength_zero_and_exact_edit_return_the_input(tmp_path):
    ddimctl("edit", THREE, "--model", "digits", "--strength", "0", "--out", "zero.png", "--scale", 1, cwd=tmp_path)
    assert np.abs(gray(tmp_path / "zero.png") - gray(THREE)).max() <= 1
    ddimctl("edit", THREE, "--model", "digits", "--strength", "0", "--out", "big.png", cwd=tmp_path)
    assert Image.open(tmp_path / "big.png").size == (256, 256)  # a single picture: enlarged to 256 px by default
    ddimctl("edit", THREE, "--model", "digits", "--strength", "0.6", "--steps", "10", "--exact", "--out", "exact.png",
            "--scale", 1, cwd=tmp_path)
    diff = (gray(tmp_path / "exact.png") - gray(THREE)) / 255
    assert (diff**2).mean() < 1e-3
    noised = ddimctl("edit", THREE, "--model", "digits", "--strength", "0.6", "--steps", "10", "--out", "noise.png",
                     "--strip", "--scale", "1", cwd=tmp_path)
    assert "6 of 10 steps" in noised.stdout
    strip = gray(tmp_path / "noise-strip.png")  # beside the edited image, which keeps its own name
    assert strip.shape == (14 + 20, 38)  # labels, then input | edited with the grid's padding
    assert np.array_equal(strip[16:32, 2:18], gray(THREE))
    assert np.array_equal(strip[16:32, 20:36], gray(tmp_path / "noise.png"))


def test_edit_is_reproducible_per_image(tmp_path):
    ddimctl("edit", THREE, SEVEN, "--model", "digits", "--strength", "0.5", "--steps", "10", "--eta", "1",
            "--out", "a/", cwd=tmp_path)
    ddimctl("edit", THREE, SEVEN, "--model", "digits", "--strength", "0.5", "--steps", "10", "--eta", "1",
            "--out", "b/", "--batch-size", "1", cwd=tmp_path)
    for name in (THREE.name, SEVEN.name):
        assert np.array_equal(gray(tmp_path / "a" / name), gray(tmp_path / "b" / name))


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--strength", "1.5"], "--strength must be between 0 and 1"),
        (["--strength", "0.5", "--out", "x.jpg"], "a .png file for a single image"),
        (["--strength", "0.5", "--mask", "nothere.png"], "no such image file"),
        (["--strength", "0.5", "--exact", "--max-iters", "0"], "at least 1 iteration"),
    ],
)
def test_edit_refuses_bad_options_in_one_line(tmp_path, args, fragment):
    assert_one_line_error(ddimctl("edit", THREE, "--model", "digits", *args, cwd=tmp_path, check=False), fragment)


def test_exact_latents_record_how_they_were_made_and_decode_back(tmp_path):
    ddimctl("invert", THREE, "--model", "digits", "--steps", "10", "--exact", "--out", "z.safetensors", cwd=tmp_path)
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["inversion"] == "exact" and meta["tol"] == "0.001" and meta["max_iters"] == "4"  # the defaults
    # sample takes the model, S and skip from the file: no --model needed.
    result = ddimctl("sample", "--latents", "z.safetensors", "--out", "back.png", "--scale", "1", cwd=tmp_path)
    assert "digits, S=10" in result.stdout and "plain inversion" not in result.stderr
    back = gray(tmp_path / "back.png")[2:18, 2:18]
    assert ((back - gray(THREE)) / 255).var() < 1e-3 and np.abs(back - gray(THREE)).mean() < 3
    ddimctl("invert", THREE, "--model", "digits", "--steps", "10", "--out", "p.safetensors", cwd=tmp_path)
    plain = ddimctl("sample", "--latents", "p.safetensors", "--out", "p.png", cwd=tmp_path)
    assert "plain inversion" in plain.stderr
    other = ddimctl("sample", "--latents", "z.safetensors", "--steps", "20", "--out", "o.png", cwd=tmp_path)
    assert "steps 10 (now 20)" in other.stderr


def test_interpolate_is_exact_by_default(tmp_path):
    ddimctl("interpolate", THREE, SEVEN, "--model", "digits", "--steps", "10", "--frames", "3", "--out", "i.png",
            "--scale", "1", cwd=tmp_path)
    strip = gray(tmp_path / "i.png")[14:]  # columns: input, 3 frames, input
    tile = lambda col: strip[2:18, 2 + col * 18 : 18 + col * 18]  # noqa: E731
    assert np.array_equal(tile(0), gray(THREE)) and np.array_equal(tile(4), gray(SEVEN))
    assert np.abs(tile(1) - gray(THREE)).mean() < 3 and np.abs(tile(3) - gray(SEVEN)).mean() < 3


def test_interpolate_streams_frames_to_a_folder(tmp_path):
    ddimctl("interpolate", THREE, SEVEN, "--model", "digits", "--steps", "10", "--frames", "5", "--batch-size", "2",
            "--out", "frames/", cwd=tmp_path)
    names = sorted(p.name for p in (tmp_path / "frames").glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(tmp_path / "frames" / names[0]).size == (16, 16)  # the model's resolution
    assert np.abs(gray(tmp_path / "frames" / names[0]) - gray(THREE)).mean() < 3  # exact inversion by default
