"""The fast path's structure on the CPU (CI has no GPU; docs/benchmarks.md has the GPU runs) and `bench`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_unet
from helpers import ddimctl

from ddimctl import bench, metrics, schedule
from ddimctl.sampling import ddim
from ddimctl.models import boundary
from ddimctl.errors import DdimctlError
from ddimctl.models.unet import PRESETS, UNet


def native_bf16(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    native_bf16(monkeypatch, False, False)
    assert boundary.resolve_precision("auto", cpu) == "fp32"
    assert boundary.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(DdimctlError, match="needs a CUDA GPU"):
        boundary.resolve_precision("fp16", cpu)
    with pytest.raises(DdimctlError, match="^precision must be one of"):
        boundary.resolve_precision("int4", cpu)


@pytest.mark.parametrize("avx512_bf16,amx", [(False, False), (True, False), (False, True), (True, True)])
def test_auto_precision_samples_in_fp32_on_every_cpu(monkeypatch, avx512_bf16, amx):
    """A seed gives the same image on every CPU by default: bf16 moves single images visibly, so on
    the CPU it is asked for by name; training's autocast keeps fp32 weights and uses native bf16."""
    from ddimctl.train import uses_bf16

    cpu = torch.device("cpu")
    native_bf16(monkeypatch, avx512_bf16, amx)
    assert boundary.resolve_precision("auto", cpu) == "fp32"
    assert boundary.resolve_precision("bf16", cpu) == "bf16"  # an explicit choice wins
    assert uses_bf16("auto", cpu) == (avx512_bf16 or amx) and not uses_bf16("fp32", cpu) and uses_bf16("bf16", cpu)


def test_older_torch_without_the_checks_means_no_native_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert not boundary.cpu_has_native_bf16()


def test_fixed_batch_pads_and_returns_float32():
    """A compiled graph takes only its own batch size: smaller batches are padded to it and the
    padding cut off again (the model here refuses any other batch, as a compiled graph would)."""
    unet = random_unet("tiny")

    def only_batches_of_4(x, t):
        assert x.shape[0] == 4 and t.shape[0] == 4, x.shape
        return unet(x, t)

    eps = boundary.FastEps(only_batches_of_4, torch.float32, channels_last=False, fixed_batch=4)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 500])
    with torch.no_grad():
        out = eps(x, t)
        torch.testing.assert_close(out, unet(x, t))
    assert out.shape == x.shape and out.dtype == torch.float32


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_the_noise_of_a_bf16_v_or_x0_network_is_made_from_the_float32_x_t(prediction):
    """The boundary runs the network in bf16 but turns its output into the noise with the sampler's own
    float32 x_t: a network whose output bf16 holds exactly (zeros) gives the same noise in bf16 as in
    fp32, bit for bit; x_t rounded to bf16 (0.4%) would move it by about 1e-3."""
    abar = schedule.alphas_cumprod(schedule.linear_betas())
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 300, 700, 999])
    zeros = lambda x, t: torch.zeros_like(x)  # noqa: E731
    noise = {dtype: boundary.FastEps(zeros, dtype, False, prediction=prediction, alphas_cumprod=abar)(x, t)
             for dtype in (torch.float32, torch.bfloat16)}
    assert noise[torch.float32].dtype == noise[torch.bfloat16].dtype == torch.float32
    assert torch.equal(noise[torch.float32], noise[torch.bfloat16])
    a = abar[t].float().view(-1, 1, 1, 1)
    expected = (1 - a).sqrt() * x if prediction == "v_prediction" else x / (1 - a).sqrt()  # the formulas, output 0
    torch.testing.assert_close(noise[torch.float32], expected, rtol=1e-6, atol=1e-6)


