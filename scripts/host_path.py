#!/usr/bin/env python3
"""What the host alone can sustain in a streamed run: a network that costs nothing, 50 quad steps,
batches of 1024 CIFAR-10-sized images from per-image generators, written as PNGs by the writer pool.
On a GPU the network and the update run on the device, so this bounds how fast the host can feed it
(here the update's arithmetic runs on the CPU too, so the bound is conservative).

    python scripts/host_path.py
"""

import tempfile
import time
from pathlib import Path

import torch

from ddimctl.io import images
from ddimctl.sampling import samplers, runners
from ddimctl.models.families import DEFAULT_SCHEDULE  # noqa: E402
from ddimctl.models.unet import PRESETS, UNet
from ddimctl.models.loading import LoadedModel

with torch.device("meta"):
    unet = UNet(PRESETS["cifar10"])
loaded = LoadedModel(unet, "free", "none", dict(DEFAULT_SCHEDULE), "quad")
for eta in (0.0, 1.0):
    free = lambda x, t: torch.zeros_like(x)  # noqa: E731
    sampler = runners.Runner.create(loaded, samplers.Settings("ddim", 50, "quad", eta), torch.device("cpu"), eps_model=free)
    out = Path(tempfile.mkdtemp())
    n = 4096
    started = time.perf_counter()
    with images.BackgroundWriter() as writer:
        for idx, x0 in sampler.sample_indices(list(range(n)), 0, 1024):
            writer.submit([(p, out / f"{i:06d}.png") for i, p in zip(idx, images.to_uint8(x0))])
    wall = time.perf_counter() - started
    print(f"eta={eta}: {n / wall:.0f} images/s through the host path, writers stalled {writer.stalled_s:.2f}s")
