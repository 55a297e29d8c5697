"""DiffusionITM: image-text matching with a text-to-image diffusion model (Krojer et al., NeurIPS '23).

A T2I model scores how well caption c matches image x by how well it denoises x given c.  The
score, as the original ``diffusion_itm.py`` (and its modified img2img pipeline) computes it:

    d_k(x, c) = || eps_k - eps_theta(z_{t_k}, t_k, c) ||_2 ,   z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    s(x, c)   = - 1/K sum_k d_k(x, c)

with t_k on the fixed grid ``range(10, 990, 1000 // S)`` (:func:`~t2i_common.engine.grid_timesteps`;
S = ``--sampling_steps``, CLI default 10, the paper's main table 250) and eps_k = ``bank[k]`` of ONE
noise bank drawn once and shared by every candidate and every example.  For image retrieval
(``--img_retrieval``) the unconditional error with the same latent and noise is subtracted,
d_k = ||eps_k - eps(z, c)|| - ||eps_k - eps(z, "")||, so errors of different images are comparable.

Deliberate differences from the original (none changes the quantity):
- z0 is the VAE posterior mean by default (deterministic); ``latent_mode="sample"`` re-samples the
  posterior for every (image, timestep) as the original does (a seeded draw per image, so the result
  does not depend on the batching).
- each distinct image is VAE-encoded once, each distinct prompt text-encoded once, and all
  (candidate x timestep) evaluations that share a noised latent run in one UNet batch
  (:func:`~t2i_common.engine.denoise_errors`); the original calls the pipeline once per
  (text, image) pair, re-encoding the prompt per call and the image at every timestep.
- per-example results are cached (:mod:`t2i_common.cache`), so a killed run resumes.
- beyond the paper: :func:`adaptive_scores`, a successive-elimination version of the score that
  spends UNet evaluations only on candidates that are still in the race (as Diffusion Classifier,
  Li et al. 2023, does); with an unlimited threshold it reproduces the grid score exactly.

Items are :class:`t2i_common.formats.MatchItem` (images, captions, gold_image, gold_caption, meta);
every score matrix here is ``s[i, j] = s(image i, caption j)``, shape [n_images, n_captions].
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import ResultCache, fingerprint, map_cached
from .engine import NoiseBank, denoise_errors, grid_timesteps
from .formats import GENDER_WORD_PAIRS, winoground_scores
from .imageio import to_pil

SCORE_VERSION = "diffitm-1"


# ------------------------------------------------------------------------------------------------
# identities: images, items, models
# ------------------------------------------------------------------------------------------------
def image_key(im) -> str:
    """Content hash of an image: a file reference (:class:`~t2i_common.formats.ImageRef` or path)
    hashes the file's bytes and crop box without decoding; PIL images / arrays hash their pixels.
    Identical content -> identical key (so an image shared by several items is encoded once)."""
    from pathlib import Path

    from .formats import ImageRef

    if isinstance(im, (str, Path)):
        im = ImageRef(Path(im))
    if isinstance(im, ImageRef):
        p = Path(im.path)
        if not p.is_file():
            raise FileNotFoundError(f"image file not found: {p}"
                                    f"{' (referenced by ' + im.source + ')' if im.source else ''}")
        h = hashlib.sha1(p.read_bytes())
        h.update(repr(im.box).encode())
        return "f" + h.hexdigest()[:19]
    pil = to_pil(im).convert("RGB")
    h = hashlib.sha1(f"{pil.size}".encode())
    h.update(np.asarray(pil).tobytes())
    return h.hexdigest()[:20]


def model_fingerprint(model) -> str:
    """Cheap fingerprint of a T2I model's weights (name, shape, sum and first values of every
    parameter of the UNet, VAE and text encoder): a LoRA adapter or any weight update changes it,
    so cached scores of a fine-tuned model are never confused with the base model's."""
    h = hashlib.sha1(str(getattr(model, "name", "")).encode())
    with torch.no_grad():
        for part in ("unet", "vae", "text_encoder"):
            for name, p in getattr(model, part).named_parameters():
                v = p.detach().float().flatten()
                h.update(f"{part}.{name}{tuple(p.shape)}{float(v.double().sum()):.10e}".encode())
                h.update(v[:16].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_items(items, who):
    items = list(items)
    if not items:
        raise ValueError(f"{who}: no items given")
    for n, it in enumerate(items):
        if not hasattr(it, "images") or not hasattr(it, "captions"):
            raise TypeError(f"{who}: item {n} is a {type(it).__name__}, expected a formats.MatchItem "
                            f"(images, captions, gold_image, gold_caption, meta)")
        if len(it.images) == 0 or len(it.captions) == 0:
            raise ValueError(f"{who}: item {n} has {len(it.images)} images and {len(it.captions)} "
                             f"captions; every item needs at least one of each")
    return items


@dataclass
class _Prepared:
    keys: list            # per item: list of image keys
    refs: dict            # image key -> image reference (ImageRef / PIL), loaded when encoded
    ids: list             # per item: content id (cache file name)
    first: dict           # content id -> index of its first item (duplicates are scored once)


def _prepare(items) -> _Prepared:
    """Image keys without keeping decoded images: MatchItems expose their lazy references."""
    keys, refs, ids = [], {}, []
    for it in items:
        ks = []
        for ref in getattr(it, "image_refs", None) or list(it.images):
            k = image_key(ref)
            refs.setdefault(k, ref)
            ks.append(k)
        keys.append(ks)
        ids.append(fingerprint({"images": ks, "captions": [str(c) for c in it.captions]}))
    first = {}
    for n, i in enumerate(ids):
        first.setdefault(i, n)
    return _Prepared(keys, refs, ids, first)


def _load(ref):
    from .formats import to_pil as load
    return load(ref)


# ------------------------------------------------------------------------------------------------
# the distance engine: requests (image, prompts, grid points) -> L2 errors
# ------------------------------------------------------------------------------------------------
class _Scorer:
    """Holds the shared noise bank, the grid and the per-image latents of one scoring call."""

    def __init__(self, model, S, seed, latent_mode, batch_size):
        if latent_mode not in ("mean", "sample"):
            raise ValueError(f"latent_mode must be 'mean' (posterior mean, default) or 'sample' "
                             f"(posterior sample per timestep, the original's behaviour), got {latent_mode!r}")
        self.model, self.seed, self.mode, self.batch_size = model, int(seed), latent_mode, batch_size
        self.grid = grid_timesteps(S)
        self.K = len(self.grid)
        self.bank = NoiseBank(model.latent_shape, seed).draw(self.K)   # bank[k] <-> grid point k
        self.post: dict[str, tuple] = {}
        self.unet_evals = 0
        self.vae_images = 0

    def encode(self, keys, refs):
        """VAE posterior (mean, std, both times the scaling factor) of every new image, once."""
        new = [k for k in dict.fromkeys(keys) if k not in self.post]
        if not new:
            return
        x = self.model.preprocess([_load(refs[k]) for k in new])
        self.vae_images += len(new)
        if self.mode == "mean":
            z = self.model.encode_images(x, mode="mean").float().cpu()
            for k, zi in zip(new, z):
                self.post[k] = (zi, None)
            return
        sf = self.model.scaling_factor
        with torch.inference_mode():
            for i in range(0, len(new), 64):
                dist = self.model.vae.encode(x[i:i + 64].to(self.model.device, self.model.dtype)).latent_dist
                for k, m, s in zip(new[i:i + 64], dist.mean.float().cpu(), dist.std.float().cpu()):
                    self.post[k] = (m * sf, s * sf)

    def latent_draws(self, key, kidx):
        """[len(kidx), C, h, w] posterior samples of image ``key`` for grid points ``kidx``: draw k of
        a per-image seeded stream, so a (image, k) pair always gets the same sample."""
        mean, std = self.post[key]
        stream = 1 + int(key[:12], 16)
        eps = NoiseBank(self.model.latent_shape, self.seed).draw(self.K, stream=stream)[kidx]
        return mean.unsqueeze(0) + std.unsqueeze(0) * eps

    def run(self, requests, emb):
        """requests: list of (image key, prompt rows [P] into ``emb``, grid indices [n]); returns one
        [P, n] float tensor of L2 errors per request.  Requests with the same (P, n) go to the UNet
        together; a group whose requests share their grid indices uses the shared bank directly."""
        out = [None] * len(requests)
        groups: dict = {}
        for r, (_, rows, kidx) in enumerate(requests):
            groups.setdefault((len(rows), len(kidx)), []).append(r)
        for (P, n), rs in groups.items():
            cond = torch.tensor([list(requests[r][1]) for r in rs], dtype=torch.long)
            kid = torch.tensor([list(requests[r][2]) for r in rs], dtype=torch.long)   # [B, n]
            self.unet_evals += len(rs) * P * n
            if self.mode == "sample":   # one latent per (image, timestep): a row per pair
                z = torch.cat([self.latent_draws(requests[r][0], kid[b]) for b, r in enumerate(rs)])
                t = self.grid[kid.reshape(-1)].unsqueeze(1)
                noise = self.bank[kid.reshape(-1)].unsqueeze(1)
                l2 = denoise_errors(self.model, z, emb, cond.repeat_interleave(n, 0), timesteps=t,
                                    noise=noise, outputs=("l2",), batch_size=self.batch_size)["l2"]
                l2 = l2.view(len(rs), n, P).transpose(1, 2)
            else:
                z = torch.stack([self.post[requests[r][0]][0] for r in rs])
                if bool((kid == kid[0]).all()):
                    t, noise = self.grid[kid[0]], self.bank[kid[0]]
                else:
                    t, noise = self.grid[kid], self.bank[kid]
                l2 = denoise_errors(self.model, z, emb, cond, timesteps=t, noise=noise,
                                    outputs=("l2",), batch_size=self.batch_size)["l2"]
            for b, r in enumerate(rs):
                out[r] = l2[b]
        return out


def _prompt_table(model, items):
    prompts = list(dict.fromkeys([""] + [str(c) for it in items for c in it.captions]))
    return model.encode_prompts(prompts), {p: i for i, p in enumerate(prompts)}


def _grid_chunk(scorer, items, keys, refs, img_retrieval):
    """[I, J, K] distances for a chunk of items; every (image, prompt) pair is evaluated once."""
    scorer.encode([k for ks in keys for k in ks], refs)
    emb, row = _prompt_table(scorer.model, items)
    need: dict[str, list] = {}
    for it, ks in zip(items, keys):
        for k in ks:
            lst = need.setdefault(k, [])
            for c in [str(c) for c in it.captions] + ([""] if img_retrieval else []):
                if c not in lst:
                    lst.append(c)
    allk = list(range(scorer.K))
    imgs = list(need)
    res = scorer.run([(k, [row[c] for c in need[k]], allk) for k in imgs], emb)
    l2 = {k: {c: r[p] for p, c in enumerate(need[k])} for k, r in zip(imgs, res)}
    out = []
    for it, ks in zip(items, keys):
        d = torch.stack([torch.stack([l2[k][str(c)] for c in it.captions]) for k in ks])   # [I, J, K]
        if img_retrieval:
            d = d - torch.stack([l2[k][""] for k in ks]).unsqueeze(1)
        out.append(d)
    return out


def _make_cache(cache, namespace, key):
    if cache is None or cache is False:
        return None
    if isinstance(cache, ResultCache):
        return cache
    root = None if cache is True else cache
    return ResultCache(namespace, key, root=root)


@dataclass
class ITMDistances:
    """Per-item distances d[i, j, k] (image i, caption j, grid point k), the grid timesteps, and
    the UNet evaluations / VAE encodings this call spent (0 for items read from the cache)."""

    dists: list
    timesteps: torch.Tensor
    unet_evals: int = 0
    vae_images: int = 0

    def scores(self) -> list:
        """s = - mean_k d_k, float64 [I, J] per item."""
        return [-d.double().mean(-1) for d in self.dists]


def diffitm_distances(model, items, S: int = 10, seed: int = 0, latent_mode: str = "mean",
                      img_retrieval: bool = False, batch_size: int | None = None, cache=None,
                      progress: bool = True, chunk: int = 32) -> ITMDistances:
    """Per-timestep DiffusionITM distances d_k for every (image, caption) of every item.

    Args:
        model: a :class:`~t2i_common.models.T2IModel`.
        items: MatchItems; any numbers of images and captions.
        S: ``sampling_steps``; grid ``range(10, 990, 1000 // S)``.
        seed: seed of the shared noise bank (and of the posterior samples in ``sample`` mode).
        latent_mode: "mean" (default) or "sample" (original's per-timestep posterior sample).
        img_retrieval: subtract the unconditional error (original ``--img_retrieval``).
        batch_size: UNet evaluations per batch (default: engine.auto_batch_size).
        cache: None (off), True (``paths.CACHE/diffitm``), a folder, or a ResultCache; keyed by the
            model's weights fingerprint and every scoring parameter, one file per item.
        chunk: items scored together (images/prompts shared inside a chunk are evaluated once).
    """
    items = _check_items(items, "diffitm_distances")
    prep = _prepare(items)
    scorer = _Scorer(model, S, seed, latent_mode, batch_size)
    key = dict(version=SCORE_VERSION, model=model_fingerprint(model), S=int(S), seed=int(seed),
               latent_mode=latent_mode, img_retrieval=bool(img_retrieval))
    rc = _make_cache(cache, "diffitm", key)
    first = prep.first

    def fn(ids):
        its = [items[first[i]] for i in ids]
        ks = [prep.keys[first[i]] for i in ids]
        out = [d.float() for d in _grid_chunk(scorer, its, ks, prep.refs, img_retrieval)]
        scorer.post.clear()   # latents live for one chunk (memory stays bounded on large benchmarks)
        return out

    got = map_cached(fn, list(first), rc, desc=f"DiffusionITM S={S}", progress=progress, chunk=chunk)
    return ITMDistances([got[i] for i in prep.ids], scorer.grid, scorer.unet_evals, scorer.vae_images)


def diffitm_scores(model, items, S: int = 10, seed: int = 0, latent_mode: str = "mean",
                   img_retrieval: bool = False, batch_size: int | None = None, cache=None,
                   progress: bool = True) -> list:
    """DiffusionITM scores s(x, c) = - mean_k ||eps_k - eps_theta(z_{t_k}, t_k, c)||_2 per item,
    float64 [n_images, n_captions] (see the module docstring and :func:`diffitm_distances`)."""
    return diffitm_distances(model, items, S=S, seed=seed, latent_mode=latent_mode,
                             img_retrieval=img_retrieval, batch_size=batch_size, cache=cache,
                             progress=progress).scores()


def grid_evaluations(items, S: int, img_retrieval: bool = False) -> int:
    """UNet evaluations of the grid score without de-duplication: I*J*K per item (+ I*K for the
    unconditional error in image retrieval)."""
    K = len(grid_timesteps(S))
    return sum(len(it.images) * (len(it.captions) + int(img_retrieval)) * K for it in items)


# ------------------------------------------------------------------------------------------------
# CLIP baseline
# ------------------------------------------------------------------------------------------------
def clip_scores(clip, items, progress: bool = False) -> list:
    """CLIP / OpenCLIP cosine similarity s[i, j] = <f(image i), g(caption j)> on the same items
    (``clip`` from :func:`t2i_common.models.load_clip`); each distinct image and caption embedded
    once.  float64 [n_images, n_captions] per item."""
    items = _check_items(items, "clip_scores")
    prep = _prepare(items)
    ukeys = list(prep.refs)
    img = torch.cat([clip.encode_images([_load(prep.refs[k]) for k in ukeys[i:i + 256]])
                     for i in range(0, len(ukeys), 256)]).double()   # 256 decoded images at a time
    irow = {k: i for i, k in enumerate(ukeys)}
    texts = list(dict.fromkeys(str(c) for it in items for c in it.captions))
    txt = clip.encode_texts(texts, progress=progress).double()
    trow = {c: i for i, c in enumerate(texts)}
    return [img[[irow[k] for k in ks]] @ txt[[trow[str(c)] for c in it.captions]].T
            for it, ks in zip(items, prep.keys)]


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def candidate_scores(item, s) -> tuple[np.ndarray, int]:
    """(scores of the candidates, index of the gold one) of a retrieval item."""
    s = np.asarray(torch.as_tensor(s, dtype=torch.float64))
    task = item.task
    if task == "text":
        gold = item.gold_caption
        vec = s[0]
    elif task == "image":
        gold = item.gold_image
        vec = s[:, 0]
    else:
        raise ValueError(f"candidate_scores: item with {len(item.images)} images and "
                         f"{len(item.captions)} captions is not a retrieval item; use winoground metrics")
    if gold is None or not 0 <= int(gold) < len(vec):
        raise ValueError(f"candidate_scores: item gold index {gold!r} is missing or outside the "
                         f"{len(vec)} candidates (meta {getattr(item, 'meta', None)})")
    return vec, int(gold)


def retrieval_metrics(items, scores, ks=(1, 5)) -> dict:
    """Accuracy over retrieval items, ties counted and reported.

    - ``accuracy``: the gold candidate scores strictly above every other (a tie at the top is a miss);
    - ``accuracy_tie_split``: ties at the top broken uniformly at random, in expectation (1/n per tie);
    - ``accuracy_first``: the original's ``np.argmax`` convention (first maximal index wins);
    - ``ties``: items whose maximum is attained more than once (the original's "max more than once");
    - ``R@k``: gold within the top k, counting every other candidate with score >= gold's as
      ranked above it (pessimistic; R@1 = accuracy); only for k smaller than the number of candidates.
    """
    items = list(items)
    scores = list(scores)
    if len(items) != len(scores):
        raise ValueError(f"retrieval_metrics: {len(items)} items but {len(scores)} score matrices")
    strict, split, first, ties = [], [], [], 0
    ranks, ncand = [], []
    for it, s in zip(items, scores):
        vec, g = candidate_scores(it, s)
        top = vec.max()
        at_top = np.flatnonzero(vec == top)
        ties += int(len(at_top) > 1)
        strict.append(float(vec[g] == top and len(at_top) == 1))
        split.append(float(vec[g] == top) / len(at_top))
        first.append(float(int(np.argmax(vec)) == g))
        ranks.append(1 + int(np.sum(np.delete(vec, g) >= vec[g])))
        ncand.append(len(vec))
    out = {"n": len(items), "accuracy": float(np.mean(strict)),
           "accuracy_tie_split": float(np.mean(split)), "accuracy_first": float(np.mean(first)),
           "ties": int(ties)}
    for k in ks:
        if k > 1 and k < min(ncand):
            out[f"R@{k}"] = float(np.mean([r <= k for r in ranks]))
    return out


def winoground_metrics(scores, per_example: bool = False) -> dict:
    """Winoground text / image / group scores (Thrush et al. 2022; strict ``>``, a tie is a miss)
    of 2 x 2 score matrices in this module's convention s[image i, caption j]; wraps
    :func:`t2i_common.formats.winoground_scores`, which takes s(caption_i, image_j)."""
    mats = []
    for n, s in enumerate(scores):
        a = np.asarray(torch.as_tensor(s, dtype=torch.float64))
        if a.shape != (2, 2):
            raise ValueError(f"winoground_metrics: item {n} has a score matrix of shape {a.shape}, "
                             f"expected 2 x 2 (images x captions)")
        mats.append(a.T)
    if not mats:
        raise ValueError("winoground_metrics: no score matrices given")
    return winoground_scores(np.stack(mats), per_example=per_example)


# ------------------------------------------------------------------------------------------------
# bias (MMBias / gender word pairs)
# ------------------------------------------------------------------------------------------------
#: group pairs of the original's MMBias report (first group minus second)
MMBIAS_PAIRS = [("Christian", "Muslim"), ("Christian", "Jewish"), ("Jewish", "Muslim"),
                ("Buddhist", "Muslim"), ("Buddhist", "Christian"), ("Buddhist", "Hindu"),
                ("Buddhist", "Jewish"), ("Hindu", "Muslim"), ("American", "Arab"),
                ("Heterosexual", "LGBT")]


def bias_phi(scores, n_pleasant: int) -> np.ndarray:
    """phi(x) = mean_{a in pleasant} s(x, a) - mean_{b in unpleasant} s(x, b) per image.

    ``scores``: [n_images, n_pleasant + n_unpleasant] with the pleasant phrases first (original
    layout)."""
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
    if s.ndim != 2 or not 0 < n_pleasant < s.shape[1]:
        raise ValueError(f"bias_phi: scores must be [n_images, n_pleasant + n_unpleasant] with "
                         f"0 < n_pleasant={n_pleasant} < {s.shape[-1] if s.ndim else 0}")
    return s[:, :n_pleasant].mean(1) - s[:, n_pleasant:].mean(1)


def effect_size(phi_x, phi_y) -> float:
    """(mean phi_X - mean phi_Y) / std(phi_X u phi_Y), population std (ddof 0, numpy's default as in
    the original).  Positive: bias towards X.  (The original's Buddhist-Hindu and Buddhist-Jewish
    lines divide by the std of the Christian group's union instead; we use each pair's own union.)"""
    x = np.asarray(phi_x, dtype=np.float64).ravel()
    y = np.asarray(phi_y, dtype=np.float64).ravel()
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"effect_size: empty group ({len(x)} and {len(y)} values)")
    sd = np.concatenate([x, y]).std()
    if sd == 0:
        raise ValueError("effect_size: all phi values are equal (zero spread); the effect size is undefined")
    return float((x.mean() - y.mean()) / sd)


