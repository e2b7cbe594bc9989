"""Images in and out: pixels <-> [-1, 1] tensors, grids, and files written atomically."""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DdimctlError, param
from .files import MARK, MARKED_SUFFIXES, atomic_path, pixels_digest, refuse_foreign, regular_file

# Formats Pillow reads that people keep images in; those ddimctl writes pictures in.
READ_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) to 8-bit (N, H, W, C), as the checkpoints' authors did."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit (N, H, W, C) to [-1, 1] floats (N, C, H, W)."""
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """One 8-bit (H, W, C) image."""
    array = pixels.to(torch.uint8).contiguous().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # mode L or RGB


def grid(pixels: torch.Tensor, columns: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile 8-bit (N, H, W, C) images into one (H', W', C) image."""
    n, h, w, c = pixels.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    out = torch.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        out[top : top + h, left : left + w] = pixels[i]
    return out


def enlarge(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement of 8-bit (..., H, W, C) images by an integer factor."""
    if factor == 1:
        return pixels
    return pixels.repeat_interleave(factor, dim=-3).repeat_interleave(factor, dim=-2)


def display_scale(side: int, target: int = 256) -> int:
    """The factor that makes a picture whose short side is `side` pixels at least `target` on that
    side (1 for large ones): the one rule for every picture ddimctl writes for a person to look at."""
    return max(1, math.ceil(target / side))


LABEL_BAND = 14  # pixels: the default bitmap font is about 11 high


def save_picture(
    pixels: torch.Tensor, path: Path, scale: int | None = None, labels: Sequence[str] = (), tile: int = 0, padding: int = 2
) -> None:
    """A grid or strip (H, W, C) for a person to look at: enlarged (scale None: to at least 256 px on
    the short side), and, with `labels`, a band above naming each column of `tile`-wide tiles."""
    factor = scale or display_scale(min(pixels.shape[0], pixels.shape[1]))
    img = to_pil(enlarge(pixels, factor))
    if labels:
        from PIL import ImageDraw

        band = Image.new(img.mode, (img.width, img.height + LABEL_BAND), 255 if img.mode == "L" else (255, 255, 255))
        band.paste(img, (0, LABEL_BAND))
        draw = ImageDraw.Draw(band)
        for i, label in enumerate(labels):
            centre = (padding + i * (tile + padding) + tile / 2) * factor
            left, _, right, _ = draw.textbbox((0, 0), label)
            draw.text((centre - (right - left) / 2, 1), label, fill=0 if img.mode == "L" else (0, 0, 0))
        img = band
    write(img, path, alone=True)


def save_image(pixels: torch.Tensor, path: Path, clean_stale: bool = True, alone: bool = False) -> None:
    """Write one 8-bit (H, W, C) image; the format follows the suffix, .png by default. alone: not one
    of a folder of many (see write)."""
    write(to_pil(pixels), path, clean_stale, alone)


def write(img: Image.Image, path: Path, clean_stale: bool = True, alone: bool = False) -> None:
    """An image file, atomically. A PNG written alone carries its own mark (files.MARK: the digest of
    its pixels, in a text chunk) and no ledger entry; the PNGs of a folder, and other formats, are
    entered in their folder's ledger."""
    kind = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    marked = alone and kind == "PNG"
    with atomic_path(path, clean_stale, ledger=not marked) as tmp:
        if marked:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text(MARK, pixels_digest(img))
            img.save(tmp, format=kind, pnginfo=info)
        else:
            img.save(tmp, format=kind)


class BackgroundWriter:
    """Encode and write PNGs on worker threads; at most `pending` batches wait, bounding memory.

    `stalled_s` is how long submit() blocked because the writers fell behind: the time the
    sampler (and its GPU) waited on PNG encoding.
    """

    def __init__(self, workers: int | None = None, pending: int = 4):
        workers = workers or max(2, min(8, os.cpu_count() or 1))  # encoding releases the GIL
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png-writer")
        self._futures: deque[Future] = deque()
        self._pending = pending
        self.stalled_s = 0.0

    def submit(self, items: list[tuple[torch.Tensor, Path]]) -> None:
        started = time.perf_counter()
        while len(self._futures) >= self._pending:
            self._futures.popleft().result()  # re-raises a failed write here, in the caller
        self.stalled_s += time.perf_counter() - started
        # Folders of samples clean their stale temporaries once, up front, not once per image.
        self._futures.append(self._pool.submit(lambda: [save_image(p, path, clean_stale=False) for p, path in items]))

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self._futures:
                self._futures.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


def save_gif(frames: Sequence[torch.Tensor], path: Path, duration_ms: int = 120, scale: int | None = None) -> None:
    factor = scale or display_scale(min(frames[0].shape[0], frames[0].shape[1]))
    images = [to_pil(enlarge(f, factor)) for f in frames]
    # Play forwards then backwards so the loop has no jump.
    sequence = images + images[-2:0:-1]
    with atomic_path(path) as tmp:
        sequence[0].save(tmp, format="GIF", save_all=True, append_images=sequence[1:], duration=duration_ms, loop=0)


GRID_MEMORY_LIMIT = 4 << 30  # bytes of float images a grid may gather in memory


def check_grid_size(count: int, image_shape, scale: int | None = None) -> None:
    """Before sampling into one picture: the images must fit in memory together, enlarged too."""
    c, h, w = image_shape
    needed = count * c * h * w * 4 * max(1, scale or 1) ** 2
    if needed > GRID_MEMORY_LIMIT:
        raise DdimctlError(f"a grid of {count} images needs {needed / 2**30:,.0f} GiB of memory; "
                           f"write them one PNG each with --out FOLDER/")


def check_writable(path: Path) -> None:
    """Fail early, before any sampling, when `path` cannot be written."""
    folder = Path(path).parent if not Path(path).is_dir() else Path(path)
    if not folder.exists():
        raise DdimctlError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise DdimctlError(f"cannot write {path}: {folder} is not a folder; choose another {param('out')}")
    if not os.access(folder, os.W_OK):
        raise DdimctlError(f"cannot write {path}: folder {folder} is not writable; choose another {param('out')}")
    if not Path(path).is_dir():  # a file written alone carries its own mark: no ledger of the folder's is involved
        refuse_foreign([path], ledger=Path(path).suffix.lower() not in MARKED_SUFFIXES)


GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def read_pixels(path: Path, resolution: int, channels: int, changes: dict[str, list] | None = None) -> torch.Tensor:
    """Any image Pillow reads as 8-bit (C, H, W) at `resolution`: the shorter side resized and the
    centre cropped; RGBA, palette and grayscale images converted to `channels`. What was changed is
    recorded in `changes` ("resized": [(name, (w, h))], "to grayscale" / "to RGB": [name])."""
    path = Path(path)
    if not os.path.lexists(path):
        raise DdimctlError(f"{path}: no such image file")
    regular_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.format == "PNG" and not png_rows_complete(path.read_bytes()):
                raise DdimctlError(f"{path}: its pixel data ends before its last row (a cut-short PNG, which would "
                                   f"read as black rows); write the image again")
            gray = img.mode in GRAYSCALE_MODES
            img = ImageOps.exif_transpose(img)  # a phone photo's orientation tag: upright as it is shown
            img = to_8bit(img).convert("RGB" if channels == 3 else "L")
    except ValueError as e:
        if "NaN or infinite pixels" in str(e):  # a floating-point image must not become black or white silently
            raise DdimctlError(f"{path}: {e}, which no image can show; fix or drop the file") from e
        raise DdimctlError(f"{path}: not a readable image ({str(e).splitlines()[0]}); pass a PNG or JPEG file") from e
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise DdimctlError(f"{path}: not a readable image ({str(e).splitlines()[0]}); pass a PNG or JPEG file") from e
    if changes is not None and gray != (channels == 1):
        changes.setdefault("to grayscale" if channels == 1 else "to RGB", []).append(path.name)
    if img.size != (resolution, resolution):
        if changes is not None:
            changes.setdefault("resized", []).append((path.name, img.size))
        img = fit(img, resolution)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.reshape(resolution, resolution, channels).permute(2, 0, 1)


# Adam7's passes: (first column, first row, column step, row step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type


def png_rows_complete(data: bytes) -> bool:
    """Whether a PNG's compressed pixel data (its IDAT chunks) holds every row its header promises.
    Pillow fills the rows of a stream that ends early with zeros without a word."""
    import struct
    import zlib

    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 33:
        return False
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    pixel_bits = depth * _PNG_CHANNELS.get(colour, 1)
    row_bytes = lambda w: 1 + (w * pixel_bits + 7) // 8  # noqa: E731 (a filter byte, then the pixels)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = sum(row_bytes(-(-(width - x0) // dx)) * -(-(height - y0) // dy)
                   for x0, y0, dx, dy in passes if width > x0 and height > y0)
    stream, at = zlib.decompressobj(), 8
    produced = 0
    while at + 8 <= len(data) and produced < expected:
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            try:
                produced += len(stream.decompress(data[at + 8:at + 8 + length], expected - produced))
                while stream.unconsumed_tail and produced < expected:
                    produced += len(stream.decompress(stream.unconsumed_tail, expected - produced))
            except zlib.error:
                return False
        at += 12 + length
    return produced >= expected


