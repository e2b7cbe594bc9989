"""images.py: the PNG writer pool, and reading images as they are meant to be seen."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddimctl.io import images
from ddimctl.errors import DdimctlError


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


def test_a_png_whose_pixel_data_ends_early_is_refused(tmp_path):
    """Pillow reads a PNG whose compressed rows stop after 2 of 16 as black rows; ddimctl refuses it,
    and reads every complete PNG (bit depths, colour types, palettes)."""
    import io
    import struct
    import zlib

    from ddimctl.io.images import png_rows_complete, read_pixels

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    def png(rows):
        raw = b"".join(b"\x00" + bytes([200]) * 16 for _ in range(rows))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

    assert png_rows_complete(png(16)) and not png_rows_complete(png(2))
    (tmp_path / "short.png").write_bytes(png(2))
    with pytest.raises(DdimctlError, match="ends before its last row"):
        read_pixels(tmp_path / "short.png", 16, 1)
    rng = np.random.default_rng(0)
    for image in (Image.fromarray((rng.random((17, 23, 3)) * 255).astype("uint8")),
                  Image.fromarray((rng.random((8, 8)) * 60000).astype("uint16")),
                  Image.fromarray((rng.random((13, 7)) > 0.5)),
                  Image.fromarray((rng.random((9, 9)) * 255).astype("uint8")).convert("P")):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        assert png_rows_complete(buffer.getvalue()), image.mode


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stores its pixels sideways with an orientation tag: it is read upright."""
    from ddimctl.io.images import read_pixels

    pixels = np.zeros((16, 16), dtype="uint8")
    pixels[:, :8] = 255  # left half white as stored
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    image.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    upright = read_pixels(tmp_path / "photo.jpg", 16, 1)[0].float()
    assert upright[:8].mean() > 200 and upright[8:].mean() < 50  # the white half is on top once turned