def mmbias_effect_sizes(phi_by_group: dict, pairs=None) -> dict:
    """Effect sizes "X-Y" for every pair (default :data:`MMBIAS_PAIRS`) whose groups are present."""
    pairs = MMBIAS_PAIRS if pairs is None else pairs
    return {f"{x}-{y}": effect_size(phi_by_group[x], phi_by_group[y])
            for x, y in pairs if x in phi_by_group and y in phi_by_group}


def gender_effect_sizes(scores_male_word: dict, scores_female_word: dict) -> dict:
    """Gender bias per entity: phi(image) = s(image, male word) - s(image, female word);
    effect size between male and female images.  Inputs: ``{"male_clothes": [s...],
    "female_clothes": [...], ...}`` scores of each group's images with the male / female word."""
    out = {}
    for ent in GENDER_WORD_PAIRS:
        m, f = f"male_{ent}", f"female_{ent}"
        if m in scores_male_word and f in scores_male_word:
            phi_m = np.asarray(scores_male_word[m], float) - np.asarray(scores_female_word[m], float)
            phi_f = np.asarray(scores_male_word[f], float) - np.asarray(scores_female_word[f], float)
            out[ent] = effect_size(phi_m, phi_f)
    return out


# ------------------------------------------------------------------------------------------------
# adaptive evaluation (successive elimination)
# ------------------------------------------------------------------------------------------------
def visit_order(K: int) -> list:
    """Grid indices 0..K-1 in bit-reversed (van der Corput) order: every prefix is spread over the
    whole noise range (K=10: 0, 8, 4, 2, 6, 1, 9, 5, 3, 7)."""
    m = max(1, (K - 1).bit_length())
    return sorted(range(K), key=lambda i: int(format(i, f"0{m}b")[::-1], 2))


