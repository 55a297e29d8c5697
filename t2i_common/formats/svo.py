"""GDBench SVO probes (subject / verb / object negatives) as image-retrieval items."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ._common import PathLike, _nonempty, _read_table, _require_keys, _write_csv, _write_json
from .images import ImageRef, MatchItem, _check_exists, save_image


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
