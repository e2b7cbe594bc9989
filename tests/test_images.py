"""images.py: the PNG writer pool."""

import time

import torch

from ddimctl import images


def test_writer_stalls_are_measured(monkeypatch, tmp_path):
    """submit() blocks only when `pending` batches are still being written, and says for how long."""

    slow = lambda pixels, path, clean_stale=True: time.sleep(0.05)  # noqa: E731
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


def test_mask_pixels_brighter_than_mid_grey_are_regenerated(tmp_path):
    import numpy as np
    from PIL import Image

    row = np.array([0, 127, 128, 255], dtype=np.uint8)
    Image.fromarray(np.tile(row, (4, 1)), "L").save(tmp_path / "mask.png")
    mask = images.load_mask(tmp_path / "mask.png", 4)
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
