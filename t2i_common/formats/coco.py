"""COCO instances (polygons, RLE masks) and COCO-IT / COCO-WL (Info-Decomp word localisation)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as _cocomask

from ._common import (FormatError, PathLike, _as_number, _fail, _nonempty, _read_json, _read_table, _require_file,
                      _require_keys, _write_csv, _write_json)
from .images import ImageRef, _check_exists


def _cocodecode(rle: Mapping) -> np.ndarray:
    """pycocotools ``mask.decode`` of one compressed RLE as a bool (H,W) mask. pycocotools 2.0.11's
    Cython array warns under numpy >= 2 (``__array__ ... copy keyword``, DeprecationWarning);
    the decoded values are unaffected, so that one warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return _cocomask.decode(rle).astype(bool)


def rle_encode(mask: np.ndarray) -> dict:
    """Binary mask (H,W) -> uncompressed COCO RLE ``{'size': [H, W], 'counts': [...]}``.

    Encoded by pycocotools (``mask.encode``): runs over the column-major (Fortran) flattening,
    starting with a run of zeros (possibly of length 0); the compressed string it returns is
    expanded to the counts list with :func:`rle_string_to_counts`.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    enc = _cocomask.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle_string_to_counts(enc["counts"])}


def rle_counts_to_string(counts: Sequence[int]) -> str:
    """COCO's compressed RLE string of uncompressed ``counts`` (maskApi ``rleToString``, via
    pycocotools ``frPyObjects``)."""
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"RLE counts must be >= 0, got {counts}")
    total = sum(counts)
    if total == 0:  # pycocotools needs a non-empty image; the format is the same
        return "".join("0" for _ in counts)
    rle = _cocomask.frPyObjects({"size": [total, 1], "counts": counts}, total, 1)
    return rle["counts"].decode("ascii")


def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Uncompressed counts of a compressed RLE string (maskApi ``rleFrString``), validated.

    pycocotools has no Python call for this step, and its C decoder neither checks the
    characters nor bounds-checks the runs against the mask size, so every compressed string is
    parsed and checked here before pycocotools decodes it: each count (from the 4th on, its
    difference to the count two places before) is stored in 5-bit groups as chr(value + 48),
    least significant first, 0x20 = "more groups follow", 0x10 of the last group = sign.
    """
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