def test_bf16_path_stays_close_to_fp32():
    unet = random_unet("tiny")
    x_T = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    abar = schedule.alphas_cumprod(schedule.linear_betas())
    tau = schedule.timestep_sequence(10, 1000, "uniform")
    ref = ddim.sample(boundary.prepare(unet, torch.device("cpu"), "fp32"), x_T, abar, tau)
    low = ddim.sample(boundary.prepare(unet, torch.device("cpu"), "bf16"), x_T, abar, tau)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert float(metrics.psnr_per_image(low, ref).median()) > 25  # a random network: outputs far outside [-1, 1]


def test_bf16_samples_of_the_trained_digits_model_match_fp32():
    """bf16 keeps each image recognisably itself. The bound holds on every CPU kind: bf16 rounds every
    activation to 8 significant bits, and how that rounding falls depends on the processor's kernels
    (median 39-50 dB on 4 images at S = 6 where bf16 is emulated or on Intel AMX, 35.9 dB on an AMD
    EPYC with AVX512-BF16); a broken bf16 path (a wrong cast, a lost scale) lands below 20 dB."""
    from ddimctl.sampling import samplers, runners
    from ddimctl.models import loading

    model = loading.load_model("digits")
    for eta in (0.0, 1.0):
        runs = {}
        for precision in ("fp32", "bf16"):
            eps = boundary.prepare(model.unet, torch.device("cpu"), precision)
            sampler = runners.Runner.create(model, samplers.Settings(steps=6, eta=eta), torch.device("cpu"), eps_model=eps)
            runs[precision] = torch.cat([x for _, x in sampler.sample_indices(list(range(4)), 0, 4)])
        assert torch.isfinite(runs["bf16"]).all()
        psnr = metrics.psnr_per_image(runs["bf16"], runs["fp32"])
        assert float(psnr.median()) > 30 and float(psnr.min()) > 25, psnr


def test_compiled_model_matches_eager_and_its_kernels_are_cached(tmp_path):
    """torch.compile on the CPU (Inductor's C++ kernels) of a one-level UNet (no attention: its C++
    kernels double the compile time; the GPU runs compile the full UNet): the
    same numbers as eager; and a second process reuses the first one's graph from
    $DDIMCTL_CACHE/inductor instead of compiling again."""
    script = (
        "import os, torch; from torch._dynamo.utils import counters\n"
        "from ddimctl.models import boundary; from ddimctl.models.unet import UNet, UNetConfig\n"
        "torch.manual_seed(0)\n"
        "unet = UNet(UNetConfig(resolution=8, in_channels=1, out_channels=1, base_channels=32, channel_mult=(1,),\n"
        "                       num_res_blocks=1, attention_resolutions=())).eval()\n"
        "eps = boundary.prepare(unet, torch.device('cpu'), 'fp32', 'default', batch_size=2)\n"
        "x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 999])\n"
        "with torch.no_grad():\n"
        "    diff = float((eps(x, t) - unet(x, t)).abs().max())\n"
        "print(os.environ['TORCHINDUCTOR_CACHE_DIR'], counters['inductor']['fxgraph_cache_hit'], diff)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["DDIMCTL_CACHE"] = str(tmp_path / "cache")
    run = lambda: subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)  # noqa: E731
    folder, hits, diff = run().stdout.split()
    assert folder == str(tmp_path / "cache" / "inductor") and hits == "0"
    assert float(diff) < 1e-4
    assert any((tmp_path / "cache" / "inductor").iterdir())
    folder, hits, diff = run().stdout.split()
    assert int(hits) >= 1 and float(diff) < 1e-4


def test_users_inductor_cache_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    boundary.use_persistent_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_unknown_compile_mode_is_one_line():
    with pytest.raises(DdimctlError, match="compile_mode must be one of default, reduce-overhead"):
        boundary.prepare(random_unet("tiny"), torch.device("cpu"), "fp32", "fastest")


