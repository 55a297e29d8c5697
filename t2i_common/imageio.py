"""Image conversion helpers shared by the readers and the models."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def to_pil(im):
    """PIL image, uint8 array (H,W,3)/(H,W), float array in [0,1], or a path -> PIL.Image.

    Unreadable files raise a ValueError naming the file."""
    from PIL import Image

    if isinstance(im, Image.Image):
        return im
    if isinstance(im, (str, Path)):
        p = Path(im)
        if not p.exists():
            raise FileNotFoundError(f"image file {p} does not exist; check the dataset's image folder")
        try:
            with Image.open(p) as f:
                return f.convert("RGB")
        except Exception as err:
            raise ValueError(f"image file {p} could not be read ({err}); replace or remove it") from err
    arr = np.asarray(im)
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = (arr * 255).round().astype(np.uint8)
        else:
            raise ValueError(f"image array has dtype {arr.dtype}; expected uint8 (H,W,3) or floats in [0,1]")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(arr[..., :3], "RGB")
    raise ValueError(f"image array has shape {arr.shape}; expected (H,W,3) or (H,W)")
