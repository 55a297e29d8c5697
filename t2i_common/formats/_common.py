"""Errors and file helpers shared by the format readers and writers.

Every reader fails early with :class:`FormatError` (a ``ValueError``) or ``FileNotFoundError``
whose message names the file, the field and the fix. Writers go through :func:`_atomic_write_bytes`
(temporary file + rename), so an interrupted export never leaves a half-written file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

PathLike = str | os.PathLike


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


def _write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]], delimiter: str = ",") -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return _atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