def rle_decode(rle: Mapping, source: Any = "RLE") -> np.ndarray:
    """COCO RLE (``counts`` as a list or a compressed string) -> bool mask (H,W), decoded by
    pycocotools after the counts were checked against ``size`` (``source`` names the annotation
    in errors)."""
    fix = "an RLE is {'size': [H, W], 'counts': [...] or '<compressed string>'}"
    _require_keys(rle, ("size", "counts"), source, "the segmentation", fix)
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise _fail(source, f"RLE field 'size' is {size!r}", fix)
    h, w = (_as_number(v, source, "the RLE", "size", integer=True) for v in size)
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            arr = np.asarray(rle_string_to_counts(counts), dtype=np.int64)
        except FormatError as e:
            raise FormatError(f"{source}: field 'counts': {e}") from None
    elif isinstance(counts, (list, tuple)):
        arr = np.asarray([_as_number(c, source, "the RLE", "counts", integer=True) for c in counts], dtype=np.int64)
    else:
        raise _fail(source, f"RLE field 'counts' is a {type(counts).__name__}", fix)
    if h <= 0 or w <= 0 or (arr < 0).any() or arr.sum() != h * w:
        raise FormatError(f"{source}: RLE counts sum to {arr.sum()} (min {arr.min() if arr.size else 0}) but size is "
                          f"{h}x{w}={h * w}. Fix: the counts and 'size' must describe the same image")
    if isinstance(counts, (str, bytes)):
        compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        compressed = _cocomask.frPyObjects({"size": [h, w], "counts": arr.tolist()}, h, w)
    return _cocodecode(compressed)


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int,
                     source: Any = "polygon") -> np.ndarray:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` -> bool mask (H,W), union of the polygons,
    rasterised by pycocotools (``frPyObjects`` + ``merge`` + ``decode``, as the COCO API's ``annToMask``).

    Each polygon is checked first (a flat list of >= 3 finite (x, y) points); an empty list is
    an error, not an empty mask. ``source`` names the annotation in errors. The pixel-centre rule
    this package used before differs from pycocotools on boundary pixels (3.0 % of the mask pixels
    of 300 random convex polygons in a 32x32 image); the axis-aligned fixtures agree exactly.
    """
    fix = "a polygon segmentation is a list of flat lists [x1, y1, x2, y2, ...] of >= 3 points"
    if not isinstance(polygons, (list, tuple)) or len(polygons) == 0:
        raise _fail(source, f"segmentation is {polygons!r}: no polygon", fix)
    polys = []
    for k, poly in enumerate(polygons):
        if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
            n = len(poly) if isinstance(poly, (list, tuple)) else type(poly).__name__
            raise _fail(source, f"polygon {k} has {n} coordinates; expected a flat list x1,y1,x2,y2,... of "
                        ">= 3 points", fix)
        polys.append([_as_number(v, source, f"polygon {k}", "segmentation") for v in poly])
    rles = _cocomask.frPyObjects(polys, int(height), int(width))
    return _cocodecode(_cocomask.merge(rles))


def annotation_mask(ann: Mapping, height: int, width: int, source: Any = None) -> np.ndarray:
    """Mask of one COCO annotation (polygons, uncompressed RLE or compressed RLE), via pycocotools.

    An empty segmentation (no polygon, or a mask covering no pixel) is an error naming the
    annotation (``source``, default "annotation <id>"), not a silent empty mask.
    """
    aid = ann.get("id") if isinstance(ann, Mapping) else ann
    source = source if source is not None else f"annotation {aid}"
    seg = ann.get("segmentation") if isinstance(ann, Mapping) else None
    if isinstance(seg, list):
        m = polygons_to_mask(seg, height, width, source)
    elif isinstance(seg, Mapping):
        m = rle_decode(seg, source)
        if m.shape != (height, width):
            raise FormatError(f"{source}: RLE size {list(m.shape)} differs from the image size "
                              f"{[height, width]}. Fix: re-encode the mask at the image size")
    else:
        raise FormatError(f"{source} has no usable 'segmentation' (polygons list or RLE dict), got "
                          f"{type(seg).__name__}. Fix: check the instances json")
    if not m.any():
        raise FormatError(f"{source}: field 'segmentation' covers no pixel of the {height}x{width} image. "
                          "Fix: remove the annotation or give its polygon / RLE")
    return m


class CocoInstances:
    """An ``instances_*.json`` with indexes: images by id, category ids by name, annotations by image."""

    def __init__(self, data: Mapping, path: Any = "<instances>"):
        fix = "a COCO instances json has 'images', 'annotations' and 'categories' lists"
        _require_keys(data, ("images", "annotations", "categories"), path, "the top-level object", fix)
        self.path = path
        self.images: dict[int, dict] = {}
        for key in ("images", "annotations", "categories"):
            if not isinstance(data[key], list):
                raise _fail(path, f"field {key!r} is a {type(data[key]).__name__}, expected a list", fix)
        for i, im in enumerate(data["images"]):
            _require_keys(im, ("id", "file_name", "height", "width"), path, f"images[{i}]", fix)
            for k in ("height", "width"):
                if _as_number(im[k], path, f"images[{i}]", k, integer=True) <= 0:
                    raise _fail(path, f"images[{i}] field {k!r} is {im[k]!r}", f"{k} is the image size in pixels")
            size = {k: _as_number(im[k], path, f"images[{i}]", k, integer=True) for k in ("height", "width")}
            self.images[_as_number(im["id"], path, f"images[{i}]", "id", integer=True)] = {**im, **size}
        self.category_ids: dict[str, int] = {}
        for i, c in enumerate(data["categories"]):
            _require_keys(c, ("id", "name"), path, f"categories[{i}]", fix)
            self.category_ids[c["name"]] = _as_number(c["id"], path, f"categories[{i}]", "id", integer=True)
        self.anns_by_image: dict[int, list[dict]] = {}
        self._ann_index: dict[int, int] = {}  # id(annotation dict) -> position in the file, for errors
        for i, a in enumerate(data["annotations"]):
            _require_keys(a, ("image_id", "category_id", "segmentation"), path, f"annotations[{i}]", fix)
            _as_number(a["category_id"], path, f"annotations[{i}]", "category_id", integer=True)
            self._ann_index[id(a)] = i
            self.anns_by_image.setdefault(_as_number(a["image_id"], path, f"annotations[{i}]", "image_id",
                                                     integer=True), []).append(a)

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
        anns = [a for a in self.anns_by_image.get(int(image_id), []) if int(float(a["category_id"])) == cid]
        if not anns and not allow_empty:
            raise FormatError(f"{self.path}: image {image_id} has no {category_name!r} annotation. "
                              "Fix: check the row's Image ID / Label, or pass allow_empty=True")
        for a in anns:
            mask |= annotation_mask(a, h, w, f"{self.path} annotations[{self._ann_index[id(a)]}] (id {a.get('id')})")
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
    given) or 'mask' (bool HxW, not empty; written as uncompressed RLE, or compressed with
    ``compress=True``)}, optional id / iscrowd. area and bbox are computed from the mask (pycocotools
    ``area`` / ``toBbox``).
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
            if not m.any():
                raise ValueError(f"annotation {i}: mask covers no pixel (the reader refuses empty segmentations). "
                                 "Fix: leave the annotation out")
            seg = rle_encode(m)
            if compress:
                seg["counts"] = rle_counts_to_string(seg["counts"])
        elif "segmentation" in a:
            seg = a["segmentation"]
            m = annotation_mask(a, h, w, f"annotation {i}")
        else:
            raise ValueError(f"annotation {i} needs 'mask' or 'segmentation'")
        rle = _cocomask.encode(np.asfortranarray(m.astype(np.uint8)))
        out_anns.append({"id": int(a.get("id", i + 1)), "image_id": int(a["image_id"]),
                         "category_id": int(a["category_id"]), "segmentation": seg,
                         "area": float(_cocomask.area(rle)), "bbox": [float(v) for v in _cocomask.toBbox(rle)],
                         "iscrowd": int(a.get("iscrowd", 0))})
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
            except KeyError as e:  # unknown image id or category name
                raise _fail(csv_path, f"row {i}: {e.args[0]}", "COCO-WL rows (non-category labels) have no masks: "
                            "read them with instances=None") from None
            except FormatError as e:  # a broken annotation of the instances file: its message names the fix
                raise FormatError(f"{csv_path} row {i} (Image ID {image_id}, Label {row['Label']!r}): {e}") from None
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
