"""Writes notebooks/40_gdbench, 41_sampling_budget and 42_hardneg (paper 4, DiffusionITM).

    .venv/bin/python notebooks/src/build_4x.py            # (re)write the three notebooks, no outputs
    .venv/bin/python -m t2i_common.runner 40 41 42        # execute them with the default parameters

Interpretation cells hold placeholders INTERPRETATION_4x until ``--interpret FILE.json`` (a mapping
notebook stem -> markdown) fills them in after a default run.
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


PAPER = """Paper 4 (seed 003): Krojer, Poole-Dayan, Voleti, Pal, Reddy, *Are Diffusion Models
Vision-and-Language Reasoners?*, NeurIPS '23 ([code](https://github.com/McGill-NLP/diffusion-itm))."""

SCORE = r"""**DiffusionITM** scores image $x$ against caption $c$ by how well the text-to-image model
denoises $x$ given $c$:

$$s(x, c) = -\frac1K \sum_{k=1}^{K} \bigl\lVert \epsilon_k - \epsilon_\theta\bigl(\sqrt{\bar\alpha_{t_k}}\,z_0
+ \sqrt{1-\bar\alpha_{t_k}}\,\epsilon_k,\; t_k,\; c\bigr) \bigr\rVert_2 ,$$

$z_0$ the VAE latent of $x$, $t_k$ on the fixed grid `range(10, 990, 1000 // S)` and $\epsilon_k$ the
$k$-th entry of **one** noise bank shared by every candidate and every example.  For image
retrieval the unconditional error with the same $z_0,\epsilon_k$ is subtracted
($\lVert\epsilon_k-\epsilon_\theta(\cdot, c)\rVert - \lVert\epsilon_k-\epsilon_\theta(\cdot, \varnothing)\rVert$),
which makes errors of different images comparable."""


