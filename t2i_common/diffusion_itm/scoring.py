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
- z0, ``latent_mode`` (:data:`LATENT_MODES`):
  ``"mean"`` (default): the VAE posterior mean, deterministic; every candidate is compared on the
  same latents.
  ``"sample"``: one posterior sample per (image, grid point), shared by every caption scored
  against that image, so candidates still see the same latents (NOT the original's behaviour).
  ``"sample_per_call"``: the original's behaviour, for parity: its img2img pipeline is called once
  per (caption, image) and draws a fresh posterior sample at every timestep, so each candidate is
  scored on latents of its own; here the draw of (image, caption text, grid point k) is draw k of
  a seeded stream of that (image, caption) pair, so it does not depend on the batching, and the
  unconditional error of image retrieval uses the call's own latents, as the original's call does.
  Both sample modes draw the posterior noise from ``seed``; candidates share the noise bank eps_k
  in every mode.
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
import inspect
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import ResultCache, fingerprint
from ..distributed import MapStats, complete, shard_ids, share
from ..engine import NoiseBank, auto_batch_size, denoise_errors, grid_timesteps
from ..formats import to_pil as load
from ..keys import image_key, model_fingerprint

SCORE_VERSION = "diffitm-2"   # 2: per-(image, caption) posterior streams, per-item cache writes


# ------------------------------------------------------------------------------------------------
# identities: images, items, models
# ------------------------------------------------------------------------------------------------
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
    return load(ref)


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------
#: Work is cut into slices of this many UNet batches (whole (image, caption) requests, in item
#: order), and every item is saved the moment its last slice is done, so a kill loses only the items
#: of the slice in progress: one item at the paper's S = 250 (490 evaluations per two-caption item
#: exceed a slice on CPU), a few toy items at S = 10.  One batch per slice costs the toy scorer
#: 15-30 % of its throughput (part-filled batches and a call per slice); four cost a few per cent.
SLICE_BATCHES = 4

#: ``latent_mode`` -> what z0 is (see the module docstring)
LATENT_MODES = {
    "mean": "the VAE posterior mean of each image (deterministic; default)",
    "sample": "one posterior sample per (image, grid point), shared by every caption of the image",
    "sample_per_call": "a fresh posterior sample per (image, caption, grid point), as the original's "
                       "img2img call per (caption, image) draws one at every timestep",
}


def check_S(S, who: str = "DiffusionITM") -> int:
    """``S`` (sampling_steps) as a positive int; a non-integer (10.5) is an error, not rounded: the
    grid ``range(10, 990, int(1000 / S))`` of 10.5 has 11 points, that of 10 has 10."""
    if isinstance(S, bool) or not isinstance(S, numbers.Real) or \
            (not isinstance(S, numbers.Integral) and not float(S).is_integer()) or S < 1:
        raise ValueError(f"{who}: S (sampling_steps) must be a positive integer, got {S!r}; "
                         f"pass a whole number such as S=10 (grid range(10, 990, 1000 // S))")
    return int(S)


def _check_chunk(chunk, who: str) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"{who}: chunk must be a positive integer (items scored together), got "
                         f"{chunk!r}; pass e.g. chunk=32")
    return int(chunk)


