"""DiffusionITM scoring: image-text matching with a text-to-image diffusion model (Krojer et al., NeurIPS '23).

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
from dataclasses import dataclass

import numpy as np
import torch

from .cache import ResultCache, fingerprint, map_cached
from .engine import NoiseBank, denoise_errors, grid_timesteps
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