# ------------------------------------------------------------------------------------------------
def nb40():
    return notebook([
        md(f"""
# GDBench: DiffusionITM against CLIP

{PAPER}

{SCORE}

GDBench gathers image-text matching tasks that probe compositional understanding.  Here every
task has a toy analogue, exported by `t2i_common.toyexport` in the task's **published format**
and read back by the same readers (`t2i_common.formats`) a real run uses:

| GDBench task | toy analogue | format / reader |
|---|---|---|
| ARO VG-Attribution | colours of two objects swapped | `visual_genome_attribution.json` / `read_aro_vg` |
| ARO VG-Relation | subject and object of the relation swapped | `visual_genome_relation.json` / `read_aro_vg` |
| COCO-Order, Flickr-Order | the four ARO word-order perturbations | `coco_karpathy_test.json`, `flickr30k_test.json` / `read_aro_order` |
| Winoground (text / image / group) | two images, two captions with the same words | `examples.jsonl` / `read_winoground` |
| CLEVR subtasks | binding, recognition, spatial pairs | `captions/<subtask>.json` / `read_clevr` |
| Pets / ImageNet (class prompts) | "a photo of a {{shape}}" for every shape | class-folder pickles / `read_implosion_pickles` |
| Flickr30K image retrieval | caption vs 10 images, gold first | `{{caption: [10 paths]}}` / `read_flickr30k_retrieval` |

Accuracies are **micro** averages (DiffusionITM's convention; ARO's official VG numbers are macro
averages, see `formats.aro_accuracy`).  `accuracy` is strict (a tie at the top is a miss),
`accuracy_first` is the original's `np.argmax` rule (the first maximal candidate wins, which favours a
gold caption listed first); `ties` counts items whose top score is shared.  Run the real benchmark
with `python -m t2i_common.runner 40_gdbench -f notebooks/params/40_gdbench.yaml` (SD 2.1-base,
S = 250, OpenCLIP ViT-H-14)."""),
        code('''
model = "toy"              # T2I model: SD-format folder, hub id or alias (toy, sd2.1-base, sd1.5)
clip = "toy-clip"          # baseline: toy-clip, ViT-B-32/openai, ViT-H-14/laion2b_s32b_b79k, a CLIPModel folder
task_paths = None          # {task: path} of the real GDBench files (see params yaml); None: toy analogues
toy_n = 100                # items per exported toy task
max_items = 100            # first items per task (None: all)
S = 10                     # sampling_steps: grid range(10, 990, 1000 // S) (CLI default 10; paper table 250)
latent_mode = "mean"       # "mean" (deterministic) or "sample" (original: posterior sample per timestep)
seed = 0                   # noise bank and toy data
batch_size = None          # UNet evaluations per batch (None: 64 on CPU, from free memory on CUDA)
device = "cpu"             # "cuda" on a GPU machine
threads = 1                # torch CPU threads (1 is fastest on a shared 2-core machine; None: torch default)
dtype = "float32"          # "float16" / "bfloat16" opt in to half precision
cache = True               # per-example result cache (cache/diffitm/...): a killed run resumes
out_name = "40_gdbench"
''', ["parameters"]),
        code('''
import matplotlib.pyplot as plt
import pandas as pd
import torch
from t2i_common import itm, models, paths, report

if threads:
    torch.set_num_threads(threads)
report.setup_matplotlib()
out = report.outdir(out_name)
data_root = paths.GENERATED / out_name
torch_dtype = getattr(torch, dtype)
'''),
        md("## 1. Tasks (toy analogues in the published formats, read back by the readers)"),
        code('''
task_files = task_paths or itm.export_toy_gdbench(data_root, toy_n, seed)
tasks = itm.read_gdbench(task_files, max_items=max_items)
pd.DataFrame([{"task": k, "items": len(v), "images": len(v[0].images), "captions": len(v[0].captions),
               "example": " | ".join(v[0].captions)[:90]} for k, v in tasks.items()]).set_index("task")
'''),
        md("## 2. DiffusionITM and CLIP on every task"),
        code('''
t2i = models.load_t2i(model, device=device, dtype=torch_dtype)
clip_model = models.load_clip(clip, device=device)
methods = {"CLIP": itm.clip_method(clip_model),
           "DiffITM": itm.diffitm_method(t2i, S=S, seed=seed, latent_mode=latent_mode,
                                         cache=cache or None, batch_size=batch_size)}
table = itm.gdbench_table(tasks, methods)
report.save_table(table, out, "gdbench")
table.round(3)
'''),
        code('''
# NBVAL_CHECK_OUTPUT
for (task, metric), row in table.iterrows():
    if metric != "accuracy_first":
        print(f"{task:26s} {metric:9s} CLIP {row.CLIP:6.3f}  DiffITM {row.DiffITM:6.3f}  chance {row.chance:6.3f}")
'''),
        code('''
main = table[table.index.get_level_values("metric").isin(["accuracy", "text", "image", "group"])]
labels = [t if m == "accuracy" else f"{t} {m}" for t, m in main.index]
fig, ax = plt.subplots(figsize=(7, 0.32 * len(main) + 1))
y = range(len(main))
ax.barh([v + 0.2 for v in y], main["CLIP"], height=0.4, label="CLIP")
ax.barh([v - 0.2 for v in y], main["DiffITM"], height=0.4, label=f"DiffusionITM (S={S})")
ax.scatter(main["chance"], list(y), marker="|", color="k", s=120, label="chance", zorder=3)
ax.set(yticks=list(y), yticklabels=labels, xlabel="accuracy / Winoground score", xlim=(0, 1))
ax.invert_yaxis(); ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
report.save_figure(fig, out, "gdbench");
'''),
        code('''
report.save_results(out, {"table": itm.table_results(table),
                          "settings": {"model": str(model), "clip": str(clip), "S": S, "seed": seed,
                                       "latent_mode": latent_mode, "max_items": max_items,
                                       "tasks": {k: len(v) for k, v in tasks.items()}}})
'''),
        md("""
## The paper's numbers (SD 2.1-base, S = 250; micro accuracy, %)

| Method | VG-A | VG-R | COCO-Order | Flickr-Order |
|---|---|---|---|---|
| OpenCLIP ViT-H-14 | 64.6 | 51.4 | 32.8 | 40.5 |
| DiffITM | 62.9 | 50.0 | 23.5 | 33.2 |
| HardNeg-DiffITM | 67.6 | 52.3 | 34.4 | 48.6 |

Reported second-hand: Winoground text 32.3 / image 9.0 for vanilla SD.  The real-model run of this
notebook (`notebooks/params/40_gdbench.yaml`) reproduces the first two rows; the third is
notebook 42's procedure on MS-COCO hard negatives."""),
        md("## Reading the numbers\n\nINTERPRETATION_40"),
    ])


