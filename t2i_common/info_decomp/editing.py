"""Prompt intervention (Info-Decomp Sec. 4.3): invert an image to noise under its caption,
regenerate with one word omitted or swapped, and ask whether the word's conditional mutual
information i(x; y | c) predicts where and how much the image changes.

Sampler (the original's image_edit.py): the probability-flow ODE in Karras et al. (2022) terms,
x = z / sqrt(abar) = x0 + sigma * eps with sigma = exp(-a/2) for logSNR a; Karras sigmas (rho 7)
between sigma_min = exp(-a_max/2) and sigma_max = exp(-a_min/2) from the model's trained logSNR
range; deterministic Heun steps (Karras Alg. 1, s_churn 0).  The schedule stops at sigma_min
(it never reaches sigma = 0, so the map can be run backwards): inversion integrates sigma_min ->
sigma_max starting from the clean latent, regeneration sigma_max -> sigma_min.  No guidance.
The UNet gets the nearest discrete t of each sigma (``model.logsnr_to_t``).

CMI of the word: 20 logSNR points x M shared noises (the original: 120) from a logistic over the
trained range (clip 3, :meth:`Integration.for_editing`); image level = the standard estimator
(the original's ``cmi``), pixel level = the orthogonal per-pixel map (its ``cmi_pixel_lr``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import AttentionStore, capture_cross_attention, word_maps
from .information import (EDIT_CLIP, Integration, _as_latents, information, omit_word,  # noqa: F401
                          pearson_bootstrap, replace_words, swap_word, upsample_map)

#: The original's swap pairs (each also swaps plurals).
PAPER_SWAPS = {"dog": "cat", "zebra": "horse", "bed": "table", "bear": "elephant",
               "airplane": "kite", "person": "monkey", "people": "monkeys", "teddy bear": "robot"}


#: Reported Pearson correlations with the image change (paper Table 3): (r, +-).
PAPER_PEARSON = {"image/cmi": (0.34, 0.010), "image/attention": (0.24, 0.011),
                 "pixel/cmi": (0.27, 0.002), "pixel/attention": (0.21, 0.002)}


def symmetric_swaps(pairs: dict) -> dict:
    """{a: b} -> {a: b, b: a}."""
    out = dict(pairs)
    out.update({v: k for k, v in pairs.items()})
    return out


# ------------------------------------------------------------------------------------------------
# Karras ODE sampler
# ------------------------------------------------------------------------------------------------
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n sigmas from sigma_max down to sigma_min, (max^(1/rho) + i/(n-1) (min^(1/rho) -
    max^(1/rho)))^rho (Karras et al. 2022, Eq. 5), without the final 0."""
    if n < 2 or not (0 < sigma_min < sigma_max):
        raise ValueError(f"karras_sigmas: need n >= 2 and 0 < sigma_min < sigma_max, got "
                         f"{n}, {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, int(n), dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_range(model) -> tuple[float, float]:
    """(sigma_min, sigma_max) = exp(-a/2) at the ends of the trained logSNR range."""
    lo, hi = model.logsnr_range
    return math.exp(-hi / 2), math.exp(-lo / 2)


def _denoised(model, x, sigma: float, emb):
    """D(x; sigma) = x - sigma * eps(z, t(a), emb) with z = x / sqrt(1 + sigma^2), a = -2 log sigma."""
    a = -2.0 * math.log(sigma)
    t = model.logsnr_to_t(torch.tensor([a]))[0]
    z = x / math.sqrt(1.0 + sigma ** 2)
    return x - sigma * model.eps(z.to(model.dtype), t, emb).float()


def heun_step(model, x, emb, s0: float, s1: float):
    """One deterministic Heun step of dx/dsigma = (x - D(x; sigma)) / sigma from s0 to s1 (either
    direction); Euler when s1 == 0."""
    d = (x - _denoised(model, x, s0, emb)) / s0
    x1 = x + d * (s1 - s0)
    if s1 == 0:
        return x1
    d1 = (x1 - _denoised(model, x1, s1, emb)) / s1
    return x + 0.5 * (d + d1) * (s1 - s0)


@torch.inference_mode()
def _heun_walk(model, x, prompts, num_steps, rho, up: bool, who: str, what: str, progress):
    """Heun steps along the Karras schedule of ``model``, up (sigma_min -> sigma_max) or down."""
    sig = karras_sigmas(num_steps, *sigma_range(model), rho=rho).tolist()
    if up:
        sig = sig[::-1]
    emb = model.encode_prompts(list(prompts))
    x = torch.as_tensor(x).to(model.device, torch.float32)
    if len(emb) != len(x):
        raise ValueError(f"{who}: {len(emb)} prompts for {len(x)} {what}")
    for i in tqdm(range(len(sig) - 1), disable=not progress, desc=who):
        x = heun_step(model, x, emb, sig[i], sig[i + 1])
    return x


def invert(model, latents, prompts, *, num_steps: int = 100, rho: float = 7.0,
           progress: bool = False) -> torch.Tensor:
    """Clean latents -> "noise" x(sigma_max) under ``prompts`` (one per latent): Heun steps up the
    Karras schedule (num_steps sigmas, num_steps - 1 steps, 2 UNet calls each)."""
    return _heun_walk(model, latents, prompts, num_steps, rho, True, "invert", "latents", progress)


def regenerate(model, x_T, prompts, *, num_steps: int = 100, rho: float = 7.0,
               progress: bool = False) -> torch.Tensor:
    """x(sigma_max) -> latents at sigma_min under ``prompts`` (one per row): Heun steps down the
    same schedule as :func:`invert`."""
    return _heun_walk(model, x_T, prompts, num_steps, rho, False, "regenerate", "starting points",
                      progress)


def change_map(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Sum over channels of the squared latent difference: [B, C, h, w] x2 -> [B, h, w]."""
    return (torch.as_tensor(z_a).double() - torch.as_tensor(z_b).double()).pow(2).sum(1)


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------
def prompt_intervention(model, images=None, captions=None, words=None, *, latents=None,
                        swaps: dict | None = None, placeholder: str = "_",
                        num_steps: int = 100, rho: float = 7.0, n_points: int = 20,
                        noises_per_point: int = 120, clip: float = EDIT_CLIP, seed: int = 0,
                        streams=None, images_per_call: int = 16, batch_size=None,
                        skip_factors=(8,), progress: bool = False) -> dict:
    """Omit / swap one word of each caption and measure the change (image_edit.py).

    For image b with caption y_b and word w_b: invert under y_b, regenerate with y_b (the
    reference "recover_real", traced for the word's cross-attention as the original traces it),
    with w_b replaced by ``placeholder`` (omit) and by ``swaps[w_b]`` (swap; skipped when
    ``swaps`` is None or lacks the word).  Information per image: conditions [y, omit, swap, w,
    ""]: CMI omit = i(x; y | omit), CMI swap = i(x; y | swap), MI of the word = i(x; w).

    Returns a dict of stacked tensors (latent grid [h, w] maps) and lists: "captions",
    "omit_prompts", "swap_prompts", "latents", "recon", "omit", "swap" (latents),
    "recon_error" [B] (||recon - x||^2 / ||x||^2), "change_omit"/"change_swap" [B, h, w],
    "cmi_omit"/"cmi_swap"/"mi_word" [B] (standard estimator), "*_orth" [B] (orthogonal),
    "cmi_omit_map"/"cmi_swap_map"/"mi_word_map" [B, h, w] (orthogonal pixel maps) and
    "attention" [B, h, w].  Swap entries of images without a swap partner are NaN.
    """
    z0 = _as_latents(model, images, latents).float()
    B = z0.shape[0]
    if captions is None or words is None or len(captions) != B or len(words) != B:
        raise ValueError(f"prompt_intervention: need one caption and one word per image ({B} images)")
    streams = list(range(B)) if streams is None else [int(s) for s in streams]
    swaps = swaps or {}
    omit_p = [omit_word(c, w, placeholder) for c, w in zip(captions, words)]
    has_swap = [w in swaps for w in words]
    swap_p = [swap_word(c, w, swaps[w]) if s else c for c, w, s in zip(captions, words, has_swap)]
    integ = Integration.for_editing(model, clip=clip)

    keys = ("recon", "omit", "swap", "attention")
    acc = {k: [] for k in keys}
    for b0 in tqdm(range(0, B, images_per_call), disable=not progress, desc="interventions"):
        sl = slice(b0, b0 + images_per_call)
        n = len(range(B)[sl])
        xT = invert(model, z0[sl], captions[sl], num_steps=num_steps, rho=rho)
        store = AttentionStore(model.latent_shape[1:], n, skip_factors=skip_factors)
        store.set_rows(torch.cat([torch.arange(n), torch.full((2 * n,), -1)]))
        with capture_cross_attention(model, store):
            out = regenerate(model, torch.cat([xT, xT, xT]), captions[sl] + omit_p[sl] + swap_p[sl],
                             num_steps=num_steps, rho=rho).cpu()
        acc["recon"].append(out[:n])
        acc["omit"].append(out[n:2 * n])
        acc["swap"].append(out[2 * n:])
        acc["attention"].append(word_maps(store.maps(), model.tokenizer, captions[sl], words[sl]))
    res = {k: torch.cat(v) for k, v in acc.items()}

    info = information(model, z0, [[y, o, s, w, ""] for y, o, s, w in
                                   zip(captions, omit_p, swap_p, words)],
                       [(0, 1), (0, 2), (3, 4)], n_samples=n_points,
                       noises_per_point=noises_per_point, integration=integ, pixel=True,
                       seed=seed, streams=streams, batch_size=batch_size, progress=progress)
    nan = torch.tensor([0.0 if s else float("nan") for s in has_swap], dtype=torch.float64)
    for j, name in enumerate(("cmi_omit", "cmi_swap", "mi_word")):
        pad = nan if name == "cmi_swap" else 0.0
        res[name] = info["standard"][:, j] + pad
        res[name + "_orth"] = info["orthogonal"][:, j] + pad
        res[name + "_map"] = info["orthogonal_map"][:, j] + (nan.view(-1, 1, 1) if name == "cmi_swap" else 0)
    res["change_omit"] = change_map(res["recon"], res["omit"])
    res["change_swap"] = change_map(res["recon"], res["swap"]) + nan.view(-1, 1, 1)
    res["recon_error"] = (change_map(res["recon"], z0).sum((-2, -1)) /
                          z0.double().pow(2).sum((1, 2, 3)))
    res.update(latents=z0, captions=list(captions), words=list(words), omit_prompts=omit_p,
               swap_prompts=[p if s else None for p, s in zip(swap_p, has_swap)])
    return res


def intervention_correlations(res: dict, n_boot: int = 100, frac: float = 0.9,
                              seed: int = 0) -> list[dict]:
    """Pearson correlation of CMI and of attention with the image change (paper Table 3), for
    omit and swap, image level (across images: score vs total change) and pixel level (per image
    over latent pixels, then the mean), with bootstrap error bars (:func:`pearson_bootstrap`).
    Rows: {"intervention", "level", "predictor", "r", "err", "std", "n"}."""
    rows = []
    preds = {"omit": {"cmi": ("cmi_omit", "cmi_omit_map"), "cmi_orth": ("cmi_omit_orth", "cmi_omit_map"),
                      "attention": (None, "attention")},
             "swap": {"cmi": ("cmi_swap", "cmi_swap_map"), "cmi_orth": ("cmi_swap_orth", "cmi_swap_map"),
                      "attention": (None, "attention")}}
    for kind, table in preds.items():
        change = res[f"change_{kind}"].double()
        ok = ~torch.isnan(change.flatten(1)).any(1)
        if int(ok.sum()) < 3:
            continue
        total = change[ok].sum((-2, -1)).numpy()
        for name, (scalar, pmap) in table.items():
            m = res[pmap].double()[ok]
            value = m.sum((-2, -1)).numpy() if scalar is None else res[scalar].double()[ok].numpy()
            for level, x, y, per in (("image", value, total, False),
                                     ("pixel", m.flatten(1).numpy(), change[ok].flatten(1).numpy(), True)):
                if level == "pixel" and name == "cmi_orth":
                    continue  # same map as "cmi"
                r = pearson_bootstrap(x, y, n_boot=n_boot, frac=frac, seed=seed, per_item=per)
                rows.append({"intervention": kind, "level": level, "predictor": name, "r": r["r"],
                             "err": r["err"], "std": r["std"], "n": r["n"]})
    return rows



def intervention_rows(items, word_types=("noun",), swaps: dict | None = None,
                      one_per_image: bool = True, max_images: int | None = None) -> dict:
    """COCO-IT rows -> the inputs of :func:`prompt_intervention`: {"images", "captions", "words"}.

    Keeps rows whose word type is in ``word_types`` (all rows when the csv has no type column, as
    COCO100-IT), one row per image (the first) unless ``one_per_image`` is False; with ``swaps``
    given, rows whose word has a swap partner come first within an image.
    """
    items = list(items)
    if not items:
        raise ValueError("intervention_rows: no rows")
    if any(str(it.word_type) for it in items) and word_types:
        items = [it for it in items if str(it.word_type) in set(word_types)]
    if swaps:
        first = {}
        for i, it in enumerate(items):
            first.setdefault(it.image_id, i)
        items = sorted(items, key=lambda it: (first[it.image_id], it.word not in swaps))
    out, seen = {"images": [], "captions": [], "words": [], "image_ids": []}, set()
    for it in items:
        if one_per_image and it.image_id in seen:
            continue
        seen.add(it.image_id)
        out["images"].append(it.image)
        out["captions"].append(it.caption)
        out["words"].append(it.word)
        out["image_ids"].append(it.image_id)
        if max_images and len(out["images"]) >= max_images:
            break
    if not out["images"]:
        raise ValueError(f"intervention_rows: no row has a word type in {list(word_types)}")
    return out


def correlation_table(rows: list[dict], intervention: str = "omit", with_err: bool = True):
    """Paper Table 3 layout for one intervention: rows Image-level / Pixel-level, columns
    i(x;y|c) (standard estimator image level, orthogonal map pixel level) and Attention; cells
    "r (+- err)" strings when ``with_err`` else the correlations."""
    import pandas as pd

    sel = {(r["level"], r["predictor"]): r for r in rows if r["intervention"] == intervention}
    if not sel:
        raise ValueError(f"correlation_table: no correlations for intervention {intervention!r}; "
                         f"intervention_correlations leaves out an intervention with fewer than 3 "
                         f"edited images: edit more images (e.g. max_images >= 3)")
    out = {}
    for level, lab in (("image", "Image-level"), ("pixel", "Pixel-level")):
        out[lab] = {}
        for pred, col in (("cmi", "i(x;y|c)"), ("attention", "Attention")):
            r = sel.get((level, pred))
            if r is None:
                out[lab][col] = None
            else:
                out[lab][col] = f"{r['r']:.3f} (+-{r['err']:.3f})" if with_err else r["r"]
    return pd.DataFrame(out).T


def plot_interventions(model, res: dict, indices, kind: str = "omit"):
    """Rows = images: original (decoded reconstruction under the caption), edited (word omitted
    or swapped), change map, CMI map of the word, attention map (latent grid, upsampled)."""
    import textwrap

    import matplotlib.pyplot as plt

    indices = list(indices)
    prompts = res["omit_prompts"] if kind == "omit" else res["swap_prompts"]
    rec = model.decode_latents(res["recon"][indices].to(model.dtype)).float().cpu()
    edit = model.decode_latents(res[kind][indices].to(model.dtype)).float().cpu()
    R = rec.shape[-1]
    maps = [("change", res[f"change_{kind}"]), ("i(x;y|c) map", res[f"cmi_{kind}_map"]),
            ("attention", res["attention"])]
    fig, axes = plt.subplots(len(indices), 5, figsize=(10.5, 2.5 * len(indices) + 0.5), squeeze=False)
    for row, i in zip(axes, range(len(indices))):
        b = indices[i]
        to_img = lambda x: ((x.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)  # noqa: E731
        row[0].imshow(to_img(rec[i]))
        row[0].set_title(textwrap.fill("original: " + res["captions"][b], 30), fontsize=9)
        row[1].imshow(to_img(edit[i]))
        row[1].set_title(textwrap.fill(f"{'omitted' if kind == 'omit' else 'swapped'}: {prompts[b]}",
                                       30), fontsize=9)
        for ax, (name, m) in zip(row[2:], maps):
            ax.imshow(upsample_map(m[b].double(), R).numpy(), cmap="viridis")
            ax.set_title(f"{name}" + (f" ({res['words'][b]})" if name != "change" else ""), fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    what = "a word omitted" if kind == "omit" else "a word swapped"
    fig.suptitle(f"Prompt intervention ({what}): the reconstruction, the edited image, where the "
                 f"image changed,\nthe word's CMI map and its attention map (maps: dark = low, "
                 f"yellow = high)", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.7 / fig.get_figheight(),
                        wspace=0.1, hspace=0.3)
    return fig
