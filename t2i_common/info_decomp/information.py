"""Information decomposition from denoising errors (Kong et al., "Interpretable Diffusion via
Information Decomposition", ICLR 2024).

The pointwise ("orthogonal") mutual information between an image x and a text y is

    i(x; y) = 1/2 * int E_eps || eps_a(x_a) - eps_a(x_a | y) ||^2 da          (paper Eq. 7)

with eps_a(x_a) the prediction under the empty prompt; replacing the empty prompt by a context c
(the caption without one word) gives the conditional MI i(x; y | c).  The "standard" estimator is
1/2 int E[ ||eps - eps_a(x_a | c)||^2 - ||eps - eps_a(x_a | y)||^2 ] da.  Summing the squared
differences over channels only gives a per-pixel map (where in the image the word carries bits).

The integral over logSNR a is estimated by importance sampling (:class:`Integration`): one
(a_k, eps_k) pair per sample k, shared by every condition of the same image (all conditions of an
image at one noise level run in one UNet batch through :func:`t2i_common.engine.denoise_errors`).
The UNet receives the nearest discrete timestep ``model.logsnr_to_t(a)``; the latent is noised
with sqrt(sigmoid(a)), sqrt(sigmoid(-a)) exactly.

This module also holds the evaluation protocols of the paper: ARO retrieval by i(x; caption),
localisation mIoU over thresholds and Pearson correlations with bootstrap error bars.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import formats
from ..cache import ResultCache, fingerprint
from ..distributed import sharded_map
from ..engine import NoiseBank, denoise_errors
from ..formats import aro_accuracy, candidate_scores
from ..keys import image_key, model_fingerprint
from ..toyworld import export as toyexport

#: Defaults of the original MI code: loc 1, scale 2 and clip 4 (its MI functions never pass the
#: CLI ``--clip 3.0`` on, so ``logistic_integrate``'s default 4 is what runs).
MI_MU, MI_S, MI_CLIP = 1.0, 2.0, 4.0
#: Prompt-intervention (editing) code: clip 3, loc/scale from the trained range (Integration.for_editing).
EDIT_CLIP = 3.0
#: Localisation thresholds of the original calc.py.
THRESHOLDS = torch.linspace(0.1, 0.5, 50)
#: Reported ARO accuracies (%), SD 2.1-base (paper Table 1; README of the original code).
PAPER_ARO = {"OpenCLIP": {"VG-A": 64.6, "VG-R": 51.4, "COCO-Order": 32.8, "Flickr-Order": 40.5},
             "DiffITM": {"VG-A": 62.9, "VG-R": 50.0, "COCO-Order": 23.5, "Flickr-Order": 33.2},
             "HardNeg-DiffITM": {"VG-A": 67.6, "VG-R": 52.3, "COCO-Order": 34.4, "Flickr-Order": 48.6},
             "Info (logistic)": {"VG-A": 72.0, "VG-R": 69.1, "COCO-Order": 40.1, "Flickr-Order": 49.3}}
#: Reported COCO-IT localisation mIoU (%), 50 / 100 / 200 steps (paper Table 2).
PAPER_MIOU = {"Whole image": [14.94, 14.94, 14.94], "Attention": [34.52, 34.90, 35.35],
              "CMI": [32.31, 33.24, 33.63], "Attention+Information": [42.46, 42.71, 42.84]}


# ------------------------------------------------------------------------------------------------
# Importance sampling over logSNR
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Integration:
    """How the integral over logSNR a is sampled.

    mode="logistic" (paper default): u ~ U(sigmoid(-c), sigmoid(c)), a = mu + s * logit(u), a
    logistic(mu, s) truncated to [mu - c s, mu + c s]; weight w = 1/q(a) =
    s * tanh(c/2) / (sigmoid((a-mu)/s) * sigmoid(-(a-mu)/s)).
    mode="uniform": a ~ U[mu - c s, mu + c s], weight 2 c s (= 6 s for c = 3).  The original's
    ``trunc_uniform_integrate`` returns 1/(2 c s) as the weight; that is the density, not its
    inverse (a constant factor, rankings unchanged); we use the correct 1/q.
    """

    mode: str = "logistic"
    mu: float = MI_MU
    s: float = MI_S
    clip: float = MI_CLIP

    def __post_init__(self):
        if self.mode not in ("logistic", "uniform"):
            raise ValueError(f"Integration: mode must be 'logistic' or 'uniform', got {self.mode!r}")
        if not (self.s > 0 and self.clip > 0):
            raise ValueError(f"Integration: scale s and clip must be > 0, got s={self.s}, clip={self.clip}")

    @classmethod
    def for_editing(cls, model, clip: float = EDIT_CLIP, mode: str = "logistic") -> "Integration":
        """The editing script's choice: mu = middle of the trained logSNR range, s = range / (2 c),
        so the truncated support [mu - c s, mu + c s] is exactly the trained range."""
        lo, hi = model.logsnr_range
        return cls(mode, mu=lo + 0.5 * (hi - lo), s=(hi - lo) / (2.0 * clip), clip=clip)

    def sample(self, n: int, generator: torch.Generator | None = None):
        """(a [n], w [n]) as float64 CPU tensors."""
        u = torch.rand(int(n), generator=generator, dtype=torch.float64)
        c = torch.tensor(float(self.clip), dtype=torch.float64)
        if self.mode == "logistic":
            lo, hi = torch.sigmoid(-c), torch.sigmoid(c)
            a = self.mu + self.s * torch.logit(lo + (hi - lo) * u)
            z = (a - self.mu) / self.s
            w = self.s * torch.tanh(c / 2) / (torch.sigmoid(z) * torch.sigmoid(-z))
        else:
            a = self.mu - self.clip * self.s + 2 * self.clip * self.s * u
            w = torch.full_like(a, 2 * self.clip * self.s)
        return a, w


def _logsnr_generator(seed: int, stream: int) -> torch.Generator:
    # different mixing constants from NoiseBank.generator, so a and eps are independent draws
    return torch.Generator().manual_seed((int(seed) * 1000003 + int(stream) * 7919 + 424242)
                                         % (2 ** 63 - 1))


def draw_samples(integration: Integration, n: int, shape, seed: int = 0, stream: int = 0,
                 noises_per_point: int = 1):
    """(a [n*M], w [n*M], eps [n*M, *shape]) for one image: n logSNR points, each with M =
    ``noises_per_point`` noises (a repeated M times; the editing script uses 20 points x 120
    noises).  ``stream`` is the image's id, so an image gets the same samples whatever batch it is
    in, and all its conditions share them."""
    M = int(noises_per_point)
    if M < 1:
        raise ValueError(f"draw_samples: noises_per_point must be >= 1, got {noises_per_point}")
    a, w = integration.sample(n, _logsnr_generator(seed, stream))
    eps = NoiseBank(shape, seed).draw(n * M, stream)
    return a.repeat_interleave(M), w.repeat_interleave(M), eps


# ------------------------------------------------------------------------------------------------
# Prompt edits (contexts for CMI, interventions)
# ------------------------------------------------------------------------------------------------
def replace_words(text: str, subs: dict) -> str:
    """Whole-word, case-insensitive replacement of every key of ``subs`` (longest keys first)."""
    if not subs:
        return text
    low = {k.lower(): v for k, v in subs.items()}
    pat = r"\b(" + "|".join(re.escape(k) for k in sorted(low, key=len, reverse=True)) + r")\b"
    out = re.sub(pat, lambda m: low[m.group(0).lower()], text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", out).strip()


def omit_word(caption: str, word: str, placeholder: str = "_") -> str:
    """The caption with ``word`` (and its plural) replaced by ``placeholder`` ("_" as the
    original; "" removes it)."""
    out = replace_words(caption, {word: placeholder, word + "s": placeholder})
    if out == caption:
        raise KeyError(f"omit_word: {word!r} does not occur in {caption!r}")
    return out


def swap_word(caption: str, word: str, new: str) -> str:
    """The caption with ``word`` (and its plural) replaced by ``new``.  The original applies its
    whole swap dictionary to the caption (also swapping other listed words that happen to occur);
    we change only the target word, so omit and swap touch the same word."""
    out = replace_words(caption, {word: new, word + "s": new + "s"})
    if out == caption:
        raise KeyError(f"swap_word: {word!r} does not occur in {caption!r}")
    return out


# ------------------------------------------------------------------------------------------------
# Estimators
# ------------------------------------------------------------------------------------------------
def upsample_map(m: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False, as the original) of [..., h, w] maps to
    ``size`` = (H, W), divided by the area ratio so a map stays a density: for integer
    power-of-two factors (SD: 8, the toy: 4) the sum over pixels is preserved exactly."""
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    h, w = m.shape[-2:]
    lead = m.shape[:-2]
    up = F.interpolate(m.reshape(-1, 1, h, w).double(), size=(H, W), mode="bilinear",
                       align_corners=False)
    return (up * (h * w) / (H * W)).reshape(*lead, H, W)


