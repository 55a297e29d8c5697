"""Measuring unCLIP on the toy world: text-to-image fidelity (prior + decoder, no-prior ablations,
the toy SD), CLIP score, a Frechet distance on CLIP image features, variations, interpolation
paths and text diffs - every judgement by the package's pixel checker (``toyworld.check_prompt`` /
``detect_objects``) against the toy world's ground truth.

Generated images are cached per example (``cache.ResultCache``; key: model, method, sampler
parameters), so a killed notebook resumes.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import cache as cache_mod, toyworld as tw
from ..keys import weights_fingerprint
from ..models import T2IModel
from ..toyworld.training import to_unit

#: zero-shot MS-COCO 256x256 FID of the paper (Ramesh et al. 2022, Table 2)
PAPER_FID = {"unCLIP (diffusion prior)": 10.39, "unCLIP (AR prior)": 10.63, "GLIDE": 12.24,
             "DALL-E": 28.0}
METHODS = ("prior", "text", "caption", "sd")
METHOD_LABELS = {"prior": "unCLIP: prior + decoder", "text": "decoder fed z_t (no prior)",
                 "caption": "decoder, caption only (no z)", "sd": "toy SD (GLIDE analogue)"}


# ------------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------------
def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, FID's formula).

    tr((S1 S2)^(1/2)) is computed as the sum of sqrt of the eigenvalues of
    S1^(1/2) S2 S1^(1/2) (symmetric PSD, so the eigenvalues are real and >= 0 up to round-off),
    in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"frechet_distance: shapes do not agree (mu {mu1.shape}/{mu2.shape}, "
                         f"sigma {s1.shape}/{s2.shape})")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (unbiased covariance,
    as torchmetrics' FrechetInceptionDistance)."""
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: need two [N >= 2, D] feature sets of equal D, got "
                         f"{a.shape} and {b.shape}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                       np.cov(b, rowvar=False))