@dataclass
class AdaptivePolicy:
    """Successive elimination over the grid points of :func:`diffitm_distances`.

    Round 1 evaluates every candidate on the first ``n0`` grid points of :func:`visit_order`; each
    later round adds ``step`` points for the candidates still alive.  After each round a candidate
    j is dropped when its paired error difference to the current best b,
    Delta_k = d_k(j) - d_k(b) over the points seen, has mean > z * std / sqrt(n) (ddof 1).  It
    stops when one candidate is left or the grid is exhausted; survivors are ranked by
    - mean_k d_k over the points seen, dropped candidates score -inf.  ``z=inf`` never drops and
    reproduces the grid score.  ``max_points`` caps the points per candidate (default: all K).

    ``variance`` picks the standard error of mean(Delta):

    * ``"iid"``: std(Delta) / sqrt(n), as if the n points were independent draws (Diffusion
      Classifier's view of random timesteps);
    * ``"systematic"``: the points are not random draws but a stratified (van der Corput) subset
      of the K fixed grid points, and the target is the grid's own mean over all K.  Delta_k varies
      smoothly with t, and a systematic sample cancels that trend, so the iid formula overstates
      the error.  Here the variance comes from successive differences in t order,
      sum_i (Delta_(i+1) - Delta_(i))^2 / (2 (n - 1)) (Wolter's estimator for systematic
      samples), times the finite-population factor (1 - n / K).
    """

    n0: int = 4
    step: int = 4
    z: float = 2.0
    max_points: int | None = None
    variance: str = "iid"

    def __post_init__(self):
        if self.n0 < 2 or self.step < 1:
            raise ValueError(f"AdaptivePolicy: need n0 >= 2 (a spread estimate) and step >= 1, got "
                             f"n0={self.n0}, step={self.step}")
        if self.variance not in ("iid", "systematic"):
            raise ValueError(f"AdaptivePolicy: variance must be 'iid' or 'systematic', got "
                             f"{self.variance!r}")