def describe_changes(changes: dict[str, list], resolution: int) -> list[str]:
    """One line per kind of change made to a set of input images, however many images."""
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    lines = []
    if changes.get("resized"):
        resized = changes["resized"]
        first = ", ".join(f"{name} {w}x{h}" for name, (w, h) in resized[:3]) + (", ..." if len(resized) > 3 else "")
        lines.append(f"{len(resized)} image(s) resized on the shorter side and centre-cropped to "
                     f"{resolution}x{resolution} ({first})")
    for kind, what in (("to grayscale", "colour image(s) converted to grayscale, the model's channels"),
                       ("to RGB", "grayscale image(s) repeated to RGB, the model's channels")):
        if changes.get(kind):
            lines.append(f"{len(changes[kind])} {what} ({some(changes[kind])})")
    return lines


def load_images(paths: Sequence[Path], resolution: int, channels: int, notice: Callable[[str], None] | None = None) -> torch.Tensor:
    """load_image for each path, as one (N, C, H, W) tensor; notice() hears once what was changed."""
    changes: dict[str, list] = {}
    x = torch.stack([load_image(p, resolution, channels, changes) for p in paths])
    for line in describe_changes(changes, resolution) if notice is not None else []:
        notice(line)
    return x


def columns_grid(columns: Sequence[torch.Tensor], rows: int = 32) -> torch.Tensor:
    """A grid whose column j holds columns[j][i] in row i (8-bit (N, H, W, C) each), the first `rows`
    rows: an input and its reconstructions side by side."""
    tiles = torch.stack([c[:rows] for c in columns], dim=1).flatten(0, 1)
    return grid(tiles, columns=len(columns))


