"""Writes notebooks/30_unclip_quality, 31_unclip_variations and 32_unclip_text_diffs (paper 3, unCLIP).

    .venv/bin/python notebooks/src/build_3x.py            # (re)write the three notebooks, no outputs
    T2I_CACHE=$(mktemp -d) .venv/bin/python -m t2i_common.runner 30 31 32   # execute (cold)

Interpretation cells are filled from ``--interpret FILE.json`` (notebook stem -> markdown) after a
default run; without it they keep the text below.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent.parent


def md(s):
    return nbf.v4.new_markdown_cell(s.strip("\n"))


def code(s, tags=None):
    c = nbf.v4.new_code_cell(s.strip("\n"))
    if tags:
        c.metadata["tags"] = tags
    return c


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = cells
    return nb


PAPER = """Paper 3 (seed 002): Ramesh, Dhariwal, Nichol, Chu, Chen, *Hierarchical Text-Conditional
Image Generation with CLIP Latents* (unCLIP / DALL-E 2), 2022."""

MODEL = """**The model** (`t2i_common.unclip`, layout of diffusers' Stable unCLIP): a diffusion
**prior** (`PriorTransformer`, x0 objective) maps the CLIP text embedding $z_t$ and the caption
tokens to a CLIP image embedding $z_i$; a **decoder** (the toy SD UNet with a projection class
embedding, initialised from the toy SD as Stable unCLIP was from SD 2.1) maps $z_i$ (and
optionally the caption) to an image.  The toy checkpoint `data/toy-unclip` loads in plain
`diffusers.StableUnCLIPPipeline` and `StableUnCLIPImg2ImgPipeline`; it was trained by
`t2i_common.unclip_training` (decoder: embedding dropped 10 %, caption 50 %; prior: caption
dropped 10 %).  Sampling: prior DDIM with guidance 4 and the paper's best-of-2 by
$\\hat z_i \\cdot \\hat z_t$; decoder DDIM with guidance on (caption, $z_i$)."""

LOAD = """
import json
from pathlib import Path
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import torch
from t2i_common import models, paths, report, toyworld, training, unclip, unclip_eval, unclip_training

torch.set_num_threads(threads)
report.setup_matplotlib()
out = report.outdir(out_name)
if retrain:
    unclip_training.build_toy_unclip(retrain_out, seed=seed)
    model = retrain_out
m = unclip.load_unclip(model, prior=prior, device=device)
folder = Path(unclip.resolve_unclip(model)[0])
"""


def nb30():
    return notebook([
        md(f"""
# unCLIP text-to-image quality: prior + decoder, the no-prior ablation, and the toy SD

{PAPER}

{MODEL}

The paper's headline is zero-shot MS-COCO FID (Table 2): the diffusion prior 10.39 against GLIDE's
12.24, with higher diversity at a given guidance.  Here, on held-out toy prompts, every image is
judged by the package's pixel checker (`toyworld.check_prompt`): does it show the named colour
and shape (bound to the same object), for single-object, two-object and relational prompts?
Beside the checker: a CLIP score and a Frechet distance on toy-CLIP image features against
held-out real toy images (the FID analogue; own implementation tested against closed forms).

Four generators on the same prompts and seeds:
* **unCLIP** - prior -> decoder (caption also given to the decoder, as Stable unCLIP does);
* **no prior** - the decoder fed the CLIP *text* embedding as if it were $z_i$ (the seed
  project's open question: "it is unclear if skipping this part will lead to significantly worse
  performance"; the paper's Fig. 11 / Sec. 5.1 variant);
* **caption only** - the decoder with $z_i$ zeroed (its learned null), i.e. just the caption;
* **toy SD** - the GLIDE analogue: the toy text-to-image model of the same size class.
"""),
        code("""
model = "toy-unclip"       # Stable unCLIP folder / hub id / alias (real: stabilityai/stable-diffusion-2-1-unclip)
prior = None               # separate prior (e.g. kakaobrain/karlo-v1-alpha) when the folder has none
sd_model = "toy"           # the GLIDE-analogue baseline (any SD-format folder / hub id)
clip_model = "toy-clip"    # CLIP for CLIP score and the Frechet features
retrain = False            # train the toy unCLIP from scratch first (unclip_training.build_toy_unclip)
retrain_out = "../data/toy-unclip-retrained"
seed = 0                   # held-out prompts / images use stream seed + 1
n_prompts = 40             # prompts per kind (single, two, relational)
n_fd = 120                 # generated and real images for the Frechet distance
num_steps = 25             # decoder DDIM steps
guidance_scale = 3.0       # decoder guidance
prior_steps = 25           # prior DDIM steps
prior_guidance = 4.0       # prior guidance (caption)
n_candidates = 2           # prior samples per prompt, best by dot product with z_t (paper: 2)
sweep_scales = [1.0, 2.0, 3.0, 5.0]   # decoder guidance sweep (single-object prompts)
n_sweep = 40
threads = 1
device = "cpu"
out_name = "30_unclip_quality"
""", tags=["parameters"]),
        code(LOAD + """
sd = models.load_t2i(sd_model, device=device)
clip = models.load_clip(clip_model, device=device)
gen = dict(seed=seed + 1, num_steps=num_steps, guidance_scale=guidance_scale, prior_steps=prior_steps,
           prior_guidance=prior_guidance, n_candidates=n_candidates)
def generator(method):
    return sd if method == "sd" else m
"""),
        md("## 1. Prompt fidelity by the checker"),
        code("""
kinds = ("single", "two", "relational")
prompts = {k: training.fidelity_prompts(k, n_prompts, seed + 1) for k in kinds}
images, fid = {}, {}
for meth in unclip_eval.METHODS:
    for k in kinds:
        images[meth, k] = unclip_eval.generate_cached(generator(meth), prompts[k], meth, **gen)
        fid[meth, k] = unclip_eval.fidelity(images[meth, k], prompts[k])
table = pd.DataFrame({unclip_eval.METHOD_LABELS[me]: {k: fid[me, k]["match"] for k in kinds}
                      for me in unclip_eval.METHODS}).T
table.index.name = "generator"
report.save_table(table, out, "fidelity")
table
"""),
        code("""
# NBVAL_CHECK_OUTPUT
for me in unclip_eval.METHODS:
    print(f"{unclip_eval.METHOD_LABELS[me]:32s}", "  ".join(
        f"{k} {fid[me, k]['n_match']}/{fid[me, k]['n']}" for k in kinds))
"""),
        code("""
paired = {k: unclip_eval.paired_comparison(fid["prior", k]["matches"], fid["text", k]["matches"])
          for k in kinds}
paired_df = pd.DataFrame(paired).T[["n", "rate_a", "rate_b", "only_a", "only_b", "p_value"]]
paired_df.columns = ["n", "with prior", "no prior (z_t)", "only prior right", "only no-prior right", "McNemar p"]
report.save_table(paired_df, out, "no_prior_ablation")
paired_df
"""),
        code("""
# NBVAL_CHECK_OUTPUT
for k, r in paired.items():
    verdict = ("prior better" if r["p_value"] < 0.05 and r["only_a"] > r["only_b"] else
               "no prior better" if r["p_value"] < 0.05 else "no significant difference")
    print(f"{k:11s} prior {r['rate_a']:.2f}  no-prior {r['rate_b']:.2f}  -> {verdict}")
"""),
        md("## 2. CLIP score and a Frechet distance on toy-CLIP image features"),
        code("""
real_fd = toyworld.make_samples(n_fd, seed + 1)          # prompts: captions of held-out scenes
ref_fd = toyworld.make_samples(n_fd, seed + 2)           # the reference set of real images
fd_prompts = [s.captions[0] for s in real_fd]
ref_feats = clip.encode_images([s.image for s in ref_fd]).numpy()
rows = {}
for me in unclip_eval.METHODS:
    ims = unclip_eval.generate_cached(generator(me), fd_prompts, me, **gen)
    rows[unclip_eval.METHOD_LABELS[me]] = {
        "Frechet distance (toy-CLIP)": unclip_eval.frechet_distance(clip.encode_images(list(ims)).numpy(), ref_feats),
        "CLIP score": unclip_eval.clip_score(clip, ims, fd_prompts),
        "fidelity (all kinds)": unclip_eval.fidelity(ims, fd_prompts)["match"]}
rows["real held-out images"] = {
    "Frechet distance (toy-CLIP)": unclip_eval.frechet_distance(clip.encode_images([s.image for s in real_fd]).numpy(), ref_feats),
    "CLIP score": unclip_eval.clip_score(clip, [s.image for s in real_fd], fd_prompts),
    "fidelity (all kinds)": unclip_eval.fidelity([s.image for s in real_fd], fd_prompts)["match"]}
fd_table = pd.DataFrame(rows).T
fd_table.index.name = "images"
report.save_table(fd_table, out, "frechet_clip_score")
fd_table
"""),
        code("""
paper = pd.DataFrame({"MS-COCO zero-shot FID (paper, Table 2)": unclip_eval.PAPER_FID})
ours = fd_table["Frechet distance (toy-CLIP)"].rename("toy Frechet distance (ours)")
side = pd.concat([paper, ours.rename(index={unclip_eval.METHOD_LABELS["prior"]: "unCLIP (diffusion prior)",
                                            unclip_eval.METHOD_LABELS["sd"]: "GLIDE"})], axis=1)
side.index.name = "model"
report.save_table(side, out, "paper_fid_beside_ours")
side
"""),
        code("""
order = fd_table["Frechet distance (toy-CLIP)"].drop("real held-out images").sort_values()
print("Frechet distance, best first:", " < ".join(order.index))
"""),
        md("## 3. Decoder guidance sweep (single-object prompts, prior + decoder)"),
        code("""
sweep_prompts = training.fidelity_prompts("single", n_sweep, seed + 1)
sweep = {}
for s in sweep_scales:
    ims = unclip_eval.generate_cached(m, sweep_prompts, "prior", **{**gen, "guidance_scale": s})
    f = unclip_eval.fidelity(ims, sweep_prompts)
    v = ims.reshape(len(ims), -1).astype(float) / 255
    sweep[s] = {"fidelity": f["match"], "colour": f["colour_ok"], "shape": f["shape_ok"],
                "CLIP score": unclip_eval.clip_score(clip, ims, sweep_prompts),
                "pixel std across samples": float(v.std(0).mean())}
sweep_df = pd.DataFrame(sweep).T
sweep_df.index.name = "guidance scale"
report.save_table(sweep_df, out, "guidance_sweep")
fig, ax = plt.subplots(1, 2, figsize=(8, 3))
sweep_df[["fidelity", "colour", "shape"]].plot(ax=ax[0], marker="o"); ax[0].set_ylim(0, 1.05)
sweep_df["CLIP score"].plot(ax=ax[1], marker="o", color="k"); ax[1].set_ylabel("CLIP score")
report.save_figure(fig, out, "guidance_sweep")
sweep_df
"""),
        md("## 4. Samples"),
        code("""
combos = [f"a {c} {s}" for c in toyworld.COLOURS for s in toyworld.SHAPES]
grid = {me: unclip_eval.generate_cached(generator(me), combos, me, **{**gen, "seed": seed + 2})
        for me in unclip_eval.METHODS}
fig, axes = plt.subplots(len(grid), len(combos), figsize=(len(combos) * 0.8, len(grid) * 0.95))
for r, me in enumerate(grid):
    for j, p in enumerate(combos):
        axes[r, j].imshow(grid[me][j]); axes[r, j].set_xticks([]); axes[r, j].set_yticks([])
        if r == 0: axes[r, j].set_title(p[2:].replace(" ", "\\n"), fontsize=6)
    axes[r, 0].set_ylabel(unclip_eval.METHOD_LABELS[me].replace(": ", "\\n").replace(" (", "\\n("), fontsize=5)
report.save_figure(fig, out, "samples_per_generator");
"""),
        code("""
n_fig = min(8, n_prompts)
fig, axes = plt.subplots(2, n_fig, figsize=(1.5 * n_fig, 3.4), squeeze=False)
for r, k in enumerate(("two", "relational")):
    for j in range(n_fig):
        axes[r, j].imshow(images["prior", k][j]); axes[r, j].axis("off")
        ok = fid["prior", k]["matches"][j]
        axes[r, j].set_title(("OK " if ok else "x ") + prompts[k][j][2:].replace(" to the", "\\nto the"), fontsize=5)
report.save_figure(fig, out, "unclip_two_object_samples");
"""),
        code("""
results = {
    "fidelity": {me: {k: {kk: v for kk, v in fid[me, k].items() if kk != "matches"} for k in kinds}
                 for me in unclip_eval.METHODS},
    "prior_decoder_single_fidelity": fid["prior", "single"]["match"],
    "target_prior_decoder_single_fidelity": 0.80,
    "no_prior_ablation": paired,
    "frechet_clip_score": fd_table.to_dict(), "guidance_sweep": {str(k): v for k, v in sweep.items()},
    "paper_fid": unclip_eval.PAPER_FID}
report.save_results(out, results)
ok = results["prior_decoder_single_fidelity"] >= 0.80
print(f"prior + decoder single-object fidelity {fid['prior', 'single']['n_match']}/{n_prompts}:",
      "target >= 0.80 met" if ok else "target >= 0.80 NOT met")
"""),
        md("""
INTERPRETATION_30
"""),
    ])


def nb31():
    return notebook([
        md(f"""
# unCLIP variations and interpolations

{PAPER}

{MODEL}

**Variations** (paper Sec. 3.1, Fig. 3): encode an image to its CLIP embedding $z_i$ and decode it
with different decoder noises; the paper shows that variations keep the semantics (objects,
style) and vary what CLIP does not encode.  Here, on held-out single-object toy images, the
checker reads the largest object's colour, shape and size in each variation and compares them
with the source's ground truth; diversity is the mean pairwise RMS pixel distance and the mean
pairwise centroid distance of the variations of one source.  (The first number is also the
decoder's reconstruction fidelity: decoding an image's own embedding.)

**Interpolations** (Sec. 3.2, Fig. 4): $z_\\theta = \\mathrm{{slerp}}(z_A, z_B, \\theta)$ decoded from
one fixed decoder noise; for pairs of images that differ in colour and shape we plot how often
the decoded object has A's or B's colour and shape along $\\theta$.
"""),
        code("""
model = "toy-unclip"       # Stable unCLIP folder / hub id / alias
prior = None
retrain = False
retrain_out = "../data/toy-unclip-retrained"
seed = 0                   # held-out images: stream seed + 1
n_sources = 40             # single-object source images
n_variations = 4           # variations per source
num_steps = 25
guidance_scale = 3.0
noise_levels = [0, 300]    # Stable unCLIP's image-embedding noise augmentation at sampling
n_pairs = 12               # interpolation pairs
thetas = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
threads = 1
device = "cpu"
out_name = "31_unclip_variations"
""", tags=["parameters"]),
        code(LOAD),
        md("## 1. Variations"),
        code("""
sources = toyworld.make_samples(n_sources, seed + 1, kinds=("single",))
var, var_images = unclip_eval.variation_stats(m, sources, n_variations, seed=seed, num_steps=num_steps,
                                              guidance_scale=guidance_scale)
var_df = pd.DataFrame({"value": {k: v for k, v in var.items() if not k.startswith("n_")}})
report.save_table(var_df, out, "variations")
var_df
"""),
        code("""
# NBVAL_CHECK_OUTPUT
print(f"variations keeping colour and shape: {var['n_keeps_colour_and_shape']}/{var['n_total']}"
      f" = {var['keeps_colour_and_shape']:.2f} (target >= 0.85)")
print(f"keeps colour {var['keeps_colour']:.2f}, shape {var['keeps_shape']:.2f}, size {var['keeps_size']:.2f}")
"""),
        code("""
n_fig = min(8, n_sources)
fig, axes = plt.subplots(n_variations + 1, n_fig, figsize=(1.3 * n_fig, 1.35 * (n_variations + 1)))
for j in range(n_fig):
    axes[0, j].imshow(sources[j].image); axes[0, j].set_title(sources[j].captions[-1][2:], fontsize=5)
    for r in range(n_variations):
        axes[r + 1, j].imshow(var_images[j][r])
for a in axes.flat: a.set_xticks([]); a.set_yticks([])
axes[0, 0].set_ylabel("source", fontsize=7); axes[1, 0].set_ylabel("variations", fontsize=7)
report.save_figure(fig, out, "variations");
"""),
        code("""
by_level = {}
for lv in noise_levels:
    z = m.encode_images([s.image for s in sources]).repeat_interleave(n_variations, 0)
    ims = m.decode(z, num_steps=num_steps, guidance_scale=guidance_scale, noise_level=lv, seed=seed + 5)
    keep = [unclip_eval.main_object(im) for im in ims]
    src = [s.scene.objects[0] for s in sources for _ in range(n_variations)]
    v = ims.reshape(n_sources, n_variations, -1).astype(float) / 255
    pair = np.mean([np.sqrt(((v[:, a] - v[:, b]) ** 2).mean(-1)).mean()
                    for a in range(n_variations) for b in range(a + 1, n_variations)])
    by_level[lv] = {"keeps colour and shape": np.mean([o is not None and o["colour"] == s.colour and o["shape"] == s.shape
                                                       for o, s in zip(keep, src)]),
                    "diversity (pixel RMS)": pair}
level_df = pd.DataFrame(by_level).T
level_df.index.name = "noise_level"
report.save_table(level_df, out, "variations_by_noise_level")
level_df
"""),
        md("## 2. Interpolations"),
        code("""
pairs = unclip_eval.interpolation_pairs(n_pairs, seed + 1)
path, interp_images = unclip_eval.interpolation_paths(m, pairs, thetas, seed=seed, num_steps=num_steps,
                                                      guidance_scale=guidance_scale)
path_df = pd.DataFrame(path).set_index("theta")
report.save_table(path_df, out, "interpolation_path")
fig, ax = plt.subplots(figsize=(5, 3))
for c, st in (("colour_A", "-"), ("colour_B", "-"), ("shape_A", "--"), ("shape_B", "--")):
    ax.plot(path_df.index, path_df[c], st, marker="o", label=c.replace("_", " of "))
ax.set_xlabel("theta (0 = image A, 1 = image B)"); ax.set_ylabel("fraction of decodes"); ax.legend(fontsize=7)
report.save_figure(fig, out, "interpolation_path")
path_df
"""),
        code("""
# NBVAL_CHECK_OUTPUT
crossing = {c: next((t for t, v in zip(path_df.index, path_df[c + "_B"]) if v > path_df.loc[t, c + "_A"]), None)
            for c in ("colour", "shape")}
print(f"endpoints: A's colour and shape at theta 0: {path_df.iloc[0]['colour_A']:.2f} / {path_df.iloc[0]['shape_A']:.2f};"
      f" B's at theta 1: {path_df.iloc[-1]['colour_B']:.2f} / {path_df.iloc[-1]['shape_B']:.2f}")
print("first theta where B's attribute dominates:", crossing)
"""),
        code("""
n_fig = min(6, n_pairs)
fig, axes = plt.subplots(n_fig, len(thetas) + 2, figsize=(1.1 * (len(thetas) + 2), 1.15 * n_fig), squeeze=False)
for r in range(n_fig):
    axes[r, 0].imshow(pairs[r][0].image); axes[r, -1].imshow(pairs[r][1].image)
    for j in range(len(thetas)):
        axes[r, j + 1].imshow(interp_images[r, j])
        if r == 0: axes[r, j + 1].set_title(f"{thetas[j]:.2f}", fontsize=7)
for a in axes.flat: a.set_xticks([]); a.set_yticks([])
axes[0, 0].set_title("A", fontsize=7); axes[0, -1].set_title("B", fontsize=7)
report.save_figure(fig, out, "interpolations");
"""),
        code("""
report.save_results(out, {"variations": var, "reconstruction_keeps_colour_and_shape": var["keeps_colour_and_shape"],
                          "target_reconstruction": 0.85, "variations_by_noise_level": {str(k): v for k, v in by_level.items()},
                          "interpolation_path": path, "crossing_theta": crossing})
"""),
        md("""
INTERPRETATION_31
"""),
    ])


def nb32():
    return notebook([
        md(f"""
# unCLIP text diffs: editing an image with a second prompt

{PAPER}

{MODEL}

**Text diffs** (paper Sec. 3.3, Fig. 5) - the seed project's *reach goal*, "being able to
influence the image generated with a modification prompt afterwards".  With $z_t$ the CLIP text
embedding of the target caption and $z_{{t_0}}$ that of a caption of the current image, the
direction $z_d = \\mathrm{{normalize}}(z_t - z_{{t_0}})$ is mixed into the image embedding,
$z_\\theta = \\mathrm{{slerp}}(z_i, z_d, \\theta)$, and decoded with the decoder noise fixed to the
DDIM inversion $x_T$ of the source image under $z_i$, for $\\theta$ from 0 (the DDIM
reconstruction) to 0.5.  The paper shows pictures; here each edit is scored by the checker:
for colour -> colour, shape -> shape and size edits on held-out single-object images, the
fraction of edits in which the intended attribute reaches the target while the other attributes
stay, against $\\theta$.
"""),
        code("""
model = "toy-unclip"       # Stable unCLIP folder / hub id / alias
prior = None               # the CLIP text tower lives with the prior (prior_text_encoder)
retrain = False
retrain_out = "../data/toy-unclip-retrained"
seed = 0                   # held-out images: stream seed + 1
n_edits = 24               # edits per kind
thetas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
num_steps = 25             # DDIM steps of inversion and decoding
guidance_scale = 3.0       # decoder guidance (inversion uses the same scale)
threads = 1
device = "cpu"
out_name = "32_unclip_text_diffs"
""", tags=["parameters"]),
        code(LOAD),
        code("""
sources = toyworld.make_samples(n_edits, seed + 1, kinds=("single",))
rows, edit_images, edits = [], {}, {}
for edit in unclip_eval.EDITS:
    r, edit_images[edit], edits[edit] = unclip_eval.text_diff_sweep(
        m, sources, edit, thetas, num_steps=num_steps, guidance_scale=guidance_scale)
    rows += r
sweep = pd.DataFrame(rows)
report.save_table(sweep.set_index(["edit", "theta"]), out, "text_diff_sweep")
sweep.set_index(["edit", "theta"])
"""),
        code("""
fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
for ax, edit in zip(axes, unclip_eval.EDITS):
    d = sweep[sweep.edit == edit].set_index("theta")
    cols = ["target", "success"] + [c for c in d.columns if c.startswith("keeps_")]
    d[cols].plot(ax=ax, marker="o"); ax.set_title(f"{edit} edits"); ax.set_ylim(0, 1.05)
    ax.set_xlabel("theta")
axes[0].set_ylabel("fraction of edits")
report.save_figure(fig, out, "text_diff_vs_theta")
"""),
        code("""
# NBVAL_CHECK_OUTPUT
for edit in unclip_eval.EDITS:
    d = sweep[sweep.edit == edit]
    print(f"{edit:7s} target reached at theta " + "  ".join(f"{t:.1f}:{v:.2f}" for t, v in zip(d.theta, d.target)))
best = unclip_eval.best_theta([r for r in rows if r["edit"] == "colour"], 0.7, "keeps_shape", 0.8)
print("colour edit: target >= 0.70 with shape kept >= 0.80 at theta <= 0.5:",
      "none" if best is None else f"theta {best['theta']:.1f} (target {best['target']:.2f}, shape kept {best['keeps_shape']:.2f})")
"""),
        code("""
n_fig = 4
fig, axes = plt.subplots(3 * n_fig, len(thetas) + 1, figsize=(1.1 * (len(thetas) + 1), 1.2 * 3 * n_fig))
for b, edit in enumerate(unclip_eval.EDITS):
    for i in range(n_fig):
        r = b * n_fig + i
        s, src, tgt, new = edits[edit][i]
        axes[r, 0].imshow(s.image); axes[r, 0].set_ylabel(f"{src[2:]}\\n-> {tgt[2:]}", fontsize=5)
        for j, t in enumerate(thetas):
            axes[r, j + 1].imshow(edit_images[edit][i, j])
            if r == 0: axes[r, j + 1].set_title(f"theta {t:.1f}", fontsize=6)
for a in axes.flat: a.set_xticks([]); a.set_yticks([])
axes[0, 0].set_title("source", fontsize=6)
report.save_figure(fig, out, "text_diffs");
"""),
        code("""
recon = sweep[sweep.theta == 0.0].set_index("edit")
report.save_results(out, {"sweep": rows,
    "colour_best_theta": None if best is None else best,
    "colour_target_met": best is not None, "target": "colour edit reaches the target colour in >= 0.70 "
    "of edits at some theta <= 0.5 keeping the shape in >= 0.80",
    "reconstruction_theta0": recon[[c for c in recon.columns if c.startswith("keeps_")]].to_dict()})
"""),
        md("""
INTERPRETATION_32
"""),
    ])


BUILDERS = {"30_unclip_quality": nb30, "31_unclip_variations": nb31, "32_unclip_text_diffs": nb32}


def main(argv):
    interp = {}
    if "--interpret" in argv:
        interp = json.loads(Path(argv[argv.index("--interpret") + 1]).read_text())
    for stem, build in BUILDERS.items():
        nb = build()
        for c in nb.cells:
            if c.cell_type == "markdown" and c.source.startswith("INTERPRETATION_"):
                c.source = interp.get(stem, "**Interpretation.** Run the notebook with its default "
                                            "parameters to fill in the numbers.")
        nbf.write(nb, HERE / f"{stem}.ipynb")
        print("wrote", HERE / f"{stem}.ipynb")


if __name__ == "__main__":
    main(sys.argv[1:])
