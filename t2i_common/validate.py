"""Checks of user input shared by the package's entry points (attribution, unCLIP, training CLIs).

Every check raises :class:`BadInput` (a ``ValueError``) with one line that names the array, file,
argument or parameter, says what was found and what is expected, and how to fix it; all of them
run before any model is loaded or any long work starts.

* numbers: :func:`finite_array` (the first non-finite entry by index), :func:`real` (finite floats
  with optional bounds), :func:`count` (positive / non-negative whole numbers, no bools, no 2.5);
* containers: :func:`text_list` (a list of captions, never a bare string), :func:`non_empty`;
* files: :func:`load_npy` / :func:`load_torch` / :func:`load_pickle` name an unreadable file as
  what it is (a folder, random bytes, a truncated array, pickled objects), :func:`out_dir` /
  :func:`out_file` check that a result can be written where asked (not under a file);
* provenance: :func:`write_record` / :func:`check_record` keep the parameters an artefact was made
  with in a ``<file>.meta.json`` sidecar, so a reused result is refused when they changed;
* vocabulary: :func:`unknown_words` (words a tokenizer maps to its unknown token);
* command lines: :func:`cli` runs a ``main`` and turns these errors into one line on stderr
  (exit 2); ``--debug`` shows the traceback.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np


class BadInput(ValueError):
    """Bad user input; the message is one line that names the input and the fix."""


# ------------------------------------------------------------------------------------------------
# numbers
# ------------------------------------------------------------------------------------------------
def finite_array(x, name: str):
    """``x`` (tensor / array / nested list) unchanged; a NaN or inf anywhere is a BadInput naming
    ``name``, the index of the first bad entry and how many there are."""
    try:
        import torch
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if not t.is_floating_point() and not t.is_complex():
                return x
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0].tolist())
                raise BadInput(_nonfinite_msg(name, t[first].item(), first, int(bad.sum()),
                                              tuple(t.shape)))
            return x
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype.kind not in "fc":
        if a.dtype.kind == "O":
            raise BadInput(f"{name}: expected numbers, got an object array; pass a numeric array")
        return x
    step = max(1, 2 ** 24 // max(1, int(np.prod(a.shape[1:])))) if a.ndim > 1 else max(1, a.size)
    for s in range(0, max(len(a), 1) if a.ndim else 1, step):   # blocks: bounded memory on big files
        blk = a[s:s + step] if a.ndim else a
        bad = ~np.isfinite(blk)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            if a.ndim:
                first = (first[0] + s,) + first[1:]
            n_bad = int(sum(int((~np.isfinite(a[r:r + step])).sum())
                            for r in range(0, len(a), step))) if a.ndim else 1
            raise BadInput(_nonfinite_msg(name, a[first] if a.ndim else a, first, n_bad, a.shape))
    return x


def _nonfinite_msg(name, value, index, n_bad, shape):
    where = f"index {index[0] if len(index) == 1 else index}" if index else "its only entry"
    return (f"{name} holds a non-finite value ({value}) at {where} ({n_bad} of "
            f"{int(np.prod(shape)) if shape else 1} entries, shape {tuple(shape)}); replace or "
            f"drop the bad entries before running")


def real(v, name: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False) -> float:
    """``v`` as a finite float in [low, high] (``low_open``/``high_open``: excluded end)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        else:
            raise BadInput(f"{name} must be a number, got {v!r} ({type(v).__name__})")
    f = float(v)
    if not math.isfinite(f):
        raise BadInput(f"{name} must be a finite number, got {v!r}")
    if low is not None and (f < low or (low_open and f == low)):
        raise BadInput(f"{name} must be {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and (f > high or (high_open and f == high)):
        raise BadInput(f"{name} must be {'<' if high_open else '<='} {high}, got {v!r}")
    return f


def count(v, name: str, *, low: int = 1, high: int | None = None) -> int:
    """``v`` as a whole number >= ``low`` (default 1); bools, strings, 2.5, NaN are errors
    (2.0 is accepted as 2)."""
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real)
    if ok and not isinstance(v, numbers.Integral):
        ok = math.isfinite(float(v)) and float(v).is_integer()
    if not ok:
        raise BadInput(f"{name} must be a whole number >= {low}, got {v!r} ({type(v).__name__})")
    n = int(v)
    if n < low:
        what = "positive" if low == 1 else (">= 0" if low == 0 else f">= {low}")
        raise BadInput(f"{name} must be {what}, got {v!r}")
    if high is not None and n > high:
        raise BadInput(f"{name} must be <= {high}, got {v!r}")
    return n