class _Race:
    """Book-keeping of one item's elimination race (shared by the live and replayed versions)."""

    def __init__(self, n_cand: int, K: int, policy: AdaptivePolicy, cost: int):
        self.order = visit_order(K)[:policy.max_points or K]
        self.K = K
        self.policy, self.cost = policy, cost
        self.alive = list(range(n_cand))
        self.d = np.full((n_cand, len(self.order)), np.nan)
        self.n = 0
        self.evals = 0

    def request(self):
        """(alive candidates, new grid indices) or None when finished."""
        if len(self.alive) <= 1 or self.n >= len(self.order):
            return None
        m = self.policy.n0 if self.n == 0 else self.policy.step
        return list(self.alive), self.order[self.n:self.n + m]

    def update(self, dist):
        dist = np.asarray(dist, dtype=np.float64)
        m = dist.shape[1]
        self.d[self.alive, self.n:self.n + m] = dist
        self.n += m
        self.evals += self.cost * len(self.alive) * m
        mean = self.d[self.alive, :self.n].mean(1)
        best = self.alive[int(np.argmin(mean))]
        if not math.isfinite(self.policy.z) or self.n < 2:
            return
        keep = []
        for j in self.alive:
            diff = self.d[j, :self.n] - self.d[best, :self.n]
            if j == best or not diff.mean() > self.policy.z * self._se(diff):
                keep.append(j)
        self.alive = keep

    def _se(self, diff):
        n = len(diff)
        if self.policy.variance == "iid":
            return diff.std(ddof=1) / math.sqrt(n)
        by_t = diff[np.argsort(self.order[:n], kind="stable")]
        var = float(np.sum(np.diff(by_t) ** 2)) / (2 * (n - 1))
        return math.sqrt(var / n * max(0.0, 1.0 - n / self.K))

    def scores(self) -> np.ndarray:
        s = np.full(self.d.shape[0], -np.inf)
        s[self.alive] = -self.d[self.alive, :self.n].mean(1)
        return s


