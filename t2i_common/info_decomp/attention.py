"""Cross-attention word maps: the DAAM baseline and "attention + information" (Info-Decomp Sec. 4.2).

Capture goes through diffusers attention processors: :func:`capture_cross_attention` swaps the
processor of every cross-attention layer (``attn2``) for :class:`CrossAttentionCapture`, which
computes the attention probabilities softmax(q k^T / sqrt(d)) explicitly, hands them to an
:class:`AttentionStore` and returns the same output as the default processor.  The store averages
the per-token maps over heads, upsamples each layer's map to the latent grid and averages over
layers and UNet calls (steps), per batch row mapped to an output slot (an image).

- :func:`daam_maps`: DAAM (Tang et al. 2023) as the original eval_daam.py runs it: DDIM inversion
  of the real image under its caption (guidance 1), then DDIM denoising with the capture on
  (``invert=False`` traces a generation from seeded noise instead).
- :func:`attention_information`: attention accumulated over single UNet passes of the real image
  noised at logistic logSNR samples (eval_daam_itd.py: loc 1, scale 2, clip 3), no inversion.

DAAM choices we keep: maps of layers at 1/8 of the latent resolution are skipped
(``skip_factors=(8,)``), each layer's map is upsampled bicubically and clamped at 0, a word's map
is the mean over its tokens.  Deliberate differences: DAAM's ``map_[map_.size(0) // 2:]`` keeps
only the second half of the (batch x heads) rows, meant to drop the unconditional half under
guidance; without guidance (the original's setting, guidance 1) it drops half of the heads.  We
keep every head of the conditional rows.  DAAM averages over (layer, head) and sums over steps; we
average over steps too (a constant factor, irrelevant after min-max normalisation and for Pearson).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache import ResultCache
from ..distributed import sharded_map
from ..engine import NoiseBank, auto_batch_size
from ..imageio import to_pil
from ..keys import image_key, model_fingerprint
from .information import (THRESHOLDS, Integration, _as_latents, draw_samples, information, iou_curve,
                          localisation_miou, min_max_normalise, omit_word, upsample_map, whole_image_miou)

DAAM_CLIP = 3.0


# ------------------------------------------------------------------------------------------------
# Capture
# ------------------------------------------------------------------------------------------------
class AttentionStore:
    """Running average of cross-attention maps [n_slots, L, h, w] on the latent grid.

    ``rows`` (set per UNet call with :meth:`set_rows`) maps each batch row to an output slot;
    -1 drops the row (e.g. the unconditional half under classifier-free guidance).  Without
    rows, batch row b goes to slot b.
    """

    def __init__(self, latent_hw, n_slots: int, skip_factors=(8,), upsample: str = "bicubic"):
        self.h, self.w = int(latent_hw[0]), int(latent_hw[1])
        self.n_slots = int(n_slots)
        self.skip_factors = {int(f) for f in skip_factors}
        if upsample not in ("bicubic", "bilinear"):
            raise ValueError(f"AttentionStore: upsample must be 'bicubic' or 'bilinear', got {upsample!r}")
        self.upsample = upsample
        self.rows = None
        self.sum = None
        self.count = torch.zeros(self.n_slots, dtype=torch.float64)
        self.layers: dict[str, tuple[int, int]] = {}

    def set_rows(self, rows) -> None:
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()

    def add(self, probs: torch.Tensor, name: str) -> None:
        """probs [B, heads, h_l * w_l, L] of one cross-attention layer."""
        B, _, n_pix, L = probs.shape
        factor = round(math.sqrt(self.h * self.w / n_pix))
        hl, wl = self.h // factor, self.w // factor
        if hl * wl != n_pix:
            raise ValueError(f"AttentionStore: layer {name} has {n_pix} query positions, not a "
                             f"{self.h}x{self.w} latent grid divided by an integer factor")
        self.layers[name] = (hl, wl)
        if factor in self.skip_factors:
            return
        m = probs.float().mean(1).transpose(1, 2).reshape(B, L, hl, wl)
        if (hl, wl) != (self.h, self.w):
            m = F.interpolate(m, size=(self.h, self.w), mode=self.upsample, align_corners=False)
            if self.upsample == "bicubic":
                m = m.clamp(min=0)  # bicubic undershoot, as DAAM
        rows = torch.arange(B) if self.rows is None else self.rows
        if len(rows) != B:
            raise ValueError(f"AttentionStore: {len(rows)} row slots set for a batch of {B}")
        keep = rows >= 0
        if self.sum is None:
            self.sum = torch.zeros(self.n_slots, L, self.h, self.w, dtype=torch.float64)
        self.sum.index_add_(0, rows[keep], m[keep.to(m.device)].double().cpu())
        self.count.index_add_(0, rows[keep], torch.ones(int(keep.sum()), dtype=torch.float64))

    def maps(self) -> torch.Tensor:
        """[n_slots, L, h, w]: mean over layers, heads and UNet calls."""
        if self.sum is None:
            raise RuntimeError("AttentionStore: no cross-attention was captured; run the UNet inside "
                               "capture_cross_attention(model, store) (does the UNet have attn2 "
                               "layers outside skip_factors?)")
        return self.sum / self.count.clamp(min=1).view(-1, 1, 1, 1)


class CrossAttentionCapture:
    """Attention processor for cross-attention layers that records the attention probabilities.

    Same computation as diffusers' ``AttnProcessor`` (explicit softmax instead of SDPA, so the
    probabilities exist), including group/spatial norm, cross-attention norm, q/k norms, masks,
    residual connection and output rescaling.
    """

    def __init__(self, store: AttentionStore, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        B = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        key, value = attn.to_k(ctx), attn.to_v(ctx)
        heads = attn.heads
        d = key.shape[-1] // heads
        q = query.view(B, -1, heads, d).transpose(1, 2)
        k = key.view(B, -1, heads, d).transpose(1, 2)
        v = value.view(B, -1, heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale   # [B, heads, N, L]
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], B)
            scores = scores + mask.view(B, heads, -1, mask.shape[-1]).float()
        probs = scores.softmax(-1)
        self.store.add(probs, self.name)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, -1, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(model, store: AttentionStore):
    """Within the block, every UNet call of ``model`` records its cross-attention into ``store``;
    the previous processors are restored on exit."""
    old = model.unet.attn_processors
    new = {name: CrossAttentionCapture(store, name) if ".attn2." in name else proc
           for name, proc in old.items()}
    if not any(".attn2." in n for n in old):
        raise ValueError("capture_cross_attention: the UNet has no cross-attention (attn2) layers")
    model.unet.set_attn_processor(new)
    try:
        yield store
    finally:
        model.unet.set_attn_processor(old)


# ------------------------------------------------------------------------------------------------
# Words -> tokens -> maps
# ------------------------------------------------------------------------------------------------
def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the padded token sequence, so SOT = 0) of every occurrence of ``word``'s
    tokens in ``prompt``.  Multi-token words ("teddy bear") give all their positions."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids[: tokenizer.model_max_length - 2]
    wid = tokenizer(word, add_special_tokens=False).input_ids
    if not wid:
        raise ValueError(f"word_token_indices: {word!r} has no tokens")
    pos = [1 + i + j for i in range(len(ids) - len(wid) + 1) if ids[i:i + len(wid)] == wid
           for j in range(len(wid))]
    if not pos:
        raise KeyError(f"word {word!r} (tokens {wid}) does not occur in prompt {prompt!r} "
                       f"(tokens {ids}); pass a word of the caption")
    return pos


def prompt_token_maps(token_maps: torch.Tensor, tokenizer, prompt: str) -> torch.Tensor:
    """Crop one slot's maps [L, h, w] to the prompt's tokens: SOT, the words, EOT
    (len(tokens) + 2 maps, as DAAM's global heat map)."""
    n = min(len(tokenizer(prompt, add_special_tokens=False).input_ids) + 2, token_maps.shape[0])
    return token_maps[:n]


def word_maps(token_maps: torch.Tensor, tokenizer, prompts, words, size=None) -> torch.Tensor:
    """Map of ``words[b]`` in ``prompts[b]`` from ``token_maps[b]`` [B, L, h, w]: the mean over the
    word's tokens -> [B, h, w], or [B, H, W] upsampled bilinearly (as a density) to ``size``."""
    if not (len(token_maps) == len(prompts) == len(words)):
        raise ValueError(f"word_maps: {len(token_maps)} maps, {len(prompts)} prompts, {len(words)} words")
    out = torch.stack([token_maps[b, word_token_indices(tokenizer, p, w)].mean(0)
                       for b, (p, w) in enumerate(zip(prompts, words))])
    return upsample_map(out, size) if size is not None else out


# ------------------------------------------------------------------------------------------------
# DDIM (for DAAM's inversion + denoising)
# ------------------------------------------------------------------------------------------------
def ddim_timesteps(model, num_steps: int) -> torch.Tensor:
    """Descending DDIM timesteps of the model's scheduler config (steps_offset respected)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(int(num_steps))
    return sched.timesteps.long().cpu()


def _eps_guided(model, z, t, cond, null, guidance_scale):
    if guidance_scale == 1.0:
        return model.eps(z, t, cond).float()
    e = model.eps(torch.cat([z, z]), t, torch.cat([null, cond])).float()
    e_null, e_cond = e.chunk(2)
    return e_null + guidance_scale * (e_cond - e_null)


def _ddim_move(z, eps, a_from, a_to):
    x0 = (z - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps


@torch.inference_mode()
def ddim_invert(model, latents, cond, *, num_steps=50, guidance_scale=1.0, null=None,
                progress=False):
    """Deterministic DDIM inversion x_0 -> x_T (eps evaluated at the current latent with the next
    timestep, the usual approximation used by the original's forward_ddim)."""
    ts = ddim_timesteps(model, num_steps).flip(0)                    # ascending
    ac = model.alphas_cumprod
    alphas = [float(ac[0])] + [float(ac[t]) for t in ts]
    z = latents.to(model.device, torch.float32)
    for i in tqdm(range(len(ts)), disable=not progress, desc="DDIM inversion"):
        e = _eps_guided(model, z.to(model.dtype), ts[i], cond, null, guidance_scale)
        z = _ddim_move(z, e, alphas[i], alphas[i + 1])
    return z


@torch.inference_mode()
def ddim_denoise(model, z, cond, *, num_steps=50, guidance_scale=1.0, null=None, progress=False):
    """Deterministic DDIM sampling x_T -> x_0 over the same timesteps as :func:`ddim_invert`."""
    ts = ddim_timesteps(model, num_steps)                            # descending
    ac = model.alphas_cumprod
    alphas = [float(ac[t]) for t in ts] + [float(ac[0])]
    z = z.to(model.device, torch.float32)
    for i in tqdm(range(len(ts)), disable=not progress, desc="DDIM denoising"):
        e = _eps_guided(model, z.to(model.dtype), ts[i], cond, null, guidance_scale)
        z = _ddim_move(z, e, alphas[i], alphas[i + 1])
    return z


# ------------------------------------------------------------------------------------------------
# The two attention methods
# ------------------------------------------------------------------------------------------------
def _new_store(model, n, skip_factors, upsample):
    return AttentionStore(model.latent_shape[1:], n, skip_factors=skip_factors, upsample=upsample)


@torch.inference_mode()
def daam_maps(model, images=None, captions=None, *, latents=None, num_steps: int = 50,
              guidance_scale: float = 1.0, invert: bool = True, seed: int = 0, batch_size=None,
              skip_factors=(8,), upsample: str = "bicubic", progress: bool = False) -> dict:
    """DAAM token maps of each caption over a DDIM denoising pass.

    invert=True (the original eval_daam.py): DDIM-invert the real image's latent under its caption
    for ``num_steps`` steps, then denoise it back with the capture on.  invert=False: trace a
    generation from seeded noise (NoiseBank stream b for image b).  With guidance_scale > 1 the
    unconditional rows are not recorded.  Returns {"tokens": [B, L, h, w], "latents": [B, C, h, w]
    (the reconstruction / generation)}.
    """
    if invert:
        z0 = _as_latents(model, images, latents).float()
        B = z0.shape[0]
    else:
        B = len(captions)
    if captions is None or len(captions) != B:
        raise ValueError(f"daam_maps: need one caption per image ({B} images)")
    bs = batch_size or max(1, auto_batch_size(model) // (1 if guidance_scale == 1 else 2))
    store = _new_store(model, B, skip_factors, upsample)
    null = model.encode_prompts([""])
    outs = []
    for b0 in tqdm(range(0, B, bs), disable=not progress or B <= bs, desc="DAAM"):
        idx = torch.arange(b0, min(B, b0 + bs))
        cond = model.encode_prompts([captions[i] for i in idx])
        nul = null.expand(len(idx), -1, -1)
        if invert:
            zT = ddim_invert(model, z0[idx], cond, num_steps=num_steps,
                             guidance_scale=guidance_scale, null=nul, progress=progress)
        else:
            zT = torch.stack([NoiseBank(model.latent_shape, seed).draw(1, int(i))[0] for i in idx])
        store.set_rows(idx if guidance_scale == 1 else torch.cat([torch.full_like(idx, -1), idx]))
        with capture_cross_attention(model, store):
            outs.append(ddim_denoise(model, zT, cond, num_steps=num_steps,
                                     guidance_scale=guidance_scale, null=nul, progress=progress).cpu())
    return {"tokens": store.maps().float(), "latents": torch.cat(outs)}


@torch.inference_mode()
def attention_information(model, images=None, captions=None, *, latents=None,
                          n_samples: int = 50,
                          integration: Integration = Integration(clip=DAAM_CLIP),
                          seed: int = 0, streams=None, snapshots=(), batch_size=None,
                          skip_factors=(8,), upsample: str = "bicubic", progress: bool = False) -> dict:
    """"Attention + information": cross-attention of the caption averaged over ``n_samples`` UNet
    passes of the real image noised at logSNR a_k ~ ``integration`` (eval_daam_itd.py: logistic,
    loc 1, scale 2, clip 3, one noise per a_k; ``n_samples`` is its --infer_step).  No inversion.
    Samples come from :func:`~t2i_common.info_decomp.information.draw_samples` (stream = image id), so they are
    the same (a, eps) an MI estimate with the same integration and seed uses.  The passes run
    sample-major, so ``snapshots`` (counts < n_samples) also give the maps after the first k
    samples ("tokens@k": nested estimates, no extra UNet calls).
    Returns {"tokens": [B, L, h, w], "tokens@k": ..., "logsnr": [B, K]}.
    """
    z0 = _as_latents(model, images, latents).float()
    B = z0.shape[0]
    if captions is None or len(captions) != B:
        raise ValueError(f"attention_information: need one caption per image ({B} images)")
    streams = list(range(B)) if streams is None else [int(s) for s in streams]
    K = int(n_samples)
    snaps = sorted({int(k) for k in snapshots if 0 < int(k) < K})
    draws = [draw_samples(integration, K, z0.shape[1:], seed, s) for s in streams]
    a = torch.stack([d[0] for d in draws])
    eps = torch.stack([d[2] for d in draws])
    t = model.logsnr_to_t(a)
    emb = model.encode_prompts(list(captions))
    store = _new_store(model, B, skip_factors, upsample)
    bs = batch_size or auto_batch_size(model)
    out = {}
    bounds = [0] + snaps + [K]
    with capture_cross_attention(model, store):
        for k0, k1 in zip(bounds[:-1], bounds[1:]):
            pairs = [(b, k) for k in range(k0, k1) for b in range(B)]
            for g0 in tqdm(range(0, len(pairs), bs), disable=not progress, desc="attention+info"):
                bi = torch.tensor([b for b, _ in pairs[g0:g0 + bs]])
                ki = torch.tensor([k for _, k in pairs[g0:g0 + bs]])
                ab = torch.sigmoid(a[bi, ki]).view(-1, 1, 1, 1).float()
                zt = ab.sqrt() * z0[bi] + (1 - ab).sqrt() * eps[bi, ki]
                store.set_rows(bi)
                model.eps(zt.to(model.device, model.dtype), t[bi, ki].to(model.device), emb[bi])
            if k1 < K:
                out[f"tokens@{k1}"] = store.maps().float()
    out["tokens"] = store.maps().float()
    out["logsnr"] = a
    return out


# ------------------------------------------------------------------------------------------------
# Word localisation experiment (paper Sec. 4.2, Table 2)
# ------------------------------------------------------------------------------------------------
LOCALISATION_METHODS = ("Whole image", "Attention", "CMI", "Attention+Information")


def _groups(items):
    """Rows sharing (image, caption) -> one group (encoded once, one UNet batch per sample)."""
    groups, index = [], {}
    for r, it in enumerate(items):
        key = (image_key(it.image), it.caption)
        if key not in index:
            index[key] = len(groups)
            groups.append({"image": it.image, "caption": it.caption, "rows": []})
        groups[index[key]]["rows"].append(r)
    return groups


def localisation_maps(model, items, steps=(50, 100, 200), *, seed: int = 0,
                      cmi_integration: Integration = Integration(),
                      attn_integration: Integration = Integration(clip=DAAM_CLIP),
                      daam_guidance: float = 1.0, groups_per_call: int = 16, batch_size=None,
                      cache=None, progress: bool = True, shard=None) -> dict:
    """Heatmaps of each row's word on the latent grid for every method and step count.

    ``items``: COCO-IT rows (:class:`~t2i_common.formats.CocoITItem`: image, caption, context,
    word).  Rows of the same (image, caption) form a group that shares the VAE encoding, the
    DAAM trajectory, the attention passes and the (a, eps) samples (stream = group index).
    - "CMI": orthogonal pixel map of i(x; caption | context) (eval_itd.py ``nll_2D``/``cmi``:
      logistic loc 1, scale 2, clip 4, n logSNR samples x 1 noise); the estimates for the
      smaller step counts are the means over the first n of max(steps) samples.
    - "Attention": DAAM over DDIM inversion + denoising with n steps (eval_daam.py).
    - "Attention+Information": attention over n logistic logSNR passes (eval_daam_itd.py,
      clip 3); nested like CMI.
    Returns {method: {n: float32 [N_rows, h, w]}} (the whole-image baseline needs no map).
    ``cache``: None or a folder; per-group results are cached (a killed run resumes).
    ``shard``: ``(i, n)`` computes shard i of n of the groups (:mod:`t2i_common.distributed`;
    ``accelerate launch`` is detected by itself); needs ``cache``.
    """
    items = list(items)
    if not items:
        raise ValueError("localisation_maps: no rows given")
    steps = sorted({int(n) for n in steps})
    K = steps[-1]
    groups = _groups(items)
    for g in groups:
        for r in g["rows"]:
            word_token_indices(model.tokenizer, g["caption"], items[r].word)  # fail early

    def run(gids):
        gs = [groups[g] for g in gids]
        z = _as_latents(model, [g["image"] for g in gs]).float()
        caps = [g["caption"] for g in gs]
        res = [{m: {} for m in LOCALISATION_METHODS[1:]} for _ in gs]
        # CMI: conditions [caption, "", context_1 .. context_m], grouped by m
        by_m = {}
        for j, g in enumerate(gs):
            by_m.setdefault(len(g["rows"]), []).append(j)
        for m, js in by_m.items():
            conds = [[caps[j], ""] + [items[r].context for r in gs[j]["rows"]] for j in js]
            info = information(model, z[js], conds, [(0, 2 + i) for i in range(m)], n_samples=K,
                               integration=cmi_integration, pixel=True, keep_samples=True,
                               seed=seed, streams=[gids[j] for j in js], batch_size=batch_size)
            smp = info["orthogonal_map_samples"]                       # [b, m, K, h, w]
            for n in steps:
                mean = smp[:, :, :n].double().mean(2).float()
                for jj, j in enumerate(js):
                    res[j]["CMI"][n] = mean[jj]
        # Attention (DAAM), one DDIM trajectory per step count
        for n in steps:
            tok = daam_maps(model, latents=z, captions=caps, num_steps=n,
                            guidance_scale=daam_guidance, batch_size=batch_size)["tokens"]
            for j, g in enumerate(gs):
                res[j]["Attention"][n] = word_maps(tok[j:j + 1].expand(len(g["rows"]), -1, -1, -1),
                                                   model.tokenizer, [caps[j]] * len(g["rows"]),
                                                   [items[r].word for r in g["rows"]]).float()
        # Attention + information, nested snapshots
        ai = attention_information(model, latents=z, captions=caps, n_samples=K,
                                   integration=attn_integration, seed=seed, streams=gids,
                                   snapshots=steps[:-1], batch_size=batch_size)
        for n in steps:
            tok = ai["tokens"] if n == K else ai[f"tokens@{n}"]
            for j, g in enumerate(gs):
                res[j]["Attention+Information"][n] = word_maps(
                    tok[j:j + 1].expand(len(g["rows"]), -1, -1, -1), model.tokenizer,
                    [caps[j]] * len(g["rows"]), [items[r].word for r in g["rows"]]).float()
        return res

    rc = None
    if cache is not None:
        key = dict(version="loc-1", model=model_fingerprint(model), steps=steps, seed=int(seed),
                   cmi=repr(cmi_integration), attn=repr(attn_integration),
                   guidance=float(daam_guidance),
                   groups=[[image_key(g["image"]), g["caption"],
                            [[items[r].word, items[r].context] for r in g["rows"]]] for g in groups])
        rc = ResultCache("localisation", key, root=cache)
    got = sharded_map(run, list(range(len(groups))), rc, shard, desc="localisation (image groups)",
                      progress=progress, chunk=groups_per_call)
    h, w = model.latent_shape[1:]
    out = {m: {n: torch.zeros(len(items), h, w) for n in steps} for m in LOCALISATION_METHODS[1:]}
    for gi, g in enumerate(groups):
        for m in out:
            for n in steps:
                out[m][n][g["rows"]] = got[gi][m][n]
    return out


def localisation_table(maps: dict, items, thresholds=None, n_folds: int = 2, seed: int = 0,
                       by_word_type: bool = True):
    """mIoU (%) of every method and step count against the rows' ground-truth masks, long format:
    method, steps, word_type ("all" or the csv's type), oracle (max over thresholds: the paper's
    protocol), heldout (threshold chosen on the other folds), oracle_threshold, n."""
    import pandas as pd

    items = list(items)
    if any(it.mask is None for it in items):
        raise ValueError("localisation_table: rows without a ground-truth mask; read the csv with "
                         "read_coco_it(..., instances=...) so each row gets its Label's mask")
    masks = torch.as_tensor(np.stack([np.asarray(it.mask, dtype=bool) for it in items]))
    types = np.array([str(it.word_type or "") for it in items])
    subsets = [("all", np.ones(len(items), dtype=bool))]
    if by_word_type:
        subsets += [(t, types == t) for t in sorted(set(types)) if t]
    steps = sorted(next(iter(maps.values())))
    rows = []
    for wt, sel in subsets:
        idx = torch.as_tensor(np.flatnonzero(sel))
        whole = 100 * whole_image_miou(masks[idx])
        for n in steps:
            rows.append(dict(method="Whole image", steps=n, word_type=wt, oracle=whole,
                             heldout=whole, oracle_threshold=float("nan"), n=len(idx)))
            for m, by_n in maps.items():
                r = localisation_miou(by_n[n][idx], masks[idx], thresholds, n_folds=n_folds, seed=seed)
                rows.append(dict(method=m, steps=n, word_type=wt, oracle=100 * r["oracle"],
                                 heldout=100 * r["heldout"], oracle_threshold=r["oracle_threshold"],
                                 n=len(idx)))
    return pd.DataFrame(rows)


def localisation_pivot(long_df, value: str = "oracle", word_type: str = "all"):
    """The paper's Table 2 layout: rows = methods, columns = step counts."""
    df = long_df[long_df.word_type == word_type]
    tab = df.pivot(index="method", columns="steps", values=value)
    order = [m for m in LOCALISATION_METHODS if m in tab.index]
    tab = tab.loc[order]
    tab.columns = [f"{c} steps" for c in tab.columns]
    return tab


# ------------------------------------------------------------------------------------------------
# Per-word heatmaps (paper Fig. 3/4: words of different types, MI vs CMI)
# ------------------------------------------------------------------------------------------------
def heatmap_examples(items, relation_words=("above", "below", "left", "right"), n: int = 3):
    """Pick up to ``n`` (image, caption) groups of COCO-IT rows that have a noun row, a colour
    (adjective) row and a relation word in the caption -> [{"image", "caption", "words":
    [(type, word), ...], "masks": {word: GT mask}}].  Word types come from the csv's type column;
    relation words from ``relation_words`` (they have no category mask).  When no group has a
    relation word (e.g. a few rows of real COCO-IT, whose captions seldom use the listed words),
    groups with a noun and a colour row are taken, without a relation word; with neither a
    ValueError says what the rows lack."""
    full, partial = [], []
    for g in _groups(items):
        rows = [items[r] for r in g["rows"]]
        by_type = {}
        for r in rows:
            by_type.setdefault(str(r.word_type), r)
        rel = [w for w in g["caption"].split() if w in set(relation_words)]
        if "noun" in by_type and "colour" in by_type:
            words = [("noun", by_type["noun"].word), ("colour", by_type["colour"].word)]
            ex = {"image": g["image"], "caption": g["caption"], "words": words,
                  "masks": {by_type[t].word: by_type[t].mask for t in ("noun", "colour")}}
            if rel:
                ex["words"] = words + [("relation", rel[0])]
                full.append(ex)
            elif len(partial) < n:
                partial.append(ex)
        if len(full) >= n:
            break
    if full or partial:
        return full or partial
    raise ValueError(f"heatmap_examples: none of the {len(items)} rows' images has both a noun row "
                     f"and a colour (adjective) row; give more rows (max_rows / toy_n) or rows with "
                     f"a type column")


def word_heatmaps(model, examples, n_samples: int = 100, *, seed: int = 0,
                  cmi_integration: Integration = Integration(),
                  attn_integration: Integration = Integration(clip=DAAM_CLIP), batch_size=None):
    """For each example (from :func:`heatmap_examples`) and each of its words: the CMI map
    i(x; caption | caption without the word), the MI map i(x; word) and the attention +
    information map, bilinearly upsampled to the model resolution.  Adds "CMI", "MI",
    "Attention+Information" ([n_words, R, R]) and "cmi", "mi" (image-level values) to each
    example (a new dict)."""
    out = []
    R = model.resolution
    for e, ex in enumerate(examples):
        words = [w for _, w in ex["words"]]
        m = len(words)
        z = _as_latents(model, [ex["image"]]).float()
        conds = [ex["caption"], ""] + [omit_word(ex["caption"], w, "") for w in words] + words
        pairs = [(0, 2 + j) for j in range(m)] + [(2 + m + j, 1) for j in range(m)]
        info = information(model, z, [conds], pairs, n_samples=n_samples, integration=cmi_integration,
                           pixel=True, image_size=R, seed=seed, streams=[e], batch_size=batch_size)
        ai = attention_information(model, latents=z, captions=[ex["caption"]], n_samples=n_samples,
                                   integration=attn_integration, seed=seed, streams=[e],
                                   batch_size=batch_size)
        att = word_maps(ai["tokens"].expand(m, -1, -1, -1), model.tokenizer, [ex["caption"]] * m,
                        words, size=R)
        up = info["orthogonal_map_up"][0]
        out.append({**ex, "CMI": up[:m].float(), "MI": up[m:].float(), "Attention+Information": att.float(),
                    "cmi": info["orthogonal"][0, :m].numpy(), "mi": info["orthogonal"][0, m:].numpy()})
    return out


def plot_word_heatmaps(examples, methods=("CMI", "MI", "Attention+Information")):
    """One row per (example, method): the image, then the method's map of each word (overlaid,
    min-max normalised per map), titled with the word type, the word and its image-level value
    (CMI / MI rows)."""
    import matplotlib.pyplot as plt

    n_words = max(len(ex["words"]) for ex in examples)
    rows = [(ex, m) for ex in examples for m in methods]
    fig, axes = plt.subplots(len(rows), n_words + 1, figsize=(2.1 * (n_words + 1), 2.2 * len(rows)),
                             squeeze=False)
    for (ex, m), ax_row in zip(rows, axes):
        img = np.asarray(to_pil(ex["image"]).convert("RGB").resize(tuple(ex[m].shape[-2:][::-1])))
        ax_row[0].imshow(img)
        ax_row[0].set_title(ex["caption"] if m == methods[0] else "", fontsize=9, loc="left")
        ax_row[0].set_ylabel(m, fontsize=9)
        for j, (wt, w) in enumerate(ex["words"]):
            ax = ax_row[j + 1]
            ax.imshow(img)
            ax.imshow(min_max_normalise(ex[m][j]).numpy(), cmap="jet", alpha=0.5)
            val = {"CMI": ex.get("cmi"), "MI": ex.get("mi")}.get(m)
            ax.set_title(f"{wt}: {w}" + (f"\n{val[j]:.1f} nats" if val is not None else ""), fontsize=9)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in ax_row[len(ex["words"]) + 1:]:
            ax.axis("off")
    fig.suptitle("Word localisation: each word's map over the image, one row per method\n"
                 "(min-max normalised per map; overlay blue = low, red = high)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def plot_iou_curves(maps: dict, items, steps: int, thresholds=None):
    """mIoU against the threshold for each method at ``steps`` (the original's iou_curves plot)."""
    import matplotlib.pyplot as plt

    masks = torch.as_tensor(np.stack([np.asarray(it.mask, dtype=bool) for it in items]))
    th = THRESHOLDS if thresholds is None else torch.as_tensor(thresholds)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for m, by_n in maps.items():
        ax.plot(th.numpy(), 100 * iou_curve(by_n[steps], masks, th).mean(0).numpy(), label=m)
    ax.axhline(100 * whole_image_miou(masks), color="gray", ls="--", label="Whole image")
    ax.set(xlabel="threshold on the min-max normalised map", ylabel="mIoU (%)",
           title=f"mIoU vs threshold ({steps} steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_mi_vs_cmi(examples):
    """Image-level MI of each word alone, i(x; w), against its CMI given the rest of the caption,
    i(x; y | c), coloured by word type (paper Fig. 4: nouns carry information on their own,
    abstract words mostly in context)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    types = sorted({t for e in examples for t, _ in e["words"]})
    for wt in types:
        pts = [(e["mi"][j], e["cmi"][j], w) for e in examples for j, (t, w) in enumerate(e["words"])
               if t == wt]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=wt)
        for x, y, w in pts:
            ax.annotate(w, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set(xlabel="i(x; word) (nats)", ylabel="i(x; caption | context) (nats)", title="MI vs CMI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
