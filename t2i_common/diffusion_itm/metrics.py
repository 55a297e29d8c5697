"""Image-text matching metrics: retrieval accuracy and recall with their tie rules, Winoground's
text / image / group scores, and the MMBias / gender-word effect sizes of DiffusionITM's bias study.

Score matrices follow :mod:`t2i_common.diffusion_itm.scoring`'s convention ``s[i, j] = s(image i, caption j)``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..formats import GENDER_WORD_PAIRS, candidate_scores


# ------------------------------------------------------------------------------------------------
# retrieval and Winoground
# ------------------------------------------------------------------------------------------------
#: Two candidate scores of one item closer than ``TIE_RTOL`` times the item's score scale (the
#: largest |score| among its candidates) are a tie.  Scores come out of float32 networks (UNet
#: errors averaged over K grid points, CLIP cosines); the same candidate computed at another batch
#: position or with another thread count moves by a few float32 ulps (1 ulp = 1.2e-7 relative),
#: so exact float equality would make ties depend on the machine.  1e-6 (about 8 ulps) absorbs that
#: noise and is far below the gaps between genuinely different candidates on the toy and real tasks.
TIE_RTOL = 1e-6

#: How every accuracy-like metric of this module treats a tie at the top (stated under each table).
TIE_RULES = {
    "accuracy": "strict: the gold candidate alone at the top; a tie at the top is a miss",
    "accuracy_first": "the original's rule (gold listed first, np.argmax): a tie at the top counts as "
                      "correct, whatever position the file stores the gold at",
    "accuracy_tie_split": "a tie at the top of m candidates including the gold counts 1/m",
    "R@k": "the original's rule (gold first, np.argsort(s)[-k:]): candidates tied with the gold rank "
           "above it",
    "ties": f"items whose top score is shared (scores within {TIE_RTOL:g} x the item's score scale)",
}


def tie_tolerance(vec) -> float:
    """Absolute tolerance of one item's candidate scores: TIE_RTOL x max |score|."""
    v = np.asarray(vec, dtype=np.float64)
    return TIE_RTOL * float(np.max(np.abs(v[np.isfinite(v)]), initial=0.0))


def pick(vec) -> int:
    """The chosen candidate: the first of those tied (within :data:`TIE_RTOL`) at the top."""
    v = np.asarray(vec, dtype=np.float64)
    return int(np.flatnonzero(v >= v.max() - tie_tolerance(v))[0])


def retrieval_metrics(items, scores, ks=(1, 5)) -> dict:
    """Accuracy over retrieval items, with the tie rules of :data:`TIE_RULES` (a tie: scores within
    :data:`TIE_RTOL` x the item's score scale).

    - ``accuracy``: strict, the gold candidate alone at the top (a tie at the top is a miss);
    - ``accuracy_first``: the original's rule: it lists the gold first and takes ``np.argmax``,
      so a tie at the top counts as correct; applied whatever position the gold is stored at
      (ARO's files store VG items as [false, true], gold at 1);
    - ``accuracy_tie_split``: ties at the top broken uniformly at random, in expectation;
    - ``ties``: items whose maximum is attained more than once (the original's "max more than once");
    - ``R@k``: the original's ``gold in np.argsort(s)[-k:]`` with the gold first (a stable sort puts
      candidates tied with the gold above it): rank = 1 + #(others scoring >= the gold's score
      within tolerance); only for k smaller than the number of candidates.
    """
    items = list(items)
    scores = list(scores)
    if len(items) != len(scores):
        raise ValueError(f"retrieval_metrics: {len(items)} items but {len(scores)} score matrices")
    strict, split, first, ties = [], [], [], 0
    ranks, ncand = [], []
    for it, s in zip(items, scores):
        vec, g = candidate_scores(it, s)
        tol = tie_tolerance(vec)
        at_top = np.flatnonzero(vec >= vec.max() - tol)
        gold_top = g in at_top
        ties += int(len(at_top) > 1)
        strict.append(float(gold_top and len(at_top) == 1))
        split.append(float(gold_top) / len(at_top))
        first.append(float(gold_top))
        ranks.append(1 + int(np.sum(np.delete(vec, g) >= vec[g] - tol)))
        ncand.append(len(vec))
    out = {"n": len(items), "accuracy": float(np.mean(strict)),
           "accuracy_tie_split": float(np.mean(split)), "accuracy_first": float(np.mean(first)),
           "ties": int(ties)}
    for k in ks:
        if k > 1 and k < min(ncand):
            out[f"R@{k}"] = float(np.mean([r <= k for r in ranks]))
    return out


def winoground_metrics(scores, per_example: bool = False) -> dict:
    """Winoground text / image / group scores (Thrush et al. 2022; strict ``>``, a tie is a miss as
    in the original) of 2 x 2 score matrices in this module's convention s[image i, caption j]:
    text = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1); image = s(c0,i0) > s(c0,i1) and
    s(c1,i1) > s(c1,i0); group = text and image, where ``a > b`` means a - b above the item's tie
    tolerance (:data:`TIE_RTOL` x its largest |score|).  With zero tolerance this is
    :func:`t2i_common.formats.winoground_scores` (which takes s(caption_i, image_j))."""
    mats = []
    for n, s in enumerate(scores):
        a = np.asarray(torch.as_tensor(s, dtype=torch.float64))
        if a.shape != (2, 2):
            raise ValueError(f"winoground_metrics: item {n} has a score matrix of shape {a.shape}, "
                             f"expected 2 x 2 (images x captions)")
        mats.append(a.T)
    if not mats:
        raise ValueError("winoground_metrics: no score matrices given")
    s = np.stack(mats)                                           # [N, caption, image]
    if not np.all(np.isfinite(s)):
        raise ValueError("winoground_metrics: scores contain NaN/inf; fix the scorer first")
    tol = TIE_RTOL * np.abs(s).reshape(len(s), -1).max(1)

    def gt(x, y):
        return x - y > tol

    text = gt(s[:, 0, 0], s[:, 1, 0]) & gt(s[:, 1, 1], s[:, 0, 1])
    image = gt(s[:, 0, 0], s[:, 0, 1]) & gt(s[:, 1, 1], s[:, 1, 0])
    group = text & image
    out = {"text": float(text.mean()), "image": float(image.mean()), "group": float(group.mean()),
           "n": len(s)}
    if per_example:
        out.update(text_correct=text, image_correct=image, group_correct=group)
    return out


def task_metrics(items, scores) -> dict:
    """The task's metrics: Winoground text/image/group for 2 x 2 items, otherwise accuracy
    (strict: a tie at the top is a miss), accuracy_first (the original's rule: gold first and
    np.argmax, a tie at the top counts as correct), the number of tied items, and R@5 (ties with
    the gold rank above it, as the original) when there are more than 5 candidates; the rules are
    :data:`TIE_RULES` (see :func:`retrieval_metrics`)."""
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