def clip_score(clip_embedder, images, prompts) -> float:
    """CLIPScore as torchmetrics defines it: mean over pairs of 100 * max(cos(image, text), 0)."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    im = clip_embedder.encode_images(list(images))
    tx = clip_embedder.encode_texts(list(prompts))
    return float((100 * (im * tx).sum(1).clamp(min=0)).mean())


def model_key(model) -> dict:
    """Cache identity of a generator: its name and a sha1 of the weights that shape its images
    (UNet, VAE and, for unCLIP, the prior), so that retraining or replacing a checkpoint in place
    never returns images cached from the old weights.  Computed once per model object."""
    if getattr(model, "_t2i_cache_key", None) is None:
        model._t2i_cache_key = dict(name=str(model.name), weights={
            part: weights_fingerprint(getattr(model, part)) for part in ("unet", "vae", "prior")
            if getattr(model, part, None) is not None})
    return model._t2i_cache_key


class Generators:
    """The generators of a comparison by method, each loaded on first use.

    ``loaders``: {name: zero-argument function returning the model}; ``methods``: {method: name}
    (e.g. "prior", "text", "caption" -> the unCLIP folder, "sd" -> the baseline).  Calling the
    holder with a method returns its model.  With ``one_at_a_time`` only one model is held: asking
    for another frees the current one first (``gc.collect``) and loads the other - for a full-size
    comparison on a machine whose memory holds one of them (Stable unCLIP with the Karlo prior
    takes 11 GB in float32, SD 2.1 another 5 GB), at the price of a reload per switch.  Results do
    not depend on it: the generators are deterministic given their seeds and cached per example.
    """

    def __init__(self, loaders: dict, methods: dict, one_at_a_time: bool = False):
        unknown = sorted(set(methods.values()) - set(loaders))
        if unknown:
            raise ValueError(f"Generators: methods name unknown models {unknown}; loaders: {sorted(loaders)}")
        self.loaders, self.methods, self.one_at_a_time = dict(loaders), dict(methods), bool(one_at_a_time)
        self._held: dict = {}
        self.loads = 0

    def model(self, name: str):
        """The model ``name`` (a key of ``loaders``), loaded now if it is not held."""
        if name not in self.loaders:
            raise ValueError(f"Generators: unknown model {name!r}; known: {sorted(self.loaders)}")
        if name not in self._held:
            if self.one_at_a_time and self._held:
                import gc
                self._held.clear()
                gc.collect()
            self._held[name] = self.loaders[name]()
            self.loads += 1
        return self._held[name]

    def __call__(self, method: str):
        if method not in self.methods:
            raise ValueError(f"Generators: unknown method {method!r}; known: {sorted(self.methods)}")
        return self.model(self.methods[method])

    @property
    def held(self) -> list:
        """Names of the models in memory now."""
        return list(self._held)


# ------------------------------------------------------------------------------------------------
# a shared first stage for the GLIDE-analogue comparison
# ------------------------------------------------------------------------------------------------
def sd_with_vae_of(sd, unclip_model):
    """``sd`` (a ``models.T2IModel``) decoding with ``unclip_model``'s VAE, so that a comparison of
    the two generators differs only in the diffusion models.  Allowed only when both VAEs have the
    same encoder weights and scaling factor (one latent space): true of SD 2.1 and its unCLIP,
    and of the toy pair, whose unCLIP VAE is the toy SD's with a fine-tuned decoder
    (``unclip.training``).  Otherwise a ValueError names the difference."""
    a, b = sd.vae, unclip_model.vae
    if abs(float(sd.scaling_factor) - float(unclip_model.scaling_factor)) > 1e-9:
        raise ValueError(f"sd_with_vae_of: scaling factors differ ({sd.scaling_factor} vs "
                         f"{unclip_model.scaling_factor}); the VAEs do not share a latent space - "
                         f"compare with each model's own VAE instead")
    ea = {k: v for k, v in a.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    eb = {k: v for k, v in b.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    if ea.keys() != eb.keys() or any(not torch.equal(ea[k].float().cpu(), eb[k].float().cpu()) for k in ea):
        raise ValueError("sd_with_vae_of: the two VAE encoders differ, so their latent spaces do not "
                         "match; compare with each model's own VAE instead")
    return T2IModel(sd.tokenizer, sd.text_encoder, b, sd.unet, sd.scheduler,
                    name=f"{sd.name}+vae:{unclip_model.name}", device=sd.device, dtype=sd.dtype)


# ------------------------------------------------------------------------------------------------
# generation with caching
# ------------------------------------------------------------------------------------------------
def generate_cached(model, prompts, method: str, *, seed: int = 0, num_steps: int = 25,
                    guidance_scale: float = 3.0, prior_guidance: float = 4.0, prior_steps: int = 25,
                    n_candidates: int = 2, caption: bool = True, cache: bool = True,
                    batch_size: int = 50, progress: bool = True) -> np.ndarray:
    """Images [N, R, R, 3] for ``prompts`` by ``method``: "prior" / "text" / "caption" (an
    :class:`unclip.UnCLIPModel`) or "sd" (a ``models.T2IModel``).  Prompt i uses seed (seed, i)
    whatever the batch, so per-example caching is exact."""
    prompts = list(prompts)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    key = dict(model=model_key(model), method=method, seed=seed, num_steps=num_steps,
               guidance_scale=guidance_scale, prior_guidance=prior_guidance, prior_steps=prior_steps,
               n_candidates=n_candidates, caption=caption, prompts=prompts)
    rc = cache_mod.ResultCache("unclip_generate", key, enabled=cache)

    def run(ids):
        ps = [prompts[i] for i in ids]
        if method == "sd":
            # T2IModel seeds item j of a call by (seed, j): shift the seed per chunk so that the
            # noise of prompt i does not depend on how the prompts are chunked
            return [model.generate([p], num_steps=num_steps, guidance_scale=guidance_scale,
                                   seed=seed * 1009 + i)[0] for p, i in zip(ps, ids)]
        return list(model.generate(ps, mode=method, caption=caption, n_candidates=n_candidates,
                                   prior_steps=prior_steps, prior_guidance=prior_guidance,
                                   num_steps=num_steps, guidance_scale=guidance_scale,
                                   seeds=[seed * 1009 + i for i in ids]))

    res = cache_mod.map_cached(run, range(len(prompts)), rc, desc=f"generate ({method})",
                               progress=progress, chunk=batch_size)
    return np.stack([res[i] for i in range(len(prompts))])


def fidelity(images, prompts) -> dict:
    """Rates of the checker's booleans and ``match`` (colour and shape bound to the same objects,
    and the relation for relational prompts) over (image, prompt) pairs."""
    rows = []
    for im, p in zip(images, prompts):
        r = dict(tw.check_prompt(im, p))
        r["match"] = bool(r.get("both", False) and r.get("relation_ok", True))
        rows.append(r)
    keys = sorted({k for r in rows for k in r})
    out = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    out["n"] = len(rows)
    out["n_match"] = int(sum(r["match"] for r in rows))
    out["matches"] = [bool(r["match"]) for r in rows]
    return out


def paired_comparison(matches_a, matches_b) -> dict:
    """Exact McNemar test of two methods judged on the same prompts (and seeds): counts of prompts
    only A / only B got right, and the two-sided binomial p-value on those discordant pairs."""
    from scipy.stats import binomtest

    a, b = np.asarray(matches_a, bool), np.asarray(matches_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired_comparison: {a.shape} vs {b.shape} prompts")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return dict(n=int(len(a)), rate_a=float(a.mean()), rate_b=float(b.mean()), only_a=only_a,
                only_b=only_b, p_value=p)


# ------------------------------------------------------------------------------------------------
# attributes of generated images
# ------------------------------------------------------------------------------------------------
def main_object(image) -> dict | None:
    """colour / shape / size / centroid of the largest detected object, or None (no object)."""
    found = tw.detect_objects(image)
    if not found:
        return None
    o = found[0]
    return dict(colour=o["colour"], shape=o["shape"], size=o["size"], centroid=o["centroid"])


@torch.inference_mode()
def vae_round_trip_reads(vae, samples, batch_size: int = 256) -> dict:
    """The first stage's ceiling: per (shape, size) of single-object ``samples``, the fraction of
    VAE round trips (decode of the posterior mean) in which the checker reads the ground-truth
    colour, shape and size.  No latent diffusion model decoding through ``vae`` can keep an
    attribute more often than its round trip does."""
    samples = list(samples)
    if not samples or any(len(s.scene.objects) != 1 for s in samples):
        raise ValueError("vae_round_trip_reads: needs single-object samples "
                         "(toyworld.make_samples(n, seed, kinds=('single',)))")

    dev, dt = next(vae.parameters()).device, next(vae.parameters()).dtype
    out = []
    for i in range(0, len(samples), batch_size):
        x = to_unit(torch.from_numpy(np.stack([np.asarray(s.image) for s in samples[i:i + batch_size]])))
        x = x.to(dev, dt)
        rt = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out.append(((rt + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    acc: dict = {}
    for im, s in zip(np.concatenate(out), samples):
        o, got = s.scene.objects[0], main_object(im)
        ok = got is not None and (got["colour"], got["shape"], got["size"]) == (o.colour, o.shape, o.size)
        acc.setdefault((o.shape, o.size), []).append(ok)
    return {k: (int(np.sum(v)), len(v)) for k, v in sorted(acc.items())}


def _single_object_sources(n: int, seed: int):
    return tw.make_samples(n, seed, kinds=("single",))


def variation_stats(model, samples, n_variations: int = 4, *, seed: int = 0, num_steps: int = 25,
                    guidance_scale: float = 3.0, method: str = "fresh_noise", eta=None,
                    cache: bool = True, progress: bool = True) -> dict:
    """Make ``n_variations`` variations of each (single-object) source image
    (:meth:`UnCLIPModel.variations` with ``method`` and ``eta``: fresh decoder noise, or the
    paper's DDIM inversion decoded with eta > 0); report how often a variation keeps the source's
    colour, shape, size (and colour and shape together), how far its object moved from the
    source's (``displacement_px``: mean distance between the checker's object centroids, pixels),
    and diversity: mean pairwise RMS pixel distance ([0, 1] units) of the variations of one
    source, and mean pairwise centroid distance in pixels."""
    samples = list(samples)
    key = dict(model=model_key(model), n_var=n_variations, seed=seed, num_steps=num_steps,
               guidance_scale=guidance_scale,
               images=[cache_mod.fingerprint(s.image) for s in samples])
    if method != "fresh_noise" or eta is not None:      # the fresh-noise default keeps its key
        key.update(method=method, eta=eta)
    rc = cache_mod.ResultCache("unclip_variations", key, enabled=cache)

    def run(ids):
        ims = [samples[i].image for i in ids]
        v = model.variations(ims, n_variations, seed=seed, num_steps=num_steps,
                             guidance_scale=guidance_scale, method=method, eta=eta)
        return list(v)

    res = cache_mod.map_cached(run, range(len(samples)), rc, desc="variations", progress=progress,
                               chunk=16)
    keep = {k: [] for k in ("colour", "shape", "size", "colour_and_shape")}
    pix, cen, moved = [], [], []
    for i, s in enumerate(samples):
        src = s.scene.objects[0]
        src_obj = main_object(s.image)
        objs = []
        for im in res[i]:
            o = main_object(im)
            objs.append(o)
            if o is not None and src_obj is not None:
                moved.append(float(np.hypot(*np.subtract(o["centroid"], src_obj["centroid"]))))
            keep["colour"].append(o is not None and o["colour"] == src.colour)
            keep["shape"].append(o is not None and o["shape"] == src.shape)
            keep["size"].append(o is not None and o["size"] == src.size)
            keep["colour_and_shape"].append(o is not None and o["colour"] == src.colour
                                            and o["shape"] == src.shape)
        v = res[i].astype(np.float64) / 255
        for a in range(len(v)):
            for b in range(a + 1, len(v)):
                pix.append(float(np.sqrt(((v[a] - v[b]) ** 2).mean())))
                if objs[a] is not None and objs[b] is not None:
                    cen.append(float(np.hypot(*np.subtract(objs[a]["centroid"], objs[b]["centroid"]))))
    out = {f"keeps_{k}": float(np.mean(v)) for k, v in keep.items()}
    out.update(n_sources=len(samples), n_variations=n_variations,
               n_keeps_colour_and_shape=int(sum(keep["colour_and_shape"])),
               n_total=len(keep["colour"]),
               displacement_px=float(np.mean(moved)) if moved else float("nan"),
               diversity_pixel_rms=float(np.mean(pix)) if pix else float("nan"),
               diversity_centroid_px=float(np.mean(cen)) if cen else float("nan"))
    return out, res


def interpolation_pairs(n: int, seed: int):
    """Pairs of single-object toy images that differ in both colour and shape (stream ``seed``)."""
    pool = _single_object_sources(8 * n + 16, seed)
    pairs, used = [], set()
    for i, a in enumerate(pool):
        if i in used:
            continue
        for j in range(i + 1, len(pool)):
            b = pool[j]
            oa, ob = a.scene.objects[0], b.scene.objects[0]
            if j not in used and oa.colour != ob.colour and oa.shape != ob.shape:
                pairs.append((a, b))
                used.update((i, j))
                break
        if len(pairs) == n:
            break
    return pairs


def interpolation_paths(model, pairs, thetas, *, seed: int = 0, num_steps: int = 25,
                        guidance_scale: float = 3.0, progress: bool = True):
    """For each pair (A, B), decode slerp(z_A, z_B, theta) for every theta from one fixed decoder
    noise; return per-theta fractions of decodes showing A's colour / B's colour / A's shape /
    B's shape, and the images [n_pairs, n_theta, R, R, 3]."""
    from tqdm.auto import tqdm

    thetas = [float(t) for t in thetas]
    ims = []
    for k, (a, b) in enumerate(tqdm(pairs, desc="interpolations", disable=not progress)):
        ims.append(model.interpolate(a.image, b.image, thetas, seed=seed * 1009 + k,
                                     num_steps=num_steps, guidance_scale=guidance_scale))
    ims = np.stack(ims)
    rows = []
    for j, th in enumerate(thetas):
        c = {"colour_A": 0, "colour_B": 0, "shape_A": 0, "shape_B": 0}
        for k, (a, b) in enumerate(pairs):
            o = main_object(ims[k, j])
            oa, ob = a.scene.objects[0], b.scene.objects[0]
            if o is not None:
                c["colour_A"] += o["colour"] == oa.colour
                c["colour_B"] += o["colour"] == ob.colour
                c["shape_A"] += o["shape"] == oa.shape
                c["shape_B"] += o["shape"] == ob.shape
        rows.append(dict(theta=th, **{k: v / len(pairs) for k, v in c.items()}))
    return rows, ims


