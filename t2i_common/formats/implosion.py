"""Model implosion (Alignment Difficulty): text-image pickles (seed 000 layout), class datasets as
pairs, and the embedding cache ``{filepath: {'img_emb', 'txt_emb'}}``."""
from __future__ import annotations

import glob as _glob
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ._common import FormatError, PathLike, _atomic_write_bytes, _fail, _require_file, _require_keys


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
