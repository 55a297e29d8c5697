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
  abs, sum, float64 accumulation) instead of a Python loop over rows; an unbiased sampled
  estimator with a normal-approximation confidence interval is offered for very large n;
* image preprocessing is deterministic: resize 512 (bilinear, shorter side) + *centre* crop 512,
  then the CLIP preprocess.  The original crops at a random, unseeded position (for square images
  both crops are the identity, so the embeddings agree);
* the CLIP model is loaded once (the original reloads it every batch), a glob whose size is a
  multiple of the batch size does not crash on an empty last batch, the cache is actually resumed
  (files already embedded are skipped) and the three numbers are saved as json, not only printed.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: CLIP similarity range the original maps onto [0, 1] for the feature term (LAION scaling)
LAION_SIM_RANGE = (0.2, 0.45)
#: image side the original resizes to and crops before the CLIP preprocess
ORIGINAL_RESIZE = 512


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
        if not t.is_floating_point():
            t = t.float()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # fp16/bf16 embeddings are cast to fp32 like the original
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
    for t, name in ((U, names[0]), (V, names[1])):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contain NaN or inf values")
    if normalize:
        return torch.nn.functional.normalize(U, dim=1), torch.nn.functional.normalize(V, dim=1)
    for t, name in ((U, names[0]), (V, names[1])):
        norms = t.norm(dim=1)
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


def feature_ad(u, v, scale: bool = True, normalize: bool = False) -> float:
    """Feature term D_fea = mean_k (1 - s~_k) with s_k = <u_k, v_k> (LAION-scaled if ``scale``,
    as the original does for every dataset; ``scale=False`` uses the raw cosine similarity)."""
    U, V = _as_pair(u, v, normalize)
    s = (U * V).sum(dim=1).double()
    if scale:
        s = laion_scale(s)
    return float((1.0 - s).mean())


def structure_ad(u, v, block_size: int = 2048, normalize: bool = False,
                 progress: bool = False) -> float:
    """Structure term D_stru = (2 / n^2) sum_{i<j} |<u_i,u_j> - <v_i,v_j>|, exact.

    Computed tile by tile: a tile of U U^T - V V^T is one matrix product [U, V] [U, -V]^T; only the
    tiles on and above the diagonal are formed (strict upper triangle on the diagonal tiles), their
    absolute values summed in float64.  The products run in the embeddings' dtype (float32 like the
    original; pass float64 tensors for a float64 product) on the embeddings' device, so GPU tensors
    are computed on the GPU.  O(n^2 d) time, O(block_size^2) extra memory.
    """
    from tqdm.auto import tqdm

    U, V = _as_pair(u, v, normalize)
    n = U.shape[0]
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    A = torch.cat([U, V], dim=1)
    B = torch.cat([U, -V], dim=1)
    starts = range(0, n, block_size)
    total = torch.zeros((), dtype=torch.float64, device=U.device)
    tiles = [(i0, j0) for i0 in starts for j0 in starts if j0 >= i0]
    for i0, j0 in tqdm(tiles, disable=not progress, desc="structure AD tiles"):
        g = A[i0:i0 + block_size] @ B[j0:j0 + block_size].T
        if i0 == j0:
            g = g.triu(diagonal=1)
        total += g.abs().sum(dtype=torch.float64)
    return float(2.0 * total / n ** 2)


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
                         num_pairs: int = 1_000_000, seed: int = 0, block_size: int = 2048,
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
    out = dict(feature_ad=feature_ad(U, V, scale=scale))
    if structure == "exact":
        out["structure_ad"] = structure_ad(U, V, block_size=block_size, progress=progress)
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
# CLIP embeddings of implosion pickles, with the original's embedding cache
# ------------------------------------------------------------------------------------------------
def load_clip_spec(clip=None, device="cpu"):
    """A CLIP embedder from a spec: an object with ``encode_images``/``encode_texts`` (returned as
    is), a local CLIPModel folder, an open_clip ``ARCH/TAG`` string (``ViT-B-32/openai``, the
    original's default; ``ViT-H-14/laion2b_s32b_b79k``), a Hugging Face id or a
    ``models.load_clip`` alias.  None: the toy CLIP."""
    from . import models
    if hasattr(clip, "encode_images") and hasattr(clip, "encode_texts"):
        return clip
    if clip is None:
        return models.load_clip(None, device=device)
    spec = str(clip)
    if not Path(spec).expanduser().exists() and "/" in spec:
        arch, tag = spec.split("/", 1)
        import open_clip
        if arch in open_clip.list_models():
            return models.load_clip(arch, pretrained=tag, device=device)
    return models.load_clip(spec, device=device)