def _retrieval_shape(item, who):
    task = item.task
    if task == "group":
        raise ValueError(f"{who}: adaptive evaluation needs a retrieval item (one image or one "
                         f"caption), got {len(item.images)} images x {len(item.captions)} captions")
    return task


def _as_matrix(item, vec):
    v = torch.as_tensor(vec, dtype=torch.float64)
    return v.unsqueeze(0) if item.task == "text" else v.unsqueeze(1)


def adaptive_replay(items, dists, policy: AdaptivePolicy, img_retrieval: bool = False):
    """Run the elimination policy on precomputed grid distances (:func:`diffitm_distances`).

    Because the live version draws the same latents and the same bank[k] for grid point k, its
    distances are exactly these, so the replay returns exactly what :func:`adaptive_scores` returns
    (scores and evaluations), without spending UNet evaluations.  Returns (scores, evals per item).
    """
    scores, evals = [], []
    for it, d in zip(items, dists):
        task = _retrieval_shape(it, "adaptive_replay")
        D = (d[0] if task == "text" else d[:, 0]).double().numpy()      # [n_cand, K]
        race = _Race(D.shape[0], D.shape[1], policy, 2 if (task == "image" and img_retrieval) else 1)
        while (req := race.request()) is not None:
            alive, kidx = req
            race.update(D[np.ix_(alive, kidx)])
        scores.append(_as_matrix(it, race.scores()))
        evals.append(race.evals)
    return scores, evals


@dataclass
class AdaptiveResult:
    """Scores [I, J] per item (-inf for eliminated candidates), UNet evaluations per item (the
    count the policy spends; the unconditional error of an image costs one more per point), and
    grid points seen per item."""

    scores: list
    evals: list
    points: list = field(default_factory=list)


def adaptive_scores(model, items, S: int = 250, seed: int = 0, policy: AdaptivePolicy | None = None,
                    latent_mode: str = "mean", img_retrieval: bool = False,
                    batch_size: int | None = None, cache=None, progress: bool = True,
                    chunk: int = 64) -> AdaptiveResult:
    """Adaptive DiffusionITM (beyond the paper): score all candidates on a few grid points, drop the
    clear losers (:class:`AdaptivePolicy`), spend the remaining UNet evaluations on the close ones.

    Uses the same grid (S), bank and latents as :func:`diffitm_scores`, so with ``z=inf`` it returns
    the grid scores.  The items of a chunk race in lock-step: each round's requests of all items go
    to the UNet together.
    """
    items = _check_items(items, "adaptive_scores")
    for it in items:
        _retrieval_shape(it, "adaptive_scores")
    policy = policy or AdaptivePolicy()
    prep = _prepare(items)
    scorer = _Scorer(model, S, seed, latent_mode, batch_size)
    key = dict(version=SCORE_VERSION, model=model_fingerprint(model), S=int(S), seed=int(seed),
               latent_mode=latent_mode, img_retrieval=bool(img_retrieval), policy=vars(policy))
    rc = _make_cache(cache, "diffitm_adaptive", key)
    first = prep.first

    def fn(ids):
        its = [items[first[i]] for i in ids]
        kss = [prep.keys[first[i]] for i in ids]
        scorer.encode([k for ks in kss for k in ks], prep.refs)
        emb, row = _prompt_table(model, its)
        races = []
        for it, ks in zip(its, kss):
            img_task = it.task == "image"
            races.append(_Race(len(ks) if img_task else len(it.captions), scorer.K, policy,
                               2 if (img_task and img_retrieval) else 1))
        while True:
            reqs, owners = [], []
            for r, (race, it, ks) in enumerate(zip(races, its, kss)):
                q = race.request()
                if q is None:
                    continue
                alive, kidx = q
                if it.task == "text":
                    reqs.append((ks[0], [row[str(it.captions[j])] for j in alive], kidx))
                    owners.append((r, None))
                else:
                    cap = [row[str(it.captions[0])]] + ([row[""]] if img_retrieval else [])
                    for j in alive:
                        reqs.append((ks[j], cap, kidx))
                    owners.append((r, len(alive)))
            if not reqs:
                break
            res = scorer.run(reqs, emb)
            pos = 0
            for r, n_img in owners:
                if n_img is None:
                    races[r].update(res[pos].numpy())
                    pos += 1
                else:
                    rows = res[pos:pos + n_img]
                    pos += n_img
                    d = torch.stack([x[0] - x[1] if img_retrieval else x[0] for x in rows])
                    races[r].update(d.numpy())
        scorer.post.clear()
        return [{"scores": _as_matrix(it, race.scores()), "evals": race.evals,
                 "points": race.n} for it, race in zip(its, races)]

    got = map_cached(fn, list(first), rc, desc=f"adaptive DiffusionITM S={S}", progress=progress,
                     chunk=chunk)
    vals = [got[i] for i in prep.ids]
    return AdaptiveResult([v["scores"] for v in vals], [int(v["evals"]) for v in vals],
                          [int(v["points"]) for v in vals])