def strip(*parts: torch.Tensor) -> torch.Tensor:
    """One row of 8-bit images, the parts one after another."""
    row = torch.cat(parts)
    return grid(row, columns=len(row))


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale images scaled to 8 bits (Pillow's convert("L") would clip them,
    turning a 16-bit image all white)."""
    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return img
    import numpy as np

    array = np.asarray(img, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError("it holds NaN or infinite pixels")
    top = 65535.0 if img.mode != "F" else max(1.0, float(array.max()))
    if img.mode == "I" and array.max() > 65535:  # a true 32-bit image: use its own range
        top = float(array.max())
    return Image.fromarray(np.clip(np.round(array / top * 255), 0, 255).astype(np.uint8), "L")


def load_image(path: Path, resolution: int, channels: int, changes: dict[str, list] | None = None) -> torch.Tensor:
    """read_pixels as a [-1, 1] float tensor (C, H, W), the way the checkpoints were trained."""
    return from_uint8(read_pixels(path, resolution, channels, changes).permute(1, 2, 0)[None])[0]


def load_mask(path: Path, resolution: int, notice: Callable[[str], None] | None = None) -> torch.Tensor:
    """An inpainting mask as (1, 1, H, W) of 0 (keep) and 1 (regenerate): pixels brighter than mid-grey
    count as white."""
    return (load_images([path], resolution, 1, notice) > 0).float()


def fit(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop the centre square."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))
