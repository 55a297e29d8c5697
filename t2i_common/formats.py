"""Readers and writers of the published dataset formats (data_formats.md).

Real datasets are read from their published layouts; the toy world is exported
through the writers below and read back through the same readers, so every
writer produces exactly the layout its reader (and the original code) expects.

Conventions
- Image-text matching data become :class:`MatchItem` s: text retrieval items have
  one image and several captions, image retrieval items several images and one
  caption, Winoground rows a 2x2 item. Image files load lazily (``item.images``);
  a missing or unreadable file raises an error naming the file.
- Every reader fails early with :class:`FormatError` (a ``ValueError``) or
  ``FileNotFoundError`` whose message names the file, the field and the fix, and
  refuses an empty dataset ("dataset X has no items").
- Writers accept PIL images or uint8 numpy arrays ((H,W) or (H,W,3)); they write
  JSON/CSV atomically (temporary file + rename) so an interrupted export never
  leaves a half-written annotation file.

Formats: implosion pickles + embedding cache; ARO VG-Relation / VG-Attribution /
COCO-Order / Flickr-Order; Winoground; COCO instances (polygons, RLE) + COCO-IT
csv; GDBench CLEVR, SVO, ImageCoDe, Flickr30K retrieval, NegCLIP tsv, MMBias and
the gender-bias folders.
"""
from __future__ import annotations

import ast
import csv
import glob as _glob
import io
import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------
# errors and small file helpers
# ---------------------------------------------------------------------------
class FormatError(ValueError):
    """A dataset file exists but does not follow its published format."""


def _fail(path: Any, problem: str, fix: str) -> FormatError:
    return FormatError(f"{path}: {problem}. Fix: {fix}")


def _require_file(path: PathLike, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. Fix: {fix}")
    return path


def _require_dir(path: PathLike, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}. Fix: {fix}")
    return path


def _nonempty(items: list, path: Any, fix: str = "check the file and the filters you passed") -> list:
    if not items:
        raise FormatError(f"dataset {path} has no items. Fix: {fix}")
    return items


def _read_json(path: PathLike, what: str, fix: str = "pass the path of the published file") -> Any:
    path = _require_file(path, what, fix)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON ({e})", "re-download or re-export the file") from None


def _require_keys(record: Any, keys: Iterable[str], path: Any, where: str, fix: str) -> None:
    if not isinstance(record, Mapping):
        raise _fail(path, f"{where} is a {type(record).__name__}, expected an object with keys {list(keys)}", fix)
    missing = [k for k in keys if k not in record]
    if missing:
        raise _fail(path, f"{where} lacks key(s) {missing} (has {sorted(record)})", fix)


def _atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_json(path: PathLike, obj: Any, indent: int | None = None) -> Path:
    return _atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))


def _read_table(path: PathLike, what: str, required: Sequence[str], fix: str, sep: str | None = None):
    """Read a csv/tsv (or a json list) as a DataFrame of strings; check required columns."""
    import pandas as pd

    path = _require_file(path, what, fix)
    if path.suffix.lower() == ".json":
        rows = _read_json(path, what, fix)
        if not isinstance(rows, list):
            raise _fail(path, f"expected a JSON list of rows, got {type(rows).__name__}", fix)
        for i, r in enumerate(rows):
            _require_keys(r, required, path, f"row {i}", fix)
        df = pd.DataFrame(rows)
    else:
        if sep is None:
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
        try:
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise FormatError(f"dataset {path} has no items (empty file). Fix: {fix}") from None
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise _fail(path, f"missing column(s) {missing} (has {list(df.columns)})", fix)
    return df


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageRef:
    """An image file loaded on demand, optionally cropped to ``box`` = (left, top, right, bottom)."""

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
        return img.crop(self.box) if self.box is not None else img


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
    """Write ``image`` (PIL or uint8 array) to ``path``; the format follows the suffix (JPEG at quality 95, 4:4:4)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = to_pil(image)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95, subsampling=0)
    elif path.suffix.lower() == ".png":
        img.save(path)
    else:
        raise FormatError(f"cannot write image {path}: unknown suffix. Fix: use one of {IMAGE_EXTS}")
    return path


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


# ---------------------------------------------------------------------------
# the common item type
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# 1. implosion text-image pickles (seed 000) and the embedding cache
# ---------------------------------------------------------------------------
def implosion_pickle_paths(glob_pattern: PathLike) -> list[Path]:
    """Sorted pickle paths matching ``PATH/*.pickle`` or ``PATH/*/*.pickle``; a folder means both."""
    pattern = str(glob_pattern)
    if os.path.isdir(pattern):
        paths = _glob.glob(os.path.join(pattern, "*.pickle")) + _glob.glob(os.path.join(pattern, "*", "*.pickle"))
    else:
        paths = _glob.glob(pattern)
    if not paths:
        raise FileNotFoundError(f"no pickle files match {pattern!r}. Fix: pass a glob like "
                                "'DATA/*.pickle' or 'DATA/*/*.pickle' (class subfolders)")
    return sorted(Path(p) for p in paths)


def read_implosion_pickle(path: PathLike) -> tuple[np.ndarray, str]:
    """One pair ``{'img': uint8 (H,W,3) or (H,W), 'text': str}`` -> (image array, text)."""
    path = _require_file(path, "implosion pickle", "check the glob pattern")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a format error here
        raise _fail(path, f"cannot unpickle ({type(e).__name__}: {e})", "re-export the pair") from None
    fix = "each pickle must hold {'img': uint8 array (H,W,3) or (H,W), 'text': str}"
    _require_keys(obj, ("img", "text"), path, "the pickled dict", fix)
    img = np.asarray(obj["img"])
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise _fail(path, f"field 'img' has dtype {img.dtype} and shape {img.shape}", fix)
    if not isinstance(obj["text"], str):
        raise _fail(path, f"field 'text' is a {type(obj['text']).__name__}", fix)
    return img, obj["text"]


def read_implosion_pickles(glob_pattern: PathLike) -> list[tuple[Path, np.ndarray, str]]:
    """All pairs matching the glob as ``(path, image, text)``, sorted by path."""
    return [(p, *read_implosion_pickle(p)) for p in implosion_pickle_paths(glob_pattern)]


def write_implosion_pickles(pairs: Sequence[tuple[Any, str]], folder: PathLike,
                            class_subfolders: Sequence[str] | None = None) -> list[Path]:
    """Write ``(image, text)`` pairs as ``folder/000000.pickle`` ... (or ``folder/<class>/000000.pickle``).

    Grayscale images are stored (H,W), colour images (H,W,3) uint8, as in the original data.
    """
    folder = Path(folder)
    if class_subfolders is not None and len(class_subfolders) != len(pairs):
        raise ValueError(f"class_subfolders has {len(class_subfolders)} entries for {len(pairs)} pairs")
    out = []
    for i, (image, text) in enumerate(pairs):
        if isinstance(image, Image.Image):
            arr = np.asarray(image.convert("L") if image.mode in ("L", "1") else image.convert("RGB"))
        else:
            arr = np.asarray(image)
        if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
            raise ValueError(f"pair {i}: image must be uint8 (H,W) or (H,W,3), got {arr.dtype} {arr.shape}")
        sub = folder / class_subfolders[i] if class_subfolders is not None else folder
        path = sub / f"{i:06d}.pickle"
        _atomic_write_bytes(path, pickle.dumps({"img": arr, "text": str(text)}))
        out.append(path)
    return out


def class_pairs(images: Sequence[Any], labels: Sequence[Any], prompt_template: str | None = None,
                class_names: Sequence[str] | None = None) -> list[tuple[Any, str]]:
    """Class datasets (CIFAR10, ImageNet) as pairs: text = label, or ``prompt_template.format(label=...)``.

    ``labels`` are names, or integer ids mapped through ``class_names``.
    Example template: ``"a photo of a {label}"`` (DiffusionITM/CLIP zero-shot prompt).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    out = []
    for img, lab in zip(images, labels):
        name = class_names[int(lab)] if class_names is not None else str(lab)
        out.append((img, prompt_template.format(label=name) if prompt_template else name))
    return out