# ------------------------------------------------------------------------------------------------
# containers
# ------------------------------------------------------------------------------------------------
def text_list(v, name: str = "prompts", *, allow_empty: bool = False) -> list[str]:
    """A list of strings; a bare string (which would be read character by character), a non-string
    item or (unless ``allow_empty``) an empty list is a BadInput."""
    if isinstance(v, (str, bytes)):
        raise BadInput(f"{name} must be a list of strings, got the string {v!r}; wrap it: [{v!r}]")
    if v is None or not hasattr(v, "__iter__"):
        raise BadInput(f"{name} must be a list of strings, got {type(v).__name__}")
    out = list(v)
    bad = [(i, x) for i, x in enumerate(out) if not isinstance(x, str)]
    if bad:
        i, x = bad[0]
        raise BadInput(f"{name}[{i}] is {type(x).__name__} {x!r}, not a string; pass captions as str")
    if not out and not allow_empty:
        raise BadInput(f"{name} is empty; pass at least one caption")
    return out


def non_empty(n: int, name: str, what: str = "entries") -> int:
    if int(n) == 0:
        raise BadInput(f"{name} holds no {what} (0); pass a non-empty input")
    return int(n)


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def existing_file(path, name: str, hint: str = "") -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{name}: {p} not found" + (f"; {hint}" if hint else ""))
    if p.is_dir():
        raise BadInput(f"{name}: {p} is a folder, expected a file" + (f"; {hint}" if hint else ""))
    return p


def load_npy(path, name: str, hint: str = "") -> np.ndarray:
    """A ``.npy`` array, memory-mapped; a folder, a file that is not a .npy (random bytes, text),
    a truncated file or one of pickled objects is a BadInput saying which."""
    p = existing_file(path, name, hint)
    with open(p, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY":
        raise BadInput(f"{name}: {p} is not a .npy array file (it does not start with the NumPy "
                       f"header; {p.stat().st_size} bytes of something else); write it with np.save")
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err) or "object" in str(err):
            raise BadInput(f"{name}: {p} holds pickled Python objects, not numbers; save a float "
                           f"array with np.save") from None
        if "mmap length" in str(err) or "larger" in str(err) or "cannot reshape" in str(err):
            raise BadInput(f"{name}: {p} is truncated (the file is shorter than its header "
                           f"says: {p.stat().st_size} bytes); write it again") from None
        raise BadInput(f"{name}: {p} is not a readable .npy array ({err}); write it again") from None
    except (OSError, EOFError) as err:
        raise BadInput(f"{name}: {p} is not a readable .npy array ({err}); write it again") from None
    if a.dtype.kind not in "biuf":
        raise BadInput(f"{name}: {p} holds {a.dtype} data, expected numbers (float32)")
    return a


def load_torch(path, name: str, hint: str = ""):
    """``torch.load`` of a tensor file (weights only); unreadable -> BadInput naming the file."""
    import torch
    p = existing_file(path, name, hint)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, ImportError, TypeError) as err:
        msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise BadInput(f"{name}: {p} is not a readable torch file (truncated, corrupt or not made "
                       f"by torch.save: {msg})" + (f"; {hint}" if hint else "")) from None


def load_pickle(path, name: str, hint: str = ""):
    p = existing_file(path, name, hint)
    try:
        with open(p, "rb") as f:
            return pickle.load(f)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise BadInput(f"{name}: {p} is not a readable pickle (truncated or corrupt: "
                       f"{type(err).__name__})" + (f"; {hint}" if hint else "")) from None