# ------------------------------------------------------------------------------------------------
# the distance engine: requests (image, prompts, grid points) -> L2 errors
# ------------------------------------------------------------------------------------------------
class _Scorer:
    """Holds the shared noise bank, the grid and the per-image posteriors of one scoring call."""

    def __init__(self, model, S, seed, latent_mode, batch_size):
        if latent_mode not in LATENT_MODES:
            raise ValueError("latent_mode must be one of " +
                             "; ".join(f"{k!r} ({v})" for k, v in LATENT_MODES.items()) +
                             f", got {latent_mode!r}")
        self.model, self.seed, self.mode, self.batch_size = model, int(seed), latent_mode, batch_size
        self.grid = grid_timesteps(check_S(S))
        self.K = len(self.grid)
        self.bank = NoiseBank(model.latent_shape, seed).draw(self.K)   # bank[k] <-> grid point k
        self.post: dict[str, tuple] = {}
        self.unet_evals = 0
        self.vae_images = 0

    def slice_evals(self) -> int:
        """UNet evaluations per slice of work between two chances to save finished items:
        :data:`SLICE_BATCHES` UNet batches."""
        return SLICE_BATCHES * int(self.batch_size or auto_batch_size(self.model))

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

    def forget(self, keep=()):
        """Drop the posteriors of images not in ``keep`` (memory stays bounded on large benchmarks)."""
        keep = set(keep)
        for k in [k for k in self.post if k not in keep]:
            del self.post[k]

    def latent_draws(self, key, kidx, caption=None):
        """[len(kidx), C, h, w] posterior samples of image ``key`` at grid points ``kidx``.

        Draw k of a seeded stream of its own: per image in ``sample`` mode, per (image, caption
        text) in ``sample_per_call`` mode, so a draw never depends on the batching or on which
        other items are scored, and identical caption strings get identical draws."""
        mean, std = self.post[key]
        tag = key if caption is None else key + "\x00" + caption
        stream = 1 + int(hashlib.sha1(tag.encode()).hexdigest()[:12], 16)
        eps = NoiseBank(self.model.latent_shape, self.seed).draw(self.K, stream=stream)[kidx]
        return mean.unsqueeze(0) + std.unsqueeze(0) * eps

    def run(self, requests, emb):
        """requests: (image key, prompt rows [P] into ``emb``, grid indices [n], caption) tuples; the
        caption names the call's posterior stream in ``sample_per_call`` mode (None otherwise).
        Returns one [P, n] float tensor of L2 errors per request.  Requests with the same (P, n)
        go to the UNet together; in ``mean`` mode a group whose requests share their grid indices
        uses the shared bank directly."""
        out = [None] * len(requests)
        groups: dict = {}
        for r, req in enumerate(requests):
            groups.setdefault((len(req[1]), len(req[2])), []).append(r)
        for (P, n), rs in groups.items():
            cond = torch.tensor([list(requests[r][1]) for r in rs], dtype=torch.long)
            kid = torch.tensor([list(requests[r][2]) for r in rs], dtype=torch.long)   # [B, n]
            self.unet_evals += len(rs) * P * n
            if self.mode != "mean":   # one latent per (request, timestep): a row per pair
                z = torch.cat([self.latent_draws(requests[r][0], kid[b], requests[r][3])
                               for b, r in enumerate(rs)])
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


def _grid_items(scorer, items, keys, refs, img_retrieval, need=None):
    """Yield (n, d [I, J, K]) for item n of ``items`` as soon as its last evaluation is done.

    Every (image, distinct caption string) pair of the chunk is evaluated once on all K grid
    points (one (image, caption) call per pair in ``sample_per_call`` mode, whose unconditional
    error for image retrieval uses the call's own latents), so identical captions tie by
    construction.  Work runs in slices of :data:`SLICE_BATCHES` UNet batches, in item order; the
    slices are cut from the requests of all ``items``, and with ``need`` (positions of the items
    to compute) a slice holding no request of a needed item is skipped, so every computed request
    sits in the same UNet batch as in a run over all items."""
    scorer.encode([k for ks in keys for k in ks], refs)
    emb, row = _prompt_table(scorer.model, items)
    per_call = scorer.mode == "sample_per_call"
    allk = list(range(scorer.K))
    uncond = [""] if img_retrieval else []
    requests, texts, last, seen, uses = [], [], [], {}, []
    for it, ks in zip(items, keys):
        caps = list(dict.fromkeys(str(c) for c in it.captions))
        used = set()
        for k in ks:
            if per_call:
                for c in caps:
                    if (k, c) not in seen:
                        seen[(k, c)] = len(requests)
                        requests.append((k, [row[t] for t in [c] + uncond], allk, c))
                        texts.append([c] + uncond)
                    used.add(seen[(k, c)])
            else:
                have = seen.setdefault((k, None), {})
                new = [c for c in caps + uncond if c not in have]
                if new:
                    have.update({c: len(requests) for c in new})
                    requests.append((k, [row[c] for c in new], allk, None))
                    texts.append(new)
                used.update(have[c] for c in caps + uncond)
        uses.append(used)
        last.append(len(requests))
    wanted = set(range(len(items))) if need is None else set(need)
    needed = set().union(*[uses[n] for n in wanted]) if wanted else set()
    l2: dict = {}

    def assemble(it, ks):
        d = []
        for k in ks:
            rows = []
            for c in (str(c) for c in it.captions):
                got = l2[(k, c if per_call else None)]
                rows.append(got[c] - got[""] if img_retrieval else got[c])
            d.append(torch.stack(rows))
        return torch.stack(d)   # [I, J, K]

    done, nxt, step = 0, 0, scorer.slice_evals()
    while nxt < len(items):
        while nxt < len(items) and last[nxt] <= done:
            if nxt in wanted:
                yield nxt, assemble(items[nxt], keys[nxt])
            nxt += 1
        if nxt == len(items):
            break
        end, evals = done, 0
        while end < len(requests) and (end == done or evals + len(requests[end][1]) * scorer.K <= step):
            evals += len(requests[end][1]) * scorer.K
            end += 1
        if needed.intersection(range(done, end)):   # slices of finished items only are skipped
            for req, txt, res in zip(requests[done:end], texts[done:end],
                                     scorer.run(requests[done:end], emb)):
                l2.setdefault((req[0], req[3]), {}).update({c: res[p] for p, c in enumerate(txt)})
        done = end


