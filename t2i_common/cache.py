"""Per-example result caches: a killed run resumes where it stopped and loses nothing.

A cache lives in ``CACHE/<namespace>/<key-hash>/`` where the key (model id, data fingerprint,
method parameters) is written to ``key.json``; each finished example is one file written
atomically (temporary file, then ``os.replace``), so a kill mid-write leaves no half result.
Temporary files of killed writers are removed when the cache is next opened; files are created
with the process umask (like any other output), not private 0600 modes.

``map_cached(..., check=...)`` validates every result, cached or new: a cached entry that fails
(e.g. the wrong shape for the current parameters) is never returned; it is recomputed with a
warning naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import warnings
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def atomic_write_bytes(path: Path, write) -> None:
    """Create ``path`` atomically: ``write(file_object)`` into ``.<name>.<pid>.<rand>.tmp`` beside
    it (mode 0666 minus the umask), then ``os.replace``.  The temporary file is removed if
    writing fails; one left by a killed process is removed by :func:`clean_stale_tmp`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clean_stale_tmp(folder: Path) -> int:
    """Remove temporary files of writers that no longer run (killed mid-write); returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        parts = p.name.rsplit(".", 3)
        pid = int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None
        if pid is None or not _pid_alive(pid):
            p.unlink(missing_ok=True)
            n += 1
    for p in Path(folder).glob("tmp*.tmp"):  # mkstemp names of earlier versions
        p.unlink(missing_ok=True)
        n += 1
    return n


class ResultCache:
    """Folder of per-example results keyed by (namespace, key dict)."""

    def __init__(self, namespace: str, key: dict, root=None, enabled: bool = True):
        self.key = _jsonable(key)
        self.enabled = enabled
        self.dir = Path(root or paths.CACHE) / namespace / fingerprint(self.key)
        if enabled:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OSError(f"cannot create the cache folder {self.dir} ({err}); set T2I_CACHE to "
                              f"a writable folder or disable caching") from err
            clean_stale_tmp(self.dir)
            kf = self.dir / "key.json"
            if not kf.exists():
                text = json.dumps(self.key, indent=1, sort_keys=True).encode()
                atomic_write_bytes(kf, lambda f: f.write(text))

    def _file(self, ex_id) -> Path:
        s = str(ex_id)
        safe = s if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,79}", s) else \
            hashlib.sha1(s.encode()).hexdigest()
        return self.dir / f"{safe}.pt"

    def path(self, ex_id) -> Path:
        """The file that holds (or will hold) example ``ex_id``."""
        return self._file(ex_id)

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
        atomic_write_bytes(self._file(ex_id), lambda f: torch.save(value, f))

    def discard(self, ex_id) -> None:
        self._file(ex_id).unlink(missing_ok=True)

    def done_ids(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.pt")} if self.enabled else set()

    def clear(self) -> None:
        for p in self.dir.glob("*.pt"):
            p.unlink()


def map_cached(fn, ids, cache: ResultCache | None, desc: str = "examples", progress: bool = True,
               chunk: int = 1, check=None) -> dict:
    """``{id: fn(id)}`` over ``ids``, reading finished ids from ``cache`` and saving each new result
    as soon as it is computed.  With ``chunk > 1``, ``fn`` receives a list of ids and returns a
    list of results (batched work), each saved individually.

    ``check(id, value)`` returns None for a valid result or a description of what is wrong (e.g.
    ``"distances of shape (11,), expected (10,)"``).  A cached entry that is unreadable or fails
    the check is recomputed (warning naming its file); a new result that fails it raises."""
    ids = list(ids)
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"map_cached: chunk must be a positive integer, got {chunk!r}")
    out = {}
    pending = []
    for i in ids:
        if cache is not None and cache.has(i):
            try:
                v = cache.load(i)
                problem = check(i, v) if check else None
            except ValueError as err:
                v, problem = None, f"an unreadable file ({err.__cause__ or err})"
            if problem is None:
                out[i] = v
                continue
            warnings.warn(f"cache file {cache.path(i)} (example {i!r}) holds {problem}; it is not "
                          f"used and is recomputed", stacklevel=2)
            cache.discard(i)
        pending.append(i)
    with tqdm(total=len(ids), initial=len(ids) - len(pending), desc=desc, disable=not progress) as bar:
        for s in range(0, len(pending), chunk):
            part = pending[s:s + chunk]
            vals = fn(part) if chunk > 1 else [fn(part[0])]
            if len(vals) != len(part):
                raise RuntimeError(f"map_cached: fn returned {len(vals)} results for {len(part)} ids")
            for i, v in zip(part, vals):
                problem = check(i, v) if check else None
                if problem is not None:
                    raise RuntimeError(f"map_cached ({desc}): the new result for {i!r} is {problem}")
                if cache is not None:
                    cache.save(i, v)
                out[i] = v
            bar.update(len(part))
    return {i: out[i] for i in ids}