# ------------------------------------------------------------------------------------------------
# the original's loop structure (reference for parity tests and the benchmark)
# ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def original_loop_scores(model, items, S: int = 10, seed: int = 0, img_retrieval: bool = False,
                         batch_items: int = 1, progress: bool = False) -> list:
    """The original ``diffusion_itm.py`` loop, re-implemented for parity tests and benchmarks.

    For each batch of ``batch_items`` consecutive items of one shape (original ``--batchsize``,
    CLI default 4): a Python double loop over (caption index, image index); each (caption, image)
    call encodes the batch's prompts, then for every grid timestep re-encodes the images with the
    VAE (posterior mean here, for a deterministic reference), noises them with bank[k], and runs
    the UNet once (twice with ``img_retrieval``: conditional and unconditional).  Same score as
    :func:`diffitm_scores`, one UNet call per timestep per pair.
    """
    from tqdm.auto import tqdm

    items = _check_items(items, "original_loop_scores")
    grid = grid_timesteps(S)
    bank = NoiseBank(model.latent_shape, seed).draw(len(grid))
    dev, dt = model.device, model.dtype
    batches, cur = [], []
    for it in items:
        if cur and (len(cur) == batch_items or (len(it.images), len(it.captions)) !=
                    (len(cur[0].images), len(cur[0].captions))):
            batches.append(cur)
            cur = []
        cur.append(it)
    batches.append(cur)
    out = []
    for batch in tqdm(batches, disable=not progress, desc="original loop"):
        imgs = [it.images for it in batch]
        I, J = len(imgs[0]), len(batch[0].captions)
        s = torch.zeros(len(batch), I, J, dtype=torch.float64)
        for j in range(J):
            for i in range(I):
                emb = model.text_encoder(model.tokenize([it.captions[j] for it in batch])
                                         .input_ids.to(dev))[0]
                if img_retrieval:
                    emb0 = model.text_encoder(model.tokenize([""] * len(batch)).input_ids.to(dev))[0]
                x = model.preprocess([im[i] for im in imgs]).to(dev, dt)
                dists = []
                for k, t in enumerate(grid):
                    z0 = model.vae.encode(x).latent_dist.mean * model.scaling_factor
                    abar = model.alphas_cumprod[t].float()
                    eps = bank[k:k + 1].to(dev, dt)
                    zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
                    pred = model.unet(zt, t, encoder_hidden_states=emb).sample
                    d = (eps - pred).float().flatten(1).norm(dim=1)
                    if img_retrieval:
                        pred0 = model.unet(zt, t, encoder_hidden_states=emb0).sample
                        d = d - (eps - pred0).float().flatten(1).norm(dim=1)
                    dists.append(d.cpu())
                s[:, i, j] = -torch.stack(dists, 1).double().mean(1)
        out.extend(list(s))
    return out


# ------------------------------------------------------------------------------------------------
# GDBench: tasks in their published formats, one table of every method on every task
# ------------------------------------------------------------------------------------------------
#: GDBench task -> (reader kind, scoring task); the toy analogue of each is written by
#: :func:`export_toy_gdbench` through the same published-format writers.
GDBENCH_TASKS = {
    "VG-A": "aro_vg_attribution", "VG-R": "aro_vg_relation", "COCO-Order": "aro_order",
    "Flickr-Order": "aro_order", "Winoground": "winoground", "CLEVR": "clevr",
    "Classes": "class_pickles", "Flickr30K-img": "flickr30k_retrieval",
}


def export_toy_gdbench(root, n: int = 40, seed: int = 0) -> dict:
    """Write the toy analogues of the GDBench tasks under ``root/n{n}-s{seed}`` in the published
    formats (:mod:`t2i_common.toyexport`) and return ``{task: path}`` for :func:`read_gdbench`.
    A folder already exported with the same (n, seed) is reused."""
    import json
    from pathlib import Path

    from . import toyexport

    root = Path(root) / f"n{int(n)}-s{int(seed)}"
    stamp = root / "export.json"
    want = {"n": int(n), "seed": int(seed), "version": 1}
    paths = {
        "VG-A": root / "vg_attribution" / "visual_genome_attribution.json",
        "VG-R": root / "vg_relation" / "visual_genome_relation.json",
        "COCO-Order": root / "coco_order" / "coco_karpathy_test.json",
        "Flickr-Order": root / "flickr_order" / "flickr30k_test.json",
        "Winoground": root / "winoground" / "examples.jsonl",
        "CLEVR": root / "clevr",
        "Classes": root / "classes" / "*" / "*.pickle",
        "Flickr30K-img": root / "flickr30k" / "flickr30k_retrieval_toy.json",
    }
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return {k: str(v) for k, v in paths.items()}
    toyexport.export_aro_vg(root / "vg_attribution", n, seed, "attribution")
    toyexport.export_aro_vg(root / "vg_relation", n, seed, "relation")
    toyexport.export_aro_order(root / "coco_order", n, seed, "coco_order")
    toyexport.export_aro_order(root / "flickr_order", n, seed, "flickr_order")
    toyexport.export_winoground(root / "winoground", n, seed)
    toyexport.export_clevr(root / "clevr", n, seed)
    toyexport.export_implosion_classes(root / "classes", n, seed)
    toyexport.export_flickr_retrieval(root / "flickr30k", n, seed)
    stamp.write_text(json.dumps(want))
    return {k: str(v) for k, v in paths.items()}


def class_prompt_items(pairs) -> list:
    """Zero-shot classification (Pets / ImageNet in GDBench) as text retrieval: each image against
    every distinct class prompt (sorted), gold = its own prompt.  ``pairs``: (path, image, text)
    from :func:`t2i_common.formats.read_implosion_pickles` (class subfolders)."""
    from .formats import MatchItem

    pairs = list(pairs)
    prompts = sorted({t for _, _, t in pairs})
    if len(prompts) < 2:
        raise ValueError(f"class_prompt_items: need at least two classes, got {prompts}")
    return [MatchItem([img], prompts, 0, prompts.index(t), {"path": str(p), "class_prompt": t})
            for p, img, t in pairs]