# ------------------------------------------------------------------------------------------------
def nb41():
    return notebook([
        md(f"""
# Sampling budget: accuracy against UNet evaluations, grid and adaptive

{PAPER}

The DiffusionITM score averages the denoising error over a fixed grid of $K$ timesteps
(`range(10, 990, 1000 // S)`, $K \\approx S$).  The paper's main table used S = 250 (490 UNet
evaluations for a two-caption item), the CLI default is S = 10, and the authors report that
Flickr30K text retrieval at S = 10 took 68 min on an A6000 against 4 min for OpenCLIP.

**Adaptive evaluation** (beyond the paper; successive elimination as in Diffusion Classifier, Li et al.
2023): every candidate is scored on the first `n0` grid points (in a coarse-to-fine order), a candidate
whose paired error difference to the current best exceeds `z` standard errors is dropped, and the
survivors get `step` more points per round until one is left or the grid is used up.  It reuses the grid's
latents and noise bank, so its distances are exactly a subset of the S = 250 distances: each policy is
replayed on those (and a live run checks that it spends and returns the same).  Question: how few UNet
evaluations reach the accuracy of the S = 250 grid?"""),
        code('''
model = "toy"              # T2I model: SD-format folder, hub id or alias
task_paths = None          # {task: path} of real GDBench files; None: toy analogues (40_gdbench's export)
tasks = ["CLEVR/pair_binding_size", "Classes"]  # GDBench names ("CLEVR/<subtask>": one CLEVR subtask)
toy_n = 100                # items per exported toy task (the same export as 40_gdbench)
max_items = 32             # test items per task (the first ones)
calib_items = 32           # the next items: used only to pick an adaptive policy (calibration split)
S_big = 250                # the paper's grid
S_values = [1, 2, 5, 10, 25, 50]  # smaller grids (each with its own bank[k], as the original)
seed = 0
device = "cpu"
threads = 1                # torch CPU threads (None: torch default)
dtype = "float32"
cache = True
out_name = "41_sampling_budget"
''', ["parameters"]),
        code('''
import matplotlib.pyplot as plt
import pandas as pd
import torch
from t2i_common import itm, models, paths, report

if threads:
    torch.set_num_threads(threads)
report.setup_matplotlib()
out = report.outdir(out_name)
data_root = paths.GENERATED / "40_gdbench" if task_paths is None else None
'''),
        code('''
task_files = task_paths or itm.export_toy_gdbench(data_root, toy_n, seed)
both = itm.select_tasks(task_files, tasks, max_items + calib_items)
data = {t: v[:max_items] for t, v in both.items()}
calib = {t: v[max_items:] for t, v in both.items()}
t2i = models.load_t2i(model, device=device, dtype=getattr(torch, dtype))
{t: (len(data[t]), len(calib[t])) for t in tasks}
'''),
        md(f"## 1. The fixed grid: accuracy against S"),
        code('''
grid = pd.concat({t: itm.grid_curve(t2i, items, S_values + [S_big], seed=seed, cache=cache or None)
                  for t, items in data.items()}, names=["task"]).reset_index(level=0)
report.save_table(grid.set_index(["task", "S"]), out, "grid_curve")
grid.round(3)
'''),
        md("""
## 2. Adaptive evaluation, replayed on the S = 250 distances

Each policy of a sweep (`n0` first points, `step` more per round, elimination threshold `z`) is replayed
on the test items and on a separate **calibration split** (the next items of the same task).  The
policy reported as *calibrated* is the cheapest one reaching the S = 250 accuracy on the calibration
items, evaluated on the test items; *best* is picked on the test items themselves (optimistic)."""),
        code('''
big = {t: itm.diffitm_distances(t2i, items, S=S_big, seed=seed, cache=cache or None).dists
       for t, items in data.items()}
big_calib = {t: itm.diffitm_distances(t2i, items, S=S_big, seed=seed, cache=cache or None).dists
             for t, items in calib.items()}
adaptive = pd.concat({t: itm.adaptive_curve(data[t], big[t], itm.policy_sweep()) for t in data},
                     names=["task"]).reset_index(level=0)
adaptive_calib = pd.concat({t: itm.adaptive_curve(calib[t], big_calib[t], itm.policy_sweep()) for t in calib},
                           names=["task"]).reset_index(level=0)
report.save_table(adaptive.set_index(["task", "variance", "n0", "step", "z"]), out, "adaptive_curve")
report.save_table(adaptive_calib.set_index(["task", "variance", "n0", "step", "z"]), out, "adaptive_curve_calibration")
adaptive.sort_values(["task", "evals_per_example"]).groupby("task").head(6).round(3)
'''),
        code('''
summary = itm.budget_summary(grid, adaptive, S_big, calibration=adaptive_calib)
report.save_table(summary, out, "summary")
summary.T
'''),
        code('''
# NBVAL_CHECK_OUTPUT
for task, r in summary.iterrows():
    print(f"{task}: S={S_big} grid accuracy {r.grid_accuracy:.3f} at {r.grid_evals:.0f} UNet evals/example")
    print(f"  default policy {itm.AdaptivePolicy()}: accuracy {r.default_accuracy:.3f} at "
          f"{r.default_evals:.1f} evals ({r.default_fraction:.3f} of the grid), "
          f"same pick as the grid on {r.default_agreement:.3f} of the items")
    print(f"  calibrated policy {r.calibrated_policy}: accuracy {r.calibrated_accuracy:.3f} at "
          f"{r.calibrated_evals:.1f} evals ({r.calibrated_fraction:.3f} of the grid), "
          f"same pick as the grid on {r.calibrated_agreement:.3f} of the items")
    print(f"  smallest grid reaching it: S={r.smallest_S_matching} ({r.smallest_S_evals:.0f} evals)")
'''),
        md("## 3. A live adaptive run spends and returns exactly what the replay says"),
        code('''
live = {t: itm.adaptive_scores(t2i, items, S=S_big, seed=seed, policy=itm.AdaptivePolicy())
        for t, items in data.items()}
check = pd.DataFrame({t: itm.live_vs_replay(data[t], live[t], big[t], itm.AdaptivePolicy())
                      for t in data}).T
check
'''),
        code('''
# NBVAL_CHECK_OUTPUT
print(check[["same_scores", "same_evals"]].to_string())
'''),
        code('''
fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 3.8), squeeze=False)
for ax, t in zip(axes[0], data):
    g, a = grid[grid.task == t], adaptive[adaptive.task == t]
    ax.plot(g.evals_per_example, g.accuracy, "o-", label="fixed grid (S labelled)")
    for _, r in g.iterrows():
        ax.annotate(f"S={r.S}", (r.evals_per_example, r.accuracy), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.scatter(a.evals_per_example, a.accuracy, s=14, alpha=0.6, color="C1", label="adaptive policies")
    ax.axhline(g[g.S == S_big].accuracy.iloc[0], color="k", lw=0.8, ls="--", label=f"S={S_big} grid")
    ax.set(xscale="log", xlabel="UNet evaluations per example", ylabel="accuracy", title=t)
    ax.legend(fontsize=7)
report.save_figure(fig, out, "accuracy_vs_evaluations");
'''),
        code('''
report.save_results(out, {"summary": {t: r.to_dict() for t, r in summary.iterrows()},
                          "grid": {f"{r.task}/S={r.S}": r.drop("task").to_dict() for _, r in grid.iterrows()},
                          "live_check": {t: r.to_dict() for t, r in check.iterrows()},
                          "settings": {"model": str(model), "S_big": S_big, "seed": seed,
                                       "items": {k: len(v) for k, v in data.items()}}})
'''),
        md("## Reading the numbers\n\nINTERPRETATION_41"),
    ])


