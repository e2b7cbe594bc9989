#!/usr/bin/env python3
"""Each sampler's own arithmetic per network call, against one UNet call of the bundled digits model
at batch 64 on this machine: the sampler driven by a network that costs almost nothing.

    python scripts/solver_overhead.py
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddimctl.sampling import samplers  # noqa: E402
from ddimctl.models import loading  # noqa: E402


def median_seconds(fn, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    model = loading.load_model("digits")
    x_T = torch.randn(64, *model.image_shape, generator=torch.Generator().manual_seed(0))

    def almost_free(x, t):
        return 0.1 * x

    with torch.no_grad():
        unet_call = median_seconds(lambda: model.unet(x_T, torch.full((64,), 500)))
        print(f"one UNet call at batch 64: {unet_call * 1e3:.1f} ms")
        for name in samplers.SAMPLERS:
            settings = samplers.Settings(name, 20).for_model(1000, model.skip)
            timesteps = settings.timesteps(model.alphas_cumprod)
            per_call = median_seconds(lambda: settings.run(almost_free, x_T, model.alphas_cumprod, timesteps)) / settings.steps
            print(f"{name:8s} own work per call {per_call * 1e3:.3f} ms = {100 * per_call / unet_call:.2f}% of a UNet call")


if __name__ == "__main__":
    main()