def _as_latents(model, images=None, latents=None):
    if latents is not None:
        return torch.as_tensor(latents)
    if images is None:
        raise ValueError("give images (PIL / uint8 arrays / paths) or latents")
    return model.encode_images(model.preprocess(images)).float().cpu()


def information(model, latents, conditions, pairs, *, n_samples: int = 100,
                integration: Integration = Integration(), pixel: bool = False, image_size=None,
                seed: int = 0, streams=None, noises_per_point: int = 1, batch_size=None,
                images_per_call=None, keep_samples: bool = False, progress: bool = False) -> dict:
    """Information that condition p carries about the image beyond condition q, for pairs (p, q).

    Args:
        latents: [B, C, h, w] clean latents.
        conditions: B lists of P prompts (the conditions of each image; same P for every image).
        pairs: (p, q) positions in those lists; "i(x; y)" is (y, empty prompt), "i(x; y | c)"
            is (y, c).
        n_samples: N (a, eps) pairs per image, shared by the image's P conditions (with
            ``noises_per_point`` M > 1: N logSNR points x M noises each, N*M evaluations).
        streams: per-image ids for the seeded draws (default 0..B-1); pass dataset indices when
            processing a dataset in chunks, so results do not depend on chunking.
        pixel: also return per-pixel maps (squared differences summed over channels only).

    Returns dict with float64 CPU tensors:
        "orthogonal" [B, n_pairs]: 1/2 mean_k w_k ||eps_p - eps_q||^2 (sum over latent dims);
        "standard" [B, n_pairs]: 1/2 mean_k w_k (||eps - eps_q||^2 - ||eps - eps_p||^2);
        "orthogonal_sem", "standard_sem": standard errors over the N samples;
        "logsnr", "weights" [B, N];
        with pixel=True: "orthogonal_map", "standard_map" [B, n_pairs, h, w] (latent grid; they sum
        to the image-level values) and "orthogonal_map_up", "standard_map_up" [B, n_pairs, H, W]
        (bilinear to ``image_size``, default model.resolution, as densities: same sums);
        with keep_samples=True also the weighted per-sample terms "orthogonal_samples",
        "standard_samples" [B, n_pairs, N] (+ "orthogonal_map_samples" [B, n_pairs, N, h, w]),
        whose means over the first n samples are the estimates with n samples (nested estimates).
    """
    latents = torch.as_tensor(latents).float().cpu()
    B = latents.shape[0]
    conditions = [list(c) for c in conditions]
    if len(conditions) != B:
        raise ValueError(f"information: {len(conditions)} condition lists for {B} images")
    P = len(conditions[0]) if conditions else 0
    if P == 0 or any(len(c) != P for c in conditions):
        raise ValueError("information: every image needs the same (non-zero) number of conditions")
    pairs = [(int(p), int(q)) for p, q in pairs]
    if not pairs:
        raise ValueError("information: give at least one (p, q) pair of condition positions")
    streams = list(range(B)) if streams is None else [int(s) for s in streams]
    if len(streams) != B:
        raise ValueError(f"information: {len(streams)} streams for {B} images")
    if int(n_samples) < 1:
        raise ValueError(f"information: n_samples must be >= 1, got {n_samples}")
    N = int(n_samples) * int(noises_per_point)

    prompts = list(dict.fromkeys(p for c in conditions for p in c))
    row = {p: i for i, p in enumerate(prompts)}
    emb = model.encode_prompts(prompts)
    cond_idx = torch.tensor([[row[p] for p in c] for c in conditions], dtype=torch.long)
    pi = torch.tensor([p for p, _ in pairs])
    qi = torch.tensor([q for _, q in pairs])

    h, wd = latents.shape[-2:]
    if images_per_call is None:  # keep the per-sample maps of one call below ~2e8 floats
        per_image = N * (P + len(pairs)) * h * wd if pixel else N * P
        images_per_call = max(1, int(2e8 // max(per_image, 1)))
    outputs = ("sq", "map") if pixel else ("sq",)
    res = {k: [] for k in ("orthogonal", "standard", "orthogonal_sem", "standard_sem",
                           "orthogonal_map", "standard_map", "orthogonal_samples",
                           "standard_samples", "orthogonal_map_samples")}
    a_all, w_all = [], []
    for b0 in tqdm(range(0, B, images_per_call), disable=not progress or B <= images_per_call,
                   desc="information"):
        sl = slice(b0, b0 + images_per_call)
        # draws per chunk: the noise of all images at once may not fit (SD: 2400 x 64 KB per image)
        draws = [draw_samples(integration, int(n_samples), latents.shape[1:], seed, s,
                              noises_per_point) for s in streams[sl]]
        a = torch.stack([d[0] for d in draws])
        w = torch.stack([d[1] for d in draws])
        eps = torch.stack([d[2] for d in draws])
        a_all.append(a)
        w_all.append(w)
        out = denoise_errors(model, latents[sl], emb, cond_idx[sl], logsnr=a, noise=eps,
                             outputs=outputs, diff_pairs=pairs, batch_size=batch_size,
                             progress=progress, desc="MI samples")
        ww = w.unsqueeze(1)                                                # [b, 1, N]
        orth = 0.5 * ww * out["diff_sq"].double()                          # [b, n, N]
        sq = out["sq"].double()
        std = 0.5 * ww * (sq[:, qi] - sq[:, pi])
        for k, v in (("orthogonal", orth), ("standard", std)):
            res[k].append(v.mean(-1))
            if keep_samples:
                res[k + "_samples"].append(v)
            res[k + "_sem"].append(v.std(-1) / math.sqrt(N) if N > 1
                                   else torch.full(v.shape[:2], float("nan"), dtype=torch.float64))
        if pixel:
            wm = ww[..., None, None]
            om = 0.5 * wm * out["diff_map"].double()
            res["orthogonal_map"].append(om.mean(2))
            if keep_samples:
                res["orthogonal_map_samples"].append(om.float())
            mp = out["map"].double()
            res["standard_map"].append((0.5 * wm * (mp[:, qi] - mp[:, pi])).mean(2))
    result = {k: torch.cat(v) for k, v in res.items() if v}
    result["logsnr"], result["weights"] = torch.cat(a_all), torch.cat(w_all)
    if pixel:
        size = image_size or model.resolution
        result["orthogonal_map_up"] = upsample_map(result["orthogonal_map"], size)
        result["standard_map_up"] = upsample_map(result["standard_map"], size)
    return result


def _option_lists(captions, B):
    if len(captions) != B:
        raise ValueError(f"{len(captions)} caption entries for {B} images")
    out = [[c] if isinstance(c, str) else list(c) for c in captions]
    if any(len(o) != len(out[0]) for o in out):
        raise ValueError("every image needs the same number of caption options")
    return out


def pointwise_mi(model, images=None, captions=None, *, latents=None, null: str = "", **kw) -> dict:
    """i(x; y) of each caption option against the empty prompt (``null``), paper Eq. 7.

    ``captions``: one string per image or a list of J options per image.  All J options and the
    null prompt of an image share each (a, eps) sample and run in one UNet batch (J + 1
    conditions).  Keyword arguments go to :func:`information` (n_samples, integration, pixel,
    seed, streams, ...).  Returns its dict with values [B, J].
    """
    z = _as_latents(model, images, latents)
    opts = _option_lists(captions, z.shape[0])
    J = len(opts[0])
    return information(model, z, [o + [null] for o in opts], [(j, J) for j in range(J)], **kw)


def conditional_mi(model, images=None, captions=None, contexts=None, *, latents=None,
                   null: str | None = None, **kw) -> dict:
    """i(x; y | c): caption y against its context c (the caption without the word), paper Eq. 9.

    One (caption, context) per image.  With ``null`` given (e.g. ""), the empty prompt is added
    as a third condition and the result also holds i(x; y) and i(x; c) (pairs
    [(y, c), (y, null), (c, null)], the original's [c-w, c-n, w-n] rows) at no extra noise draws.
    """
    z = _as_latents(model, images, latents)
    B = z.shape[0]
    if captions is None or contexts is None or len(captions) != B or len(contexts) != B:
        raise ValueError(f"conditional_mi: need one caption and one context per image ({B} images)")
    if null is None:
        return information(model, z, [[y, c] for y, c in zip(captions, contexts)], [(0, 1)], **kw)
    return information(model, z, [[y, c, null] for y, c in zip(captions, contexts)],
                       [(0, 1), (0, 2), (1, 2)], **kw)


# ------------------------------------------------------------------------------------------------
# Relation testing (ARO) by i(x; caption)
# ------------------------------------------------------------------------------------------------
def _item_parts(it, i):
    """(image, caption options) of a MatchItem or an ARO dict item."""
    if isinstance(it, dict):
        if "image_options" not in it or "caption_options" not in it:
            raise KeyError(f"item {i} lacks 'image_options' or 'caption_options'")
        return it["image_options"][0], list(it["caption_options"])
    if len(it.image_refs) != 1:
        raise ValueError(f"item {i} has {len(it.image_refs)} images; MI retrieval scores the captions "
                         f"of one image (text retrieval)")
    return it.images[0], list(it.captions)


def aro_scores(model, items, *, n_samples: int = 100, integration: Integration = Integration(),
               estimator: str = "orthogonal", seed: int = 0, images_per_call: int = 8,
               cache=None, batch_size=None, progress: bool = True, shard=None):
    """i(x; caption option) of each item -> [N, n_options] (the prediction is the argmax);
    ``estimator="both"`` returns {"orthogonal": [N, n], "standard": [N, n]} from the same UNet
    evaluations (cached entries hold both).

    Items: :class:`~t2i_common.formats.MatchItem` s with one image (``read_aro_vg``,
    ``read_aro_order``) or ARO dicts ``{"image_options": [img], "caption_options": [...]}``.
    Item i uses noise stream i; ``cache`` (a :class:`~t2i_common.cache.ResultCache`) makes a
    killed run resume.  ``shard``: ``(i, n)`` computes only shard i of n (cluster array jobs;
    ``accelerate launch`` is detected by itself), see :mod:`t2i_common.distributed`; the result
    does not depend on the number of shards.  The original scores with ``image_level_nll_fast``
    (orthogonal estimator, 100 samples, logistic loc 1 / scale 2 / clip 4) and stops after 4
    batches (``if i == 3: break``); we score every item.
    """
    if estimator not in ("orthogonal", "standard", "both"):
        raise ValueError(f"aro_scores: estimator must be 'orthogonal', 'standard' or 'both', "
                         f"got {estimator!r}")
    items = list(items)
    if not items:
        raise ValueError("aro_scores: no items given")
    n_opt = len(_item_parts(items[0], 0)[1])

    def score(ids):
        parts = [_item_parts(items[i], i) for i in ids]
        for i, (_, caps) in zip(ids, parts):
            if len(caps) != n_opt:
                raise ValueError(f"aro_scores: item {i} has {len(caps)} caption options, item 0 has "
                                 f"{n_opt}; score tasks with different option counts separately")
        z = _as_latents(model, [p[0] for p in parts])
        out = pointwise_mi(model, latents=z, captions=[p[1] for p in parts], n_samples=n_samples,
                           integration=integration, seed=seed, streams=ids, batch_size=batch_size)
        res = []
        for j, (_, caps) in enumerate(parts):
            # identical options get identical scores (UNet rows at different batch positions may
            # differ in the last bits, which would break exact ties)
            first = [caps.index(c) for c in caps]
            res.append({k: out[k][j].numpy()[first] for k in ("orthogonal", "standard")})
        return res

    res = sharded_map(score, list(range(len(items))), cache, shard, desc="ARO (MI)",
                      progress=progress, chunk=images_per_call)
    both = {k: np.stack([res[i][k] for i in range(len(items))]) for k in ("orthogonal", "standard")}
    return both if estimator == "both" else both[estimator]


ARO_TASKS = ("VG-A", "VG-R", "COCO-Order", "Flickr-Order")
_ARO_FILES = {"VG-A": "visual_genome_attribution.json", "VG-R": "visual_genome_relation.json",
              "COCO-Order": "coco_karpathy_test.json", "Flickr-Order": "flickr30k_test.json"}


def aro_task_paths(aro_root=None, toy_root=None, toy_n: int = 30, seed: int = 0,
                   tasks=ARO_TASKS) -> dict:
    """``{task: json path}`` of the ARO tasks, for :func:`t2i_common.diffusion_itm.read_gdbench`.

    aro_root: the ARO dataset folder (visual_genome_{attribution,relation}.json + images/,
    coco_karpathy_test.json, flickr30k_test.json as ARO lays them out); a missing file is an
    error naming it.  Without aro_root, the toy analogues (``toy_n`` items per task) are exported
    under ``toy_root`` in the same formats (:mod:`t2i_common.toyworld.export`).
    """
    from pathlib import Path

    bad = [t for t in tasks if t not in _ARO_FILES]
    if bad:
        raise KeyError(f"aro_task_paths: unknown tasks {bad}; choose from {list(_ARO_FILES)}")
    if aro_root is not None:
        root = Path(aro_root)
        out = {t: root / _ARO_FILES[t] for t in tasks}
        missing = [str(p) for p in out.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"ARO files missing: {missing}. Download ARO (see the ARO README; "
                                    f"Flickr30k needs the Flickr form) into {root}, or pass "
                                    f"aro_root=None for the toy analogues")
        return {t: str(p) for t, p in out.items()}

    if toy_root is None:
        raise ValueError("aro_task_paths: give aro_root (real ARO) or toy_root (folder for the toy export)")
    root = Path(toy_root)
    sub = {"VG-A": ("vg_attribution", lambda d: toyexport.export_aro_vg(d, toy_n, seed, "attribution")),
           "VG-R": ("vg_relation", lambda d: toyexport.export_aro_vg(d, toy_n, seed, "relation")),
           "COCO-Order": ("coco_order", lambda d: toyexport.export_aro_order(d, toy_n, seed, "coco_order")),
           "Flickr-Order": ("flickr_order",
                            lambda d: toyexport.export_aro_order(d, toy_n, seed, "flickr_order"))}
    out = {}
    for t in tasks:
        folder, fn = sub[t]
        out[t] = str(fn(root / folder))
    return out


def coco_it_items(csv_path=None, instances=None, image_dir=None, mask_size=None, *, toy_root=None,
                  toy_n: int = 12, seed: int = 0, max_rows: int | None = None) -> list:
    """COCO-IT rows (:func:`t2i_common.formats.read_coco_it`) with ground-truth masks resized
    (nearest) to ``mask_size`` (the model resolution, as the original resizes to 512).

    csv_path/instances/image_dir: COCO-IT.csv (or COCO100-IT.csv, COCO-WL.csv),
    annotations/instances_val2017.json and val2017/.  Without csv_path, the toy world is
    exported in the same formats under ``toy_root`` (``toy_n`` images; nouns and colour words of
    objects whose shape is unique in the image, so the category mask is the word's pixels) and
    read back through the same reader.
    """
    if csv_path is None:
        if toy_root is None:
            raise ValueError("coco_it_items: give csv_path (real COCO-IT) or toy_root (toy export folder)")
        csv_path, instances, image_dir = toyexport.export_coco_it(toy_root, toy_n, seed)
    shape = None if mask_size is None else ((mask_size, mask_size) if isinstance(mask_size, int)
                                            else tuple(mask_size))
    rows = formats.read_coco_it(csv_path, instances=instances, image_dir=image_dir, mask_shape=shape)
    return rows[:max_rows] if max_rows else rows


def info_methods(model, n_samples: int = 100, integration: Integration = Integration(),
                 estimators=("orthogonal",), seed: int = 0, cache=None, batch_size=None,
                 progress: bool = True, shard=None) -> dict:
    """i(x; caption) as scoring functions ``(items, img_retrieval) -> [1, J] score matrices``
    (the interface of :func:`t2i_common.diffusion_itm.gdbench_table` and :func:`relation_testing`), one per
    estimator ("orthogonal": the paper's; "standard": the difference of denoising errors).  All
    estimators of one task come from the same UNet evaluations (computed once, memoised).
    ``cache``: None, or a folder under which a ResultCache keyed by the model, the items and every
    parameter is made per task.  ``shard``: see :func:`aro_scores`."""
    memo = {}

    def both(items):
        key = dict(method="info-mi-3", model=model_fingerprint(model), n=int(n_samples),
                   integration=repr(integration), seed=int(seed),
                   items=[[image_key(_item_parts(it, i)[0]), _item_parts(it, i)[1]]
                          for i, it in enumerate(items)])
        fp = fingerprint(key)
        if fp not in memo:
            rc = ResultCache("info_mi", key, root=cache) if cache is not None else None
            memo[fp] = aro_scores(model, items, n_samples=n_samples, integration=integration,
                                  estimator="both", seed=seed, cache=rc, batch_size=batch_size,
                                  progress=progress, shard=shard)
        return memo[fp]

    def make(est):
        def score(items, img_retrieval=False):
            if img_retrieval:
                raise ValueError("info_methods: MI retrieval scores captions of one image (text retrieval)")
            return [row[None, :] for row in both(list(items))[est]]
        return score

    bad = [e for e in estimators if e not in ("orthogonal", "standard")]
    if bad or not estimators:
        raise ValueError(f"info_methods: estimators must be 'orthogonal' and/or 'standard', got {estimators}")
    return {e: make(e) for e in estimators}


def relation_methods(model, n_samples: int = 100, integration: Integration = Integration(),
                     seed: int = 0, cache=None, batch_size=None, progress: bool = True,
                     shard=None, baselines: dict | None = None) -> dict:
    """The paper's Table 1 columns as scoring functions: the ``baselines`` first (the paper
    compares with CLIP and DiffusionITM: pass ``{"CLIP": diffusion_itm.clip_method(clip),
    "DiffITM": diffusion_itm.diffitm_method(model, S=10, ...)}``), then "Info (<mode>)" (the
    paper's orthogonal estimator) and, beyond the paper, "Info (<mode>, standard)" (difference of
    denoising errors; same UNet evaluations), see :func:`info_methods`.  ``cache``: None or a
    folder (per-item results are cached under it).  ``shard``: ``(i, n)`` runs shard i of n of the
    MI passes (:mod:`t2i_common.distributed`)."""
    out = dict(baselines or {})
    info = info_methods(model, n_samples, integration, ("orthogonal", "standard"), seed=seed,
                        cache=cache, batch_size=batch_size, progress=progress, shard=shard)
    out[f"Info ({integration.mode})"] = info["orthogonal"]
    out[f"Info ({integration.mode}, standard)"] = info["standard"]
    return out


def plot_relation_table(table, title: str = "ARO accuracy"):
    """Grouped bars: one group per task, one bar per method (accuracy in %)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * table.shape[1], 3.4))
    table.T.plot.bar(ax=ax, rot=0)
    ax.set(ylabel="accuracy (%)", xlabel="", title=title, ylim=(0, 100))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def relation_testing(tasks: dict, methods: dict, progress: bool = True):
    """Score ARO-style tasks ``{task: [MatchItem]}`` with ``{method: (items, img_retrieval) ->
    scores}`` and return a long table (method, task, protocol, ties, accuracy, n).

    ``ties`` = "strict": an item is correct when the gold caption scores strictly above every
    other option (a tie is a miss); "first": ``np.argmax`` as the original (the first maximal
    option wins, which favours the gold caption in COCO/Flickr-Order, where it is listed first,
    and the false one in VG, where it is listed first).  Ties arise when a perturbation equals the
    true caption.  protocol "macro" = ARO's official numbers (VG-R mean over asymmetric
    relations, VG-A mean over attribute pairs, here with no minimum count since toy groups are
    small; COCO/Flickr precision@1); "micro" = the mean over items (DiffusionITM's tables).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    for task, items in tqdm(list(tasks.items()), desc="ARO tasks", disable=not progress):
        metas = [it.meta for it in items]
        for name, fn in methods.items():
            scores = fn(items, False)
            strict, first, n_ties = [], [], 0
            for it, sc in zip(items, scores):
                vec, g = candidate_scores(it, sc)
                top = np.flatnonzero(vec == vec.max())
                n_ties += int(len(top) > 1)
                strict.append(bool(vec[g] == vec.max() and len(top) == 1))
                first.append(int(np.argmax(vec)) == g)
            for rule, correct in (("strict", strict), ("first", first)):
                for protocol in ("macro", "micro"):
                    acc = aro_accuracy(metas, correct, protocol=protocol, vga_min_count=1)
                    rows.append(dict(method=name, task=task, protocol=protocol, ties=rule,
                                     accuracy=acc, n_tied=n_ties, n=len(items)))
    return pd.DataFrame(rows)


def relation_table(long_df, protocol: str = "macro", ties: str = "strict"):
    """The paper's table layout: one row per method, one column per task, accuracy in %."""
    df = long_df[(long_df.protocol == protocol) & (long_df.ties == ties)]
    tab = df.pivot(index="method", columns="task", values="accuracy") * 100
    order = list(dict.fromkeys(df.task))
    return tab.loc[list(dict.fromkeys(df.method)), order]


# ------------------------------------------------------------------------------------------------
# Localisation mIoU
# ------------------------------------------------------------------------------------------------
def min_max_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-image (last two dims) min-max normalisation to [0, 1]; a constant map becomes 0 (the
    original divides 0 by 0, giving NaN, which no threshold selects: the same empty prediction)."""
    m = torch.as_tensor(maps).double()
    lo = m.amin(dim=(-2, -1), keepdim=True)
    rng = m.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(rng > 0, (m - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                       torch.zeros_like(m))


def iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of boolean masks [..., H, W]; 0 when the union is empty (torchmetrics'
    BinaryJaccardIndex default, used by the original)."""
    pred, gt = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool()
    inter = (pred & gt).flatten(-2).sum(-1).double()
    union = (pred | gt).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def iou_curve(heatmaps, masks, thresholds=None, chunk: int = 64) -> torch.Tensor:
    """IoU [N, T] of (min-max normalised heatmap > tau) with the ground-truth masks [N, H, W].
    Heatmaps on a coarser grid (e.g. the latent grid) are upsampled bilinearly to the mask size
    first (as the original, before normalising), ``chunk`` images at a time."""
    hm_all = torch.as_tensor(heatmaps)
    masks = torch.as_tensor(masks).bool()
    if hm_all.ndim != 3 or masks.ndim != 3 or len(hm_all) != len(masks):
        raise ValueError(f"iou_curve: heatmaps {tuple(hm_all.shape)} and masks {tuple(masks.shape)} "
                         f"must be [N, h, w] and [N, H, W] with the same N")
    th = THRESHOLDS if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float64)
    out = []
    for i in range(0, len(masks), chunk):
        hm, mk = hm_all[i:i + chunk], masks[i:i + chunk]
        if hm.shape[-2:] != mk.shape[-2:]:
            hm = upsample_map(hm, mk.shape[-2:])
        hm = min_max_normalise(hm)
        out.append(torch.stack([iou(hm > float(t), mk) for t in th], dim=-1))
    return torch.cat(out)


def whole_image_miou(masks) -> float:
    """The whole-image-mask baseline: mean IoU of an all-ones prediction."""
    masks = torch.as_tensor(masks).bool()
    return float(iou(torch.ones_like(masks), masks).mean())


def localisation_miou(heatmaps, masks, thresholds=None, n_folds: int = 2, seed: int = 0) -> dict:
    """mIoU of thresholded heatmaps (paper Sec. 4.2, the original calc.py protocol).

    "oracle": max over thresholds of the mean IoU over all images (the paper's number; the
    threshold is chosen on the test set itself).  "heldout": the threshold is chosen on the other
    folds of a seeded ``n_folds`` split and applied to each fold (cross-fitting, every image
    scored once) - the honest variant.  Also returns the curve and chosen thresholds.
    """
    curve = iou_curve(heatmaps, masks, thresholds)                  # [N, T]
    th = THRESHOLDS if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float64)
    N = curve.shape[0]
    mean_curve = curve.mean(0)
    best = int(mean_curve.argmax())
    out = {"oracle": float(mean_curve[best]), "oracle_threshold": float(th[best]),
           "curve": mean_curve.numpy(), "thresholds": th.numpy(), "n": N}
    if N >= n_folds >= 2:
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(int(seed)))
        folds = perm.chunk(n_folds)
        scores, taus = torch.empty(N, dtype=torch.float64), []
        for f in folds:
            rest = torch.ones(N, dtype=torch.bool)
            rest[f] = False
            k = int(curve[rest].mean(0).argmax())
            taus.append(float(th[k]))
            scores[f] = curve[f, k]
        out["heldout"], out["heldout_thresholds"] = float(scores.mean()), taus
    else:
        out["heldout"], out["heldout_thresholds"] = float("nan"), []
    return out


