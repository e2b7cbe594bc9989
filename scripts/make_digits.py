"""Write scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package, no network)
as 16x16 grayscale PNGs: DIR/train/ (4 of every 5) and DIR/test/ (every 5th), the data set of the
bundled `digits` model.

    pip install scikit-learn && python scripts/make_digits.py data/digits
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: Path) -> None:
    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "test" if i % 5 == 0 else "train"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), "L")
        img.resize((16, 16), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
    print(f"wrote {len(digits.images)} images to {out}/train and {out}/test")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/digits"))