def original_preprocess(image, resize: int | None = ORIGINAL_RESIZE):
    """The original's image step before the CLIP preprocess, made deterministic.

    compute_AD.py resizes the shorter side to 512 (bilinear) and takes a *random, unseeded* 512
    crop; we take the *centre* crop (identical for square images, the common case).  ``resize=None``
    skips the step (images go straight to the CLIP preprocess).  Grayscale (H, W) images become RGB.
    We also skip the original's float round trip back to uint8 (which truncates instead of rounding).
    """
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    arr = np.asarray(image)
    pil = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").convert("RGB")
    if resize:
        pil = TF.resize(pil, int(resize), interpolation=InterpolationMode.BILINEAR)
        pil = TF.center_crop(pil, int(resize))
    return pil


@dataclass
class PairEmbeddings:
    """CLIP embeddings of the pairs of one glob, in the glob's (sorted) order."""
    paths: list
    img_emb: torch.Tensor  # [n, d], L2-normalised
    txt_emb: torch.Tensor  # [n, d], L2-normalised
    num_new: int  # pairs embedded by this call (the rest came from the cache)

    def __len__(self):
        return len(self.paths)


def _meta_path(cache_path) -> Path:
    return Path(str(cache_path) + ".meta.json")


def embed_pairs(data_glob, clip=None, cache_path=None, batch_size: int = 512,
                resize: int | None = ORIGINAL_RESIZE, save_every: int = 10, device="cpu",
                progress: bool = True) -> PairEmbeddings:
    """Normalised CLIP embeddings of every implosion pickle matching ``data_glob``.

    Pickles (``{'img', 'text'}``) are read through ``formats`` one batch at a time (``batch_size``,
    512 as in the original), images preprocessed by :func:`original_preprocess`, then embedded
    with ``clip`` (see :func:`load_clip_spec`; loaded once).  With ``cache_path`` the embeddings go
    to a pickle in the original's format ``{filepath: {'img_emb': (d,), 'txt_emb': (d,)}}``,
    written every ``save_every`` batches and at the end (also when a bad file stops the run, so
    nothing computed is lost); files already in the cache are not embedded again (resume).  A
    sidecar ``<cache>.meta.json`` records the CLIP model and preprocessing; resuming a cache made
    with a different one raises.
    """
    from tqdm.auto import tqdm

    from . import formats

    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch_size and save_every must be >= 1, got {batch_size}, {save_every}")
    paths = [str(p) for p in formats.implosion_pickle_paths(data_glob)]
    embedder = load_clip_spec(clip, device=device)
    meta = dict(clip=str(getattr(embedder, "name", type(embedder).__name__)),
                resize=resize, crop="center" if resize else None)
    cache: dict = {}
    if cache_path is not None:
        cache_path = Path(cache_path)
        mp = _meta_path(cache_path)
        if mp.exists():
            old = json.loads(mp.read_text())
            if old != meta:
                raise ValueError(f"embedding cache {cache_path} was made with {old}, not {meta}: "
                                 f"pass another cache path or delete {cache_path} and {mp}")
        if cache_path.exists():
            cache = formats.read_embedding_cache(cache_path)
    # caches written by the original key files by the glob's spelling ('./x/a.pickle')
    by_norm = {str(Path(k)): k for k in cache}
    keys = [by_norm.get(p, p) for p in paths]
    todo = [(p, k) for p, k in zip(paths, keys) if k not in cache]
    dim = len(next(iter(cache.values()))["img_emb"]) if cache else None

    def save():
        if cache_path is not None and cache:
            formats.write_embedding_cache(cache, cache_path)
            _meta_path(cache_path).write_text(json.dumps(meta, indent=1) + "\n")

    unsaved = 0
    try:
        batches = range(0, len(todo), batch_size)
        for b, start in enumerate(tqdm(batches, desc="CLIP pairs", disable=not progress or not todo)):
            chunk = todo[start:start + batch_size]
            images, texts = [], []
            for p, _ in chunk:
                img, text = formats.read_implosion_pickle(p)
                images.append(original_preprocess(img, resize))
                texts.append(text)
            ie = embedder.encode_images(images, batch_size=batch_size).float().cpu().numpy()
            te = embedder.encode_texts(texts, batch_size=batch_size).float().cpu().numpy()
            if dim is not None and ie.shape[1] != dim:
                raise ValueError(f"embedding cache {cache_path} holds d={dim} embeddings but "
                                 f"{meta['clip']} gives d={ie.shape[1]}: use another cache path")
            dim = ie.shape[1]
            for (_, k), a, t in zip(chunk, ie, te):
                cache[k] = {"img_emb": a.reshape(-1), "txt_emb": t.reshape(-1)}
            unsaved += len(chunk)
            if (b + 1) % save_every == 0:
                save()
                unsaved = 0
    finally:
        if unsaved:
            save()
    img = torch.from_numpy(np.stack([cache[k]["img_emb"] for k in keys]))
    txt = torch.from_numpy(np.stack([cache[k]["txt_emb"] for k in keys]))
    return PairEmbeddings(paths, img, txt, len(todo))


