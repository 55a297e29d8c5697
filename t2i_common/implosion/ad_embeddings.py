"""CLIP embeddings of implosion pickles for Alignment Difficulty, cached in the original's format.

The data side of :mod:`t2i_common.implosion.alignment` (seed 000, ``compute_AD.py``): a glob of
``{'img', 'text'}`` pickles -> preprocessed images and texts -> L2-normalised CLIP embeddings, kept
in the original's embedding cache ``{filepath: {'img_emb': (d,), 'txt_emb': (d,)}}`` (a pickle).

Provenance.  The original's cache records neither the CLIP model nor the preprocessing.  Next to
the cache this package writes a sidecar ``<cache>.meta.json`` naming both, and it never mixes
embeddings of unknown or different provenance with new ones unasked:

* a cache whose sidecar names the current model and preprocessing is resumed;
* a cache without a sidecar (e.g. written by the original) that already holds every pair of the
  glob is used as it is, with a :class:`CacheProvenanceWarning` saying its provenance is unknown
  (nothing is embedded, no sidecar is written);
* a cache without a sidecar that lacks some pairs, or a cache whose sidecar names another model or
  preprocessing, is refused with an error naming the cache, both provenances and the fixes, unless
  ``trust_cache=True`` (CLI ``--trust_cache``); then the sidecar written records how many entries
  were taken on trust and where they came from, never that the whole cache is the current model's.

Preprocessing (``preprocess``):

* ``"package"`` (default): resize the shorter side to 512 (bilinear), *centre* crop 512, then the
  CLIP preprocess.  The original crops at a random, unseeded position (for square images both
  crops are the identity);
* ``"original"`` (parity): the same plus the original's float round trip of the image
  (ToTensor, Normalize(0.5, 0.5), ``clamp((x + 1) / 2, 0, 1)``, ``255 * x``, ``astype(uint8)``,
  all float32), which truncates instead of rounding: pixel values 1..63 come back one lower,
  0 and 64..255 unchanged (:func:`uint8_round_trip`).  Measured on the five toy datasets of
  notebook 10 (n = 1000 each, toy CLIP, resize 512), AD with ``"original"`` minus AD with
  ``"package"``: captions (scenes) -1.0e-4 (-0.29 %), captions (single object) -4.3e-4
  (-0.75 %), shape label +2.4e-4 (+0.52 %), shape prompt -2.1e-5 (-0.04 %), colour+shape label
  -1.1e-4 (-0.28 %), almost all of it in the structure term (feature term within 7e-5); the
  ordering of the datasets is unchanged.  Command (about 6 min on 2 busy cores)::

      python -c "import tempfile; from t2i_common.implosion import alignment as a; \
        d = a.toy_ad_datasets(tempfile.mkdtemp(), 1000); p = a.ad_table(d, [None]); \
        o = a.ad_table(d, [None], preprocess='original'); print(o['ad'] - p['ad'])"
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import formats, models
from ..distributed import Shard, ShardError, accelerate_cpu, resolve_shard, shard_ids

#: image side the original resizes to and crops before the CLIP preprocess
ORIGINAL_RESIZE = 512
#: ``preprocess`` choices: the package's (no uint8 round trip) and the original's (with it)
PREPROCESSING = ("package", "original")
#: sidecar fields that must agree for cached embeddings to be reused
_META_KEYS = ("clip", "resize", "crop", "preprocess")


class CacheProvenanceWarning(UserWarning):
    """An embedding cache is used whose CLIP model / preprocessing is not recorded (no sidecar) or
    was taken on the user's word (``trust_cache``)."""


def load_clip_spec(clip=None, device="cpu", dtype="float32"):
    """A CLIP embedder from a spec: an object with ``encode_images``/``encode_texts`` (returned as
    is), a local CLIPModel folder, an open_clip ``ARCH/TAG`` string (``ViT-B-32/openai``, the
    original's default; ``ViT-H-14/laion2b_s32b_b79k``), a Hugging Face id or a
    ``models.load_clip`` alias.  None: the toy CLIP."""
    if hasattr(clip, "encode_images") and hasattr(clip, "encode_texts"):
        return clip
    if clip is None:
        return models.load_clip(None, device=device, dtype=dtype)
    spec = str(clip)
    if not Path(spec).expanduser().exists() and "/" in spec:
        arch, tag = spec.split("/", 1)
        import open_clip
        if arch in open_clip.list_models():
            return models.load_clip(arch, pretrained=tag, device=device, dtype=dtype)
    return models.load_clip(spec, device=device, dtype=dtype)