def read_gdbench(paths: dict, max_items: int | None = None) -> dict:
    """Read GDBench tasks with the published-format readers: ``{task: path}`` (task names of
    :data:`GDBENCH_TASKS`; a path may be a mapping ``{"path": ..., **reader kwargs}``, e.g.
    ``image_root`` for Flickr30K) -> ``{task name: [MatchItem]}``; CLEVR is split into one task per
    subtask ("CLEVR/spatial", ...).  ``max_items`` keeps the first items of each task."""
    from . import formats

    out = {}
    for task, path in paths.items():
        kind = GDBENCH_TASKS.get(task)
        if kind is None:
            raise KeyError(f"read_gdbench: unknown task {task!r}; known: {sorted(GDBENCH_TASKS)}")
        kw = {}
        if isinstance(path, dict):   # {"path": ..., reader keyword arguments (image_root, ...)}
            kw = dict(path)
            if "path" not in kw:
                raise KeyError(f"read_gdbench: task {task!r} is given as a mapping without 'path': {path}")
            path = kw.pop("path")
        if kind == "aro_vg_attribution":
            got = {task: formats.read_aro_vg(path, "attribution", **kw)}
        elif kind == "aro_vg_relation":
            got = {task: formats.read_aro_vg(path, "relation", **kw)}
        elif kind == "aro_order":
            got = {task: formats.read_aro_order(path, task="coco_order" if task == "COCO-Order"
                                                else "flickr_order", **kw)}
        elif kind == "winoground":
            got = {task: formats.read_winoground(path, **kw)}
        elif kind == "clevr":
            got = {}
            for it in formats.read_clevr(path, **kw):
                got.setdefault(f"CLEVR/{it.meta['subtask']}", []).append(it)
        elif kind == "class_pickles":
            got = {task: class_prompt_items(formats.read_implosion_pickles(path))}
        else:
            got = {task: formats.read_flickr30k_retrieval(path, **kw)}
        out.update({k: v[:max_items] for k, v in got.items()})
    return out


def select_tasks(paths: dict, names, max_items: int | None = None) -> dict:
    """Read only the named tasks (``"CLEVR/<subtask>"`` names select one CLEVR subtask)."""
    base = {n.split("/")[0] for n in names}
    missing = base - set(paths)
    if missing:
        raise KeyError(f"select_tasks: no path for {sorted(missing)}; paths has {sorted(paths)}")
    got = read_gdbench({b: paths[b] for b in base}, max_items=max_items)
    absent = [n for n in names if n not in got]
    if absent:
        raise KeyError(f"select_tasks: {absent} not found; available {sorted(got)}")
    return {n: got[n] for n in names}


def diffitm_method(model, S: int = 10, seed: int = 0, latent_mode: str = "mean", cache=None,
                   batch_size: int | None = None, progress: bool = True):
    """A scoring function ``(items, img_retrieval) -> scores`` for :func:`gdbench_table`."""
    def score(items, img_retrieval):
        return diffitm_scores(model, items, S=S, seed=seed, latent_mode=latent_mode,
                              img_retrieval=img_retrieval, batch_size=batch_size, cache=cache,
                              progress=progress)
    return score


def clip_method(clip):
    """CLIP cosine scores as a ``(items, img_retrieval) -> scores`` function (no normalisation)."""
    return lambda items, img_retrieval: clip_scores(clip, items)


def task_metrics(items, scores) -> dict:
    """The task's metrics: Winoground text/image/group for 2 x 2 items, otherwise accuracy
    (strict: a tie at the top is a miss), accuracy_first (the original's np.argmax: the first
    maximal candidate wins, which favours a gold listed first), the number of tied items, and R@5
    when there are more than 5 candidates (see :func:`retrieval_metrics`)."""
    if all(it.task == "group" for it in items):
        m = winoground_metrics(scores)
        return {"text": m["text"], "image": m["image"], "group": m["group"]}
    m = retrieval_metrics(items, scores, ks=(5,))
    out = {"accuracy": m["accuracy"], "accuracy_first": m["accuracy_first"], "ties": m["ties"]}
    if "R@5" in m:
        out["R@5"] = m["R@5"]
    return out


def chance_metrics(items) -> dict:
    """Expected metrics of uniformly random scores: accuracy = mean 1/n_candidates, R@5 = mean
    min(1, 5/n); Winoground text = image = 1/4, group = 1/6."""
    if all(it.task == "group" for it in items):
        return {"text": 0.25, "image": 0.25, "group": 1 / 6}
    n = np.array([len(it.captions) if it.task == "text" else len(it.images) for it in items], float)
    out = {"accuracy": float(np.mean(1 / n)), "accuracy_first": float(np.mean(1 / n))}
    if n.min() > 5:
        out["R@5"] = float(np.mean(np.minimum(1.0, 5 / n)))
    return out


def gdbench_table(tasks: dict, methods: dict, chance: bool = True, progress: bool = True):
    """One row per (task, metric), one column per method, plus ``chance`` and n.  Image-retrieval
    tasks are scored with ``img_retrieval=True`` (the original's flag for Flickr30K / ImageCoDe /
    SVO).  Accuracies are micro averages (DiffusionITM's convention, not ARO's macro one)."""
    import pandas as pd
    from tqdm.auto import tqdm

    rows = {}
    for task, items in tqdm(list(tasks.items()), desc="GDBench tasks", disable=not progress):
        img_ret = all(it.task == "image" for it in items)
        for name, fn in methods.items():
            for metric, v in task_metrics(items, fn(items, img_ret)).items():
                rows.setdefault((task, metric), {"n": len(items)})[name] = v
        if chance:
            for metric, v in chance_metrics(items).items():
                rows[(task, metric)]["chance"] = v
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index = pd.MultiIndex.from_tuples(df.index, names=["task", "metric"])
    return df[list(methods) + (["chance"] if chance else []) + ["n"]]


def grid_curve(model, items, S_values, seed: int = 0, img_retrieval: bool = False, cache=None,
               progress: bool = True):
    """Accuracy of the grid score against S (sampling steps): one row per S with the grid size K,
    UNet evaluations per example (:func:`grid_evaluations`), accuracy and ties."""
    import pandas as pd

    rows = []
    for S in S_values:
        s = diffitm_scores(model, items, S=S, seed=seed, img_retrieval=img_retrieval, cache=cache,
                           progress=progress)
        m = retrieval_metrics(items, s)
        rows.append({"S": int(S), "K": len(grid_timesteps(S)),
                     "evals_per_example": grid_evaluations(items, S, img_retrieval) / len(items),
                     "accuracy": m["accuracy"], "ties": m["ties"]})
    return pd.DataFrame(rows)


def policy_sweep(n0s=(2, 4, 8), steps=(2, 4, 8), zs=(0.5, 1.0, 1.5, 2.0, 3.0),
                 max_points=(None, 24), variances=("iid", "systematic")) -> list:
    """The :class:`AdaptivePolicy` grid used by the sampling-budget study, plus the full grid
    (z = inf, which never eliminates) as the reference row."""
    return [AdaptivePolicy(n0=a, step=b, z=z, max_points=m, variance=v)
            for v in variances for a in n0s for b in steps for z in zs for m in max_points] + \
        [AdaptivePolicy(n0=2, step=2, z=math.inf)]


