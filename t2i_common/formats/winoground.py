"""Winoground (Thrush et al., 2022): rows as 2x2 items, the three file layouts, and the
text / image / group scores."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ._common import (PathLike, _atomic_write_bytes, _fail, _nonempty, _read_json, _read_table, _require_file,
                      _require_keys, _write_csv, _write_json)
from .images import ImageRef, MatchItem, _find_image, save_image


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
