"""Flickr30K image and text retrieval (DiffusionITM's top-10 CLIP RN50x64 candidate files)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from ._common import PathLike, _fail, _nonempty, _read_json, _require_keys, _write_json
from .images import ImageRef, MatchItem, _check_exists


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