def adaptive_curve(items, dists, policies, img_retrieval: bool = False):
    """Accuracy and UNet evaluations of each policy, replayed on grid distances (exact; see
    :func:`adaptive_replay`).  ``fraction_of_grid`` = evaluations / the full grid's;
    ``agreement`` = fraction of items whose pick (first of the top-scored candidates) is the full
    grid's pick, a less noisy measure of "matches the grid" than equal accuracy."""
    import pandas as pd

    K = dists[0].shape[-1]
    full = sum(len(it.images) * (len(it.captions) + int(img_retrieval)) * K for it in items)
    grid_sc, _ = adaptive_replay(items, dists, AdaptivePolicy(n0=2, step=2, z=math.inf), img_retrieval)
    grid_pick = [int(np.argmax(candidate_scores(it, s)[0])) for it, s in zip(items, grid_sc)]
    rows = []
    for pol in policies:
        sc, ev = adaptive_replay(items, dists, pol, img_retrieval)
        m = retrieval_metrics(items, sc)
        agree = np.mean([int(np.argmax(candidate_scores(it, s)[0])) == g
                         for it, s, g in zip(items, sc, grid_pick)])
        rows.append({"n0": pol.n0, "step": pol.step, "z": pol.z, "max_points": pol.max_points,
                     "variance": pol.variance,
                     "evals_per_example": sum(ev) / len(items), "fraction_of_grid": sum(ev) / full,
                     "accuracy": m["accuracy"], "ties": m["ties"], "agreement": float(agree)})
    return pd.DataFrame(rows)


def cheapest_matching(curve, target_accuracy: float):
    """Row of ``curve`` with the fewest evaluations whose accuracy >= ``target_accuracy`` (None if
    no row reaches it)."""
    ok = curve[curve["accuracy"] >= target_accuracy - 1e-12]
    return None if ok.empty else ok.sort_values("evals_per_example").iloc[0]


def before_after(before, after):
    """Join two one-method GDBench tables: columns before, after, delta (after - before), chance, n."""
    b, a = before.columns[0], after.columns[0]
    out = before[[b]].join(after[[a]], how="inner")
    out["delta"] = out[a] - out[b]
    for c in ("chance", "n"):
        if c in before:
            out[c] = before[c]
    return out


def budget_summary(grid, adaptive, S_big: int = 250, default: AdaptivePolicy | None = None,
                   calibration=None):
    """Per task: the S_big grid's accuracy and evaluations per example, the smallest grid S that
    reaches it, the default policy's accuracy / evaluations / fraction of the grid and, with
    ``calibration`` (an :func:`adaptive_curve` on *other* items of the task, including the z=inf
    row = the grid), the policy picked there as the cheapest reaching the calibration items' grid
    accuracy, evaluated on these items.  ``best_*`` is the cheapest policy reaching the grid
    accuracy picked on these very items (optimistic: selected on the test items)."""
    import pandas as pd

    default = default or AdaptivePolicy()

    def row_of(curve, n0, step, z, mp, var="iid"):
        same_mp = curve.max_points.isna() if mp is None or mp != mp else curve.max_points == mp
        same_var = curve.variance == var if "variance" in curve else var == "iid"
        r = curve[(curve.n0 == n0) & (curve.step == step) & (curve.z == z) & same_mp & same_var]
        if r.empty:
            raise ValueError(f"budget_summary: policy n0={n0}, step={step}, z={z}, max_points={mp}, variance={var} "
                             f"is not in the sweep")
        return r.iloc[0]

    def name(r):
        mp = "" if r.max_points is None or r.max_points != r.max_points else f",max={int(r.max_points)}"
        var = ",systematic" if r.get("variance", "iid") == "systematic" else ""
        return f"n0={int(r.n0)},step={int(r.step)},z={r.z:g}{mp}{var}"

    rows = {}
    for task in grid["task"].unique():
        g, a = grid[grid.task == task], adaptive[adaptive.task == task]
        top = g[g.S == S_big].iloc[0]
        ok = g[g.accuracy >= top.accuracy - 1e-12].sort_values("evals_per_example").iloc[0]
        d = row_of(a, default.n0, default.step, default.z, default.max_points, default.variance)
        r = {"grid_accuracy": top.accuracy, "grid_evals": top.evals_per_example,
             "smallest_S_matching": int(ok.S), "smallest_S_evals": ok.evals_per_example,
             "default_accuracy": d.accuracy, "default_evals": d.evals_per_example,
             "default_fraction": d.fraction_of_grid,
             "default_agreement": d.get("agreement", float("nan"))}
        if calibration is not None:
            c = calibration[calibration.task == task]
            target = c[~np.isfinite(c.z)].accuracy.iloc[0]
            pick = cheapest_matching(c[np.isfinite(c.z)], target)
            if pick is not None:
                t = row_of(a, pick.n0, pick.step, pick.z, pick.max_points, pick.get("variance", "iid"))
                r.update({"calibrated_policy": name(pick),
                          "calibrated_accuracy": t.accuracy, "calibrated_evals": t.evals_per_example,
                          "calibrated_fraction": t.fraction_of_grid,
                          "calibrated_agreement": t.get("agreement", float("nan"))})
        best = cheapest_matching(a[np.isfinite(a.z)], top.accuracy)
        if best is not None:
            r.update({"best_policy": name(best),
                      "best_evals": best.evals_per_example, "best_fraction": best.fraction_of_grid})
        rows[task] = r
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("task")


def live_vs_replay(items, live: AdaptiveResult, dists, policy: AdaptivePolicy,
                   img_retrieval: bool = False, atol: float = 1e-5) -> dict:
    """Does a live adaptive run equal its replay on the grid distances (scores to ``atol``,
    eliminated candidates and evaluation counts exactly)?"""
    sc, ev = adaptive_replay(items, dists, policy, img_retrieval)
    same = all(torch.equal(torch.isinf(a), torch.isinf(b)) and
               torch.allclose(a[~torch.isinf(a)], b[~torch.isinf(b)], atol=atol, rtol=0)
               for a, b in zip(live.scores, sc))
    return {"same_scores": bool(same), "same_evals": live.evals == ev,
            "live_evals": int(sum(live.evals)), "replay_evals": int(sum(ev))}


def table_results(df, prefix: str = "") -> dict:
    """Every cell of a (task, metric) x method table as ``{"prefix/task/metric/method": value}``."""
    out = {}
    for (task, metric), row in df.iterrows():
        for col, v in row.items():
            out[f"{prefix}{task}/{metric}/{col}"] = None if v != v else float(v)
    return out
