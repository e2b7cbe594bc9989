"""The command line on real files: outputs, reproducibility, and one-line errors for bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, ddimctl
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddimctl import choices, schedule, seeds
from ddimctl.sampling import ddim, samplers
from ddimctl.models import loading
from ddimctl.errors import DdimctlError


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture()
def images_dir(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 60, 3)) * 255).astype("uint8")).save(tmp_path / "wide.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 16).astype("uint8"), (16, 1))).save(tmp_path / "gray.png")
    rgba = (rng.random((16, 16, 4)) * 255).astype("uint8")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).convert("P").save(tmp_path / "palette.gif")
    (tmp_path / "notes.txt").write_text("not an image")
    good = (tmp_path / "wide.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    return tmp_path


def test_sample_grid(tiny_checkpoint, tmp_path):
    result = ddimctl("sample", "--model", tiny_checkpoint, "-n", 5, "--steps", 4, "--out", "grid.png", cwd=tmp_path)
    img = Image.open(tmp_path / "grid.png")
    # 5 images of 16x16 in a 3x2 grid with 2 px padding (56 x 38), enlarged 7 times to be at least
    # 256 px on its short side.
    assert img.size == (7 * (3 * 18 + 2), 7 * (2 * 18 + 2)) and img.mode == "RGB"
    assert "wrote 5 images" in result.stdout


@pytest.mark.parametrize("eta", ["0", "1"])
def test_same_seed_same_images_for_any_batch_size(tiny_checkpoint, tmp_path, eta):
    common = ["sample", "--model", tiny_checkpoint, "-n", 5, "--steps", 5, "--eta", eta, "--seed", 7]
    ddimctl(*common, "--batch-size", 5, "--out", "a/", cwd=tmp_path)
    ddimctl(*common, "--batch-size", 2, "--out", "b/", cwd=tmp_path)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".ddimctl-files", ".ddimctl-sample.json", *names]  # the ledger and the run's record
    for name in names:
        assert np.array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "b" / name)), name
    # A different seed gives different images.
    ddimctl("sample", "--model", tiny_checkpoint, "-n", 1, "--steps", 5, "--eta", eta, "--seed", 8, "--out", "c/", cwd=tmp_path)
    assert not np.array_equal(pixels(tmp_path / "a" / names[0]), pixels(tmp_path / "c" / names[0]))


def test_folder_output_resumes(tiny_checkpoint, tmp_path):
    args = ["sample", "--model", tiny_checkpoint, "-n", 4, "--steps", 3, "--out", "run/"]
    ddimctl(*args, cwd=tmp_path)
    original = pixels(tmp_path / "run" / "000002.png")
    (tmp_path / "run" / "000002.png").unlink()
    stamp = (tmp_path / "run" / "000000.png").stat().st_mtime_ns
    result = ddimctl(*args, cwd=tmp_path)
    assert "3 of 4 images already" in result.stderr
    assert "waited" not in result.stderr  # 4 tiny PNGs never hold sampling up: nothing to say
    assert np.array_equal(pixels(tmp_path / "run" / "000002.png"), original)
    assert (tmp_path / "run" / "000000.png").stat().st_mtime_ns == stamp


def test_images_match_the_library(tiny_checkpoint, tmp_path):
    """The CLI's PNG is exactly the library's sample of the (seed, i) noise, quantised."""
    ddimctl("sample", "--model", tiny_checkpoint, "-n", 2, "--steps", 6, "--seed", 3, "--out", "o/", "--precision", "fp32",
            cwd=tmp_path)
    model = loading.load_model(str(tiny_checkpoint))
    x_T = seeds.initial_noise(seeds.image_generators(3, [0, 1]), model.image_shape)
    x0 = ddim.sample(model.unet, x_T, model.alphas_cumprod, schedule.timestep_sequence(6, 1000, "uniform"))
    expected = ((x0 + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        assert np.array_equal(pixels(tmp_path / "o" / f"{i:06d}.png"), expected[i])


def test_invert_writes_latents_that_sample_decodes(tiny_checkpoint, images_dir):
    result = ddimctl(
        "invert", "wide.png", "gray.png", "alpha.png", "palette.gif",
        "--model", tiny_checkpoint, "--steps", 8, "--out", "z.safetensors", cwd=images_dir,
    )
    # Said once for all the images it concerns, whatever their number.
    assert "2 image(s) resized on the shorter side and centre-cropped to 16x16 (wide.png 60x40, palette.gif 20x20)" in result.stderr
    assert "1 grayscale image(s) repeated to RGB, the model's channels (gray.png)" in result.stderr
    assert "mean" in result.stdout and "std" in result.stdout
    latents = load_file(images_dir / "z.safetensors")["latents"]
    assert latents.shape == (4, 3, 16, 16) and latents.dtype == torch.float32
    with safe_open(images_dir / "z.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "tiny.safetensors" and meta["steps"] == "8" and meta["skip"] == "uniform"
    assert json.loads(meta["sources"]) == ["wide.png", "gray.png", "alpha.png", "palette.gif"]

    same = ddimctl("sample", "--model", tiny_checkpoint, "--steps", 8, "--latents", "z.safetensors", "--out", "dec/",
                   "--precision", "fp32", cwd=images_dir)
    assert len(list((images_dir / "dec").glob("*.png"))) == 4
    assert "was inverted with" not in same.stderr
    other = ddimctl("sample", "--model", tiny_checkpoint, "--steps", 4, "--latents", "z.safetensors", "--out", "o.png", cwd=images_dir)
    assert "z.safetensors was inverted with steps 8 (now 4)" in other.stderr
    # reconstruct = invert + decode: its JSON MSE agrees with the decoded files.
    report = json.loads(
        ddimctl("reconstruct", "wide.png", "gray.png", "--model", tiny_checkpoint, "--steps", "8", "--json", cwd=images_dir).stdout
    )
    r = report["results"][0]
    assert r["steps"] == 8 and len(r["images"]) == 2
    target = np.asarray(Image.open(images_dir / "gray.png").convert("RGB"), dtype=np.float64) / 255
    decoded = pixels(images_dir / "dec" / "000001.png").astype(np.float64) / 255
    assert r["images"][1]["mse"] == pytest.approx(((decoded - target) ** 2).mean(), abs=2e-4)  # PNG rounding


def test_reconstruct_table_and_side_by_side(tiny_checkpoint, images_dir):
    result = ddimctl("reconstruct", "wide.png", "gray.png", "--model", tiny_checkpoint, "--steps", "2,4", "--out", "r.png", cwd=images_dir)
    rows = [re.match(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d\.\d\de[+-]\d\d)\s*│", line) for line in result.stdout.splitlines()]
    assert [(m.group(1), m.group(2), 0 < float(m.group(3)) <= 1) for m in rows if m] == [("2", "2", True), ("4", "4", True)]
    # input + 2 S, 2 images; enlarged 7 times (short side >= 256), with a 14 px band of labels on top
    assert Image.open(images_dir / "r.png").size == (7 * (3 * 18 + 2), 7 * (2 * 18 + 2) + 14)


def test_interpolate_images_and_seeds(tiny_checkpoint, images_dir):
    ddimctl("interpolate", "wide.png", "gray.png", "--model", tiny_checkpoint, "--steps", 4, "--frames", 5, "--gif", "interp.gif",
            cwd=images_dir)
    # The inputs at both ends, enlarged to at least 256 px on the short side (20 px: 13 times), with a
    # band of labels on top.
    assert Image.open(images_dir / "interp.png").size == (13 * (7 * 18 + 2), 13 * (18 + 2) + 14)
    gif = Image.open(images_dir / "interp.gif")
    assert gif.n_frames == 8 and gif.size == (256, 256)  # there and back; 16 px frames enlarged 16 times
    # A new strip without --gif: the earlier animation stays (the user's to keep) and the run says it is stale.
    earlier = (images_dir / "interp.gif").read_bytes()
    again = ddimctl("interpolate", "--seeds", "1,2", "--model", tiny_checkpoint, "--steps", 2, "--frames", 3, cwd=images_dir)
    assert "interp.gif beside it is an earlier run's animation" in again.stderr
    assert (images_dir / "interp.gif").read_bytes() == earlier
    ddimctl("interpolate", "--seeds", "1,2", "--model", tiny_checkpoint, "--steps", 4, "--frames", 3, "--out", "s.png",
            "--scale", 1, cwd=images_dir)
    ddimctl("sample", "--model", tiny_checkpoint, "-n", 1, "--seed", 2, "--steps", 4, "--out", "end/", "--precision", "fp32",
            cwd=images_dir)
    strip = pixels(images_dir / "s.png")[14:]  # below the labels
    assert np.array_equal(strip[2:18, 2 + 2 * 18 : 18 + 2 * 18], pixels(images_dir / "end" / "000000.png"))
    bad = ddimctl("interpolate", "--seeds", "1", "--model", tiny_checkpoint, cwd=images_dir, check=False)
    assert_one_line_error(bad, "--seeds takes two integers")


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["sample", "--steps", "1001"], ["--steps must be between 1 and 1000"]),
        (["sample", "--eta", "-0.5"], ["--eta must be between 0 and 1 (0: DDIM, 1: DDPM's posterior variance)"]),
        (["sample", "--skip", "cosine"], ["--skip: unknown skip scheme 'cosine'; use one of uniform, quad, logsnr, karras, ays, trailing"]),
        (["sample", "--out", "nowhere/x.png"], ["folder nowhere does not exist"]),
        (["sample", "--out", "x.txt"], ["give an image file"]),
        (["sample", "--latents", "missing.safetensors"], ["no such file"]),
    ],
)
def test_bad_sample_input(tiny_checkpoint, tmp_path, args, fragments):
    result = ddimctl(*args, "--model", tiny_checkpoint, cwd=tmp_path, check=False)
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.glob("*.png"))


def test_unknown_model_and_wrong_latents(tiny_checkpoint, tmp_path):
    assert_one_line_error(ddimctl("sample", "--model", "no-such-model", cwd=tmp_path, check=False), "unknown model 'no-such-model'")
    save_file({"latents": torch.zeros(2, 3, 32, 32)}, str(tmp_path / "big.safetensors"))
    result = ddimctl("sample", "--model", tiny_checkpoint, "--latents", "big.safetensors", cwd=tmp_path, check=False)
    assert_one_line_error(result, "shape (2, 3, 32, 32) does not fit", "(N, 3, 16, 16)")
    assert not (tmp_path / "samples.png").exists()


def test_unwritable_out(tiny_checkpoint, tmp_path):
    (tmp_path / "afile").write_text("")
    result = ddimctl("sample", "--model", tiny_checkpoint, "--out", "afile/x.png", cwd=tmp_path, check=False)
    assert_one_line_error(result, "afile is not a folder")
    result = ddimctl("sample", "--model", tiny_checkpoint, "--out", "afile/sub/", cwd=tmp_path, check=False)
    assert_one_line_error(result, "cannot create the folder")
    if os.geteuid() != 0:  # root can write anywhere, so only an ordinary user sees this one
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = ddimctl("sample", "--model", tiny_checkpoint, "--out", locked / "x.png", cwd=tmp_path, check=False)
        assert_one_line_error(result, "not writable")


@pytest.mark.parametrize("name,fragment", [("missing.png", "no such image file"), ("notes.txt", "not a readable image"), ("truncated.png", "not a readable image")])
def test_bad_images(tiny_checkpoint, images_dir, name, fragment):
    for command in (["invert", name, "gray.png"], ["reconstruct", "gray.png", name], ["interpolate", name, "gray.png"]):
        result = ddimctl(*command, "--model", tiny_checkpoint, "--steps", 2, cwd=images_dir, check=False)
        assert_one_line_error(result, name, fragment)
    for output in ("latents.safetensors", "recon.png", "interp.png"):
        assert not (images_dir / output).exists()
    assert not list(images_dir.glob(".*.tmp"))


def test_models_lists_the_registry(tmp_path):
    """Every entry, one row each, with its size and whether it is here (the tests' cache is empty:
    only the bundled digits model is)."""
    from ddimctl.models import registry

    out = ddimctl("models", cwd=tmp_path).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in registry.registry()}
    assert sorted(rows) == sorted(registry.registry())
    assert rows["cifar10"][1:5] == ["*", "32", "35.7M", "quad"] and rows["cifar10"][5] == "no"
    assert rows["ema-cat-256"][1:5] == ["256", "113.7M", "uniform", "no"]
    assert rows["digits"][1:7] == ["16,", "gray", "1.6M", "uniform", "yes", "bundled"]  # 1 channel: said


def test_python_dash_m_and_console_script_agree(tmp_path):
    assert "sample" in ddimctl("--help", cwd=tmp_path).stdout
    exe = Path(sys.executable).with_name("ddimctl")
    if exe.exists():
        assert "sample" in subprocess.run([exe, "--help"], capture_output=True, text=True).stdout


def test_bundled_digits_model_round_trip(tmp_path):
    """With a trained model (the bundled digits), invert + decode returns the input, better with more
    steps (Table 2's measure), and exactly at small S with --exact, in at most 4 S network calls."""
    from conftest import DATA

    images = [DATA / "digit-three.png", DATA / "digit-seven.png"]
    run = lambda *extra: json.loads(  # noqa: E731
        ddimctl("reconstruct", *images, "--model", "digits", "--json", "--out", "r.png", *extra, cwd=tmp_path).stdout
    )
    plain = run("--steps", "10,50")
    mse = {r["steps"]: r["mse"] for r in plain["results"]}
    assert mse[50] < 2.5e-3 < mse[10]  # the paper has 0.0023 at S = 50 on CIFAR-10
    assert plain["inversion"] == "plain" and [r["evaluations"] for r in plain["results"]] == [10, 50]
    exact = run("--steps", "10", "--exact")["results"][0]
    assert exact["mse"] < min(1e-4, mse[10] / 50), (exact["mse"], mse[10])
    assert 10 < exact["evaluations"] <= 40
    assert Image.open(tmp_path / "r.png").mode == "L"


def test_bundled_digits_model_samples_offline(tmp_path):
    result = ddimctl("sample", "--model", "digits", "-n", "4", "--steps", "10", "--out", "d.png", "--scale", "1", cwd=tmp_path)
    assert "digits, S=10" in result.stdout
    img = np.asarray(Image.open(tmp_path / "d.png"))
    assert img.shape == (2 * 18 + 2, 2 * 18 + 2)
    ddimctl("sample", "--model", "digits", "-n", "4", "--steps", "2", "--out", "big.png", cwd=tmp_path)
    assert Image.open(tmp_path / "big.png").size == (7 * 38, 7 * 38)  # enlarged to at least 256 px
    ddimctl("sample", "--model", "digits", "-n", "2", "--steps", "2", "--out", "one/", cwd=tmp_path)
    assert Image.open(tmp_path / "one" / "000000.png").size == (16, 16)  # folders: the model's resolution
    # Digits are bright strokes on black: every tile has both.
    for r in range(2):
        for c in range(2):
            tile = img[2 + r * 18 : 18 + r * 18, 2 + c * 18 : 18 + c * 18]
            assert tile.min() < 40 and tile.max() > 150


def test_reconstruct_takes_a_folder(tiny_checkpoint, images_dir, tmp_path):
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes((images_dir / "wide.png").read_bytes())
    (folder / "sub" / "b.png").write_bytes((images_dir / "gray.png").read_bytes())
    (folder / "readme.txt").write_text("ignored")
    report = json.loads(ddimctl("reconstruct", folder, "--model", tiny_checkpoint, "--steps", "2", "--json", cwd=tmp_path).stdout)
    assert [Path(im["image"]).name for im in report["results"][0]["images"]] == ["a.png", "b.png"]
    (tmp_path / "empty").mkdir()
    assert_one_line_error(ddimctl("invert", "empty", "--model", tiny_checkpoint, cwd=tmp_path, check=False), "holds no images")


def test_version_and_shell_completion(tmp_path):
    from importlib import metadata

    from ddimctl import __version__

    assert metadata.version("ddimctl") == __version__  # the package's version is read from __init__.py alone
    assert ddimctl("--version", cwd=tmp_path).stdout.startswith(f"ddimctl {__version__}")
    assert "--install-completion" in ddimctl("--help", cwd=tmp_path).stdout
    # What bash asks the installed console script at a Tab: commands, registry models, samplers.
    exe = Path(sys.executable).with_name("ddimctl")

    def complete(words: str, imported: list[str] | None = None) -> list[str]:
        env = {**os.environ, "_DDIMCTL_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1), **({"PYTHONPROFILEIMPORTTIME": "1"} if imported is not None else {})}
        result = subprocess.run([exe], env=env, capture_output=True, text=True, check=True)
        if imported is not None:  # -X importtime's lines: "import time: self | cumulative | module"
            imported.extend(line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:"))
        return result.stdout.split()

    # A Tab on an option or a choice imports no torch (2 s on every Tab before the commands deferred it).
    modules: list[str] = []
    assert complete("ddimctl sample --sampler d", modules) == ["ddim", "dpm++2m", "dpm++3m"]
    assert "typer" in modules and "torch" not in modules and "ddimctl.sampling.runners" not in modules
    assert complete("ddimctl sam") == ["sample"]
    assert complete("ddimctl sample --model ema-c") == ["ema-church-256", "ema-celebahq-256", "ema-cat-256"]
    assert complete("ddimctl sample --sampler dpm") == ["dpm++2m", "dpm++3m"]
    assert complete("ddimctl sample --precision f") == ["fp32", "fp16"]
    assert complete("ddimctl invert --device c") == ["cpu", "cuda"]
    assert complete("ddimctl sample --skip t") == ["trailing", "tuned"]


def test_the_command_lines_choices_name_what_the_library_implements():
    """choices.py lets help and completion list the choices without importing torch; these are its names."""
    from ddimctl.models import boundary
    from ddimctl.sampling import timesteps

    assert tuple(samplers.SAMPLERS) == choices.SAMPLER_NAMES
    assert timesteps.SCHEMES == choices.SKIP_SCHEMES and boundary.PRECISIONS == choices.PRECISIONS
    assert choices.ETA_SAMPLERS == tuple(name for name, spec in samplers.SAMPLERS.items() if spec.takes_eta)
    assert {schedule.Schedule(kind=kind).kind for kind in choices.NOISE_SCHEDULES.values()} <= set(schedule.SCHEDULE_KINDS)
    assert set(choices.PREDICTIONS.values()) == set(schedule.PREDICTIONS)


@pytest.mark.parametrize("args,named", [
    (["sample", "--sampler", "dpm++"], "'dpm++' is not a sampler"),
    (["sample", "--sampler", "unipc", "--eta", "0.5"], "--eta is a setting of the ddim sampler"),
    (["edit", "x.png", "--strength", "0.5", "--sampler", "unipc", "--eta", "1"], "--eta is a setting of the ddim sampler"),
    (["sample", "--device", "tpu"], "'tpu' is not a device"),
])
def test_wrong_choices_are_the_parsers_before_torch_starts(tmp_path, args, named):
    """Exit 2 with click's usage error, and torch never imported (seconds saved on a typo)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "ddimctl", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "typer" in imported and "torch" not in imported


def test_piped_progress_prints_plain_lines(tiny_checkpoint, tmp_path):
    """stderr is a pipe here: progress comes as plain lines (done/total, rate, elapsed, time left)."""
    env_run = ddimctl("sample", "--model", tiny_checkpoint, "-n", "2", "--steps", "3", "--batch-size", "1",
                      "--out", "p.png", cwd=tmp_path, env={"DDIMCTL_PROGRESS_SECONDS": "0"})
    lines = [line for line in env_run.stderr.splitlines() if line.startswith("sampling: ")]
    assert len(lines) == 6, env_run.stderr  # one per network call of a batch
    assert re.fullmatch(r"sampling: 6/6 calls, [\d.]+ (img/s|s/img), elapsed \d+:\d\d, left 0:00", lines[-1])
    assert "━" not in env_run.stderr


def test_a_rate_that_collapses_is_named():
    from ddimctl.threads import Slowdown

    watch = Slowdown(window_s=1.0, factor=3.0)
    remarks = [watch.update(t, done) for t, done in [(0, 0), (1, 100), (2, 200), (3, 220), (4, 240)]]
    assert remarks[:3] == ["", "", ""]
    assert remarks[3].startswith("5x slower than at the start: other work is using the CPU")


def test_threads_follow_the_free_cores(monkeypatch):
    from ddimctl import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 4)
    env = {}
    assert "4 other process(es)" in threads.choose(env)
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 0)
    env = {}
    assert threads.choose(env) is None and env == {}  # an idle machine: PyTorch's own choice
    env = {"OMP_NUM_THREADS": "2"}
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 4)
    assert threads.choose(env) is None and env == {"OMP_NUM_THREADS": "2"}  # the user's setting wins


def test_training_takes_the_free_cores_and_a_resume_its_runs_count(monkeypatch, tmp_path):
    """train takes the free cores like every command (tune-steps keeps every core: its search compares
    errors); a run records its count, and a resume takes it again, its weights' bits depending on it."""
    from ddimctl.models import runs
    from ddimctl import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 4)
    for argv, command in ((["train", "data"], "train"), (["--threads", "2", "train"], "train"),
                          (["sample", "--model", "digits"], "sample"), (["--version"], None)):
        assert threads.command_of(argv) == command
    env = {}
    assert threads.choose(env, "tune-steps") is None and env == {}
    assert threads.choose(env, "train") is not None and env["OMP_NUM_THREADS"] == "1"
    assert runs.thread_change({"cpu_threads": 2}, 2) is None and runs.thread_change({}, 1) is None
    assert "--threads 2 keeps them" in runs.thread_change({"cpu_threads": 2}, 1)
    with pytest.raises(DdimctlError, match="cpu_threads"):
        runs.thread_change({"cpu_threads": "two"}, 1)
    # A run trained on one thread resumes on one, wherever the machine's default is (no OMP_NUM_THREADS set).
    from PIL import Image

    (tmp_path / "data").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, dtype=np.uint8), "L").save(tmp_path / "data" / f"{i}.png")
    plain_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    train = [sys.executable, "-m", "ddimctl", "train", "data", "--out", "run", "--preset", "tiny", "--batch-size", "2",
             "--sample-count", "0", "--warmup", "0"]
    subprocess.run([*train[:3], "--threads", "1", *train[3:], "--steps", "1"], cwd=tmp_path, env=plain_env, check=True,
                   capture_output=True)
    resumed = subprocess.run([*train, "--steps", "2", "--resume"], cwd=tmp_path, env=plain_env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    # (on a busy machine the free cores may be one already; either way the resume ran on the run's count)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cpu_threads"] == 1
    assert "will not be bit-identical" not in resumed.stderr


def test_no_network_default_model_answers_in_one_line(tmp_path):
    """The Hub's host does not resolve: one error line at once, no retries, pointing to --model digits."""
    env = dict(HF_ENDPOINT="http://ddimctl-test.invalid", HF_HUB_CACHE=str(tmp_path / "hf"), DDIMCTL_CACHE=str(tmp_path / "c"))
    for args in (["sample", "--steps", "50", "--eta", "0"], ["reconstruct", str(tmp_path / "x.png")]):
        if args[0] == "reconstruct":
            Image.fromarray(np.zeros((32, 32, 3), dtype="uint8")).save(tmp_path / "x.png")
        result = ddimctl(*args, cwd=tmp_path, check=False, env=env, offline=False, timeout=120)
        assert result.returncode == 1 and "Retrying" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) <= 3 and "does not resolve" in lines[-1] and "--model digits" in lines[-1], result.stderr


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_writes_the_librarys_images(tiny_checkpoint, tmp_path, name):
    """`sample --sampler NAME --out DIR/`: the PNGs are exactly that sampler's function on the (seed, i)
    noise, on the timesteps of its default skip, quantised."""
    result = ddimctl("sample", "--model", tiny_checkpoint, "--sampler", name, "-n", 3, "--steps", 5, "--seed", 3,
                     "--out", "o/", "--precision", "fp32", cwd=tmp_path)
    settings = samplers.Settings(name, 5).for_model(1000, "uniform")
    assert f"S=5, {name}" in result.stdout and f"skip={settings.skip}" in result.stdout
    model = loading.load_model(str(tiny_checkpoint))
    x_T = seeds.initial_noise(seeds.image_generators(3, [0, 1, 2]), model.image_shape)
    with torch.no_grad():
        x0 = settings.run(model.unet, x_T, model.alphas_cumprod, settings.timesteps(model.alphas_cumprod))
    expected = ((x0 + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(3):
        assert np.array_equal(pixels(tmp_path / "o" / f"{i:06d}.png"), expected[i]), (name, i)


def test_latents_decode_with_another_sampler_and_say_so(tiny_checkpoint, images_dir):
    ddimctl("invert", "wide.png", "gray.png", "--model", tiny_checkpoint, "--steps", 10, "--out", "z.safetensors",
            cwd=images_dir)
    for name in ("dpm++2m", "unipc"):
        result = ddimctl("sample", "--latents", "z.safetensors", "--sampler", name, "--skip", "uniform", "--steps", 10,
                         "--precision", "fp32", "--out", f"{name}/", cwd=images_dir)
        assert f"z.safetensors was inverted with sampler ddim (now {name})" in result.stderr
        assert len(list((images_dir / name).glob("*.png"))) == 2
    with safe_open(images_dir / "z.safetensors", "pt") as f:
        assert f.metadata()["sampler"] == "ddim"  # the file still says what it was inverted for


def test_json_reports_write_null_for_an_infinite_psnr():
    """A perfect round trip has MSE 0 and PSNR inf, which JSON cannot hold (it printed `Infinity`)."""
    import math

    from ddimctl.cli.inversion import finite_or_null

    report = {"results": [{"mse": 0.0, "psnr": math.inf, "images": [{"psnr": math.inf}, {"psnr": 30.0}]}]}
    text = json.dumps(finite_or_null(report), allow_nan=False)
    assert json.loads(text) == {"results": [{"mse": 0.0, "psnr": None, "images": [{"psnr": None}, {"psnr": 30.0}]}]}