def test_flops_of_the_cifar10_unet():
    flops = boundary.forward_flops(UNet(PRESETS["cifar10"]))
    # Attention: q k^T and softmax(.) v, 2 * 2 * tokens^2 * channels each, in the five 16x16 blocks
    # (256 tokens, 256 channels) and the 4x4 middle block.
    attention = 5 * 4 * 256**2 * 256 + 4 * 16**2 * 256
    assert 12.0e9 < flops - attention < 12.2e9  # the rest: 12.1 GFLOP (reference/performance.md)


def test_compiling_is_left_to_runs_that_repay_it():
    cifar, church = UNet(PRESETS["cifar10"]), UNet(PRESETS["ddpm256"])
    assert not boundary.worth_compiling(cifar, 16 * 50)  # the default `sample` grid
    assert not boundary.worth_compiling(cifar, 3_000 * 50)  # 1.9 PFLOP: eager finishes first
    assert boundary.worth_compiling(cifar, 5_000 * 50)
    assert boundary.worth_compiling(cifar, 50_000 * 10)  # a sweep cell
    assert not boundary.worth_compiling(church, 16 * 50)
    assert boundary.worth_compiling(church, 100 * 100)  # 5 PFLOP


def test_psnr():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1] += 0.2  # 0.1 on the [0, 1] scale: MSE 0.01, 20 dB
    p = metrics.psnr_per_image(b, a)
    assert p[0] > 100 and p[1] == pytest.approx(20.0, abs=1e-3)


def test_bench_cli_json(tmp_path):
    def bench_json(*extra):
        result = ddimctl("bench", "--model", "tiny", "--steps", "2", "--batch-size", "2", "--runs", "1", "--json", *extra,
                         cwd=tmp_path)
        return {r["name"]: r for r in json.loads(result.stdout)["results"]}

    # On a CPU without native bf16 the default fast path is the fp32 baseline itself: timed once,
    # beside the reference. (The subprocess cannot be mocked, so fp32 is asked for explicitly.)
    rows = bench_json("--precision", "fp32")
    assert list(rows) == ["ddimctl fp32 eager", "diffusers fp32"]
    ours, ref = rows["ddimctl fp32 eager"], rows["diffusers fp32"]
    assert ours["images_per_s"] > 0 and ours["finite"] and ours["ratio"]["fp32"] > 0
    assert ref["psnr_median"] > 60  # same weights, same noise, same update: the same images
    rows = bench_json("--precision", "bf16")
    assert list(rows) == ["ddimctl fp32 eager", "ddimctl bf16 eager", "diffusers fp32"]
    low = rows["ddimctl bf16 eager"]
    assert low["finite"] and 20 < low["psnr_median"] < 100 and low["ratio"]["fp32"] > 0


def test_training_benchmark_runs_the_trainers_step():
    from ddimctl.models.unet import PRESETS

    result = bench.benchmark_training(PRESETS["tiny"], torch.device("cpu"), 2, "fp32", False, steps=1)
    assert result["name"] == "train fp32 eager" and result["images_per_s"] > 0


def test_bench_times_presets_with_random_weights_and_loads_the_rest():
    loaded = []
    unet, source = bench.unet_to_time("tiny", loaded.append)
    assert isinstance(unet, UNet) and unet.config == PRESETS["tiny"] and "random weights" in source and not loaded
    again, _ = bench.unet_to_time("tiny", loaded.append)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))

    class Loaded:
        unet = "the loaded UNet"

    assert bench.unet_to_time("some/checkpoint.safetensors", lambda spec: Loaded()) == (
        "the loaded UNet", "some/checkpoint.safetensors")


def test_bench_without_diffusers_says_so_and_times_ddimctl(tmp_path):
    """It was a traceback (No module named 'diffusers'), README commands included."""
    result = ddimctl("bench", "--model", "digits", "--steps", "2", "--batch-size", "2", "--runs", "1", cwd=tmp_path,
                     prelude="import sys; sys.modules['diffusers'] = None  # as if not installed", check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "diffusers is not installed: ddimctl's rows only" in result.stderr
    assert "ddimctl fp32 eager" in result.stdout and "diffusers fp32" not in result.stdout