# ------------------------------------------------------------------------------------------------
def nb42():
    return notebook([
        md(f"""
# HardNeg-DiffusionITM: LoRA fine-tuning with hard negatives

{PAPER}

HardNeg-DiffusionITM fine-tunes rank-4 LoRA adapters on the UNet's attention projections (q, k, v,
out; self- and cross-attention) on MS-COCO with NegCLIP's hard negatives, with the loss

$$\\mathcal L = \\mathcal L_\\text{{pos}} - \\min\\bigl(\\mathcal L_\\text{{neg}},\\, \\lambda\\,
\\mathrm{{sg}}(\\mathcal L_\\text{{pos}})\\bigr),\\qquad \\lambda = 1,$$

$\\mathcal L_\\text{{pos}}$ the usual noise-prediction MSE of the positive pair and $\\mathcal L_\\text{{neg}}$
the MSE with a negative drawn once per step: a hard-negative image (p = 0.5; same noise and timestep,
positive caption), a hard-negative caption (p = 0.25) or a random caption (p = 0.25).  The hinge stops
the model from "winning" by making negatives arbitrarily bad.  AdamW, lr 1e-4, weight decay 1e-2,
gradient clipping 1, constant schedule; validation accuracy with S = 4.  The paper reports that it
helps on every ARO task (VG-A 62.9 -> 67.6, VG-R 50.0 -> 52.3, COCO-Order 23.5 -> 34.4, Flickr-Order
33.2 -> 48.6) and that the released checkpoint reaches 0.640 MS-COCO validation accuracy with hard
negatives against 0.625 without.

Here: the toy checkpoint's UNet is fine-tuned on toy hard negatives written as a NegCLIP tsv (pairs of
scenes whose colours are swapped or whose two objects trade places: each row's hard-negative caption is
its partner's caption and its hard-negative image the partner's image), then the GDBench toy analogues
are scored before and after (**transfer**, as in the paper: the evaluation sets are other scenes in
other formats).  Note the hinge: when a batch's negative error already exceeds its positive error,
$\\mathcal L = 0$ and only $\\mathcal L_\\text{{pos}}$ sends gradients, so negatives the model already
rejects teach nothing."""),
        code('''
model = "toy"              # T2I model to fine-tune: SD-format folder, hub id or alias
train_tsv = None           # NegCLIP tsv (title, filepath, neg_caption, neg_image); None: toy export
val_tsv = None             # held-out NegCLIP-format rows for validation; None: toy export (another seed)
image_root = None          # folder the tsv's filepath column is relative to (None: the tsv's folder)
task_paths = None          # GDBench files for before/after; None: toy analogues (40_gdbench's export)
tasks = ["VG-A", "VG-R", "COCO-Order", "Winoground", "CLEVR/pair_binding_color", "CLEVR/spatial"]
toy_n = 100                # items per exported toy task (the same export as 40_gdbench)
max_items = 64             # items per task before/after
train_n = 600              # toy training pairs (2 rows each)
negative_families = ["colour", "relation"]  # toy hard-negative families (colour swaps, objects trading places)
val_n = 32                 # toy validation pairs
steps = 300                # optimizer steps (original: 8 epochs of MS-COCO; released checkpoint: 5000)
batch_size = 8             # original 4
grad_accum = 1             # original 4
lr = 1e-3                  # original 1e-4 (10x here: a short CPU run)
rank = 4
neg_loss_factor = 1.0      # lambda
val_every = 50
val_S = 4
S = 10                     # grid for the before/after tables
seed = 0
device = "cpu"
threads = 1                # torch CPU threads (None: torch default)
cache = True
out_name = "42_hardneg"
''', ["parameters"]),
        code('''
from pathlib import Path
import matplotlib.pyplot as plt
import pandas as pd
import torch
from t2i_common import formats, itm, lora, models, paths, report

if threads:
    torch.set_num_threads(threads)
report.setup_matplotlib()
out = report.outdir(out_name)
data_root = paths.GENERATED / out_name
cfg = lora.HardNegConfig(rank=rank, lr=lr, batch_size=batch_size, grad_accum=grad_accum, steps=steps,
                         neg_loss_factor=neg_loss_factor, val_every=val_every, val_S=val_S, seed=seed,
                         ckpt_every=val_every)
'''),
        md("## 1. Training rows with hard negatives (NegCLIP tsv) and the evaluation tasks"),
        code('''
train_file = Path(train_tsv or lora.export_toy_negclip(data_root / ("negclip_train_" + "_".join(negative_families)), train_n, seed,
                                                             families=tuple(negative_families)))
val_file = Path(val_tsv or lora.export_toy_negclip(data_root / ("negclip_val_" + "_".join(negative_families)), val_n, seed + 1000,
                                                         families=tuple(negative_families)))
train = lora.hardneg_data_from_negclip(formats.read_negclip_tsv(train_file), root=image_root or train_file.parent)
val_items = lora.negclip_val_items(lora.hardneg_data_from_negclip(formats.read_negclip_tsv(val_file),
                                                                  root=image_root or val_file.parent))
task_files = task_paths or itm.export_toy_gdbench(paths.GENERATED / "40_gdbench", toy_n, seed)
evals = itm.select_tasks(task_files, tasks, max_items)
print(f"{len(train)} training rows, {len(val_items)} validation items;", {t: len(v) for t, v in evals.items()})
print("row 0:", train.captions[0], "| hard negative caption:", train.neg_captions[0][0])
'''),
        md("## 2. Before: the base model"),
        code('''
t2i = models.load_t2i(model, device=device)
before = itm.gdbench_table(evals, {"DiffITM": itm.diffitm_method(t2i, S=S, seed=seed, cache=cache or None)})
'''),
        md("## 3. HardNeg LoRA fine-tuning (resumable: a killed run continues from its checkpoint)"),
        code('''
run = lora.run_dir(data_root, cfg, model=itm.model_fingerprint(t2i), train=train_file, val=val_file)
history = lora.finetune_hardneg(t2i, train, val_items, cfg, out_dir=run)
report.save_table(history, out, "history")
history.dropna(subset=["val_acc"])[["step", "val_text", "val_image", "val_acc"]].round(3)
'''),
        md("How often did the negatives teach anything?  The hinge is open (the negative term has a "
           "gradient) only in steps whose mean negative error is below lambda times the positive one."),
        code('''
hinge = lora.hinge_activity(history)
report.save_table(hinge, out, "hinge_activity")
hinge.round(4)
'''),
        md("## 4. After: the same tasks with the adapter"),
        code('''
after = itm.gdbench_table(evals, {"HardNeg-DiffITM": itm.diffitm_method(t2i, S=S, seed=seed, cache=cache or None)})
table = itm.before_after(before, after)
report.save_table(table, out, "before_after")
table.round(3)
'''),
        code('''
# NBVAL_CHECK_OUTPUT
for (task, metric), row in table.iterrows():
    print(f"{task:26s} {metric:9s} DiffITM {row['DiffITM']:6.3f} -> HardNeg {row['HardNeg-DiffITM']:6.3f}  ({row['delta']:+.3f})")
v = history.dropna(subset=["val_acc"])
print(f"validation accuracy (S={val_S}): {v.val_acc.iloc[0]:.3f} -> {v.val_acc.iloc[-1]:.3f}")
print("hinge open (fraction of steps):", {k: round(x, 3) for k, x in hinge.hinge_open.items()})
'''),
        code('''
fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.4))
tr = history.dropna(subset=["loss"])
a0.plot(tr.step, tr.l_pos.rolling(10, min_periods=1).mean(), label="L_pos")
a0.plot(tr.step, tr.l_neg.rolling(10, min_periods=1).mean(), label="L_neg")
a0.plot(tr.step, tr.loss.rolling(10, min_periods=1).mean(), label="L (hinged)")
a0.set(xlabel="step", ylabel="loss (running mean of 10)", title="training"); a0.legend(fontsize=8)
v = history.dropna(subset=["val_acc"])
for c in ("val_text", "val_image", "val_acc"):
    a1.plot(v.step, v[c], "o-", label=c)
a1.set(xlabel="step", ylabel=f"accuracy (S={val_S})", title="validation on held-out hard negatives", ylim=(0, 1))
a1.legend(fontsize=8)
report.save_figure(fig, out, "training_curves");
'''),
        code('''
report.save_results(out, {"table": itm.table_results(table),
                          "validation": {int(r.step): r[["val_text", "val_image", "val_acc"]].to_dict()
                                         for _, r in v.iterrows()},
                          "hinge_activity": {k: r.to_dict() for k, r in hinge.iterrows()},
                          "settings": {"model": str(model), "S": S, "seed": seed, **vars(cfg)}})
'''),
        md("## Reading the numbers\n\nINTERPRETATION_42"),
    ])


def main(argv):
    texts = {}
    if len(argv) > 2 and argv[1] == "--interpret":
        texts = json.loads(Path(argv[2]).read_text())
    for name, fn in (("40_gdbench", nb40), ("41_sampling_budget", nb41), ("42_hardneg", nb42)):
        nb = fn()
        key = f"INTERPRETATION_{name[:2]}"
        for c in nb.cells:
            if c.cell_type == "markdown" and key in c.source and name in texts:
                c.source = c.source.replace(key, texts[name])
        nbf.write(nb, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main(sys.argv)