# ------------------------------------------------------------------------------------------------
# text diffs
# ------------------------------------------------------------------------------------------------
EDITS = ("colour", "shape", "size")


def text_diff_edits(samples, edit: str) -> list[tuple]:
    """(sample, source caption, target caption, target value) for single-object samples.
    colour / shape: "a {c} {s}" -> the next colour / shape in the world's order (a fixed,
    balanced choice); size: "a {z} {c} {s}" -> the other size."""
    if edit not in EDITS:
        raise ValueError(f"edit must be one of {EDITS}, got {edit!r}")
    cols, shapes = list(tw.COLOURS), list(tw.SHAPES)
    out = []
    for k, s in enumerate(samples):
        o = s.scene.objects[0]
        if edit == "colour":
            new = cols[(cols.index(o.colour) + 1 + k % (len(cols) - 1)) % len(cols)]
            out.append((s, f"a {o.colour} {o.shape}", f"a {new} {o.shape}", new))
        elif edit == "shape":
            new = shapes[(shapes.index(o.shape) + 1 + k % (len(shapes) - 1)) % len(shapes)]
            out.append((s, f"a {o.colour} {o.shape}", f"a {o.colour} {new}", new))
        else:
            new = "large" if o.size == "small" else "small"
            out.append((s, f"a {o.size} {o.colour} {o.shape}", f"a {new} {o.colour} {o.shape}", new))
    return out


