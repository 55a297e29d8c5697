"""Per-example result caches: a killed run resumes where it stopped and loses nothing.

A cache lives in ``CACHE/<namespace>/<key-hash>/`` where the key (model id, data fingerprint,
method parameters) is written to ``key.json``; each finished example is one file written
atomically (temporary file, then ``os.replace``), so a kill mid-write leaves no half result.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import paths


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return {"tensor_sha1": hashlib.sha1(obj.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
                "shape": list(obj.shape)}
    if hasattr(obj, "tobytes") and hasattr(obj, "shape"):  # numpy
        return {"array_sha1": hashlib.sha1(obj.tobytes()).hexdigest(), "shape": list(obj.shape)}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def fingerprint(obj) -> str:
    """Stable hex digest of a JSON-able structure (tensors/arrays hashed by content)."""
    return hashlib.sha1(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


class ResultCache:
    """Folder of per-example results keyed by (namespace, key dict)."""

    def __init__(self, namespace: str, key: dict, root=None, enabled: bool = True):
        self.key = _jsonable(key)
        self.enabled = enabled
        self.dir = Path(root or paths.CACHE) / namespace / fingerprint(self.key)
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            kf = self.dir / "key.json"
            if not kf.exists():
                kf.write_text(json.dumps(self.key, indent=1, sort_keys=True))

    def _file(self, ex_id) -> Path:
        s = str(ex_id)
        safe = s if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", s) else hashlib.sha1(s.encode()).hexdigest()
        return self.dir / f"{safe}.pt"

    def has(self, ex_id) -> bool:
        return self.enabled and self._file(ex_id).exists()

    def load(self, ex_id):
        f = self._file(ex_id)
        try:
            return torch.load(f, weights_only=False)
        except Exception as err:
            raise ValueError(f"cache file {f} is unreadable ({err}); delete it to recompute") from err

    def save(self, ex_id, value) -> None:
        if not self.enabled:
            return
        f = self._file(ex_id)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        torch.save(value, tmp)
        os.replace(tmp, f)

    def done_ids(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.pt")} if self.enabled else set()

    def clear(self) -> None:
        for p in self.dir.glob("*.pt"):
            p.unlink()


def map_cached(fn, ids, cache: ResultCache | None, desc: str = "examples", progress: bool = True,
               chunk: int = 1) -> dict:
    """``{id: fn(id)}`` over ``ids``, reading finished ids from ``cache`` and saving each new result
    as soon as it is computed.  With ``chunk > 1``, ``fn`` receives a list of ids and returns a
    list of results (batched work), each saved individually."""
    ids = list(ids)
    out = {}
    pending = []
    for i in ids:
        if cache is not None and cache.has(i):
            out[i] = cache.load(i)
        else:
            pending.append(i)
    with tqdm(total=len(ids), initial=len(ids) - len(pending), desc=desc, disable=not progress) as bar:
        for s in range(0, len(pending), chunk):
            part = pending[s:s + chunk]
            vals = fn(part) if chunk > 1 else [fn(part[0])]
            if len(vals) != len(part):
                raise RuntimeError(f"map_cached: fn returned {len(vals)} results for {len(part)} ids")
            for i, v in zip(part, vals):
                if cache is not None:
                    cache.save(i, v)
                out[i] = v
            bar.update(len(part))
    return {i: out[i] for i in ids}
