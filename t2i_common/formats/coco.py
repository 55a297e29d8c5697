"""COCO instances (polygons, RLE masks) and COCO-IT / COCO-WL (Info-Decomp word localisation)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ._common import (FormatError, PathLike, _fail, _nonempty, _read_json, _read_table, _require_file,
                      _require_keys, _write_csv, _write_json)
from .images import ImageRef, _check_exists


def rle_encode(mask: np.ndarray) -> dict:
    """Binary mask (H,W) -> uncompressed COCO RLE ``{'size': [H, W], 'counts': [...]}``.

    Runs are over the column-major (Fortran) flattening and start with a run of zeros
    (possibly of length 0), as in the COCO API.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    flat = m.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def rle_counts_to_string(counts: Sequence[int]) -> str:
    """COCO's compressed RLE string (maskApi ``rleToString``), written from its description.

    Each count (from the 4th on, its difference to the count two places before) is
    cut into 5-bit groups, least significant first; bit 0x20 marks "more groups follow";
    the last group's 0x10 bit is the sign; every group is stored as chr(value + 48).
    """
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        while True:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift: negative numbers end at -1
            more = x != -1 if ch & 0x10 else x != 0
            out.append(chr((ch | 0x20 if more else ch) + 48))
            if not more:
                break
    return "".join(out)


