"""Images (lazy, cropped, validated) and the common image-text matching item :class:`MatchItem`."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from ._common import FormatError, PathLike, _atomic_write_bytes


IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """``box`` = (left, top, right, bottom) intersected with the image (0, 0, width, height); None
    when nothing of it is inside. PIL would fill the outside part of a crop with black pixels."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    return c if c[2] > c[0] and c[3] > c[1] else None


@dataclass(frozen=True)
class ImageRef:
    """An image file loaded on demand, optionally cropped to ``box`` = (left, top, right, bottom).

    A box partly outside the image is clipped to it (the original crops with PIL, which pads the
    outside with black pixels that would then be scored); a box entirely outside raises
    :class:`FormatError` naming the file and the referencing annotation.
    """

    path: Path
    box: tuple[float, float, float, float] | None = None
    source: str = ""  # the annotation that references the file (for error messages)

    def load(self) -> Image.Image:
        ref = f" (referenced by {self.source})" if self.source else ""
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"image file not found: {self.path}{ref}. "
                                    "Fix: check the image folder/root argument or restore the file")
        try:
            with Image.open(self.path) as im:
                im.load()
                img = im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise FormatError(f"cannot read image {self.path}{ref}: {e}. "
                              "Fix: replace the file with a valid PNG/JPEG") from None
        if self.box is None:
            return img
        box = clip_box(self.box, *img.size)
        if box is None:
            raise FormatError(f"crop box {tuple(self.box)} lies outside image {self.path} of size "
                              f"{img.size[0]}x{img.size[1]}{ref}. Fix: correct the annotation's bbox fields")
        return img.crop(box)


