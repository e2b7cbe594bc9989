"""Devices: `--device` to a torch device, and host/device copies that do not stall the host."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .errors import DdimctlError, param


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as e:
        raise DdimctlError(f"unknown {param('device')} {device!r}; use auto, cpu or cuda") from e
    if picked.type not in ("cpu", "cuda"):
        raise DdimctlError(f"{param('device')} {device} is not supported; use auto, cpu or cuda (cuda:N for one GPU)")
    if picked.type == "cuda":
        if not torch.cuda.is_available():
            raise DdimctlError(f"{param('device')} cuda was asked for but no CUDA GPU is visible; use {param('device')} cpu")
        if picked.index is not None and picked.index >= torch.cuda.device_count():
            raise DdimctlError(f"{param('device')} {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    return picked


def free_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on `device` (the system's available memory for the CPU), or None when
    it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_batch_fits(per_image: int, batch: int, device: torch.device, option: str = "batch_size") -> None:
    """Refuse, before anything is allocated, a batch whose images need more memory than `device` has
    free (per_image: UNetConfig.activation_bytes): allocating it would fail with a traceback, or
    swap for hours."""
    free = free_memory(device)
    if free is not None and per_image * batch > free:
        fits = max(1, free // per_image)
        raise DdimctlError(f"{param(option)} {batch} needs about {per_image * batch / 2**30:.1f} GiB on {device}, more than "
                           f"the {free / 2**30:.1f} GiB free; use {param(option)} {fits} or less")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without stalling the host: CUDA copies from pinned memory run asynchronously."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def start_host_copy(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying x (on a CUDA device) to pinned host memory; the returned function waits for
    the copy and returns it."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), host)[1]


class WorkTimer:
    """Seconds that stretches of work take on `device`. A GPU runs its kernels after the host has queued
    them, so there the stretches are CUDA events, read once the device has caught up (no wait in the
    loop); elsewhere the host's clock."""

    def __init__(self, device: torch.device):
        self.on_gpu = device.type == "cuda"
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    @contextmanager
    def measure(self):
        if self.on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end))
            if len(self._pending) > 64:  # a process that never reads the total keeps few events
                self._fold(wait=False)
        else:
            started = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - started

    @property
    def seconds(self) -> float:
        """The measured stretches so far, together (waits for the device's last one)."""
        self._fold(wait=True)
        return self._seconds

    def _fold(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][1].query()):
            start, end = self._pending.pop(0)
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000