def text_diff_sweep(model, samples, edit: str, thetas, *, num_steps: int = 25,
                    guidance_scale: float = 3.0, cache: bool = True, progress: bool = True):
    """Text diffs of single-object sources for one ``edit``: per theta the fraction of edits whose
    intended attribute reached the target, the fractions keeping each other attribute, and
    ``success`` (target reached and the other two kept).  Returns (rows, images
    [n, n_theta, R, R, 3], edits)."""
    thetas = [float(t) for t in thetas]
    edits = text_diff_edits(samples, edit)
    key = dict(model=model_key(model), edit=edit, thetas=thetas, num_steps=num_steps,
               guidance_scale=guidance_scale,
               items=[(cache_mod.fingerprint(e[0].image), e[1], e[2]) for e in edits])
    rc = cache_mod.ResultCache("unclip_text_diff", key, enabled=cache)
    res = cache_mod.map_cached(
        lambda i: model.text_diff(edits[i][0].image, edits[i][1], edits[i][2], thetas,
                                  num_steps=num_steps, guidance_scale=guidance_scale),
        range(len(edits)), rc, desc=f"text diffs ({edit})", progress=progress)
    others = [a for a in EDITS if a != edit]
    rows = []
    for j, th in enumerate(thetas):
        n = dict(target=0, success=0, **{f"keeps_{a}": 0 for a in others})
        for i, (s, _, _, new) in enumerate(edits):
            o = main_object(res[i][j])
            src = s.scene.objects[0]
            if o is None:
                continue
            hit = o[edit] == new
            kept = {a: o[a] == getattr(src, a) for a in others}
            n["target"] += hit
            for a in others:
                n[f"keeps_{a}"] += kept[a]
            n["success"] += hit and all(kept.values())
        rows.append(dict(edit=edit, theta=th, n=len(edits),
                         **{k: v / len(edits) for k, v in n.items()}))
    return rows, np.stack([res[i] for i in range(len(edits))]), edits


def best_theta(rows, target_min: float = 0.7, keep_key: str = "keeps_shape", keep_min: float = 0.8,
               theta_max: float = 0.5):
    """Smallest theta <= theta_max whose row reaches ``target_min`` on the target while keeping
    ``keep_key`` >= ``keep_min``; None if there is none."""
    for r in sorted(rows, key=lambda r: r["theta"]):
        if r["theta"] <= theta_max + 1e-9 and r["target"] >= target_min and r[keep_key] >= keep_min:
            return r
    return None