def _validate_embedding_cache(cache: Mapping, where: Any, atol: float | None) -> dict:
    fix = "the cache must map filepath -> {'img_emb': (d,), 'txt_emb': (d,)} with one d for all entries"
    if not isinstance(cache, Mapping):
        raise _fail(where, f"embedding cache is a {type(cache).__name__}, expected a dict", fix)
    if not cache:
        raise FormatError(f"dataset {where} has no items (empty embedding cache). Fix: {fix}")
    out, dim = {}, None
    for key, entry in cache.items():
        _require_keys(entry, ("img_emb", "txt_emb"), where, f"entry {key!r}", fix)
        vecs = {}
        for k in ("img_emb", "txt_emb"):
            v = np.asarray(entry[k], dtype=np.float32)
            if v.ndim != 1:
                raise _fail(where, f"entry {key!r} field {k!r} has shape {v.shape}, expected (d,)", fix)
            dim = v.shape[0] if dim is None else dim
            if v.shape[0] != dim:
                raise _fail(where, f"entry {key!r} field {k!r} has d={v.shape[0]}, other entries d={dim}", fix)
            if not np.all(np.isfinite(v)):
                raise _fail(where, f"entry {key!r} field {k!r} has non-finite values", "recompute the embedding")
            if atol is not None and abs(float(np.linalg.norm(v)) - 1.0) > atol:
                raise _fail(where, f"entry {key!r} field {k!r} has L2 norm {np.linalg.norm(v):.4f}, "
                            "expected 1 (the original stores L2-normalised vectors)",
                            "normalise v / ||v|| or pass check_norm=None")
            vecs[k] = v
        out[str(key)] = vecs
    return out


def read_embedding_cache(path: PathLike, check_norm: float | None = 1e-3) -> dict[str, dict[str, np.ndarray]]:
    """Read ``{filepath: {'img_emb': (d,), 'txt_emb': (d,)}}`` (pickle), validated (keys, one d, finite, unit norm)."""
    path = _require_file(path, "embedding cache", "compute the embeddings first or pass the cache path")
    try:
        with open(path, "rb") as f:
            cache = pickle.load(f)
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"cannot unpickle ({type(e).__name__}: {e})", "delete the cache and recompute it") from None
    return _validate_embedding_cache(cache, path, check_norm)


def write_embedding_cache(cache: Mapping, path: PathLike, check_norm: float | None = 1e-3) -> Path:
    """Validate and write the embedding cache atomically (a killed run never leaves a truncated cache)."""
    clean = _validate_embedding_cache(cache, path, check_norm)
    return _atomic_write_bytes(path, pickle.dumps(clean, protocol=pickle.HIGHEST_PROTOCOL))


# ---------------------------------------------------------------------------
# 2. ARO (Yuksekgonul et al., ICLR'23): VG-Relation, VG-Attribution, COCO/Flickr-Order
# ---------------------------------------------------------------------------
#: Relations that ARO's official VG-Relation macro accuracy leaves out (symmetric or
#: not order-sensitive), as listed in mertyg/vision-language-models-are-bows,
#: notebooks/"Replicate ARO! VG-Relation, VG-Attribution.ipynb".
ARO_SYMMETRIC_RELATIONS = frozenset([
    'adjusting', 'attached to', 'between', 'bigger than', 'biting', 'boarding', 'brushing', 'chewing',
    'cleaning', 'climbing', 'close to', 'coming from', 'coming out of', 'contain', 'crossing', 'dragging',
    'draped over', 'drinking', 'drinking from', 'driving', 'driving down', 'driving on', 'eating from',
    'eating in', 'enclosing', 'exiting', 'facing', 'filled with', 'floating in', 'floating on', 'flying',
    'flying above', 'flying in', 'flying over', 'flying through', 'full of', 'going down', 'going into',
    'going through', 'grazing in', 'growing in', 'growing on', 'guiding', 'hanging from', 'hanging in',
    'hanging off', 'hanging over', 'higher than', 'holding onto', 'hugging', 'in between', 'jumping off',
    'jumping on', 'jumping over', 'kept in', 'larger than', 'leading', 'leaning over', 'leaving', 'licking',
    'longer than', 'looking in', 'looking into', 'looking out', 'looking over', 'looking through',
    'lying next to', 'lying on top of', 'making', 'mixed with', 'mounted on', 'moving', 'on the back of',
    'on the edge of', 'on the front of', 'on the other side of', 'opening', 'painted on', 'parked at',
    'parked beside', 'parked by', 'parked in', 'parked in front of', 'parked near', 'parked next to',
    'perched on', 'petting', 'piled on', 'playing', 'playing in', 'playing on', 'playing with', 'pouring',
    'reaching for', 'reading', 'reflected on', 'riding on', 'running in', 'running on', 'running through',
    'seen through', 'sitting behind', 'sitting beside', 'sitting by', 'sitting in front of', 'sitting near',
    'sitting next to', 'sitting under', 'skiing down', 'skiing on', 'sleeping in', 'sleeping on',
    'smiling at', 'sniffing', 'splashing', 'sprinkled on', 'stacked on', 'standing against',
    'standing around', 'standing behind', 'standing beside', 'standing in front of', 'standing near',
    'standing next to', 'staring at', 'stuck in', 'surrounding', 'swimming in', 'swinging', 'talking to',
    'topped with', 'touching', 'traveling down', 'traveling on', 'tying', 'typing on', 'underneath',
    'wading in', 'waiting for', 'walking across', 'walking by', 'walking down', 'walking next to',
    'walking through', 'working in', 'working on', 'worn on', 'wrapped around', 'wrapped in', 'by', 'of',
    'near', 'next to', 'with', 'beside', 'on the side of', 'around',
])

VG_FILES = {"relation": "visual_genome_relation.json", "attribution": "visual_genome_attribution.json"}
_VG_BBOX = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
_VG_KEYS = {"relation": ("image_path", *_VG_BBOX, "relation_name", "true_caption", "false_caption"),
            "attribution": ("image_path", *_VG_BBOX, "attributes", "true_caption", "false_caption")}


def read_aro_vg(root: PathLike, kind: str = "relation", image_dir: PathLike | None = None,
                check_images: bool = True) -> list[MatchItem]:
    """ARO VG-Relation (``kind='relation'``) or VG-Attribution (``'attribution'``) as MatchItems.

    Reads ``root/visual_genome_{relation,attribution}.json`` (or the json path itself);
    images are ``image_dir`` (default ``root/images``) / ``image_path``, cropped to
    (bbox_x, bbox_y, bbox_x + bbox_w, bbox_y + bbox_h) as ARO does. Captions are
    ``[false_caption, true_caption]`` (ARO's caption_options order), so gold_caption = 1.
    meta: aro_task, index, image_path, relation_name / attributes (+ attribute_pair 'a1_a2').
    """
    if kind not in VG_FILES:
        raise ValueError(f"kind must be one of {list(VG_FILES)}, got {kind!r}")
    root = Path(root)
    path = root if root.suffix == ".json" else root / VG_FILES[kind]
    fix = f"pass the ARO folder holding {VG_FILES[kind]} and images/ (download: ARO README)"
    data = _read_json(path, f"ARO VG-{kind} annotations", fix)
    if not isinstance(data, list):
        raise _fail(path, f"expected a JSON list of test cases, got {type(data).__name__}", fix)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    items = []
    for i, rec in enumerate(data):
        _require_keys(rec, _VG_KEYS[kind], path, f"entry {i}", fix)
        x, y, w, h = (float(rec[k]) for k in _VG_BBOX)
        if w <= 0 or h <= 0:
            raise _fail(path, f"entry {i} has an empty bbox (w={w}, h={h})", "fix the bbox fields")
        ref = ImageRef(image_dir / rec["image_path"], box=(x, y, x + w, y + h), source=f"{path} entry {i}")
        meta = {"aro_task": f"vg_{kind}", "index": i, "image_path": rec["image_path"]}
        if kind == "relation":
            meta["relation_name"] = rec["relation_name"]
        else:
            attrs = rec["attributes"]
            if not (isinstance(attrs, (list, tuple)) and len(attrs) == 2):
                raise _fail(path, f"entry {i} field 'attributes' is {attrs!r}", "it must be a list [a1, a2]")
            meta["attributes"] = list(attrs)
            meta["attribute_pair"] = f"{attrs[0]}_{attrs[1]}"
        items.append(MatchItem([ref], [rec["false_caption"], rec["true_caption"]], 0, 1, meta))
    _nonempty(items, path)
    if check_images:
        _check_exists(it.image_refs[0] for it in items)
    return items


