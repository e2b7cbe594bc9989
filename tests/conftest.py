import json
import os
from pathlib import Path

# One thread per test process, set before torch starts its pool: OpenMP threads spin-waiting on a
# shared 2-core machine made a tiny forward 6x slower. Tests about threads set their own.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ddimctl.models.unet import PRESETS, UNet  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; a run without xdist ignores it
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than cores. Every test process runs one thread, and some of the
    suite's time is spent waiting (subprocesses starting, a stalled Hub's timeouts), which the extra
    worker fills: 153 s against 161 s idle on 2 cores, and a fairer share of a busy CPU."""
    return (os.cpu_count() or 1) + 1


@pytest.fixture(scope="session", autouse=True)
def private_ddimctl_cache(tmp_path_factory):
    """Converted checkpoints and compiled kernels of the tests stay out of the user's ~/.cache."""
    saved = os.environ.get("DDIMCTL_CACHE")
    os.environ["DDIMCTL_CACHE"] = str(tmp_path_factory.mktemp("ddimctl-cache"))
    yield
    if saved is None:
        del os.environ["DDIMCTL_CACHE"]
    else:
        os.environ["DDIMCTL_CACHE"] = saved


def random_unet(preset: str = "tiny", seed: int = 0) -> UNet:
    """A UNet whose weights are all random (biases and norms too, so no layer is an identity)."""
    torch.manual_seed(seed)
    model = UNet(PRESETS[preset])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 and p.shape[0] > 0 else 0))
        # Scale the last layer so the predicted noise has about unit size, like a trained model's.
        c = model.config
        probe = torch.randn(4, c.in_channels, c.resolution, c.resolution, generator=torch.Generator().manual_seed(0))
        scale = model(probe, torch.tensor([10, 300, 600, 900])).std()
        model.conv_out.weight /= scale
        model.conv_out.bias /= scale
    return model.eval()


@pytest.fixture(scope="session")
def tiny_unet() -> UNet:
    return random_unet("tiny")


@pytest.fixture()
def tiny_checkpoint(tmp_path, tiny_unet) -> Path:
    """A local safetensors checkpoint of the tiny UNet with a sidecar ddimctl config."""
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_unet.state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps({"unet": PRESETS["tiny"].to_dict(), "skip": "uniform"}))
    return path