def _round_trip_table() -> np.ndarray:
    k = np.arange(256, dtype=np.float32)
    x = k / np.float32(255)                                  # ToTensor
    x = (x - np.float32(0.5)) / np.float32(0.5)              # Normalize([0.5], [0.5])
    x = np.clip((x + np.float32(1.0)) / np.float32(2.0), 0.0, 1.0)  # back to [0, 1]
    return (np.float32(255.0) * x).astype(np.uint8)          # 255. * x, astype: truncation


_ROUND_TRIP = _round_trip_table()


def uint8_round_trip(arr) -> np.ndarray:
    """The original's float round trip of a uint8 image (``load_txt_img`` in compute_AD.py):
    ToTensor, Normalize(0.5, 0.5), ``clamp((x + 1) / 2, 0, 1)``, ``255 * x``, ``astype(uint8)``,
    in float32.  Each value maps independently, so it is a 256-entry table: values 1..63 lose 1
    (float32 rounding in ``2x - 1`` leaves ``255 * x`` just below the integer), others stay."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"uint8_round_trip needs a uint8 image, got dtype {arr.dtype}")
    return _ROUND_TRIP[arr]


def _check_preprocess(preprocess: str) -> str:
    if preprocess not in PREPROCESSING:
        raise ValueError(f"preprocess must be one of {PREPROCESSING} ('original': the original's "
                         f"uint8 round trip, for parity), got {preprocess!r}")
    return preprocess


def original_preprocess(image, resize: int | None = ORIGINAL_RESIZE, preprocess: str = "package"):
    """The image step before the CLIP preprocess, made deterministic; returns an RGB PIL image.

    Resize the shorter side to ``resize`` (bilinear) and take the *centre* ``resize`` crop (the
    original's crop is random and unseeded); ``resize=None`` skips the step.  ``preprocess=
    "original"`` adds the original's uint8 round trip (:func:`uint8_round_trip`).  Grayscale
    (H, W) images are processed as such and returned as RGB (the CLIP preprocess converts too)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    _check_preprocess(preprocess)
    arr = np.asarray(image)
    pil = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")
    if resize:
        pil = TF.resize(pil, int(resize), interpolation=InterpolationMode.BILINEAR)
        pil = TF.center_crop(pil, int(resize))
    if preprocess == "original":
        pil = Image.fromarray(uint8_round_trip(np.asarray(pil)), pil.mode)
    return pil.convert("RGB")


@dataclass
class PairEmbeddings:
    """CLIP embeddings of the pairs of one glob, in the glob's (sorted) order."""
    paths: list
    img_emb: torch.Tensor  # [n, d], L2-normalised
    txt_emb: torch.Tensor  # [n, d], L2-normalised
    num_new: int  # pairs embedded by this call (the rest came from the cache)
    clip: str | None = None  # the model that made them (None: unknown, a cache without sidecar)
    provenance: str | None = None  # a note when the cache's provenance is unknown or trusted

    def __len__(self):
        return len(self.paths)


def meta_path(cache_path) -> Path:
    """The sidecar of an embedding cache: ``<cache>.meta.json``."""
    return Path(str(cache_path) + ".meta.json")


def ad_json_path(emb_path) -> Path:
    """Where ``alignment.compute_ad`` saves its numbers: next to the cache, ``<cache>.ad.json``."""
    p = Path(emb_path)
    return p.with_name(p.name + ".ad.json") if p.suffix != ".pickle" else p.with_suffix(".ad.json")


def read_cache_arrays(path, atol: float = 1e-3):
    """Keys and float32 ``[n, d]`` image / text embeddings of an embedding cache in the original's
    format, validated on the stacked arrays at once (one d, finite, unit norm within ``atol``;
    float16 entries, as the original's fp16 CLIP writes them, are cast to float32).  Any defect
    is reported by ``formats.read_embedding_cache``, which names the file, entry and field."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
        keys = [str(k) for k in obj]
        img = np.stack([np.asarray(e["img_emb"]) for e in obj.values()]).astype(np.float32)
        txt = np.stack([np.asarray(e["txt_emb"]) for e in obj.values()]).astype(np.float32)
        ok = (img.ndim == 2 and img.shape == txt.shape and img.shape[1] > 0
              and bool(np.isfinite(img).all() and np.isfinite(txt).all())
              and float(np.abs(np.linalg.norm(img, axis=1) - 1).max()) <= atol
              and float(np.abs(np.linalg.norm(txt, axis=1) - 1).max()) <= atol)
    except Exception:  # noqa: BLE001 - the entry-by-entry reader below names the defect
        ok = False
    if not ok:
        formats.read_embedding_cache(path, check_norm=atol)
        raise ValueError(f"embedding cache {path} is not a dict filepath -> {{'img_emb': (d,), "
                         f"'txt_emb': (d,)}} of finite unit vectors of one d. Fix: delete it and "
                         f"compute the embeddings again")
    return keys, img, txt


def check_writable(path, what: str = "embedding cache", flag: str = "--emb_path") -> Path:
    """Raise before any long work if ``path`` cannot be written: a folder, a parent that is a file
    or cannot be created, or a folder without write permission (probed by creating a file)."""
    path = Path(path)
    fix = f"Fix: pass a path for the {what} ({flag}) in a folder you can write"
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file. Fix: pass a file path "
                                f"such as {path / 'emb.pickle'} ({flag})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"cannot write the {what} {path}: {err.strerror or err} "
                              f"({path.parent}). {fix}") from None
    return path


def _describe(meta) -> str:
    if meta is None:
        return "an unknown CLIP model and preprocessing"
    pre = meta.get("preprocess") or "package"
    return f"CLIP {meta.get('clip')!r} (resize {meta.get('resize')}, {pre} preprocessing)"


def _same(old: dict, meta: dict) -> bool:
    return all(old.get(k) == meta.get(k) for k in _META_KEYS)


def _provenance(cache_path, old, meta, n_cached, n_glob, n_missing, trust):
    """Decide whether a non-empty cache may be used: returns (note or None, sidecar to write)."""
    mp = meta_path(cache_path)
    if old is not None and _same(old, meta):
        inh = old.get("inherited")
        note = None if inh is None else (f"embedding cache {cache_path}: {inh.get('entries')} of "
                                         f"its entries were taken on trust ({mp.name})")
        return note, ({**meta, "inherited": inh} if inh is not None else meta)
    src = (f"was made with {_describe(old)} (per its sidecar {mp.name})" if old is not None else
           f"is of unknown provenance (no sidecar {mp.name}, e.g. written by the original "
           f"compute_AD.py)")
    if old is None and n_missing == 0 and not trust:
        note = (f"embedding cache {cache_path} {src}: the CLIP model and preprocessing of its "
                f"embeddings are unknown. It holds all {n_glob} pairs of the glob, so it is used "
                f"as it is")
        warnings.warn(note, CacheProvenanceWarning, stacklevel=3)
        return note, None
    if not trust:
        risk = (f"{n_missing} of the {n_glob} pairs are missing from it and would be embedded with "
                f"{meta['clip']!r} and mixed with its {n_cached} entries" if n_missing else
                "its embeddings would be taken for this run's")
        raise ValueError(
            f"embedding cache {cache_path} {src}, but this run uses {_describe(meta)}: {risk}. "
            f"Fix: delete {cache_path} (and {mp.name}) to embed everything again, pass another "
            f"cache path (--emb_path), or, if its embeddings are from the same model and "
            f"preprocessing, pass trust_cache=True (--trust_cache)")
    inherited = dict(entries=n_cached, source=old if old is not None else "unknown (no sidecar)",
                     trusted_by="trust_cache")
    note = (f"embedding cache {cache_path} {src}; its {n_cached} entries are used on the "
            f"user's word (trust_cache) and recorded as such in {mp.name}")
    warnings.warn(note, CacheProvenanceWarning, stacklevel=3)
    return note, {**meta, "inherited": inherited}


def _glob_paths(data_glob, cache_path) -> list:
    """The pickles of the glob in sorted order, without the cache's own files (a glob over the
    folder that also holds the cache would otherwise read the cache as a pair)."""
    paths = [str(p) for p in formats.implosion_pickle_paths(data_glob)]
    if cache_path is None:
        return paths
    own = {os.path.realpath(p)
           for p in (cache_path, meta_path(cache_path), ad_json_path(cache_path))}
    part = Path(cache_path).name + ".shard"     # shard caches (shard_part_path) and sidecars
    kept = [p for p in paths if os.path.realpath(p) not in own
            and not (os.path.basename(p).startswith(part) and Path(p).parent.resolve()
                     == Path(cache_path).parent.resolve())]
    if not kept:
        raise FileNotFoundError(f"no pickle files match {str(data_glob)!r} besides the embedding "
                                f"cache {cache_path}. Fix: pass the glob of the pair pickles")
    return kept


def shard_part_path(cache_path, shard) -> Path:
    """The embedding cache of one shard: ``<cache>.shard<i>of<n>.part`` (not ``*.pickle``, so a
    pickle glob over the cache's folder never reads it as a pair)."""
    return Path(str(cache_path) + f".shard{shard.rank}of{shard.world}.part")


def merge_shard_parts(cache_path, meta) -> int:
    """Fold the shards' caches (:func:`shard_part_path`) into ``cache_path`` (and its sidecar),
    then delete them; returns how many entries they held.  A part or a cache made with another
    CLIP model / preprocessing is an error naming it."""
    cache_path = Path(cache_path)
    parts = sorted(cache_path.parent.glob(cache_path.name + ".shard*of*.part"))
    if not parts:
        return 0
    merged = {}
    for f in ([cache_path] if cache_path.exists() else []) + parts:
        mp = meta_path(f)
        old = json.loads(mp.read_text()) if mp.exists() else None
        if old is None or not _same(old, meta):
            raise ValueError(f"cannot merge the shard caches of {cache_path}: {f} was made with "
                             f"{_describe(old)}, this run uses {_describe(meta)}. Fix: run the "
                             f"shards and the merge with the same clip/preprocess, or delete {f}")
        merged.update(formats.read_embedding_cache(f))
    formats.write_embedding_cache(merged, cache_path)
    meta_path(cache_path).write_text(json.dumps(meta, indent=1) + "\n")
    for f in parts:
        f.unlink()
        meta_path(f).unlink(missing_ok=True)
    return len(merged)


def embed_pairs(data_glob, clip=None, cache_path=None, batch_size: int = 512,
                resize: int | None = ORIGINAL_RESIZE, save_every: int = 10, device="cpu",
                progress: bool = True, *, preprocess: str = "package", trust_cache: bool = False,
                save_every_s: float = 60.0, shard=None) -> PairEmbeddings:
    """Normalised CLIP embeddings of every implosion pickle matching ``data_glob``.

    Pickles (``{'img', 'text'}``) are read through ``formats`` one batch at a time (``batch_size``,
    512 as in the original), images prepared by :func:`original_preprocess` (``resize``,
    ``preprocess``), then embedded with ``clip`` (see :func:`load_clip_spec`; loaded once).

    With ``cache_path`` (checked writable before anything is embedded) the embeddings go to a
    pickle in the original's format, written every ``save_every`` batches or ``save_every_s``
    seconds, whichever comes first, and at the end, also when an error or an interrupt stops the
    run, so nothing computed is lost; pairs already in the cache are not embedded again (resume).
    The cache's own files are never read as pairs.  Provenance rules (``trust_cache``): see the
    module docstring.

    ``shard``: ``(i, n)`` embeds only shard i of n of the pairs (batches of ``batch_size`` in glob
    order, round robin; :mod:`t2i_common.distributed`; ``accelerate launch`` is detected by
    itself) into its own cache :func:`shard_part_path`; the other pairs' rows are NaN.  A call
    without shard first merges the shards' caches into ``cache_path`` (:func:`merge_shard_parts`)
    and embeds only what is still missing.  Under ``accelerate launch`` every rank embeds its
    share, then the main process merges and all return the complete embeddings.
    """
    from tqdm.auto import tqdm

    _check_preprocess(preprocess)
    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch_size and save_every must be >= 1, got {batch_size}, {save_every}")
    sh = resolve_shard(shard)
    if not sh.single and cache_path is None:
        raise ShardError(f"embed_pairs: running as {sh} needs cache_path (each shard writes "
                         f"<cache>.shard<i>of<n>.part, merged by the call without shard)")
    if cache_path is not None:
        cache_path = check_writable(cache_path)
    embedder = load_clip_spec(clip, device=device)
    if sh.live:  # accelerate launch: each rank its share, then the main process merges
        from accelerate import PartialState

        kw = dict(clip=embedder, cache_path=cache_path, batch_size=batch_size, resize=resize,
                  save_every=save_every, device=device, progress=progress, preprocess=preprocess,
                  trust_cache=trust_cache, save_every_s=save_every_s)
        state = PartialState(cpu=accelerate_cpu())
        embed_pairs(data_glob, shard=Shard(sh.rank, sh.world, False, sh.source), **kw)
        with state.main_process_first():
            return embed_pairs(data_glob, shard=Shard(), **kw)
    all_paths = paths = _glob_paths(data_glob, cache_path)
    meta = dict(clip=str(getattr(embedder, "name", type(embedder).__name__)), resize=resize,
                crop="center" if resize else None)
    if preprocess != "package":
        meta["preprocess"] = preprocess
    if not sh.single:
        paths = shard_ids(paths, sh, chunk=batch_size)
        cache_path = shard_part_path(cache_path, sh)
        if not paths:  # more shards than batches: nothing here
            nan = torch.full((len(all_paths), 0), float("nan"))
            return PairEmbeddings(all_paths, nan, nan.clone(), 0, clip=meta["clip"])
    elif cache_path is not None:
        merge_shard_parts(cache_path, meta)
    keys, img0, txt0, old = [], None, None, None
    if cache_path is not None:
        mp = meta_path(cache_path)
        if cache_path.exists():
            keys, img0, txt0 = read_cache_arrays(cache_path)
            if mp.exists():
                try:
                    old = json.loads(mp.read_text())
                except ValueError as err:
                    raise ValueError(f"embedding cache sidecar {mp} is not valid json ({err}). "
                                     f"Fix: delete {mp} (the cache is then of unknown "
                                     f"provenance) or delete both {cache_path} and {mp}") from None
    index = {os.path.normpath(os.path.abspath(k)): i for i, k in enumerate(keys)}
    rows = [index.get(os.path.normpath(os.path.abspath(p)), -1) for p in paths]
    pending = [p for p, r in zip(paths, rows) if r < 0]
    note, side = None, meta
    if keys:
        note, side = _provenance(cache_path, old, meta, len(keys), len(paths), len(pending),
                                 trust_cache)
    new: dict = {}

    def save():
        cache = {k: {"img_emb": img0[i], "txt_emb": txt0[i]} for i, k in enumerate(keys)}
        cache.update(new)
        formats.write_embedding_cache(cache, cache_path)
        meta_path(cache_path).write_text(json.dumps(side, indent=1) + "\n")

    unsaved, last = 0, time.monotonic()
    try:
        batches = range(0, len(pending), batch_size)
        for b, start in enumerate(tqdm(batches, desc="CLIP pairs", disable=not progress or not pending)):
            chunk = pending[start:start + batch_size]
            images, texts = [], []
            for p in chunk:
                img, text = formats.read_implosion_pickle(p)
                images.append(original_preprocess(img, resize, preprocess))
                texts.append(text)
            ie = embedder.encode_images(images, batch_size=batch_size).float().cpu().numpy()
            te = embedder.encode_texts(texts, batch_size=batch_size).float().cpu().numpy()
            if img0 is not None and ie.shape[1] != img0.shape[1]:
                raise ValueError(f"embedding cache {cache_path} holds d={img0.shape[1]} embeddings "
                                 f"but {meta['clip']} gives d={ie.shape[1]}. Fix: pass another "
                                 f"cache path (--emb_path) or delete {cache_path}")
            for p, a, t in zip(chunk, ie, te):
                new[p] = {"img_emb": a.reshape(-1), "txt_emb": t.reshape(-1)}
            unsaved += len(chunk)
            if cache_path is not None and ((b + 1) % save_every == 0
                                           or time.monotonic() - last >= save_every_s):
                save()
                unsaved, last = 0, time.monotonic()
    finally:
        if unsaved and cache_path is not None:
            save()

    rows_a = np.asarray(rows, dtype=np.int64)
    have = rows_a >= 0

    def gather(field, old_arr):
        parts = [new[p][field] for p in pending]
        d = old_arr.shape[1] if old_arr is not None else len(parts[0])
        out = np.empty((len(paths), d), np.float32)
        if have.any():
            out[have] = old_arr[rows_a[have]]
        if parts:
            out[~have] = np.stack(parts)
        return torch.from_numpy(out)
    img, txt = gather("img_emb", img0), gather("txt_emb", txt0)
    if not sh.single:  # the other shards' pairs: NaN rows
        rows_of = {p: r for r, p in enumerate(all_paths)}
        full = [torch.full((len(all_paths), e.shape[1]), float("nan")) for e in (img, txt)]
        for f, e in zip(full, (img, txt)):
            f[[rows_of[p] for p in paths]] = e
        paths, (img, txt) = all_paths, full
    return PairEmbeddings(paths, img, txt, len(pending),
                          clip=None if keys and old is None and not trust_cache else meta["clip"],
                          provenance=note)