def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Inverse of :func:`rle_counts_to_string` (maskApi ``rleFrString``)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k = 0, 0
        while True:
            if p >= len(s):
                raise FormatError(f"compressed RLE string ends inside a count: {s!r}. Fix: re-encode the mask")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise FormatError(f"compressed RLE string has invalid character {s[p]!r}. Fix: re-encode the mask")
            x |= (c & 0x1F) << (5 * k)
            p, k = p + 1, k + 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: Mapping) -> np.ndarray:
    """COCO RLE (``counts`` as a list or a compressed string) -> bool mask (H,W)."""
    _require_keys(rle, ("size", "counts"), "RLE", "the segmentation", "an RLE is {'size': [H, W], 'counts': ...}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_string_to_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    arr = np.asarray(counts, dtype=np.int64)
    if (arr < 0).any() or arr.sum() != h * w:
        raise FormatError(f"RLE counts sum to {arr.sum()} (min {arr.min() if arr.size else 0}) but size is "
                          f"{h}x{w}={h * w}. Fix: the counts and 'size' must describe the same image")
    vals = np.zeros(arr.size, dtype=bool)
    vals[1::2] = True
    return np.repeat(vals, arr).reshape(w, h).T


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` -> bool mask (H,W), union of the polygons.

    A pixel (col x, row y) is inside when its centre (x + 0.5, y + 0.5) is inside the polygon
    (even-odd rule). pycocotools rasterises on a 5x finer grid; both agree except possibly
    on boundary pixels (deliberate: no pycocotools dependency).
    """
    mask = np.zeros((height, width), dtype=bool)
    xc = np.arange(width) + 0.5
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64)
        if p.ndim != 1 or p.size < 6 or p.size % 2:
            raise FormatError(f"polygon has {p.size} coordinates; expected a flat list x1,y1,x2,y2,... of "
                              ">= 3 points. Fix: check the annotation's segmentation")
        x0, y0 = p[0::2], p[1::2]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for row in range(height):
            yc = row + 0.5
            cross = (y0 > yc) != (y1 > yc)
            if not cross.any():
                continue
            xs = np.sort(x0[cross] + (yc - y0[cross]) * (x1[cross] - x0[cross]) / (y1[cross] - y0[cross]))
            n_right = xs.size - np.searchsorted(xs, xc, side="right")
            mask[row] |= (n_right % 2) == 1
    return mask


def annotation_mask(ann: Mapping, height: int, width: int) -> np.ndarray:
    """Mask of one COCO annotation (polygons, uncompressed RLE or compressed RLE)."""
    seg = ann.get("segmentation") if isinstance(ann, Mapping) else None
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width)
    if isinstance(seg, Mapping):
        m = rle_decode(seg)
        if m.shape != (height, width):
            raise FormatError(f"annotation {ann.get('id')} RLE size {list(m.shape)} differs from the image size "
                              f"{[height, width]}. Fix: re-encode the mask at the image size")
        return m
    raise FormatError(f"annotation {ann.get('id') if isinstance(ann, Mapping) else ann} has no usable "
                      "'segmentation' (polygons list or RLE dict). Fix: check the instances json")


class CocoInstances:
    """An ``instances_*.json`` with indexes: images by id, category ids by name, annotations by image."""

    def __init__(self, data: Mapping, path: Any = "<instances>"):
        fix = "a COCO instances json has 'images', 'annotations' and 'categories' lists"
        _require_keys(data, ("images", "annotations", "categories"), path, "the top-level object", fix)
        self.path = path
        self.images: dict[int, dict] = {}
        for i, im in enumerate(data["images"]):
            _require_keys(im, ("id", "file_name", "height", "width"), path, f"images[{i}]", fix)
            self.images[int(im["id"])] = im
        self.category_ids: dict[str, int] = {}
        for i, c in enumerate(data["categories"]):
            _require_keys(c, ("id", "name"), path, f"categories[{i}]", fix)
            self.category_ids[c["name"]] = int(c["id"])
        self.anns_by_image: dict[int, list[dict]] = {}
        for i, a in enumerate(data["annotations"]):
            _require_keys(a, ("image_id", "category_id", "segmentation"), path, f"annotations[{i}]", fix)
            self.anns_by_image.setdefault(int(a["image_id"]), []).append(a)

    def image_info(self, image_id: int) -> dict:
        if int(image_id) not in self.images:
            raise KeyError(f"{self.path}: image id {image_id} is not in 'images'. "
                           "Fix: use the instances file of the split the image comes from")
        return self.images[int(image_id)]

    def image_path(self, image_id: int, image_dir: PathLike) -> Path:
        return Path(image_dir) / self.image_info(image_id)["file_name"]

    def mask(self, image_id: int, category_name: str, shape: tuple[int, int] | None = None,
             allow_empty: bool = False) -> np.ndarray:
        """Union of all instance masks of ``category_name`` in the image (crowd ones included, as
        Info-Decomp's ``getAnnIds(iscrowd=None)``), resized with nearest to ``shape`` = (H, W)."""
        info = self.image_info(image_id)
        if category_name not in self.category_ids:
            raise KeyError(f"{self.path}: category {category_name!r} is not in 'categories' "
                           f"(known: {sorted(self.category_ids)[:10]}...). Fix: use a COCO category name")
        cid = self.category_ids[category_name]
        h, w = int(info["height"]), int(info["width"])
        mask = np.zeros((h, w), dtype=bool)
        anns = [a for a in self.anns_by_image.get(int(image_id), []) if int(a["category_id"]) == cid]
        if not anns and not allow_empty:
            raise FormatError(f"{self.path}: image {image_id} has no {category_name!r} annotation. "
                              "Fix: check the row's Image ID / Label, or pass allow_empty=True")
        for a in anns:
            mask |= annotation_mask(a, h, w)
        return resize_mask(mask, shape) if shape is not None else mask


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``shape`` = (H, W) (PIL NEAREST, as Info-Decomp)."""
    h, w = int(shape[0]), int(shape[1])
    if mask.shape == (h, w):
        return mask.copy()
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    return np.asarray(im) > 127


_INSTANCES_CACHE: dict[tuple[str, int, int], CocoInstances] = {}


def read_coco_instances(path: PathLike) -> CocoInstances:
    """Load and index a COCO ``instances_*.json`` (the last file read is kept in memory)."""
    path = _require_file(path, "COCO instances json", "pass annotations/instances_val2017.json")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _INSTANCES_CACHE:
        _INSTANCES_CACHE.clear()
        _INSTANCES_CACHE[key] = CocoInstances(_read_json(path, "COCO instances json"), path)
    return _INSTANCES_CACHE[key]


def coco_masks(instances_json: PathLike | CocoInstances, image_id: int, category_name: str,
               shape: tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask of COCO-IT: union of the ``category_name`` instance masks of the image,
    resized with nearest to ``shape`` = (H, W) (Info-Decomp resizes to 512x512)."""
    inst = instances_json if isinstance(instances_json, CocoInstances) else read_coco_instances(instances_json)
    return inst.mask(image_id, category_name, shape)


def write_coco_instances(path: PathLike, images: Sequence[Mapping], annotations: Sequence[Mapping],
                         categories: Sequence[Mapping], compress: bool = False) -> Path:
    """Write a COCO instances json.

    images: {id, file_name, height, width}; categories: {id, name[, supercategory]};
    annotations: {image_id, category_id, and either 'segmentation' (polygons/RLE, kept as
    given) or 'mask' (bool HxW, written as uncompressed RLE, or compressed with
    ``compress=True``)}, optional id / iscrowd. area and bbox are computed from the mask.
    """
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
    cat_ids = {int(c["id"]) for c in categories}
    out_anns = []
    for i, a in enumerate(annotations):
        _require_keys(a, ("image_id", "category_id"), f"annotation {i}", "the annotation", "add the field")
        if int(a["image_id"]) not in sizes or int(a["category_id"]) not in cat_ids:
            raise ValueError(f"annotation {i} refers to unknown image {a['image_id']} or category {a['category_id']}")
        h, w = sizes[int(a["image_id"])]
        if "mask" in a:
            m = np.asarray(a["mask"]).astype(bool)
            if m.shape != (h, w):
                raise ValueError(f"annotation {i}: mask shape {m.shape} != image size {(h, w)}")
            seg = rle_encode(m)
            if compress:
                seg["counts"] = rle_counts_to_string(seg["counts"])
        elif "segmentation" in a:
            seg = a["segmentation"]
            m = annotation_mask(a, h, w)
        else:
            raise ValueError(f"annotation {i} needs 'mask' or 'segmentation'")
        ys, xs = np.nonzero(m)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] \
            if xs.size else [0.0, 0.0, 0.0, 0.0]
        out_anns.append({"id": int(a.get("id", i + 1)), "image_id": int(a["image_id"]),
                         "category_id": int(a["category_id"]), "segmentation": seg, "area": float(m.sum()),
                         "bbox": bbox, "iscrowd": int(a.get("iscrowd", 0))})
    data = {"images": [dict(im) for im in images], "annotations": out_anns,
            "categories": [{"supercategory": c.get("supercategory", ""), **dict(c)} for c in categories]}
    return _write_json(path, data)


COCO_IT_COLUMNS = ("Image ID", "Label", "correct_obj+context", "context", "correct_obj")


@dataclass
class CocoITItem:
    """One COCO-IT / COCO-WL row: the caption, the caption without the word (context), the word,
    the optional ``_`` variant and word type, the image and (with instances) the GT mask."""

    image_id: int
    label: str
    caption: str
    context: str
    word: str
    context_: str = ""
    word_type: str = ""
    image_ref: ImageRef | None = None
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def image(self) -> Image.Image:
        if self.image_ref is None:
            raise FormatError(f"COCO-IT row for image {self.image_id} has no image: pass image_dir to read_coco_it")
        return self.image_ref.load()


def read_coco_it(csv_path: PathLike, instances: PathLike | CocoInstances | None = None,
                 image_dir: PathLike | None = None, mask_shape: tuple[int, int] | None = None,
                 check_images: bool = True) -> list[CocoITItem]:
    """COCO-IT / COCO100-IT / COCO-WL csv (``Image ID, Label, correct_obj+context, context,
    correct_obj`` [, ``context_``, word type]) -> :class:`CocoITItem` s.

    With ``instances`` (COCO instances json) the mask is the union of the ``Label`` instances
    (resized to ``mask_shape``) and the image file name comes from the json; without it, masks
    are None (COCO-WL labels are words, not categories) and images are
    ``image_dir/{id:012d}.jpg`` (COCO 2017 naming). Strings are kept verbatim (the context
    keeps the double space where the word was, as in the published files).
    """
    csv_path = Path(csv_path)
    fix = f"the csv needs columns {list(COCO_IT_COLUMNS)} (as in Info-Decomp's datasets/coco/*.csv)"
    df = _read_table(csv_path, "COCO-IT csv", COCO_IT_COLUMNS, fix, sep=",")
    cols = list(df.columns)
    type_col = next((c for c in ("word_type", "type") if c in cols), None)
    if type_col is None and len(cols) > 6:
        type_col = cols[6]  # COCO-WL: 7th column with an empty header
    inst = read_coco_instances(instances) if isinstance(instances, (str, os.PathLike)) else instances
    items = []
    for i, row in enumerate(df.to_dict("records")):
        try:
            image_id = int(str(row["Image ID"]).strip())
        except ValueError:
            raise _fail(csv_path, f"row {i} has Image ID {row['Image ID']!r}", "Image ID must be an integer") from None
        ref, mask = None, None
        if inst is not None:
            if image_dir is not None:
                ref = ImageRef(inst.image_path(image_id, image_dir), source=f"{csv_path} row {i}")
            try:
                mask = inst.mask(image_id, row["Label"], mask_shape)
            except (KeyError, FormatError) as e:
                raise _fail(csv_path, f"row {i}: {e}", "COCO-WL rows (non-category labels) have no masks: "
                            "read them with instances=None") from None
        elif image_dir is not None:
            ref = ImageRef(Path(image_dir) / f"{image_id:012d}.jpg", source=f"{csv_path} row {i}")
        items.append(CocoITItem(image_id, row["Label"], row["correct_obj+context"], row["context"],
                                row["correct_obj"], row.get("context_", ""),
                                row[type_col] if type_col else "", ref, mask))
    _nonempty(items, csv_path)
    if check_images:
        _check_exists(it.image_ref for it in items if it.image_ref is not None)
    return items


def write_coco_it(rows: Sequence[Mapping], path: PathLike) -> Path:
    """Write a COCO-IT csv. Rows: image_id, label, caption, context, word [, context_, word_type].

    With any context_/word_type the header is COCO-WL's ``...,context_,`` (the word type column
    has an empty name, as published).
    """
    extended = any(r.get("context_") or r.get("word_type") for r in rows)
    header = list(COCO_IT_COLUMNS) + (["context_", ""] if extended else [])
    out = []
    for i, r in enumerate(rows):
        _require_keys(r, ("image_id", "label", "caption", "context", "word"), f"row {i}", "the row", "add the field")
        vals = [int(r["image_id"]), r["label"], r["caption"], r["context"], r["word"]]
        out.append(vals + ([r.get("context_", ""), r.get("word_type", "")] if extended else []))
    return _write_csv(path, header, out)