# ------------------------------------------------------------------------------------------------
# The original's interface: glob -> embeddings -> AD (function and command line)
# ------------------------------------------------------------------------------------------------
def ad_json_path(emb_path) -> Path:
    """Where :func:`compute_ad` saves the three numbers: next to the cache, ``<cache>.ad.json``."""
    p = Path(emb_path)
    return p.with_name(p.name + ".ad.json") if p.suffix != ".pickle" else p.with_suffix(".ad.json")


def _report(res: dict) -> None:
    print(f"feature AD = {res['feature_ad']:.6f}, structure AD = {res['structure_ad']:.6f}, "
          f"AD (alpha = {res['alpha']}) = {res['ad']:.6f}  [n = {res['n']}]")


def compute_ad(data_glob_path, save_emb_path, alpha: float = 0.8, clip=None,
               batch_size: int = 512, resize: int | None = ORIGINAL_RESIZE, structure: str = "exact",
               num_pairs: int = 1_000_000, seed: int = 0, scale: bool = True, device="cpu",
               progress: bool = True, verbose: bool = True) -> dict:
    """The original ``compute_AD.py`` run: embed the pairs of ``data_glob_path`` (cache at
    ``save_emb_path``, resumed), compute feature AD, structure AD and AD for ``alpha``, print them
    and save them as json next to the cache (:func:`ad_json_path`).

    Unlike the original (which uses every entry of the cache file), AD is computed over the files
    the glob matches, so one cache may serve several globs.  Returns the :func:`alignment_difficulty`
    dict plus ``data_glob``, ``emb_path``, ``clip`` and ``json_path``."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # fail before embedding anything
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    emb = embed_pairs(data_glob_path, clip, save_emb_path, batch_size=batch_size, resize=resize,
                      device=device, progress=progress)
    res = alignment_difficulty(emb.img_emb, emb.txt_emb, alpha, scale=scale, structure=structure,
                               num_pairs=num_pairs, seed=seed)
    meta = json.loads(_meta_path(save_emb_path).read_text())
    jp = ad_json_path(save_emb_path)
    res.update(data_glob=str(data_glob_path), emb_path=str(save_emb_path), clip=meta["clip"],
               resize=resize, structure_method=structure, json_path=str(jp))
    jp.write_text(json.dumps(res, indent=1) + "\n")
    if verbose:
        _report(res)
    return res


def compute_ad_from_embeddings(save_emb_path, alpha: float = 0.8, verbose: bool = True,
                               **kwargs) -> dict:
    """AD of every entry of an embedding cache (the original's ``compute_AD(save_emb_path, alpha)``,
    which reads the cache written by its embedding step); ``kwargs`` go to
    :func:`alignment_difficulty`."""
    from . import formats
    cache = formats.read_embedding_cache(save_emb_path)
    u = np.stack([e["img_emb"] for e in cache.values()])
    v = np.stack([e["txt_emb"] for e in cache.values()])
    res = alignment_difficulty(u, v, alpha, **kwargs)
    if verbose:
        _report(res)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m t2i_common.alignment",
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
    p.add_argument("--structure", choices=("exact", "sampled"), default="exact")
    p.add_argument("--num_pairs", type=int, default=1_000_000, help="pairs for --structure sampled")
    p.add_argument("--seed", type=int, default=0, help="seed for --structure sampled")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    return compute_ad(args.data_dir, args.emb_path, args.alpha, clip=args.clip,
                      batch_size=args.batch_size, resize=args.resize or None,
                      structure=args.structure, num_pairs=args.num_pairs, seed=args.seed,
                      device=args.device)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as err:
        sys.exit(f"error: {err}")