# ------------------------------------------------------------------------------------------------
# Pearson correlations with bootstrap error bars
# ------------------------------------------------------------------------------------------------
def _pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
    return float((xc * yc).sum() / den) if den > 0 else float("nan")


def pearson_bootstrap(x, y, n_boot: int = 100, frac: float = 0.9, seed: int = 0,
                      per_item: bool = False) -> dict:
    """Pearson correlation with a bootstrap error bar (the original calc.py protocol).

    per_item=False ("image level"): x, y are [N] values, r = corr(x, y).
    per_item=True ("pixel level"): x, y are [N, ...] maps, r = mean over items of the per-item
    correlation over pixels (items with a constant map are skipped, NaN in numpy's corrcoef).
    Each of ``n_boot`` draws takes int(frac * N) items with replacement (numpy randint, seeded);
    "std" is the spread of the draws, "err" = std / sqrt(n_boot), what the original prints as
    the error bar (paper Table 3's +-).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.shape[0] < 3:
        raise ValueError(f"pearson_bootstrap: x {x.shape} and y {y.shape} must match with >= 3 items")
    if per_item:
        r_items = np.array([_pearson(a, b) for a, b in zip(x, y)])
        stat = lambda idx: float(np.nanmean(r_items[idx]))  # noqa: E731
    else:
        stat = lambda idx: _pearson(x[idx], y[idx])  # noqa: E731
    N = x.shape[0]
    rng = np.random.default_rng(int(seed))
    draws = np.array([stat(rng.integers(0, N, size=int(frac * N))) for _ in range(int(n_boot))])
    sd = float(np.nanstd(draws))
    return {"r": stat(np.arange(N)), "std": sd, "err": sd / math.sqrt(max(int(n_boot), 1)),
            "draws": draws, "n": N}