def _make_cache(cache, namespace, key):
    if cache is None or cache is False:
        return None
    if isinstance(cache, ResultCache):
        return cache
    root = None if cache is True else cache
    return ResultCache(namespace, key, root=root)


def cached_items(gen, ids, rc, check, desc: str, progress: bool = True, chunk: int = 32,
                 shard=None, split: int | None = None, blank=None) -> dict:
    """``{id: value}`` over ``ids``: finished ids are read from the cache ``rc`` (an entry that
    fails ``check(id, value)`` -- which returns a problem or None -- is recomputed with a warning,
    never returned), the rest are computed by ``gen(list of ids)``, a generator of (id, value)
    pairs, ``chunk`` ids per call; each value is saved the moment it is yielded, so a kill loses
    only the items whose evaluations were in progress.  A ``gen(ids, need)`` is called on fixed
    chunks of ``chunk`` consecutive ids (by position, whatever is cached) and computes only the
    ``need`` ids, in the batches an uninterrupted run gives them, so a resumed run is
    bit-identical to an uninterrupted one.

    ``shard``: ``(i, n)``, ``accelerate launch`` or ``T2I_SHARD`` (:mod:`t2i_common.distributed`):
    this process computes only its share (groups of ``split`` ids, default ``chunk``, round robin,
    so a chunk is the same batch as in a one-process run) and the rest comes from the cache
    (``blank(id)`` placeholders where another array-job shard has not written it yet)."""
    sh, all_ids = share(ids, rc, shard, desc)
    ids = shard_ids(all_ids, sh, split or chunk)
    out, pending = {}, []
    for i in ids:
        if rc is not None and rc.has(i):
            v = rc.load(i)
            problem = check(i, v)
            if problem is None:
                out[i] = v
                continue
            warnings.warn(f"{desc}: cache entry {rc._file(i)} is not a result of this call "
                          f"({problem}); recomputing it")
        pending.append(i)
    wanted = set(pending)
    fixed = "need" in inspect.signature(gen).parameters
    with tqdm(total=len(ids), initial=len(ids) - len(pending), desc=desc, disable=not progress) as bar:
        # ``gen(part, need)``: fixed chunks of ``ids`` by position, of which only the ``need`` ids
        # are computed, in the batches an uninterrupted run gives them (bit-identical resume)
        for s in range(0, len(ids) if fixed else len(pending), chunk):
            part = ids[s:s + chunk] if fixed else pending[s:s + chunk]
            need = wanted.intersection(part)
            if not need:
                continue
            for i, v in (gen(part, need=need) if fixed else gen(part)):
                if i not in wanted:
                    continue
                if rc is not None:
                    rc.save(i, v)
                out[i] = v
                bar.update(1)
            missing = [i for i in need if i not in out]
            if missing:
                raise RuntimeError(f"{desc}: no result for {len(missing)} of {len(part)} items")
    stats = MapStats(sh, total=len(all_ids), mine=len(ids), computed=len(pending),
                     reused=len(ids) - len(pending))
    return complete(all_ids, rc, out, sh, stats, desc=desc, blank=blank)


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
                      progress: bool = True, chunk: int = 32, shard=None) -> ITMDistances:
    """Per-timestep DiffusionITM distances d_k for every (image, caption) of every item.

    Args:
        model: a :class:`~t2i_common.models.T2IModel`.
        items: MatchItems; any numbers of images and captions.
        S: ``sampling_steps`` (a positive integer); grid ``range(10, 990, 1000 // S)``.
        seed: seed of the shared noise bank (and of the posterior samples in the sample modes).
        latent_mode: what z0 is (:data:`LATENT_MODES`): "mean" (default), "sample" (one posterior
            sample per (image, grid point), shared by the captions), "sample_per_call" (a fresh
            sample per (image, caption, grid point): the original's behaviour, for parity).
        img_retrieval: subtract the unconditional error (original ``--img_retrieval``).
        batch_size: UNet evaluations per batch (default: engine.auto_batch_size).
        cache: None (off), True (``paths.CACHE/diffitm``), a folder, or a ResultCache; keyed by the
            model's weights fingerprint and every scoring parameter, one file per item, written as
            soon as the item's evaluations are done (a kill loses only the items of the slice in
            progress, :data:`SLICE_BATCHES`); a resumed run reruns exactly the slices that hold
            unfinished items, in the same UNet batches, so its result is bit-identical to an
            uninterrupted run's.
        chunk: items scored together (images / prompts shared inside a chunk are evaluated once).
        shard: ``(i, n)`` scores shard i of n of the chunks (cluster array jobs; ``accelerate
            launch`` and the runner's ``--shard`` are detected by themselves), see
            :mod:`t2i_common.distributed`; needs ``cache``.  The result does not depend on n.
    """
    items = _check_items(items, "diffitm_distances")
    S = check_S(S, "diffitm_distances")
    chunk = _check_chunk(chunk, "diffitm_distances")
    prep = _prepare(items)
    scorer = _Scorer(model, S, seed, latent_mode, batch_size)
    key = dict(version=SCORE_VERSION, model=model_fingerprint(model), S=S, seed=int(seed),
               latent_mode=latent_mode, img_retrieval=bool(img_retrieval))
    rc = _make_cache(cache, "diffitm", key)
    first = prep.first

    def gen(ids, need=None):
        its = [items[first[i]] for i in ids]
        ks = [prep.keys[first[i]] for i in ids]
        pos = None if need is None else [n for n, i in enumerate(ids) if i in need]
        for n, d in _grid_items(scorer, its, ks, prep.refs, img_retrieval, need=pos):
            yield ids[n], d.float()
        scorer.forget()

    def check(i, v):
        it = items[first[i]]
        want = (len(it.images), len(it.captions), scorer.K)
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != want:
            return f"expected a tensor of shape {want}, found {getattr(v, 'shape', type(v).__name__)}"
        return None

    def blank(i):
        it = items[first[i]]
        return torch.full((len(it.images), len(it.captions), scorer.K), float("nan"))

    got = cached_items(gen, list(first), rc, check, desc=f"DiffusionITM S={S}", progress=progress,
                       chunk=chunk, shard=shard, blank=blank)
    return ITMDistances([got[i] for i in prep.ids], scorer.grid, scorer.unet_evals, scorer.vae_images)