def write_aro_vg(records: Sequence[Mapping], root: PathLike, kind: str = "relation") -> Path:
    """Write ``root/visual_genome_{kind}.json`` + ``root/images/``.

    Each record: the json fields (image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption,
    false_caption, relation_name and/or attributes) plus ``image`` (PIL/array of the full
    image; needed on the first record of each image_path only).
    """
    if kind not in VG_FILES:
        raise ValueError(f"kind must be one of {list(VG_FILES)}, got {kind!r}")
    root = Path(root)
    out, written = [], set()
    for i, rec in enumerate(records):
        _require_keys(rec, _VG_KEYS[kind], f"record {i}", "the record", "add the missing field")
        if rec["image_path"] not in written:
            if "image" not in rec:
                raise ValueError(f"record {i}: first record of image {rec['image_path']!r} needs 'image'")
            save_image(rec["image"], root / "images" / rec["image_path"])
            written.add(rec["image_path"])
        out.append({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in rec.items() if k != "image"})
    return _write_json(root / VG_FILES[kind], out)


def _group_key(meta: Mapping) -> tuple[str, str]:
    task = meta.get("aro_task")
    if task == "vg_relation":
        return task, meta["relation_name"]
    if task == "vg_attribution":
        return task, meta.get("attribute_pair") or "_".join(meta["attributes"])
    if task in ("coco_order", "flickr_order"):
        return task, "all"
    raise FormatError(f"item meta {dict(meta)!r} has no known 'aro_task'. "
                      "Fix: pass the meta of items from read_aro_vg / read_aro_order")


def aro_group_accuracy(items_meta: Sequence[Mapping], correct: Sequence[bool],
                       symmetric: Iterable[str] = ARO_SYMMETRIC_RELATIONS, vga_min_count: int = 25):
    """Per-group accuracy table (relation / attribute pair) with the official inclusion flag.

    Returns a DataFrame with columns task, group, accuracy, count, included. VG-R groups
    are excluded when symmetric; VG-A groups when they have fewer than ``vga_min_count``
    items (ARO's ``evaluate_scores`` skips attribute pairs with < 25 cases).
    """
    import pandas as pd

    correct = np.asarray(correct, dtype=bool)
    if len(items_meta) != len(correct):
        raise ValueError(f"{len(items_meta)} metas but {len(correct)} correctness values")
    if len(correct) == 0:
        raise ValueError("no items to score")
    symmetric = set(symmetric)
    keys = [_group_key(m) for m in items_meta]
    df = pd.DataFrame({"task": [k[0] for k in keys], "group": [k[1] for k in keys], "correct": correct})
    g = df.groupby(["task", "group"], sort=True)["correct"].agg(["mean", "size"]).reset_index()
    g = g.rename(columns={"mean": "accuracy", "size": "count"})
    inc = np.ones(len(g), dtype=bool)
    inc[(g.task == "vg_relation").to_numpy() & g.group.isin(symmetric).to_numpy()] = False
    inc[(g.task == "vg_attribution").to_numpy() & (g["count"] < vga_min_count).to_numpy()] = False
    g["included"] = inc
    return g


def aro_accuracy(items_meta: Sequence[Mapping], correct: Sequence[bool], protocol: str = "macro",
                 symmetric: Iterable[str] = ARO_SYMMETRIC_RELATIONS, vga_min_count: int = 25) -> float:
    """ARO accuracy of one task (VG-R, VG-A, COCO-Order or Flickr-Order).

    protocol="macro" (ARO's official numbers): VG-R = mean over relations of the per-relation
    accuracy, symmetric relations excluded; VG-A = mean over attribute pairs with at least
    ``vga_min_count`` items; COCO/Flickr-Order = precision@1 (macro = micro there).
    protocol="micro" (DiffusionITM's tables): plain mean over all items, nothing excluded.
    ``correct[n]`` = whether the model ranked the true caption first for item n.
    """
    if protocol not in ("macro", "micro"):
        raise ValueError(f"protocol must be 'macro' or 'micro', got {protocol!r}")
    tasks = {_group_key(m)[0] for m in items_meta}
    if len(tasks) != 1:
        raise ValueError(f"items mix ARO tasks {sorted(tasks)}; score each task separately")
    c = np.asarray(correct, dtype=bool)
    if protocol == "micro":
        if len(c) != len(items_meta) or len(c) == 0:
            raise ValueError(f"{len(items_meta)} metas but {len(c)} correctness values")
        return float(c.mean())
    g = aro_group_accuracy(items_meta, c, symmetric, vga_min_count)
    g = g[g.included]
    if g.empty:
        raise ValueError(f"no group is left after the official exclusions (task {tasks.pop()}; "
                         f"VG-A needs >= {vga_min_count} items per attribute pair). "
                         "Fix: pass vga_min_count=1 for small datasets, or use protocol='micro'")
    return float(g.accuracy.mean())


# -- COCO-Order / Flickr-Order ----------------------------------------------
_PUNCT = re.compile(r'([.!"()*#:;~])')
_TOKEN = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]")


def normalize_caption(caption: str, max_words: int = 30) -> str:
    """ARO/BLIP ``pre_caption``: lower case, ``.!"()*#:;~`` -> space, collapse spaces, keep max_words words."""
    text = re.sub(r"\s{2,}", " ", _PUNCT.sub(" ", caption.lower())).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def tokenize(text: str) -> list[str]:
    """Word/punctuation tokens (stand-in for nltk.word_tokenize, which is not installed)."""
    return _TOKEN.findall(text)


POS_NOUN, POS_ADJ, POS_OTHER = "NOUN", "ADJ", "OTHER"

#: Default noun lexicon: COCO category words + frequent caption nouns.
DEFAULT_NOUNS = frozenset("""
person people man men woman women child children boy girl kid baby player group crowd couple family
bicycle bike car motorcycle airplane plane jet bus train truck boat ship light hydrant sign meter bench
bird cat dog horse sheep cow elephant bear zebra giraffe animal backpack umbrella handbag bag tie
suitcase frisbee skis ski snowboard ball kite bat glove skateboard surfboard racket bottle glass cup
fork knife spoon bowl banana apple sandwich orange broccoli carrot pizza donut doughnut cake chair couch
sofa plant bed table toilet tv television laptop computer mouse remote keyboard phone microwave oven
toaster sink refrigerator fridge book clock vase scissors toothbrush street road sidewalk field grass
water ocean sea beach wave sand snow hill mountain slope sky cloud tree building city house room kitchen
bathroom wall window door floor ground park lot area picture photo image food plate shirt hat jacket
game track pole fence lake river counter shelf desk head hand top side front back middle tower wood
circle square triangle star cross hexagon diamond shape object cube sphere cylinder
""".split())

