"""images.py: the PNG writer pool."""

import time

import torch

from ddimctl import images


def test_writer_stalls_are_measured(monkeypatch, tmp_path):
    """submit() blocks only when `pending` batches are still being written, and says for how long."""

    slow = lambda pixels, path: time.sleep(0.05)  # noqa: E731
    monkeypatch.setattr(images, "save_image", slow)
    batch = [(torch.zeros(4, 4, 3, dtype=torch.uint8), tmp_path / "x.png")]
    with images.BackgroundWriter(workers=1, pending=1) as writer:
        for _ in range(4):
            writer.submit(batch)
    assert writer.stalled_s >= 3 * 0.05 * 0.8  # batches 2-4 each waited for the one before
    with images.BackgroundWriter(workers=1, pending=8) as roomy:
        for _ in range(4):
            roomy.submit(batch)
    assert roomy.stalled_s < 0.02
