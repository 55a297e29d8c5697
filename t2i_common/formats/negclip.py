"""NegCLIP training tsv: caption, image path, hard-negative captions and hard-negative image rows."""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ._common import PathLike, _fail, _nonempty, _read_table, _write_csv


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