#: Default adjective lexicon: colours, sizes, ages and frequent caption adjectives.
DEFAULT_ADJECTIVES = frozenset("""
red blue green yellow white black brown gray grey orange pink purple cyan silver golden dark bright
small large big little tiny huge tall short long wide narrow young old older new empty full open closed
busy clean dirty grassy sunny cloudy snowy wooden metal plastic several various many other different
whole single double round flat striped colorful cute pretty beautiful hot cold wet dry
""".split())


class LexiconTagger:
    """Fallback POS tagger: a word is ADJ if in ``adjectives``, NOUN if in ``nouns`` (also after
    stripping a plural -s/-es/-ies->y), else OTHER. Adjectives win ties ("orange").

    The original uses spaCy's tagger (NN*/JJ* tags); spaCy and nltk are not installed here,
    so this lexicon approximation is the default. A spaCy tagger can be passed instead::

        nlp = spacy.load("en_core_web_sm")
        tagger = lambda ws: ["NOUN" if t.tag_.startswith("NN") else "ADJ" if t.tag_.startswith("JJ")
                             else "OTHER" for t in nlp(spacy.tokens.Doc(nlp.vocab, words=ws))]
    """

    def __init__(self, nouns: Iterable[str] = DEFAULT_NOUNS, adjectives: Iterable[str] = DEFAULT_ADJECTIVES):
        self.nouns = {w.lower() for w in nouns}
        self.adjectives = {w.lower() for w in adjectives}

    def _is_noun(self, w: str) -> bool:
        cands = [w]
        if w.endswith("ies"):
            cands.append(w[:-3] + "y")
        if w.endswith("es"):
            cands.append(w[:-2])
        if w.endswith("s"):
            cands.append(w[:-1])
        return any(c in self.nouns for c in cands)

    def __call__(self, words: Sequence[str]) -> list[str]:
        tags = []
        for w in words:
            lw = w.lower()
            tags.append(POS_ADJ if lw in self.adjectives else POS_NOUN if self._is_noun(lw) else POS_OTHER)
        return tags


def _check_tags(tags: Sequence[str], words: Sequence[str]) -> list[str]:
    tags = list(tags)
    if len(tags) != len(words) or any(t not in (POS_NOUN, POS_ADJ, POS_OTHER) for t in tags):
        raise ValueError(f"pos_tagger must return one of NOUN/ADJ/OTHER per word; got {tags} for {list(words)}")
    return tags


def _permute_positions(tokens: list[str], positions: Sequence[int], rng: np.random.Generator) -> None:
    if len(positions) > 1:
        vals = [tokens[p] for p in positions]
        for p, j in zip(positions, rng.permutation(len(positions))):
            tokens[p] = vals[j]


def _tagged(caption: str, pos_tagger: Callable | None) -> tuple[list[str], list[str]]:
    tokens = tokenize(caption)
    return tokens, _check_tags((pos_tagger or LexiconTagger())(tokens), tokens)


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


