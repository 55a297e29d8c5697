"""Alignment Difficulty (AD) of a text-image dataset.

Seed 000: Ding, Li, Shan, Zhao, Zheng, "Understanding Implosion in Text-to-Image Generative
Models" (CCS '24).  Training cross-attention is modelled as aligning the graph of image embeddings
u_k with the graph of text embeddings v_k (k = 1..n, L2-normalised CLIP embeddings):

* feature term   D_fea  = mean_k (1 - s~_k),  s~_k = clip((<u_k, v_k> - 0.2) * 4, 0, 1)
  (the original's "LAION scaling", applied to every dataset);
* structure term D_stru = (2 / n^2) * sum_{i<j} |<u_i, u_j> - <v_i, v_j>|;
* AD = alpha * D_fea + (1 - alpha) * D_stru, alpha in [0, 1], default 0.8.

Where this package deliberately differs from the original ``compute_AD.py``:

* the structure term is computed exactly with blocked matrix products (tiles of U U^T - V V^T,
  abs, per-row sums in the embeddings' dtype, accumulated in float64) instead of a Python loop
  over rows, with the tile side picked from n so that small n wastes no work on the discarded
  lower triangle; it is never slower than the original (``bench/bench_alignment.py``: n = 500 to
  20,000, d = 64 and 512).  An unbiased sampled estimator with a normal-approximation confidence
  interval is offered for very large n;
* the data side (pickles -> CLIP embeddings -> the original's embedding cache, with a provenance
  sidecar; deterministic preprocessing, the original's uint8 round trip as a parity option) is
  :mod:`t2i_common.implosion.ad_embeddings`, whose names are re-exported here;
* the CLIP model is loaded once (the original reloads it every batch), a glob whose size is a
  multiple of the batch size does not crash on an empty last batch, the cache is actually resumed
  (files already embedded are skipped) and the three numbers are saved as json, not only printed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import cache as rcache, formats, models, paths, sdformat, toyworld
from ..cache import fingerprint
from ..toyworld import training
from .ad_embeddings import (ORIGINAL_RESIZE, PREPROCESSING, CacheProvenanceWarning,  # noqa: F401
                            PairEmbeddings, ad_json_path, check_writable, embed_pairs,
                            load_clip_spec, original_preprocess, read_cache_arrays,
                            uint8_round_trip)

#: CLIP similarity range the original maps onto [0, 1] for the feature term (LAION scaling)
LAION_SIM_RANGE = (0.2, 0.45)


# ------------------------------------------------------------------------------------------------
# AD from embeddings
# ------------------------------------------------------------------------------------------------
def _as_pair(u, v, normalize: bool = False, names=("image embeddings u", "text embeddings v")):
    """Validate two embedding matrices [n, d] (numpy or torch) and return float torch tensors.

    Mismatched counts/dims raise a ValueError naming both shapes; non-normalised rows raise unless
    ``normalize`` (then they are L2-normalised here)."""
    out = []
    for x, name in zip((u, v), names):
        t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
        if t.ndim != 2:
            raise ValueError(f"{name} must be a matrix [n, d]; got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # fp16/bf16 (the original's CLIP output) and integers: fp32
        out.append(t)
    U, V = out
    if U.shape != V.shape:
        raise ValueError(f"{names[0]} {tuple(U.shape)} and {names[1]} {tuple(V.shape)} must have the "
                         f"same shape [n, d]: one image and one text embedding per pair, from the "
                         f"same CLIP model")
    if U.shape[0] == 0:
        raise ValueError("no embeddings given (n = 0); AD needs at least one text-image pair")
    if U.dtype != V.dtype:
        U, V = U.double(), V.double()
    norms = [U.norm(dim=1), V.norm(dim=1)]  # finite exactly when every entry of the row is
    for nrm, name in zip(norms, names):
        if not torch.isfinite(nrm).all():
            raise ValueError(f"{name} contain NaN or inf values (or overflow in the row norm)")
    if normalize:
        return torch.nn.functional.normalize(U, dim=1), torch.nn.functional.normalize(V, dim=1)
    for norms, name in zip(norms, names):
        if (norms - 1).abs().max() > 1e-2:
            raise ValueError(f"{name} are not L2-normalised (row norms {float(norms.min()):.4g}.."
                             f"{float(norms.max()):.4g}); AD is defined on unit vectors: pass "
                             f"normalize=True or normalise the rows first")
    return U, V


def laion_scale(sim):
    """The original's LAION scaling of CLIP similarities: clip((s - 0.2) * 4, 0, 1), mapping the
    range 0.2..0.45 onto 0..1 (0.2 -> 0, 0.325 -> 0.5, 0.45 -> 1)."""
    lo, hi = LAION_SIM_RANGE
    sim = torch.as_tensor(sim)
    return ((sim - lo) / (hi - lo)).clamp(0.0, 1.0)


def _feature(U, V, scale: bool) -> float:
    s = (U * V).sum(dim=1).double()
    return float((1.0 - (laion_scale(s) if scale else s)).mean())


def feature_ad(u, v, scale: bool = True, normalize: bool = False) -> float:
    """Feature term D_fea = mean_k (1 - s~_k) with s_k = <u_k, v_k> (LAION-scaled if ``scale``,
    as the original does for every dataset; ``scale=False`` uses the raw cosine similarity)."""
    return _feature(*_as_pair(u, v, normalize), scale)


def auto_block_size(n: int) -> int:
    """Tile side for n pairs: n / 8 rounded up to a power of two, within 128..2048.  A diagonal
    tile computes its lower half only to discard it (a fraction ~ block / (n + block) of the
    work), so small n gets small tiles; large n gets 2048 (large products, few Python steps)."""
    return int(min(2048, max(128, 2 ** math.ceil(math.log2(max(n, 8) / 8)))))


def _structure(U, V, block_size, progress: bool) -> float:
    from tqdm.auto import tqdm

    n = U.shape[0]
    b = auto_block_size(n) if block_size is None else int(block_size)
    if b < 1:
        raise ValueError(f"block_size must be >= 1 (or None: picked from n), got {block_size}")
    A = torch.cat([U, V], dim=1)
    B = torch.cat([U, -V], dim=1)
    starts = range(0, n, b)
    total = torch.zeros((), dtype=torch.float64, device=U.device)
    tiles = [(i0, j0) for i0 in starts for j0 in starts if j0 >= i0]
    for i0, j0 in tqdm(tiles, disable=not progress, desc="structure AD tiles"):
        g = A[i0:i0 + b] @ B[j0:j0 + b].T
        if i0 == j0:
            g.triu_(diagonal=1)
        total += g.abs_().sum(dim=1).sum(dtype=torch.float64)
    return float(2.0 * total / n ** 2)


def structure_ad(u, v, block_size: int | None = None, normalize: bool = False,
                 progress: bool = False) -> float:
    """Structure term D_stru = (2 / n^2) sum_{i<j} |<u_i,u_j> - <v_i,v_j>|, exact.

    Computed tile by tile: a tile of U U^T - V V^T is one matrix product [U, V] [U, -V]^T; only the
    tiles on and above the diagonal are formed (strict upper triangle on the diagonal tiles), their
    absolute values summed per row in the embeddings' dtype (at most ``block_size`` terms, as the
    original sums each row in float32) and the row sums accumulated in float64.  The products run
    in the embeddings' dtype (float32 like the original; pass float64 tensors for float64) on the
    embeddings' device, so GPU tensors are computed on the GPU.  ``block_size`` None: picked from
    n (:func:`auto_block_size`).  O(n^2 d) time, O(block_size^2) extra memory.
    """
    return _structure(*_as_pair(u, v, normalize), block_size, progress)


@dataclass
class SampledEstimate:
    """Sampled structure term: ``estimate`` with a two-sided normal-approximation interval."""
    estimate: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    num_pairs: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)
def structure_ad_sampled(u, v, num_pairs: int = 1_000_000, seed: int = 0, confidence: float = 0.95,
                         chunk_size: int = 1 << 18, normalize: bool = False) -> SampledEstimate:
    """Unbiased Monte-Carlo estimate of D_stru for very large n, with a confidence interval.

    Draws ``num_pairs`` ordered pairs (i, j), i != j, uniformly and independently with a CPU
    generator seeded by ``seed``.  Since D_stru = ((n - 1) / n) * E_{i != j} |<u_i,u_j> - <v_i,v_j>|,
    the estimate is ((n - 1) / n) times the sample mean; its standard error is ((n - 1) / n) times
    the sample standard deviation over sqrt(num_pairs), and the interval is estimate +- z * stderr
    with z the normal quantile for ``confidence`` (the central limit theorem; num_pairs should be
    in the thousands or more).
    """
    U, V = _as_pair(u, v, normalize)
    n = U.shape[0]
    if n < 2:
        raise ValueError(f"structure_ad_sampled needs n >= 2 pairs, got {n}")
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    gen = torch.Generator().manual_seed(int(seed))
    s1 = s2 = 0.0
    for c0 in range(0, num_pairs, chunk_size):
        m = min(chunk_size, num_pairs - c0)
        i = torch.randint(n, (m,), generator=gen)
        j = torch.randint(n - 1, (m,), generator=gen)
        j = j + (j >= i).long()  # uniform over j != i
        i, j = i.to(U.device), j.to(U.device)
        x = ((U[i] * U[j]).sum(1) - (V[i] * V[j]).sum(1)).abs().double()
        s1 += float(x.sum())
        s2 += float((x * x).sum())
    mean = s1 / num_pairs
    var = max(s2 / num_pairs - mean * mean, 0.0) * num_pairs / (num_pairs - 1)
    f = (n - 1) / n
    est, se = f * mean, f * math.sqrt(var / num_pairs)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return SampledEstimate(est, se, est - z * se, est + z * se, confidence, int(num_pairs))


def alignment_difficulty(u, v, alpha: float = 0.8, *, scale: bool = True, structure: str = "exact",
                         num_pairs: int = 1_000_000, seed: int = 0, block_size: int | None = None,
                         normalize: bool = False, progress: bool = False) -> dict:
    """AD = alpha * D_fea + (1 - alpha) * D_stru (paper's AD; original default alpha = 0.8).

    ``u`` image and ``v`` text embeddings [n, d] (L2-normalised; ``normalize=True`` normalises).
    ``structure="exact"`` uses :func:`structure_ad`; ``"sampled"`` uses
    :func:`structure_ad_sampled` (``num_pairs``, ``seed``) and adds ``structure_ad_ci`` and
    ``structure_ad_stderr``.  Returns dict(feature_ad, structure_ad, ad, alpha, n).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (trade-off of feature and structure AD; the "
                         f"original's default is 0.8), got {alpha}")
    U, V = _as_pair(u, v, normalize)
    out = dict(feature_ad=_feature(U, V, scale))
    if structure == "exact":
        out["structure_ad"] = _structure(U, V, block_size, progress)
    elif structure == "sampled":
        est = structure_ad_sampled(U, V, num_pairs=num_pairs, seed=seed)
        out.update(structure_ad=est.estimate, structure_ad_stderr=est.stderr,
                   structure_ad_ci=[est.ci_low, est.ci_high])
    else:
        raise ValueError(f"structure must be 'exact' or 'sampled', got {structure!r}")
    out["ad"] = alpha * out["feature_ad"] + (1.0 - alpha) * out["structure_ad"]
    out.update(alpha=alpha, n=int(U.shape[0]))
    return out



# ------------------------------------------------------------------------------------------------
# The original's interface: glob -> embeddings -> AD (function and command line)
# ------------------------------------------------------------------------------------------------
def _report(res: dict) -> None:
    print(f"feature AD = {res['feature_ad']:.6f}, structure AD = {res['structure_ad']:.6f}, "
          f"AD (alpha = {res['alpha']}) = {res['ad']:.6f}  [n = {res['n']}]")


def compute_ad(data_glob_path, save_emb_path, alpha: float = 0.8, clip=None,
               batch_size: int = 512, resize: int | None = ORIGINAL_RESIZE, structure: str = "exact",
               num_pairs: int = 1_000_000, seed: int = 0, scale: bool = True, device="cpu",
               progress: bool = True, verbose: bool = True, *, preprocess: str = "package",
               trust_cache: bool = False) -> dict:
    """The original ``compute_AD.py`` run: embed the pairs of ``data_glob_path`` (cache at
    ``save_emb_path``, resumed; ``preprocess``, ``trust_cache``: see :func:`embed_pairs`), compute
    feature AD, structure AD and AD for ``alpha``, print them and save them as json next to the
    cache (:func:`ad_json_path`).

    Unlike the original (which uses every entry of the cache file), AD is computed over the files
    the glob matches, so one cache may serve several globs.  Returns the :func:`alignment_difficulty`
    dict plus ``data_glob``, ``emb_path``, ``clip`` (None for a cache of unknown provenance, then
    ``cache_provenance`` says so), ``resize``, ``preprocess`` and ``json_path``."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # fail before embedding anything
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if structure not in ("exact", "sampled"):
        raise ValueError(f"structure must be 'exact' or 'sampled', got {structure!r}")
    emb = embed_pairs(data_glob_path, clip, save_emb_path, batch_size=batch_size, resize=resize,
                      device=device, progress=progress, preprocess=preprocess,
                      trust_cache=trust_cache)
    res = alignment_difficulty(emb.img_emb, emb.txt_emb, alpha, scale=scale, structure=structure,
                               num_pairs=num_pairs, seed=seed)
    jp = ad_json_path(save_emb_path)
    known = emb.clip is not None
    res.update(data_glob=str(data_glob_path), emb_path=str(save_emb_path), clip=emb.clip,
               resize=resize if known else None, preprocess=preprocess if known else None,
               structure_method=structure, json_path=str(jp))
    if emb.provenance:
        res["cache_provenance"] = emb.provenance
    jp.write_text(json.dumps(res, indent=1) + "\n")
    if verbose:
        _report(res)
    return res


def compute_ad_from_embeddings(save_emb_path, alpha: float = 0.8, verbose: bool = True,
                               **kwargs) -> dict:
    """AD of every entry of an embedding cache (the original's ``compute_AD(save_emb_path, alpha)``,
    which reads the cache written by its embedding step); the cache is validated on the stacked
    arrays (:func:`read_cache_arrays`); ``kwargs`` go to :func:`alignment_difficulty`."""
    _, u, v = read_cache_arrays(save_emb_path)
    res = alignment_difficulty(torch.from_numpy(u), torch.from_numpy(v), alpha, **kwargs)
    if verbose:
        _report(res)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m t2i_common.implosion.alignment",
        description="Alignment Difficulty of a text-image dataset (implosion pickles), as the "
                    "original compute_AD.py: embeds the pairs (cache resumed), prints feature AD, "
                    "structure AD and AD, and saves them as json next to the embedding cache.")
    p.add_argument("--data_dir", "-data_glob_path", dest="data_dir", required=True,
                   help="glob of the pair pickles, e.g. 'DATA/*.pickle' or 'DATA/*/*.pickle'")
    p.add_argument("--emb_path", "-save_emb_path", dest="emb_path", required=True,
                   help="embedding cache (pickle) to write / resume")
    p.add_argument("--alpha", "-alpha", dest="alpha", type=float, default=0.8,
                   help="trade-off of feature and structure AD, in [0, 1] (default 0.8)")
    p.add_argument("--clip", default=None,
                   help="CLIP: ViT-B-32/openai (the original's), ViT-H-14/laion2b_s32b_b79k, a "
                        "local CLIPModel folder, or an HF id (default: the toy CLIP)")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--resize", type=int, default=ORIGINAL_RESIZE,
                   help="resize + centre crop side before the CLIP preprocess (0: none)")
    p.add_argument("--preprocess", choices=PREPROCESSING, default="package",
                   help="'original': add the original's uint8 round trip of the image (parity)")
    p.add_argument("--trust_cache", action="store_true",
                   help="use an existing cache of unknown (no .meta.json) or other recorded "
                        "provenance together with new embeddings; recorded in the sidecar")
    p.add_argument("--structure", choices=("exact", "sampled"), default="exact")
    p.add_argument("--num_pairs", type=int, default=1_000_000, help="pairs for --structure sampled")
    p.add_argument("--seed", type=int, default=0, help="seed for --structure sampled")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """The command line; notes (e.g. a cache of unknown provenance) go to stderr as ``note: ...``."""
    args = parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = compute_ad(args.data_dir, args.emb_path, args.alpha, clip=args.clip,
                         batch_size=args.batch_size, resize=args.resize or None,
                         structure=args.structure, num_pairs=args.num_pairs, seed=args.seed,
                         device=args.device, verbose=False, preprocess=args.preprocess,
                         trust_cache=args.trust_cache)
    for w in caught:
        kind = "note" if issubclass(w.category, CacheProvenanceWarning) else w.category.__name__
        print(f"{kind}: {w.message}", file=sys.stderr)
    _report(res)
    return res


# ------------------------------------------------------------------------------------------------
# Datasets written as implosion pickles (toy world included), AD tables, AD vs poisoning
# ------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    import re
    tail = re.sub(r"[^A-Za-z0-9]+", "-", str(text).rstrip("/").split("/")[-1]).strip("-")[:24]
    return f"{tail}-{fingerprint(str(text))[:8]}"


def write_pairs_dataset(pairs, root, name: str, class_subfolders=None) -> str:
    """Write ``(image, text)`` pairs as implosion pickles (``formats.write_implosion_pickles``) in
    ``root/name/<content fingerprint>/pairs/`` (``pairs/<class>/`` with ``class_subfolders``, as
    class datasets are stored) and return their glob.  The folder is named by a hash of the
    images, texts and classes, so a re-run with the same data reuses the files (and the embedding
    caches next to them) and different data never meets a stale cache."""
    import hashlib

    h = hashlib.sha1()
    for img, text in pairs:
        a = np.ascontiguousarray(np.asarray(img))
        h.update(str(a.shape).encode() + a.tobytes() + b"\0" + str(text).encode() + b"\0")
    if class_subfolders is not None:
        h.update("\0".join(map(str, class_subfolders)).encode())
    folder = Path(root) / name / h.hexdigest()[:16]
    done = folder / "complete"
    if not done.exists():
        formats.write_implosion_pickles(list(pairs), folder / "pairs", class_subfolders)
        done.write_text(f"{len(pairs)}\n")
    return str(folder / "pairs" / ("*/*.pickle" if class_subfolders is not None else "*.pickle"))


def default_cache_path(data_glob, clip_name: str, resize: int | None = ORIGINAL_RESIZE,
                       cache_dir=None, preprocess: str = "package") -> Path:
    """Embedding cache for a glob, a CLIP model and a preprocessing: next to a dataset written by
    :func:`write_pairs_dataset` (``.../<hash>/emb_<clip>_r<resize>.pickle``, ``..._orig.pickle``
    for ``preprocess="original"``), else under ``cache_dir`` (default ``CACHE/alignment``)."""
    g = Path(str(data_glob))
    tag = f"{_slug(clip_name)}_r{resize or 0}" + ("_orig" if preprocess == "original" else "")
    for folder in list(g.parents)[1:3]:
        if (folder / "complete").exists() and (folder / "pairs").is_dir():
            return folder / f"emb_{tag}.pickle"
    return Path(cache_dir or Path(paths.CACHE) / "alignment") / f"{_slug(str(g))}_{tag}.pickle"


def glob_ad(data_glob, clip=None, alpha: float = 0.8, cache_path=None, batch_size: int = 512,
            resize: int | None = ORIGINAL_RESIZE, device="cpu", progress: bool = False,
            preprocess: str = "package", dtype="float32", **ad_kwargs) -> dict:
    """AD of the pairs of one glob (embeddings cached, see :func:`default_cache_path`), plus the
    mean raw CLIP similarity of the pairs (``mean_clip_sim``).  ``device`` / ``dtype``: of the
    CLIP model when ``clip`` is a spec."""
    embedder = load_clip_spec(clip, device, dtype)
    cache_path = cache_path or default_cache_path(data_glob, getattr(embedder, "name", "clip"),
                                                  resize, preprocess=preprocess)
    emb = embed_pairs(data_glob, embedder, cache_path, batch_size=batch_size, resize=resize,
                      device=device, progress=progress, preprocess=preprocess)
    res = alignment_difficulty(emb.img_emb, emb.txt_emb, alpha, **ad_kwargs)
    res["mean_clip_sim"] = float((emb.img_emb * emb.txt_emb).sum(1).mean())
    return res


def ad_table(datasets: dict, clips, alpha: float = 0.8, batch_size: int = 512,
             resize: int | None = ORIGINAL_RESIZE, device="cpu", progress: bool = True,
             preprocess: str = "package", dtype="float32"):
    """AD of several datasets (name -> glob of implosion pickles) under several CLIP models
    (specs for :func:`load_clip_spec`); each model is loaded once.  Returns a DataFrame indexed by
    (dataset, clip) with n, mean_clip_sim, feature_ad, structure_ad, ad."""
    import pandas as pd
    from tqdm.auto import tqdm

    if not datasets:
        raise ValueError("ad_table: no datasets given; pass a dict name -> glob of pair pickles")
    clips = [clips] if isinstance(clips, (str, Path)) or clips is None else list(clips)
    rows = []
    for spec in clips:
        embedder = load_clip_spec(spec, device, dtype)
        for name, g in tqdm(list(datasets.items()), desc=f"AD ({spec})", disable=not progress):
            r = glob_ad(g, embedder, alpha, batch_size=batch_size, resize=resize, device=device,
                        preprocess=preprocess)
            rows.append(dict(dataset=name, clip=str(spec if spec is not None else "toy-clip"),
                             n=r["n"], mean_clip_sim=r["mean_clip_sim"],
                             feature_ad=r["feature_ad"], structure_ad=r["structure_ad"], ad=r["ad"]))
    return pd.DataFrame(rows).set_index(["dataset", "clip"])


def toy_pairs(samples, seed: int = 0) -> list:
    """One ``(image, caption)`` pair per toy sample; the caption (toy samples have one per
    template) is drawn with ``seed`` by position only, so a poisoned copy of the same samples
    gets the same template and differs only in the poisoned words."""
    rng = np.random.default_rng(seed)
    picks = [int(rng.integers(len(s.captions))) for s in samples]
    return [(s.image, s.captions[k]) for s, k in zip(samples, picks)]


def toy_ad_datasets(root, n: int = 1000, seed: int = 0) -> dict:
    """Toy-world datasets for the caption-vs-class-label comparison, written as implosion pickles
    (the readers of real data read them back).  Returns name -> glob:

    * ``captions (scenes)``: 1-3 object scenes, one caption each (LAION-like captions);
    * ``captions (single object)``: single-object images, captions like "a small red circle";
    * ``shape label``: the same single-object images, text = the shape name ("circle"), as a
      class dataset with label text (CIFAR10/ImageNet labels in the original);
    * ``shape prompt``: text = "a photo of a {label}" (the generated-prompt variant);
    * ``colour+shape label``: text = "red circle" (a finer label set).
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 pairs per dataset, got {n}")
    scenes = toyworld.make_samples(n, seed)
    singles = toyworld.make_samples(n, seed + 1, kinds=("single",))
    imgs = [s.image for s in singles]
    shapes = [s.scene.objects[0].shape for s in singles]
    fine = [f"{s.scene.objects[0].colour} {s.scene.objects[0].shape}" for s in singles]
    sets = {
        "captions (scenes)": toy_pairs(scenes, seed),
        "captions (single object)": toy_pairs(singles, seed),
        "shape label": formats.class_pairs(imgs, shapes),
        "shape prompt": formats.class_pairs(imgs, shapes, prompt_template="a photo of a {label}"),
        "colour+shape label": formats.class_pairs(imgs, fine),
    }
    classes = {"shape label": shapes, "shape prompt": shapes,
               "colour+shape label": [f.replace(" ", "_") for f in fine]}
    return {name: write_pairs_dataset(p, root, _slug(name), classes.get(name))
            for name, p in sets.items()}


def poisoned_ad(samples, rate: float, clip=None, root=None, *, seed: int = 0, concepts=None,
                attribute: str = "shape", caption_seed: int = 0, alpha: float = 0.8,
                batch_size: int = 512, resize: int | None = ORIGINAL_RESIZE, device="cpu",
                dtype="float32") -> dict:
    """AD of toy ``samples`` after ``toyworld.poison(samples, rate, seed, concepts, attribute)``
    (Nightshade-style mismatched captions), through the pickle + embedding pipeline.  Returns the
    AD dict plus rate, n_concepts, n_poisoned and poisoned_fraction (of all pairs)."""
    poisoned, is_p = toyworld.poison(samples, rate, seed, concepts=concepts, attribute=attribute)
    values = toyworld.SHAPES if attribute == "shape" else tuple(toyworld.COLOURS)
    n_concepts = len(values) if concepts is None else len(set(concepts))
    g = write_pairs_dataset(toy_pairs(poisoned, caption_seed), root or paths.GENERATED / "poisoned",
                            f"{attribute}-rate{rate:g}-k{n_concepts}")
    res = glob_ad(g, clip, alpha, batch_size=batch_size, resize=resize, device=device, dtype=dtype)
    res.update(rate=float(rate), n_concepts=n_concepts, n_poisoned=int(is_p.sum()),
               poisoned_fraction=float(is_p.mean()))
    return res


def _poison_rows(settings, samples, clip, root, progress, **kw):
    import pandas as pd
    from tqdm.auto import tqdm
    embedder = load_clip_spec(clip, kw.get("device", "cpu"), kw.get("dtype", "float32"))
    rows = []
    for rate, concepts in tqdm(settings, desc="AD vs poisoning", disable=not progress):
        r = poisoned_ad(samples, rate, embedder, root, concepts=concepts, **kw)
        rows.append({k: r[k] for k in ("rate", "n_concepts", "n_poisoned", "poisoned_fraction",
                                       "mean_clip_sim", "feature_ad", "structure_ad", "ad")})
    return pd.DataFrame(rows)


def ad_vs_poison_rate(samples, rates, clip=None, root=None, *, concepts=None, progress=True, **kw):
    """AD of the toy dataset poisoned at each rate in ``rates`` (fraction of the eligible pairs,
    see ``toyworld.poison``); DataFrame indexed by rate.  ``kw`` go to :func:`poisoned_ad`."""
    rates = [float(r) for r in rates]
    return _poison_rows([(r, concepts) for r in rates], samples, clip, root, progress,
                        **kw).set_index("rate")


def ad_vs_poisoned_concepts(samples, n_concepts, rate: float, clip=None, root=None, *,
                            attribute: str = "shape", progress=True, **kw):
    """AD when the first k concepts (``toyworld.SHAPES`` / ``COLOURS`` order) are poisoned at
    ``rate``, for each k in ``n_concepts`` (k = 0: the clean dataset); DataFrame indexed by k."""
    values = list(toyworld.SHAPES if attribute == "shape" else toyworld.COLOURS)
    bad = [k for k in n_concepts if not 0 <= int(k) <= len(values)]
    if bad:
        raise ValueError(f"n_concepts {bad} outside 0..{len(values)} ({attribute}s: {values})")
    settings = [(float(rate) if k else 0.0, values[:max(int(k), 1)]) for k in n_concepts]
    df = _poison_rows(settings, samples, clip, root, progress, attribute=attribute, **kw)
    df["n_concepts"] = [int(k) for k in n_concepts]
    return df.set_index("n_concepts")


# ------------------------------------------------------------------------------------------------
# Implosion measured (beyond the original): train on poisoned data, score generations
# ------------------------------------------------------------------------------------------------
def single_object_prompts(template: str = "a {colour} {shape}") -> list:
    """The clean single-object prompts of the toy world: every colour x shape (20 prompts)."""
    return [template.format(colour=c, shape=s) for s in toyworld.SHAPES for c in toyworld.COLOURS]


def prompt_fidelity(images, prompts) -> dict:
    """Fraction of generated images that match their prompt by ``toyworld.check_prompt``:
    ``fidelity`` (colour and shape bound to the same object), ``shape_ok``, ``colour_ok``."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    checks = [toyworld.check_prompt(im, p) for im, p in zip(images, prompts)]
    return dict(fidelity=float(np.mean([c["both"] for c in checks])),
                shape_ok=float(np.mean([c["shape_ok"] for c in checks])),
                colour_ok=float(np.mean([c["colour_ok"] for c in checks])))


def _train_config(model):
    """The architecture config of a toy-format checkpoint (``toy_config.json``); for other
    SD folders a config carrying only the tokenizer length (fine-tuning needs nothing else)."""
    cfg = sdformat.read_toy_config(str(model.name))
    return cfg or sdformat.TinySDConfig(max_length=int(model.tokenizer.model_max_length))


def _weights_fingerprint(module) -> str:
    import hashlib
    h = hashlib.sha1()
    for k, t in sorted(module.state_dict().items()):
        h.update(k.encode() + t.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def implosion_experiment(model="toy", rates=(0.0, 0.25, 0.5, 0.75), *, n_train: int = 2000,
                         kinds=("single",), attribute: str = "shape", concepts=None,
                         init: str = "finetune", steps: int = 150, batch_size: int = 64,
                         lr: float = 2e-4, n_seeds: int = 2, gen_steps: int = 25,
                         guidance: float = 3.0, snr_gamma: float | None = 5.0, seed: int = 0,
                         clip=None, alpha: float = 0.8,
                         resize: int | None = ORIGINAL_RESIZE, root=None, device="cpu",
                         progress: bool = True, clip_dtype="float32"):
    """Train a UNet on toy data poisoned at each rate, generate the clean prompts, score them.

    For each rate: ``toyworld.poison`` the ``n_train`` toy samples (``kinds``, ``attribute``,
    ``concepts``), take one caption per image (:func:`toy_pairs`), compute the AD of exactly these
    pairs through the pickle pipeline (:func:`poisoned_ad`, CLIP ``clip``, default: the model
    folder's CLIP), train the UNet with ``training.train_unet`` on them (the checkpoint's frozen VAE
    and text encoder; ``init="finetune"`` starts from its UNet, ``"scratch"`` from random weights;
    no EMA; ``snr_gamma`` Min-SNR loss weighting as in the toy recipe), generate every clean single-object prompt (:func:`single_object_prompts`) ``n_seeds``
    times (DDIM ``gen_steps``, guidance ``guidance``) and score them with
    ``toyworld.check_prompt`` (:func:`prompt_fidelity`).  The shipped model's own fidelity is
    measured too (``base``).  ``device``: of every model; ``clip_dtype``: of the CLIP scorer (the
    T2I model trains and generates in float32).  Each rate's result is cached (``cache.ResultCache``, keyed by the
    weights and every parameter), training is resumable.

    Returns ``(table, extra)``: a DataFrame indexed by rate (AD terms, poisoned fraction,
    fidelity, shape_ok, colour_ok, ``fidelity_<concept>`` per value of ``attribute``,
    ``fidelity_untouched`` on the prompts naming a concept that is neither poisoned nor the
    target of a poisoned one in ``toyworld.poison``'s concept map (NaN if there is none), final
    loss)
    and a dict with ``prompts``, ``images`` (rate -> uint8 [P, R, R, 3]), ``base`` (fidelity of
    the shipped model), ``base_images`` and ``n_untouched_prompts``.
    """
    import copy

    import pandas as pd
    from tqdm.auto import tqdm

    if init not in ("finetune", "scratch"):
        raise ValueError(f"init must be 'finetune' or 'scratch', got {init!r}")
    rates = [float(r) for r in rates]
    m = models.load_t2i(model, device=device)
    cfg = _train_config(m)
    if clip is None:
        clip = Path(str(m.name)) / "clip" if (Path(str(m.name)) / "clip").exists() else None
    embedder = load_clip_spec(clip, device, clip_dtype)
    values = list(toyworld.SHAPES if attribute == "shape" else toyworld.COLOURS)
    poisoned_set = set(values if concepts is None else concepts)
    # poison() rewrites a poisoned concept's word into the next value (its target)
    touched = poisoned_set | {values[(values.index(c) + 1) % len(values)] for c in poisoned_set}
    prompts = single_object_prompts() * int(n_seeds)
    words = [set(p.split()) for p in prompts]
    samples = toyworld.make_samples(n_train, seed, kinds=kinds)
    key = dict(model=str(m.name), unet=_weights_fingerprint(m.unet), n_train=n_train,
               kinds=list(kinds), attribute=attribute, concepts=sorted(poisoned_set), init=init,
               steps=steps, batch_size=batch_size, lr=lr, n_seeds=n_seeds, gen_steps=gen_steps,
               guidance=guidance, snr_gamma=snr_gamma, seed=seed)
    store = rcache.ResultCache("implosion", key)

    def score(imgs):
        out = prompt_fidelity(imgs, prompts)
        groups = [(f"fidelity_{v}", [v in w for w in words]) for v in values]
        groups.append(("fidelity_untouched", [not (w & touched) for w in words]))
        for name, sel in groups:
            idx = np.flatnonzero(sel)
            out[name] = (prompt_fidelity(imgs[idx], [prompts[i] for i in idx])["fidelity"]
                         if len(idx) else float("nan"))
        return out

    def generate(unet, tag):
        gm = models.T2IModel(m.tokenizer, m.text_encoder, m.vae, unet, m.scheduler,
                             name=f"{m.name}:{tag}", device=device)
        return gm.generate(prompts, num_steps=gen_steps, guidance_scale=guidance, seed=seed)

    if not store.has("base"):
        store.save("base", dict(images=torch.from_numpy(generate(m.unet, "base"))))
    base = store.load("base")["images"].numpy()
    rows, images = [], {}
    for rate in tqdm(rates, desc="implosion (rates)", disable=not progress):
        rid = f"rate{rate:g}"
        poisoned, _ = toyworld.poison(samples, rate, seed, concepts=concepts, attribute=attribute)
        ad = poisoned_ad(samples, rate, embedder, root or paths.GENERATED / "implosion",
                         seed=seed, concepts=concepts, attribute=attribute, caption_seed=seed,
                         alpha=alpha, resize=resize, device=device)
        if not store.has(rid):
            unet0 = copy.deepcopy(m.unet).requires_grad_(True) if init == "finetune" else None
            unet, info = training.train_unet(
                toy_pairs(poisoned, seed), m.text_encoder, m.vae, m.tokenizer, cfg, steps,
                batch_size=batch_size, lr=lr, seed=seed, out_dir=store.dir / rid, init=unet0,
                ema_decay=None, warmup=max(1, min(100, steps // 10)), scheduler=m.scheduler,
                snr_gamma=snr_gamma, progress=progress)
            store.save(rid, dict(images=torch.from_numpy(generate(unet, rid)),
                                 final_loss=info["final_loss"]))
        res = store.load(rid)
        images[rate] = res["images"].numpy()
        rows.append(dict(rate=rate, poisoned_fraction=ad["poisoned_fraction"],
                         feature_ad=ad["feature_ad"], structure_ad=ad["structure_ad"], ad=ad["ad"],
                         **score(images[rate]), final_loss=res["final_loss"]))
    table = pd.DataFrame(rows).set_index("rate")
    n_untouched = sum(1 for w in words if not (w & touched))
    return table, dict(prompts=prompts, images=images, base=score(base), base_images=base,
                       n_untouched_prompts=n_untouched)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, KeyError) as err:
        sys.exit(f"error: {err}")