def out_dir(path, name: str) -> Path:
    """A folder results can be written into: it is a folder or can be created (no part of the
    path is a file).  Nothing is created."""
    p = Path(path)
    for q in [p, *p.parents]:
        if q.exists():
            if not q.is_dir():
                what = "is a file" if q == p else f"lies under {q}, which is a file"
                raise BadInput(f"{name}: {p} {what}; pass a folder path")
            import os
            if not os.access(q, os.W_OK):
                raise BadInput(f"{name}: cannot write in {q} (no permission); pass another folder")
            break
    return p


def out_file(path, name: str) -> Path:
    """A file a result may be written to: not a folder, and its folder can be created."""
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"{name}: {p} is a folder, expected a file path")
    out_dir(p.parent, name)
    return p


# ------------------------------------------------------------------------------------------------
# provenance records
# ------------------------------------------------------------------------------------------------
def digest(*arrays) -> str:
    """sha1 (16 hex) of arrays / tensors' bytes and shapes (identifies data in a record)."""
    h = hashlib.sha1()
    for a in arrays:
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def record_path(path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".meta.json")


def write_record(path, params: dict) -> Path:
    """Write ``<path>.meta.json``: the parameters ``path`` was made with."""
    r = record_path(path)
    tmp = r.with_name(r.name + ".tmp")
    tmp.write_text(json.dumps(params, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(r)
    return r


def read_record(path):
    """The record of ``path`` (dict) or None when it has none."""
    r = record_path(path)
    if not r.exists():
        return None
    try:
        return json.loads(r.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise BadInput(f"{r} (the record of how {Path(path).name} was made) is not readable JSON; "
                       f"move both files away to recompute") from None


def record_differences(path, params: dict) -> list | None:
    """[(key, recorded, now)] where the record of ``path`` differs from ``params``; None when the
    file has no record."""
    rec = read_record(path)
    if rec is None:
        return None
    now = json.loads(json.dumps(params, default=str))
    keys = sorted(set(rec) | set(now))
    return [(k, rec.get(k, "<absent>"), now.get(k, "<absent>")) for k in keys
            if rec.get(k, "<absent>") != now.get(k, "<absent>")]


def check_record(path, params: dict, name: str, fix: str) -> bool:
    """Raise when the record of ``path`` names other parameters than ``params``; True when it
    matches, False when the file has no record."""
    diff = record_differences(path, params)
    if diff is None:
        return False
    if diff:
        shown = ", ".join(f"{k}={a!r} (now {b!r})" for k, a, b in diff[:4])
        raise BadInput(f"{name}: {path} was made with other parameters: {shown}; {fix}")
    return True


# ------------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------------
def unknown_words(tokenizer, texts) -> list[str]:
    """Words of ``texts`` that ``tokenizer`` maps (in part) to its unknown token.  Real CLIP
    tokenizers are byte-level and never do; the toy tokenizer maps every word outside its
    vocabulary to <|endoftext|>, which also ends the caption for the pooled embedding."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    out = []
    words = dict.fromkeys(w for t in texts for w in str(t).split())
    if not words:
        return out
    ids = tokenizer(list(words), add_special_tokens=False).input_ids
    for w, i in zip(words, ids):
        if unk in i:
            out.append(w)
    return out


def known_words(tokenizer, texts, name: str = "prompts") -> None:
    """BadInput naming the words of ``texts`` the tokenizer does not know."""
    bad = unknown_words(tokenizer, texts)
    if bad:
        raise BadInput(f"{name}: the tokenizer does not know the word(s) {bad[:5]} (they would become "
                       f"<|endoftext|> and end the caption); use words of the model's vocabulary")


# ------------------------------------------------------------------------------------------------
# command lines
# ------------------------------------------------------------------------------------------------
#: errors that are the user's input, reported in one line
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, KeyError, IndexError)


def cli(main, prog: str, argv=None) -> int:
    """Run ``main(argv)``; a user error prints ``prog: error: <one line>`` to stderr and returns 2,
    its traceback only with ``--debug`` (removed from argv before ``main`` sees it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    import warnings
    fmt = warnings.formatwarning
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{prog}: warning: {msg}\n"
    try:
        main(argv)
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except USER_ERRORS + (RuntimeError, OSError) as err:
        if debug:
            raise
        msg = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
        print(f"{prog}: error: {msg or type(err).__name__} (--debug shows the traceback)",
              file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = fmt