# token-level perturbations: (tokens, tags, rng) -> tokens; the tags are computed once per caption
def _nouns_and_adj(tokens: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    out = list(tokens)
    _permute_positions(out, [i for i, t in enumerate(tags) if t == POS_NOUN], rng)
    _permute_positions(out, [i for i, t in enumerate(tags) if t == POS_ADJ], rng)
    return out


def _allbut_nouns_and_adj(tokens: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    out = list(tokens)
    _permute_positions(out, [i for i, t in enumerate(tags) if t == POS_OTHER], rng)
    return out


def _within_trigrams(tokens: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    return [g[j] for g in _trigrams(tokens) for j in rng.permutation(len(g))]


def _trigram_order(tokens: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    grams = _trigrams(tokens)
    return [w for j in rng.permutation(len(grams)) for w in grams[j]]


def shuffle_nouns_and_adj(caption: str, rng: np.random.Generator, pos_tagger: Callable | None = None) -> str:
    """ARO perturbation 1: permute the nouns among noun positions and the adjectives among adjective positions."""
    return " ".join(_nouns_and_adj(*_tagged(caption, pos_tagger), rng))


def shuffle_allbut_nouns_and_adj(caption: str, rng: np.random.Generator, pos_tagger: Callable | None = None) -> str:
    """ARO perturbation 2: permute every token that is neither a noun nor an adjective."""
    return " ".join(_allbut_nouns_and_adj(*_tagged(caption, pos_tagger), rng))


def shuffle_within_trigrams(caption: str, rng: np.random.Generator, pos_tagger: Callable | None = None) -> str:
    """ARO perturbation 3: cut the tokens into consecutive trigrams and permute inside each."""
    return " ".join(_within_trigrams(tokenize(caption), [], rng))


def shuffle_trigrams(caption: str, rng: np.random.Generator, pos_tagger: Callable | None = None) -> str:
    """ARO perturbation 4: permute the order of the consecutive trigrams."""
    return " ".join(_trigram_order(tokenize(caption), [], rng))


ORDER_PERTURBATIONS = (shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj, shuffle_within_trigrams,
                       shuffle_trigrams)
_TOKEN_PERTURBATIONS = (_nouns_and_adj, _allbut_nouns_and_adj, _within_trigrams, _trigram_order)


class NoOrderNegative(ValueError):
    """No draw of an ARO order perturbation changes the caption (e.g. a caption with one noun and
    one adjective cannot be perturbed by "shuffle nouns and adjectives"); ``perturbation`` names it."""

    def __init__(self, caption: str, perturbation: str, tries: int):
        self.caption, self.perturbation, self.tries = caption, perturbation, tries
        super().__init__(f"caption {caption!r}: {tries} draws of {perturbation} all reproduce the caption, so it "
                         "has no order negative. Fix: drop the caption (read_aro_order does and reports it "
                         "in .dropped) or use a longer caption")


def order_caption_options(caption: str, seed: int, max_words: int = 30,
                          pos_tagger: Callable | None = None, max_tries: int = 100) -> list[str]:
    """``[true, 4 perturbations]`` for one caption, each ``normalize_caption``-ed.

    As in ARO, the perturbations act on the raw caption and are normalised afterwards.
    ARO draws from the unseeded global RNG; here every draw comes from
    ``np.random.default_rng(seed)`` (deliberate difference: reproducible captions).
    A perturbation that reproduces the caption (same tokens after normalisation, e.g. the
    identity permutation) is not a negative: it is redrawn, retry ``t`` of perturbation
    ``k`` from ``np.random.default_rng([seed, k, t])`` (so the other perturbations keep their
    draws), up to ``max_tries`` draws in all. Where every draw reproduces the caption,
    :class:`NoOrderNegative` is raised. Deliberate difference: the original keeps such
    "negatives", which makes the item an exact tie.
    """
    if int(max_tries) < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    rng = np.random.default_rng(seed)
    tokens, tags = _tagged(caption, pos_tagger)
    true = normalize_caption(caption, max_words)
    true_tokens = tokenize(true)
    opts = [true]
    for k, perturb in enumerate(_TOKEN_PERTURBATIONS):
        for t in range(int(max_tries)):
            draw = rng if t == 0 else np.random.default_rng([int(seed), k, t])
            cand = normalize_caption(" ".join(perturb(tokens, tags, draw)), max_words)
            if tokenize(cand) != true_tokens:
                break
        else:
            raise NoOrderNegative(caption, ORDER_PERTURBATIONS[k].__name__, int(max_tries))
        opts.append(cand)
    return opts


class OrderItems(list):
    """:func:`read_aro_order`'s result: the list of :class:`MatchItem` s, plus ``dropped``, one dict
    ``{entry, caption_index, caption, perturbation}`` per caption left out because a perturbation
    could not change it (report ``len(items.dropped)`` beside the accuracy). Slicing gives a plain list."""

    def __init__(self, items: Iterable[MatchItem] = (), dropped: Sequence[dict] = ()):
        super().__init__(items)
        self.dropped = list(dropped)


ORDER_FILES = {"coco_order": "coco_karpathy_test.json", "flickr_order": "flickr30k_test.json"}


def read_aro_order(json_path: PathLike, image_root: PathLike | None = None, seed: int = 0, max_words: int = 30,
                   pos_tagger: Callable | None = None, task: str | None = None,
                   check_images: bool = True) -> OrderItems:
    """COCO-Order / Flickr-Order: one item per (image, caption) with captions ``[true, 4 perturbed]``, gold 0.

    ``json_path``: ``coco_karpathy_test.json`` / ``flickr30k_test.json`` (entries
    ``{image, caption: [captions]}``); ``image`` is relative to ``image_root`` (default: the
    json's folder, as in ARO where both live in the dataset root). The item for caption k of
    entry e uses seed ``[seed, e, k]``, so subsets and reorderings keep the same perturbations.
    ``pos_tagger``: words -> NOUN/ADJ/OTHER tags (default :class:`LexiconTagger`, see there).
    A caption some perturbation cannot change (:func:`order_caption_options`) gives no item;
    the result's ``dropped`` lists those captions (ARO's protocol for short captions).
    meta: aro_task, image, entry, caption_index.
    """
    json_path = Path(json_path)
    fix = "pass coco_karpathy_test.json or flickr30k_test.json (entries {image, caption: [...]})"
    data = _read_json(json_path, "ARO order annotations", fix)
    if not isinstance(data, list):
        raise _fail(json_path, f"expected a JSON list of entries, got {type(data).__name__}", fix)
    task = task or ("flickr_order" if "flickr" in json_path.name.lower() else "coco_order")
    if task not in ORDER_FILES:
        raise ValueError(f"task must be one of {list(ORDER_FILES)}, got {task!r}")
    image_root = Path(image_root) if image_root is not None else json_path.parent
    tagger = pos_tagger or LexiconTagger()
    items, dropped = OrderItems(), []
    for e, ent in enumerate(data):
        _require_keys(ent, ("image", "caption"), json_path, f"entry {e}", fix)
        caps = [ent["caption"]] if isinstance(ent["caption"], str) else ent["caption"]
        ref = ImageRef(image_root / ent["image"], source=f"{json_path} entry {e}")
        for k, cap in enumerate(caps):
            seq = np.random.SeedSequence([int(seed), e, k])
            try:
                opts = order_caption_options(cap, int(seq.generate_state(1)[0]), max_words, tagger)
            except NoOrderNegative as err:
                dropped.append({"entry": e, "caption_index": k, "caption": cap, "perturbation": err.perturbation})
                continue
            items.append(MatchItem([ref], opts, 0, 0,
                                   {"aro_task": task, "image": ent["image"], "entry": e, "caption_index": k}))
    items.dropped = dropped
    _nonempty(items, json_path, f"check the file ({len(dropped)} caption(s) were dropped because an order "
                                "perturbation cannot change them)")
    if check_images:
        _check_exists(it.image_refs[0] for it in items)
    return items


def write_aro_order(entries: Sequence[Mapping], root: PathLike, task: str = "coco_order",
                    images: Mapping[str, Any] | None = None) -> Path:
    """Write ``root/coco_karpathy_test.json`` (or ``flickr30k_test.json``): entries ``{image, caption: [...]}``.

    ``images`` maps each relative ``image`` path to a PIL/array written under ``root``.
    """
    if task not in ORDER_FILES:
        raise ValueError(f"task must be one of {list(ORDER_FILES)}, got {task!r}")
    root = Path(root)
    out = []
    for i, ent in enumerate(entries):
        _require_keys(ent, ("image", "caption"), f"entry {i}", "the entry", "add the missing field")
        caps = [ent["caption"]] if isinstance(ent["caption"], str) else list(ent["caption"])
        out.append({"image": ent["image"], "caption": caps,
                    **{k: v for k, v in ent.items() if k not in ("image", "caption")}})
    for rel, img in (images or {}).items():
        save_image(img, root / rel)
    return _write_json(root / ORDER_FILES[task], out)


# ---------------------------------------------------------------------------
# 3. Winoground
# ---------------------------------------------------------------------------
WINOGROUND_COLUMNS = ("id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag",
                      "num_main_preds", "collapsed_tag")


def winoground_items(rows: Iterable[Mapping], images_dir: PathLike | None = None,
                     source: Any = "<rows>") -> list[MatchItem]:
    """Winoground rows -> 2x2 MatchItems (images [image_0, image_1], captions [caption_0, caption_1]).

    ``image_k`` is a PIL image (HF datasets rows) or a file name in ``images_dir``, with or
    without extension (.png/.jpg tried, so file existence is always checked); when absent it
    defaults to ``ex_{id}_img_{k}`` (DiffusionITM's data.json has no image columns).
    meta: id and the tag columns.
    """
    fix = f"rows need {list(WINOGROUND_COLUMNS)} (image_0/image_1 may be omitted)"
    items = []
    for n, row in enumerate(rows):
        _require_keys(row, ("id", "caption_0", "caption_1"), source, f"row {n}", fix)
        refs = []
        for k in (0, 1):
            img = row.get(f"image_{k}")
            if img is None or (isinstance(img, str) and not img):
                img = f"ex_{row['id']}_img_{k}"
            if isinstance(img, (str, os.PathLike)):
                if images_dir is None:
                    raise _fail(source, f"row {n} names image {img!r} but no images folder was given",
                                "pass images_dir")
                img = ImageRef(_find_image(Path(images_dir), str(img), f"{source} row {n}"), source=f"{source} row {n}")
            refs.append(img)
        meta = {k: row[k] for k in WINOGROUND_COLUMNS[5:] if k in row}
        if "num_main_preds" in meta and str(meta["num_main_preds"]).strip() != "":
            meta["num_main_preds"] = int(meta["num_main_preds"])
        rid = row["id"]
        meta["id"] = int(rid) if isinstance(rid, str) and rid.strip().lstrip("-").isdigit() else rid
        items.append(MatchItem(refs, [row["caption_0"], row["caption_1"]], 0, 0, meta))
    return _nonempty(items, source)


def read_winoground(path: PathLike, images_dir: PathLike | None = None) -> list[MatchItem]:
    """Winoground from ``examples.jsonl`` (HF), a json list (DiffusionITM ``data.json``) or a csv.

    Images in ``images_dir`` (default: ``<file folder>/images``). See :func:`winoground_items`.
    """
    path = _require_file(path, "Winoground annotations", "pass examples.jsonl, data.json or a csv with "
                         f"columns {list(WINOGROUND_COLUMNS)}")
    fix = f"one row per example with {list(WINOGROUND_COLUMNS)}"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise _fail(path, f"line {ln} is not valid JSON ({e})", fix) from None
    elif suffix == ".json":
        rows = _read_json(path, "Winoground annotations")
        if not isinstance(rows, list):
            raise _fail(path, f"expected a JSON list of rows, got {type(rows).__name__}", fix)
    else:
        rows = _read_table(path, "Winoground csv", ("id", "caption_0", "caption_1"), fix).to_dict("records")
    images_dir = Path(images_dir) if images_dir is not None else path.parent / "images"
    return winoground_items(rows, images_dir, path)


def write_winoground(rows: Sequence[Mapping], root: PathLike, fmt: str = "jsonl") -> Path:
    """Write Winoground rows: ``root/examples.jsonl`` (fmt 'jsonl', HF layout), ``root/data.json``
    ('json') or ``root/winoground.csv`` ('csv'), images as ``root/images/ex_{id}_img_{k}.png``.

    Each row: id, caption_0, caption_1, image_0, image_1 (PIL/arrays), optional tag,
    secondary_tag, num_main_preds (default 1), collapsed_tag.
    """
    root = Path(root)
    out = []
    for n, row in enumerate(rows):
        _require_keys(row, ("id", "caption_0", "caption_1", "image_0", "image_1"), f"row {n}", "the row",
                      "add the missing field")
        rec = {"id": row["id"]}
        for k in (0, 1):
            name = f"ex_{row['id']}_img_{k}"
            save_image(row[f"image_{k}"], root / "images" / f"{name}.png")
            rec[f"image_{k}"] = name
        rec.update(caption_0=row["caption_0"], caption_1=row["caption_1"], tag=row.get("tag", ""),
                   secondary_tag=row.get("secondary_tag", ""), num_main_preds=int(row.get("num_main_preds", 1)),
                   collapsed_tag=row.get("collapsed_tag", ""))
        out.append(rec)
    if fmt == "jsonl":
        return _atomic_write_bytes(root / "examples.jsonl", "".join(json.dumps(r) + "\n" for r in out).encode())
    if fmt == "json":
        return _write_json(root / "data.json", out, indent=4)
    if fmt == "csv":
        return _write_csv(root / "winoground.csv", list(WINOGROUND_COLUMNS), [[r[c] for c in WINOGROUND_COLUMNS]
                                                                              for r in out])
    raise ValueError(f"fmt must be 'jsonl', 'json' or 'csv', got {fmt!r}")


def winoground_scores(s: Any, per_example: bool = False) -> dict:
    """Winoground text / image / group scores from ``s[n, caption_i, image_j]`` (shape [N,2,2]).

    Thrush et al. (2022), with strict ``>`` (a tie counts as a failure):
    text  = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1);
    image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0); group = text and image.
    Returns means (and the per-example booleans with ``per_example=True``).
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 3 or s.shape[1:] != (2, 2) or s.shape[0] == 0:
        raise ValueError(f"scores must have shape [N,2,2] (caption, image), got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN/inf; fix the scorer before computing Winoground metrics")
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    group = text & image
    out = {"text": float(text.mean()), "image": float(image.mean()), "group": float(group.mean()), "n": len(s)}
    if per_example:
        out.update(text_correct=text, image_correct=image, group_correct=group)
    return out


def _write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]], delimiter: str = ",") -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return _atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


# ---------------------------------------------------------------------------
# 4. COCO instances (polygons, RLE) and COCO-IT (Info-Decomp word localisation)
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# 5-10. DiffusionITM's GDBench tasks
# ---------------------------------------------------------------------------
CLEVR_SUBTASKS = ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape", "spatial",
                  "binding_color_shape", "binding_shape_color")


def read_clevr(root: PathLike, subtasks: Sequence[str] | None = None, check_images: bool = True) -> list[MatchItem]:
    """GDBench CLEVR: ``root/captions/{subtask}.json`` = ``{image: [[pos, neg], ...]}``, images in ``root/images``.

    One text-retrieval item per pair, captions [pos, neg], gold 0 (DiffusionITM also uses
    columns 0/1 for 'spatial': its special case never fires). ``subtasks=None`` reads every
    published subtask file present; named subtasks must exist. meta: subtask, image.
    """
    root = Path(root)
    cap_dir = _require_dir(root / "captions", "CLEVR captions folder", "pass the folder holding captions/ and images/")
    names = list(subtasks) if subtasks is not None else [s for s in CLEVR_SUBTASKS if (cap_dir / f"{s}.json").is_file()]
    if not names:
        raise FileNotFoundError(f"no CLEVR subtask file in {cap_dir}. Fix: expected some of "
                                f"{[s + '.json' for s in CLEVR_SUBTASKS]}")
    items = []
    for sub in names:
        path = cap_dir / f"{sub}.json"
        fix = "each subtask file maps image name -> list of [positive caption, negative caption]"
        data = _read_json(path, f"CLEVR subtask {sub!r}", f"expected {path}; known subtasks {list(CLEVR_SUBTASKS)}")
        if not isinstance(data, Mapping):
            raise _fail(path, f"expected a JSON object, got {type(data).__name__}", fix)
        for img, pairs in data.items():
            ref = ImageRef(root / "images" / img, source=f"{path} [{img!r}]")
            for j, pair in enumerate(pairs):
                if not (isinstance(pair, (list, tuple)) and len(pair) >= 2):
                    raise _fail(path, f"image {img!r} pair {j} is {pair!r}", fix)
                items.append(MatchItem([ref], [pair[0], pair[1]], 0, 0, {"subtask": sub, "image": img, "pair": j}))
    _nonempty(items, cap_dir)
    if check_images:
        _check_exists(it.image_refs[0] for it in items)
    return items


def write_clevr(root: PathLike, subtask_pairs: Mapping[str, Mapping[str, Sequence[Sequence[str]]]],
                images: Mapping[str, Any]) -> list[Path]:
    """Write ``root/captions/{subtask}.json`` and ``root/images/{name}`` (names as in the json, e.g. .png)."""
    root = Path(root)
    for name, img in images.items():
        save_image(img, root / "images" / name)
    return [_write_json(root / "captions" / f"{sub}.json", {k: [list(p) for p in v] for k, v in pairs.items()})
            for sub, pairs in subtask_pairs.items()]


SVO_COLUMNS = ("pos_id", "neg_id", "sentence", "pos_triplet", "neg_triplet", "neg_type")


def read_svo(path: PathLike, image_dir: PathLike | None = None, neg_types: Sequence[str] | None = None,
             check_images: bool = True) -> list[MatchItem]:
    """SVO probes (``svo.json`` list or a csv with ``pos_id, neg_id, sentence, pos_triplet, neg_triplet,
    neg_type``) -> image-retrieval items: images [pos, neg], caption [sentence], gold_image 0.

    Images are ``image_dir`` (default ``<file folder>/images``) / pos_id (ids include ``.jpg``).
    ``neg_types`` filters (DiffusionITM's svo_subj / svo_verb / svo_obj tasks).
    """
    path = Path(path)
    fix = f"rows need {list(SVO_COLUMNS)}"
    df = _read_table(path, "SVO annotations", SVO_COLUMNS, fix)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    items = []
    for i, row in enumerate(df.to_dict("records")):
        if neg_types is not None and row["neg_type"] not in neg_types:
            continue
        refs = [ImageRef(image_dir / str(row[k]), source=f"{path} row {i}") for k in ("pos_id", "neg_id")]
        meta = {k: row[k] for k in SVO_COLUMNS}
        items.append(MatchItem(refs, [row["sentence"]], 0, 0, meta))
    _nonempty(items, path, f"check the file (and neg_types={neg_types})")
    if check_images:
        _check_exists(r for it in items for r in it.image_refs)
    return items


def write_svo(rows: Sequence[Mapping], root: PathLike, images: Mapping[str, Any], fmt: str = "json") -> Path:
    """Write ``root/svo.json`` (or ``root/svo.csv``) and ``root/images/{id}``; rows have the SVO columns."""
    root = Path(root)
    for name, img in images.items():
        save_image(img, root / "images" / name)
    out = []
    for i, r in enumerate(rows):
        _require_keys(r, SVO_COLUMNS, f"row {i}", "the row", "add the missing field")
        out.append({k: r[k] for k in SVO_COLUMNS})
    if fmt == "json":
        return _write_json(root / "svo.json", out, indent=4)
    if fmt == "csv":
        return _write_csv(root / "svo.csv", SVO_COLUMNS, [[r[k] for k in SVO_COLUMNS] for r in out])
    raise ValueError(f"fmt must be 'json' or 'csv', got {fmt!r}")


_IMGCODE_NAME = re.compile(r"^img(\d+)$")


def read_imagecode(json_path: PathLike, image_sets_dir: PathLike | None = None, static_only: bool = False,
                   check_images: bool = True) -> list[MatchItem]:
    """ImageCoDe ``{split}_data.json`` = ``{set_dir: {img_idx: text}}`` -> image-retrieval items.

    Images: ``image_sets_dir`` (default ``<json folder>/image-sets``) / set_dir / ``img{k}.jpg``
    (png accepted), ordered by k; gold_image = img_idx. ``static_only=True`` keeps the static
    sets (set names containing 'open-images'), which is what DiffusionITM's ``imagecode`` task uses.
    """
    json_path = Path(json_path)
    fix = "ImageCoDe json maps image-set folder -> {image index: description}"
    data = _read_json(json_path, "ImageCoDe annotations", "pass e.g. valid_data.json")
    if not isinstance(data, Mapping):
        raise _fail(json_path, f"expected a JSON object, got {type(data).__name__}", fix)
    sets_dir = Path(image_sets_dir) if image_sets_dir is not None else json_path.parent / "image-sets"
    items = []
    for set_name, descs in data.items():
        if static_only and "open-images" not in set_name:
            continue
        if not isinstance(descs, Mapping):
            raise _fail(json_path, f"set {set_name!r} maps to {type(descs).__name__}", fix)
        folder = _require_dir(sets_dir / set_name, f"ImageCoDe image set {set_name!r}",
                              "pass image_sets_dir (the folder holding the image-set folders)")
        files = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS and _IMGCODE_NAME.match(f.stem)]
        files.sort(key=lambda f: int(_IMGCODE_NAME.match(f.stem).group(1)))
        if not files:
            raise _fail(folder, "no img{k}.jpg files", "restore the image set")
        for idx, text in descs.items():
            if not str(idx).strip().isdigit():
                raise _fail(json_path, f"set {set_name!r} has image index {idx!r}", "indices are 0..9 as strings")
            k = int(idx)
            if not 0 <= k < len(files):
                raise _fail(json_path, f"set {set_name!r} description index {k} but only {len(files)} images",
                            "check the image set folder")
            refs = [ImageRef(f, source=f"{json_path} [{set_name!r}]") for f in files]
            items.append(MatchItem(refs, [text], k, 0, {"set": set_name, "img_idx": k}))
    _nonempty(items, json_path, f"check the file (static_only={static_only})")
    if check_images:
        _check_exists(r for it in items for r in it.image_refs)
    return items


def write_imagecode(root: PathLike, sets: Mapping[str, Sequence[Any]], descriptions: Mapping[str, Mapping[int, str]],
                    split: str = "valid", image_ext: str = ".jpg") -> Path:
    """Write ``root/{split}_data.json`` and ``root/image-sets/{set}/img{k}{image_ext}``."""
    root = Path(root)
    for set_name, imgs in sets.items():
        for k, img in enumerate(imgs):
            save_image(img, root / "image-sets" / set_name / f"img{k}{image_ext}")
    return _write_json(root / f"{split}_data.json",
                       {s: {str(k): t for k, t in d.items()} for s, d in descriptions.items()})


def _resolve(root: Path, p: str) -> Path:
    return Path(p) if os.path.isabs(p) else root / p


def read_flickr30k_retrieval(json_path: PathLike, image_root: PathLike | None = None, stride: int = 1,
                             check_images: bool = True) -> list[MatchItem]:
    """Flickr30K image retrieval: ``{caption: [10 image paths, gold first]}`` (DiffusionITM's
    ``{split}_top10_RN50x64.json``; a list of ``{caption, images}`` is accepted too).

    Paths are relative to ``image_root`` (default: the json folder; for the published file
    pass the DiffusionITM repository root). ``stride=5`` keeps the first caption of each image,
    as DiffusionITM does (``data[::5]``). Items: images = candidates, caption, gold_image 0.
    """
    json_path = Path(json_path)
    fix = "the json maps caption -> list of candidate image paths (gold first)"
    data = _read_json(json_path, "Flickr30K retrieval json")
    if isinstance(data, Mapping):
        pairs = list(data.items())
    elif isinstance(data, list):
        for i, r in enumerate(data):
            _require_keys(r, ("caption", "images"), json_path, f"entry {i}", fix)
        pairs = [(r["caption"], r["images"]) for r in data]
    else:
        raise _fail(json_path, f"expected an object or a list, got {type(data).__name__}", fix)
    root = Path(image_root) if image_root is not None else json_path.parent
    items = []
    for n, (cap, paths) in enumerate(pairs[::stride]):
        if not isinstance(paths, list) or not paths:
            raise _fail(json_path, f"caption {cap!r} has candidates {paths!r}", fix)
        refs = [ImageRef(_resolve(root, p), source=f"{json_path} [{cap!r}]") for p in paths]
        items.append(MatchItem(refs, [cap], 0, 0, {"caption": cap, "image_paths": list(paths)}))
    _nonempty(items, json_path)
    if check_images:
        _check_exists(r for it in items for r in it.image_refs)
    return items


def read_flickr30k_text_retrieval(json_path: PathLike, image_root: PathLike | None = None,
                                  check_images: bool = True) -> list[MatchItem]:
    """Flickr30K text retrieval: ``{image path: [10 captions, gold first]}`` (``*_top10_RN50x64_text.json``)."""
    json_path = Path(json_path)
    fix = "the json maps image path -> list of candidate captions (gold first)"
    data = _read_json(json_path, "Flickr30K text-retrieval json")
    if not isinstance(data, Mapping):
        raise _fail(json_path, f"expected a JSON object, got {type(data).__name__}", fix)
    root = Path(image_root) if image_root is not None else json_path.parent
    items = []
    for p, caps in data.items():
        if not isinstance(caps, list) or not caps:
            raise _fail(json_path, f"image {p!r} has captions {caps!r}", fix)
        items.append(MatchItem([ImageRef(_resolve(root, p), source=f"{json_path} [{p!r}]")], caps, 0, 0, {"image": p}))
    _nonempty(items, json_path)
    if check_images:
        _check_exists(it.image_refs[0] for it in items)
    return items


def write_flickr30k_retrieval(entries: Sequence[tuple[str, Sequence[str]]], json_path: PathLike) -> Path:
    """Write ``{caption: [paths, gold first]}``. Captions are json keys, so they must be unique."""
    out: dict[str, list[str]] = {}
    for cap, paths in entries:
        if cap in out:
            raise ValueError(f"duplicate caption {cap!r}: the published format is keyed by caption")
        out[cap] = [str(p) for p in paths]
    return _write_json(json_path, out, indent=4)


def write_flickr30k_text_retrieval(entries: Sequence[tuple[str, Sequence[str]]], json_path: PathLike) -> Path:
    """Write ``{image path: [captions, gold first]}``; image paths must be unique."""
    out: dict[str, list[str]] = {}
    for path, caps in entries:
        if str(path) in out:
            raise ValueError(f"duplicate image path {path!r}: the published format is keyed by image")
        out[str(path)] = list(caps)
    return _write_json(json_path, out, indent=4)


NEGCLIP_COLUMNS = ("title", "filepath", "neg_caption", "neg_image")


@dataclass
class NegClipRow:
    """One NegCLIP training row: caption (title), image path, hard-negative captions, hard-negative image rows."""

    title: str
    filepath: str
    neg_captions: list[str]
    neg_images: list[int]


def _parse_list(text: str, path: Path, i: int, col: str) -> list:
    for parse in (json.loads, ast.literal_eval):
        try:
            v = parse(text)
            if isinstance(v, (list, tuple)):
                return list(v)
        except (ValueError, SyntaxError, TypeError):
            pass
    raise _fail(path, f"row {i} column {col!r} is {text[:60]!r}", "it must be a python-literal or JSON list")


def read_negclip_tsv(path: PathLike) -> list[NegClipRow]:
    """NegCLIP tsv (``train_neg_clip.tsv``): title, filepath, neg_caption (list of str), neg_image (row indices)."""
    path = Path(path)
    df = _read_table(path, "NegCLIP tsv", NEGCLIP_COLUMNS, f"a tab-separated file with columns {list(NEGCLIP_COLUMNS)}",
                     sep="\t")
    rows = []
    for i, r in enumerate(df.to_dict("records")):
        caps = [str(c) for c in _parse_list(r["neg_caption"], path, i, "neg_caption")]
        imgs = _parse_list(r["neg_image"], path, i, "neg_image")
        if not all(isinstance(j, int) and 0 <= j < len(df) for j in imgs):
            raise _fail(path, f"row {i} neg_image {imgs} has indices outside 0..{len(df) - 1}",
                        "neg_image lists row indices of this file")
        rows.append(NegClipRow(r["title"], r["filepath"], caps, imgs))
    return _nonempty(rows, path)


def write_negclip_tsv(rows: Sequence[NegClipRow | Mapping], path: PathLike) -> Path:
    """Write the NegCLIP tsv as pandas does (leading unnamed index column, python-literal lists)."""
    out = []
    for i, r in enumerate(rows):
        r = r if isinstance(r, NegClipRow) else NegClipRow(r["title"], r["filepath"], list(r["neg_captions"]),
                                                            [int(j) for j in r["neg_images"]])
        if any(not 0 <= j < len(rows) for j in r.neg_images):
            raise ValueError(f"row {i}: neg_images {r.neg_images} must be row indices in 0..{len(rows) - 1}")
        out.append([i, r.title, r.filepath, repr([str(c) for c in r.neg_captions]),
                    repr([int(j) for j in r.neg_images])])
    return _write_csv(path, ["", *NEGCLIP_COLUMNS], out, delimiter="\t")


#: MMBias target groups by category (DiffusionITM ``BiasDataset``; folder data/Images/<category>/<group>).
MMBIAS_GROUPS = {"Religion": ("Christian", "Muslim", "Jewish", "Hindu", "Buddhist"),
                 "Nationality": ("American", "Arab"), "Sexual Orientation": ("Heterosexual", "LGBT")}

#: Gender-bias word pairs (male-, female-associated) per target (DiffusionITM ``GenderBiasDataset``).
GENDER_WORD_PAIRS = {"clothes": ("suit", "apron"), "bags": ("briefcase", "purse"), "drinks": ("beer", "wine")}


@dataclass
class MMBias:
    """MMBias: image paths per group, the group's category, and the pleasant / unpleasant phrases."""

    groups: dict[str, list[Path]]
    categories: dict[str, str]
    pleasant: list[str]
    unpleasant: list[str]


def read_mmbias(root: PathLike, groups: Sequence[str] | None = None) -> MMBias:
    """MMBias: ``root/textual_phrases.txt`` (JSON with pleasant_phrases / unpleasant_phrases) and
    images ``root/data/Images/<category>/<group>/*.jpg``. ``groups`` selects target groups."""
    root = Path(root)
    fix = "the MMBias root holds textual_phrases.txt and data/Images/<category>/<group>/"
    phrases = _read_json(root / "textual_phrases.txt", "MMBias textual_phrases.txt", fix)
    _require_keys(phrases, ("pleasant_phrases", "unpleasant_phrases"), root / "textual_phrases.txt",
                  "the top-level object", fix)
    img_root = _require_dir(root / "data" / "Images", "MMBias image folder", fix)
    found: dict[str, list[Path]] = {}
    cats: dict[str, str] = {}
    for cat_dir in sorted(p for p in img_root.iterdir() if p.is_dir()):
        for g_dir in sorted(p for p in cat_dir.iterdir() if p.is_dir()):
            files = sorted(f for f in g_dir.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if files:
                found[g_dir.name], cats[g_dir.name] = files, cat_dir.name
    if groups is not None:
        missing = [g for g in groups if g not in found]
        if missing:
            raise FileNotFoundError(f"MMBias groups {missing} have no images under {img_root} "
                                    f"(found {sorted(found)}). Fix: check the group names")
        found = {g: found[g] for g in groups}
    if not found:
        raise FormatError(f"dataset {img_root} has no items (no group folder with images). Fix: {fix}")
    pleasant, unpleasant = list(phrases["pleasant_phrases"]), list(phrases["unpleasant_phrases"])
    if not pleasant or not unpleasant:
        raise _fail(root / "textual_phrases.txt", "a phrase list is empty", "give both pleasant and unpleasant phrases")
    return MMBias(found, {g: cats[g] for g in found}, pleasant, unpleasant)


def write_mmbias(root: PathLike, images: Mapping[str, Sequence[Any]], pleasant: Sequence[str],
                 unpleasant: Sequence[str], categories: Mapping[str, str] | None = None,
                 image_ext: str = ".jpg") -> Path:
    """Write the MMBias layout; a group's category defaults to its MMBias category, else 'Other'."""
    root = Path(root)
    known = {g: c for c, gs in MMBIAS_GROUPS.items() for g in gs}
    for g, imgs in images.items():
        cat = (categories or {}).get(g, known.get(g, "Other"))
        for k, img in enumerate(imgs):
            save_image(img, root / "data" / "Images" / cat / g / f"{k:04d}{image_ext}")
    return _write_json(root / "textual_phrases.txt",
                       {"pleasant_phrases": list(pleasant), "unpleasant_phrases": list(unpleasant)}, indent=2)


def read_gender_bias(root: PathLike) -> list[dict]:
    """Gender-bias images ``root/{word}-images/{n}.jpg`` for the words of :data:`GENDER_WORD_PAIRS`.

    As in DiffusionITM, images numbered <= 6 are the 'male' ones and the rest 'female'.
    Returns dicts: path, target (clothes/bags/drinks), words (male word, female word), gender.
    """
    root = Path(root)
    out = []
    for target, words in GENDER_WORD_PAIRS.items():
        for word in words:
            folder = _require_dir(root / f"{word}-images", f"gender-bias folder for {word!r}",
                                  f"the root holds {[w + '-images' for ws in GENDER_WORD_PAIRS.values() for w in ws]}")
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() not in IMAGE_EXTS:
                    continue
                if not f.stem.isdigit():
                    raise _fail(f, "gender-bias image names must be numbers", "rename to 1.jpg, 2.jpg, ...")
                out.append({"path": f, "target": target, "words": words,
                            "gender": "male" if int(f.stem) <= 6 else "female"})
    return _nonempty(out, root)


def write_gender_bias(root: PathLike, images: Mapping[str, Mapping[str, Sequence[Any]]],
                      image_ext: str = ".jpg") -> list[Path]:
    """Write ``root/{word}-images/{n}.jpg``: images[word]['male'] as 1..6, ['female'] from 7 on."""
    root = Path(root)
    out = []
    for word, by_gender in images.items():
        male, female = list(by_gender.get("male", [])), list(by_gender.get("female", []))
        if len(male) > 6:
            raise ValueError(f"{word}: at most 6 'male' images fit the published numbering (1..6)")
        for n, img in list(zip(range(1, 7), male)) + list(zip(range(7, 7 + len(female)), female)):
            out.append(save_image(img, root / f"{word}-images" / f"{n}{image_ext}"))
    return out
