"""The size of the unlearning step, and attribution against it (the paper's regime).

Attribution by unlearning (:mod:`t2i_common.attribution`) adds one Newton step
``(lr / N) F^-1 grad L(z^)`` to the weights and ranks the training images by their loss rise.  The
method rests on that step being a *small* perturbation: the weights move away from the query while
the loss of every other training image stays nearly where it was.  The paper trains on MSCOCO
(N = 118,287 images) with lr = 0.01, so lr / N = 8.5e-8.  A toy training set of a few hundred
images with the same lr has an lr / N hundreds of times larger, and the step can then be many
times the norm of the weights it changes: the model is broken rather than unlearned, and a perfect
retrieval score says nothing about the paper's regime.

This module measures the step (:func:`step_size`), the loss change it causes on the training
images that are not the query's (:func:`others_loss_change`), and sweeps attribution quality over
lr / N (:func:`step_sweep`), reusing each query's gradient (the step is linear in lr / N).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from . import unlearning as A
from .baselines import rank_scores, retrieval_table

#: MSCOCO 2017 train images: the N of the paper's lr / N (the original's ``mscoco`` setting)
PAPER_N = 118_287
#: the paper's unlearning learning rate
PAPER_LR = 0.01
#: lr / N of the paper's MSCOCO experiments
PAPER_LR_OVER_N = PAPER_LR / PAPER_N


def step_size(unet, delta: dict) -> dict:
    """Size of an update ``delta`` ({parameter name: tensor}) relative to the weights it changes.

    Returns ``relative_norm`` (||delta|| / ||theta|| over all changed parameters together),
    ``max_tensor_relative_norm`` (the largest per-tensor ratio), ``max_abs_change`` (largest
    |delta| of one weight) and ``weight_rms`` (root mean square of the changed weights)."""
    if not delta:
        raise ValueError("step_size: the update is empty; pass the dict unlearn_delta returned")
    params = dict(unet.named_parameters())
    missing = [n for n in delta if n not in params]
    if missing:
        raise KeyError(f"step_size: the UNet has no parameter(s) {missing[:3]}; the update belongs "
                       f"to another model")
    d2 = w2 = 0.0
    per, mx, n_w = [], 0.0, 0
    for n, d in delta.items():
        w = params[n].detach().double().cpu()
        d = d.double().cpu()
        dn, wn = float((d ** 2).sum()), float((w ** 2).sum())
        d2, w2, n_w = d2 + dn, w2 + wn, n_w + w.numel()
        per.append(np.sqrt(dn / max(wn, 1e-300)))
        mx = max(mx, float(d.abs().max()))
    return dict(relative_norm=float(np.sqrt(d2 / max(w2, 1e-300))),
                max_tensor_relative_norm=float(max(per)), max_abs_change=mx,
                weight_rms=float(np.sqrt(w2 / n_w)))


def others_loss_change(loss_after, loss_before, truth) -> dict:
    """Loss change of the training images that are *not* the query's ground truth: per image the
    mean over its two rows (image, flip) of loss after - loss before.  Returns ``mean``, ``min``,
    ``max`` of that change, and ``relative_mean``: ``mean`` over the mean loss before of those
    images."""
    a, b = np.asarray(loss_after, np.float64), np.asarray(loss_before, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) % 2:
        raise ValueError(f"losses before/after must be equal [2N] arrays, got {a.shape} and {b.shape}")
    n = len(a) // 2
    change = (a[:n] - b[:n] + a[n:] - b[n:]) / 2
    keep = np.setdiff1d(np.arange(n), np.asarray(truth, dtype=np.int64))
    if not len(keep):
        raise ValueError("others_loss_change: every training image is ground truth; nothing to measure")
    c = change[keep]
    before = (b[:n] + b[n:])[keep].mean() / 2
    return dict(mean=float(c.mean()), min=float(c.min()), max=float(c.max()),
                relative_mean=float(c.mean() / before))


def step_sweep(setup, lr_over_n, *, subset: str = "cross-attn-kv", n_batches: int = 4,
               batch_size: int = 25, use_fisher: bool = True, damping: float = 0.0, k: int = 10,
               loss_batch_size: int = 256, progress: bool = True):
    """Attribution by unlearning at each step size ``lr_over_n`` (the lr / N of the Newton step)
    on an :class:`~t2i_common.attribution.counterfactual.AttributionSetup`.

    Each query's gradient is computed once; for every lr / N the step is rescaled, the training
    loss recomputed (same noise as the pre-training loss) and the weights restored.  Returns a
    DataFrame indexed by ``lr_over_n`` with the step's size (medians over queries of
    :func:`step_size`'s ``relative_norm`` and ``max_abs_change``), the loss change of the
    non-ground-truth images (mean over queries of :func:`others_loss_change`'s ``mean`` and
    ``relative_mean``; ``others_max``: the largest over queries) and retrieval quality
    (``recall@k``, ``mAP``, ``found`` of ``of`` ground-truth images in the top k)."""
    import pandas as pd


    lrs = [float(x) for x in lr_over_n]
    if not lrs or any(not np.isfinite(x) or x <= 0 for x in lrs):
        raise ValueError(f"step_sweep: lr_over_n must be positive finite numbers, got {lr_over_n!r}")
    model, data, queries = setup.base, setup.data, setup.queries
    ts, seed = setup.settings["time_samples"], setup.settings["seed"]
    names = A.select_parameters(model.unet, subset)
    infl = np.zeros((len(lrs), len(queries), data.n))
    stats = [[None] * len(queries) for _ in lrs]
    for q in tqdm(range(len(queries)), disable=not progress, desc="step sweep: queries"):
        g = A.query_gradient(model, queries.latents[q], queries.text_emb[q], names,
                             n_batches=n_batches, batch_size=batch_size, seed=seed)
        # lr / N enters as lr=x, N=1: newton_step computes (lr / N) F^-1 g
        unit = A.newton_step(g, setup.fisher if use_fisher else None, 1.0, 1, damping)
        for i, x in enumerate(lrs):
            delta = {n: v * x for n, v in unit.items()}
            with A.unlearned(model.unet, delta):
                after = A.training_loss(model, data, time_samples=ts, seed=seed,
                                        batch_size=loss_batch_size, progress=False)
            stats[i][q] = dict(step_size(model.unet, delta),
                               **others_loss_change(after, setup.pretrain_loss, setup.truth[q]))
            infl[i, q] = A.influence_from_losses(after, setup.pretrain_loss)["influence"]
    rows = []
    for i, x in enumerate(lrs):
        t = retrieval_table({"unlearning": rank_scores(infl[i])}, setup.truth, k=k).iloc[0]
        s = stats[i]
        rows.append({"lr_over_n": x,
                     "relative_step": float(np.median([v["relative_norm"] for v in s])),
                     "max_abs_change": float(np.median([v["max_abs_change"] for v in s])),
                     "others_loss_change": float(np.mean([v["mean"] for v in s])),
                     "others_relative_change": float(np.mean([v["relative_mean"] for v in s])),
                     "others_max": float(np.max([v["max"] for v in s])),
                     f"recall@{k}": float(t[f"recall@{k}"]), "mAP": float(t["mAP"]),
                     "found": int(t["found"]), "of": int(t["of"])})
    return pd.DataFrame(rows).set_index("lr_over_n")


def plot_step_sweep(sweep, paper_lr_over_n: float = PAPER_LR_OVER_N, default=None, k: int = 10):
    """Recall@k and mAP (left axis) and the relative step size (right axis, log) against lr / N
    (log), with the paper's lr / N and the notebook's default marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.asarray(sweep.index, dtype=float)
    ax.plot(x, sweep[f"recall@{k}"], "o-", label=f"Recall@{k}")
    ax.plot(x, sweep["mAP"], "s-", label="mAP")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step size lr / N of the Newton step")
    ax.set_ylabel("retrieval of the ground truth")
    ax2 = ax.twinx()
    ax2.plot(x, sweep["relative_step"], "k:", marker=".", label="||step|| / ||weights||")
    ax2.set_yscale("log")
    ax2.set_ylabel("||step|| / ||changed weights||")
    ax2.grid(False)
    ax.axvline(paper_lr_over_n, color="tab:green", ls="--", label="paper's lr / N (MSCOCO)")
    if default is not None:
        ax.axvline(default, color="tab:red", ls="-.", label="this notebook's default")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    return fig