def diffitm_scores(model, items, S: int = 10, seed: int = 0, latent_mode: str = "mean",
                   img_retrieval: bool = False, batch_size: int | None = None, cache=None,
                   progress: bool = True, shard=None) -> list:
    """DiffusionITM scores s(x, c) = - mean_k ||eps_k - eps_theta(z_{t_k}, t_k, c)||_2 per item,
    float64 [n_images, n_captions] (see the module docstring and :func:`diffitm_distances`)."""
    return diffitm_distances(model, items, S=S, seed=seed, latent_mode=latent_mode,
                             img_retrieval=img_retrieval, batch_size=batch_size, cache=cache,
                             progress=progress, shard=shard).scores()


def grid_evaluations(items, S: int, img_retrieval: bool = False) -> int:
    """UNet evaluations of the grid score without de-duplication: I*J*K per item (+ I*K for the
    unconditional error in image retrieval)."""
    K = len(grid_timesteps(check_S(S, "grid_evaluations")))
    return sum(len(it.images) * (len(it.captions) + int(img_retrieval)) * K for it in items)

# ------------------------------------------------------------------------------------------------
# CLIP baseline
# ------------------------------------------------------------------------------------------------
def clip_scores(clip, items, progress: bool = False) -> list:
    """CLIP / OpenCLIP cosine similarity s[i, j] = <f(image i), g(caption j)> on the same items
    (``clip`` from :func:`t2i_common.models.load_clip`); each distinct image and caption embedded
    once, and each distinct caption string of an item scored once (its column is copied to the
    string's repeats), so identical captions tie exactly.  float64 [n_images, n_captions] per item."""
    items = _check_items(items, "clip_scores")
    prep = _prepare(items)
    ukeys = list(prep.refs)
    img = torch.cat([clip.encode_images([_load(prep.refs[k]) for k in ukeys[i:i + 256]])
                     for i in range(0, len(ukeys), 256)]).double()   # 256 decoded images at a time
    irow = {k: i for i, k in enumerate(ukeys)}
    texts = list(dict.fromkeys(str(c) for it in items for c in it.captions))
    txt = clip.encode_texts(texts, progress=progress).double()
    trow = {c: i for i, c in enumerate(texts)}
    out = []
    for it, ks in zip(items, prep.keys):
        caps = [str(c) for c in it.captions]
        distinct = list(dict.fromkeys(caps))
        s = img[[irow[k] for k in ks]] @ txt[[trow[c] for c in distinct]].T
        out.append(s[:, [distinct.index(c) for c in caps]])
    return out


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
                    pred = model.eps(zt, t, emb)   # = the UNet output on eps models
                    d = (eps - pred).float().flatten(1).norm(dim=1)
                    if img_retrieval:
                        pred0 = model.eps(zt, t, emb0)
                        d = d - (eps - pred0).float().flatten(1).norm(dim=1)
                    dists.append(d.cpu())
                s[:, i, j] = -torch.stack(dists, 1).double().mean(1)
        out.extend(list(s))
    return out
