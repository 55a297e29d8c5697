"""Small image helpers shared by the tests of t2i_common.formats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def solid(rgb, size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, tuple(rgb))


def pattern(h: int, w: int) -> np.ndarray:
    """uint8 HxWx3 image whose pixel (y, x) is (x, y, x + 10 y) -> crops are checkable exactly."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x, y, x + 10 * y], axis=-1).astype(np.uint8)


def px(img: Image.Image) -> tuple:
    return np.asarray(img)[0, 0].tolist()


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image")
    return path