def to_pil(image: Any) -> Image.Image:
    """PIL image (RGB) from a PIL image, an :class:`ImageRef`, a path, or a uint8 array (H,W)/(H,W,3)/(H,W,4)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, ImageRef):
        return image.load()
    if isinstance(image, (str, os.PathLike)):
        return ImageRef(Path(image)).load()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise FormatError(f"image array has dtype {arr.dtype}, expected uint8. "
                          "Fix: convert with (x * 255).round().clip(0, 255).astype(np.uint8)")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
        arr = arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
        return Image.fromarray(arr).convert("RGB")
    raise FormatError(f"image array has shape {arr.shape}, expected (H,W) or (H,W,3). Fix: pass HxWx3 uint8 arrays")


def read_images(paths: Iterable[PathLike]) -> list[Image.Image]:
    """Load image files as RGB PIL images; a missing/unreadable file raises an error naming it."""
    return [ImageRef(Path(p)).load() for p in paths]


def save_image(image: Any, path: PathLike) -> Path:
    """Write ``image`` (PIL or uint8 array) to ``path`` atomically; the format follows the suffix (JPEG at
    quality 95, 4:4:4)."""
    path = Path(path)
    img = to_pil(image)
    buf = io.BytesIO()
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    elif path.suffix.lower() == ".png":
        img.save(buf, format="PNG")
    else:
        raise FormatError(f"cannot write image {path}: unknown suffix. Fix: use one of {IMAGE_EXTS}")
    return _atomic_write_bytes(path, buf.getvalue())


def _find_image(folder: Path, name: str, source: str) -> Path:
    """``folder/name`` if it exists, else ``folder/name + ext`` for ext in .png/.jpg/.jpeg."""
    cand = [folder / name] + [folder / f"{name}{e}" for e in IMAGE_EXTS]
    for c in cand:
        if c.is_file():
            return c
    raise FileNotFoundError(f"image {name!r} (referenced by {source}) not found; tried "
                            f"{[str(c) for c in cand]}. Fix: pass the folder that holds the images")


def _check_exists(refs: Iterable[ImageRef]) -> None:
    seen = set()
    for r in refs:
        if r.path in seen:
            continue
        seen.add(r.path)
        if not Path(r.path).is_file():
            raise FileNotFoundError(f"image file not found: {r.path} (referenced by {r.source}). "
                                    "Fix: check the image folder/root argument or restore the file "
                                    "(or pass check_images=False to defer the check)")


class LazyImages(Sequence):
    """Read-only list of images that loads each one (RGB PIL) when indexed or iterated;
    ``len()`` does not touch the files."""

    def __init__(self, refs: Sequence[Any]):
        self._refs = refs

    def __len__(self) -> int:
        return len(self._refs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [to_pil(r) for r in self._refs[i]]
        return to_pil(self._refs[i])

    def __repr__(self) -> str:
        return f"LazyImages({len(self._refs)} images)"


class MatchItem:
    """One image-text matching example.

    ``images`` is a :class:`LazyImages` sequence: indexing or iterating loads RGB PIL images
    (a missing/unreadable file raises naming it), ``len()`` is free. The raw references
    (PIL images or :class:`ImageRef` s) are in ``image_refs``.
    ``gold_image`` / ``gold_caption`` index the correct candidate. For a
    Winoground 2x2 item both are 0 and the pairing is caption_k <-> image_k.
    ``meta`` holds the dataset's own fields (ids, tags, relation names, ...).
    """

    __slots__ = ("image_refs", "captions", "gold_image", "gold_caption", "meta")

    def __init__(self, images: Sequence[Any], captions: Sequence[str], gold_image: int = 0,
                 gold_caption: int = 0, meta: dict | None = None):
        self.image_refs = [i if isinstance(i, (Image.Image, ImageRef)) else
                           ImageRef(Path(i)) if isinstance(i, (str, os.PathLike)) else to_pil(i) for i in images]
        self.captions = [str(c) for c in captions]
        self.gold_image, self.gold_caption = int(gold_image), int(gold_caption)
        self.meta = dict(meta or {})
        if not self.image_refs or not self.captions:
            raise ValueError("a MatchItem needs at least one image and one caption")
        if not (0 <= self.gold_image < len(self.image_refs) and 0 <= self.gold_caption < len(self.captions)):
            raise ValueError(f"gold index out of range: gold_image={gold_image} of {len(self.image_refs)}, "
                             f"gold_caption={gold_caption} of {len(self.captions)}")

    @property
    def images(self) -> LazyImages:
        return LazyImages(self.image_refs)

    @property
    def image_paths(self) -> list[str | None]:
        """File path of each candidate image (None for in-memory images); useful as cache keys."""
        return [str(r.path) if isinstance(r, ImageRef) else None for r in self.image_refs]

    @property
    def task(self) -> str:
        """'text' (pick the caption), 'image' (pick the image) or 'group' (Winoground 2x2)."""
        n_i, n_c = len(self.image_refs), len(self.captions)
        return "text" if n_i == 1 else "image" if n_c == 1 else "group"

    def __repr__(self) -> str:
        return (f"MatchItem(images={len(self.image_refs)}, captions={self.captions!r}, "
                f"gold_image={self.gold_image}, gold_caption={self.gold_caption}, meta={self.meta!r})")


def candidate_scores(item, s) -> tuple[np.ndarray, int]:
    """(scores of the candidates, index of the gold one) of a retrieval item, from its score matrix
    ``s[i, j] = s(image i, caption j)`` (a torch tensor, array or nested list)."""
    if hasattr(s, "detach"):   # a torch tensor, of any dtype or device
        s = s.detach().cpu().double().numpy()
    s = np.asarray(s, dtype=np.float64)
    task = item.task
    if task == "text":
        gold = item.gold_caption
        vec = s[0]
    elif task == "image":
        gold = item.gold_image
        vec = s[:, 0]
    else:
        raise ValueError(f"candidate_scores: item with {len(item.images)} images and "
                         f"{len(item.captions)} captions is not a retrieval item; use winoground metrics")
    if gold is None or not 0 <= int(gold) < len(vec):
        raise ValueError(f"candidate_scores: item gold index {gold!r} is missing or outside the "
                         f"{len(vec)} candidates (meta {getattr(item, 'meta', None)})")
    return vec, int(gold)
