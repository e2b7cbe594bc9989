"""FID through torch-fidelity with a small feature extractor the tests build (no Inception weights, no
network), checked against a direct Frechet distance; the sweep end to end; and the errors without it.

torch-fidelity needs torchvision, which does not import beside the CPU torch 2.13.0 of the main test
venv: .ci/run runs this file a second time in a venv with torch 2.14.1 + torchvision 0.29.1.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddimctl import metrics
from helpers import ddimctl


def have_fidelity() -> bool:
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        return False
    return True


needs_fidelity = pytest.mark.skipif(not have_fidelity(), reason="torch-fidelity not importable (see .ci/run)")

# Run before the command line in its process: the tests' small feature extractor, registered by name.
WITH_TEST_EXTRACTOR = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_evaluate; test_evaluate.register_test_extractor()"


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> 48 features: the mean of each channel over a 4x4 grid of cells."""
    x = images.float() / 255
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1).double()


def register_test_extractor():
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class PooledPixels(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return ("pooled48",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "pooled48"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            return (pooled_features(x),)

    try:
        torch_fidelity.register_feature_extractor("ddimctl-test-pooled", PooledPixels)
    except Exception:
        pass  # already registered in this process


def write_images(folder: Path, n: int, seed: int, brightness: float) -> torch.Tensor:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = (np.clip(rng.normal(brightness, 60, (n, 16, 16, 3)), 0, 255)).astype(np.uint8)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:04d}.png")
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


@needs_fidelity
def test_fid_through_torch_fidelity_equals_the_direct_frechet_distance(tmp_path):
    from ddimctl import evaluate

    register_test_extractor()
    a = write_images(tmp_path / "a", 200, 0, 100)
    b = write_images(tmp_path / "b", 300, 1, 130)
    got = evaluate.compute_fid(tmp_path / "a", str(tmp_path / "b"), torch.device("cpu"),
                               feature_extractor="ddimctl-test-pooled", cache_root=str(tmp_path / "cache"))
    expected = metrics.frechet_distance_between(pooled_features(a), pooled_features(b))
    assert got == pytest.approx(expected, rel=1e-3)
    assert expected > 0.5  # the two sets really differ
    # The reference folder's statistics were cached for the next cell of a sweep.
    assert any((tmp_path / "cache").rglob("*"))


@needs_fidelity
def test_sweep_end_to_end(tmp_path):
    """Every cell sampled and scored; markdown, JSON and plot written; reruns resume."""
    write_images(tmp_path / "ref", 64, 0, 60)
    args = ["sweep", "--model", "digits", "--sampler", "ddim,dpm++2m", "--steps", "2,4", "--eta", "0,1", "--sigma-hat", "-n", "24",
            "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "sw"), "--feature-extractor", "ddimctl-test-pooled"]
    result = ddimctl(*args, check=False, prelude=WITH_TEST_EXTRACTOR, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert sorted((c["row"], c["steps"]) for c in report["cells"]) == sorted(
        (r, s) for r in ("ddim eta=0", "ddim eta=1", "ddim sigma-hat", "dpm++2m") for s in (2, 4)
    )
    assert all(c["fid"] > 0 for c in report["cells"])
    assert len(list((tmp_path / "sw" / "eta0-S2").glob("*.png"))) == 24
    assert len(list((tmp_path / "sw" / "dpm++2m-S4").glob("*.png"))) == 24
    table = (tmp_path / "sw" / "table.md").read_text()
    assert "| ddim sigma-hat |" in table and "| dpm++2m |" in table and "S = 4" in table
    if (tmp_path / "sw" / "fid.png").exists():
        assert Image.open(tmp_path / "sw" / "fid.png").size[0] > 100


@pytest.mark.skipif(have_fidelity(), reason="this checks the message shown when torch-fidelity is missing")
def test_without_torch_fidelity_the_commands_say_what_to_install(tmp_path):
    for args in (["fid", str(tmp_path), "--ref", "cifar10-train"], ["sweep", "--model", "digits", "--ref", "x", "-n", "10"]):
        result = ddimctl(*args, cwd=tmp_path, check=False, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "pip install '.[eval]'" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "sweep").exists()


def test_tables_without_fid_library(tmp_path):
    from ddimctl import evaluate

    cells = [{"row": "ddim eta=0", "paper_row": "0", "steps": 10, "fid": 12.5},
             {"row": "ddim eta=1", "paper_row": "1", "steps": 10, "fid": 40.0},
             {"row": "dpm++2m", "paper_row": None, "steps": 10, "fid": 9.5},
             {"row": "ddim eta=0", "paper_row": "0", "steps": 20, "fid": 7.0},
             {"row": "ddim sigma-hat", "paper_row": "sigma-hat", "steps": 10, "fid": 300.0}]
    written = evaluate.write_tables(tmp_path, "cifar10", cells)
    table = written["markdown"].read_text().splitlines()
    assert table[2] == "| sampler | S = 10 | S = 20 |"
    assert table[4] == "| ddim eta=0 | 12.50 (paper 13.36) | 7.00 (paper 6.84) |"
    assert table[5] == "| ddim eta=1 | 40.00 (paper 41.07) | - (paper 18.36) |"  # the paper's value even where not run
    assert table[6] == "| dpm++2m | 9.50 | - |"
    assert table[7] == "| ddim sigma-hat | 300.00 (paper 367.43) | - (paper 133.37) |"
    assert json.loads(written["json"].read_text())["cells"] == cells


@needs_fidelity
def test_fid_from_saved_statistics_and_from_a_running_sampler(tmp_path):
    from ddimctl import evaluate

    register_test_extractor()
    a = write_images(tmp_path / "a", 200, 0, 100)
    b = write_images(tmp_path / "b", 300, 1, 130)
    stats = evaluate.statistics(str(tmp_path / "b"), torch.device("cpu"), feature_extractor="ddimctl-test-pooled",
                                cache_root=str(tmp_path / "cache"))
    evaluate.save_statistics(stats, tmp_path / "b.npz")
    from_file = evaluate.compute_fid(tmp_path / "a", str(tmp_path / "b.npz"), torch.device("cpu"),
                                     cache_root=str(tmp_path / "cache"))
    expected = metrics.frechet_distance_between(pooled_features(a), pooled_features(b))
    assert from_file == pytest.approx(expected, rel=1e-3)

    args = ["fid", "--model", "digits", "-n", "16", "--steps", "3", "--ref", str(tmp_path / "b"),
            "--feature-extractor", "ddimctl-test-pooled"]
    result = ddimctl(*args, check=False, prelude=WITH_TEST_EXTRACTOR)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip()) > 0


@needs_fidelity
def test_fid_of_shards_taken_together_is_the_fid_of_their_union(tmp_path):
    """`fid s0 s1 --ref R` (the folders of `sample --shard`) scores the images of both as one set, and
    --save-stats over both saves the statistics of that set."""
    a = write_images(tmp_path / "a", 120, 0, 100)
    b = write_images(tmp_path / "b", 150, 1, 130)
    for i, path in enumerate(sorted((tmp_path / "a").iterdir())):
        (tmp_path / f"s{i % 2}").mkdir(exist_ok=True)
        path.rename(tmp_path / f"s{i % 2}" / path.name)
    expected = metrics.frechet_distance_between(pooled_features(a), pooled_features(b))
    extractor = ["--feature-extractor", "ddimctl-test-pooled"]
    scored = ddimctl("fid", "s0", "s1", "--ref", "b", *extractor, cwd=tmp_path, prelude=WITH_TEST_EXTRACTOR)
    assert float(scored.stdout.strip()) == pytest.approx(expected, rel=1e-3)
    assert float(ddimctl("fid", "s0", "--ref", "b", *extractor, cwd=tmp_path, prelude=WITH_TEST_EXTRACTOR)
                 .stdout.strip()) != pytest.approx(expected, rel=1e-2)  # one shard alone is another set
    ddimctl("fid", "s0", "s1", "--save-stats", "a.npz", *extractor, cwd=tmp_path, prelude=WITH_TEST_EXTRACTOR)
    saved = np.load(tmp_path / "a.npz")
    assert np.allclose(saved["mu"], pooled_features(a).mean(0).numpy(), atol=1e-5)


def test_the_install_hint_keeps_the_installed_torch():
    from ddimctl.evaluate import install_hint

    assert install_hint("2.13.0+cpu") == (
        "in the ddimctl folder, pip install '.[eval]' torch==2.13.0 torchvision==0.28.0 (name both from "
        "https://download.pytorch.org/whl/cpu, or pip replaces your torch 2.13.0+cpu; the README's fid section says more)")
    assert "torch==2.14.1 torchvision==0.29.1" in install_hint("2.14.1")
    assert "torch==2.2.2 torchvision==0.17.2" in install_hint("2.2.2")
