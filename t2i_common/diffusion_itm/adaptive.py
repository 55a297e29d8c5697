"""Adaptive DiffusionITM (beyond the paper): successive elimination over the fixed timestep grid, its
exact replay on precomputed grid distances, and the sampling-budget curves (accuracy against UNet
evaluations for grids of different S and for elimination policies).

A race scores all candidates on a few grid points, drops the clear losers and spends the remaining
UNet evaluations on the close ones (as Diffusion Classifier, Li et al. 2023, does); with an
unlimited threshold it reproduces the grid score of :func:`t2i_common.diffusion_itm.scoring.diffitm_scores`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine import grid_timesteps
from .metrics import candidate_scores, pick, retrieval_metrics
from .scoring import (SCORE_VERSION, _check_chunk, _check_items, _make_cache, _prepare,
                          _prompt_table, _Scorer, cached_items, check_S, diffitm_scores,
                          grid_evaluations, model_fingerprint)


# ------------------------------------------------------------------------------------------------
# the elimination race
# ------------------------------------------------------------------------------------------------
def visit_order(K: int) -> list:
    """Grid indices 0..K-1 in bit-reversed (van der Corput) order: every prefix is spread over the
    whole noise range (K=10: 0, 8, 4, 2, 6, 1, 9, 5, 3, 7)."""
    m = max(1, (K - 1).bit_length())
    return sorted(range(K), key=lambda i: int(format(i, f"0{m}b")[::-1], 2))


@dataclass
class AdaptivePolicy:
    """Successive elimination over the grid points of :func:`diffitm_distances`.

    Round 1 evaluates every candidate on the first ``n0`` grid points of :func:`visit_order`; each
    later round adds ``step`` points for the candidates still alive.  After each round a candidate
    j is dropped when its paired error difference to the current best b,
    Delta_k = d_k(j) - d_k(b) over the points seen, has mean > z * std / sqrt(n) (ddof 1).  It
    stops when one candidate is left or the grid is exhausted; survivors are ranked by
    - mean_k d_k over the points seen, dropped candidates score -inf.  ``z=inf`` never drops and
    reproduces the grid score.  ``max_points`` caps the points per candidate (default: all K).

    ``variance`` picks the standard error of mean(Delta):

    * ``"iid"``: std(Delta) / sqrt(n), as if the n points were independent draws (Diffusion
      Classifier's view of random timesteps);
    * ``"systematic"``: the points are not random draws but a stratified (van der Corput) subset
      of the K fixed grid points, and the target is the grid's own mean over all K.  Delta_k varies
      smoothly with t, and a systematic sample cancels that trend, so the iid formula overstates
      the error.  Here the variance comes from successive differences in t order,
      sum_i (Delta_(i+1) - Delta_(i))^2 / (2 (n - 1)) (Wolter's estimator for systematic
      samples), times the finite-population factor (1 - n / K).
    """

    n0: int = 4
    step: int = 4
    z: float = 2.0
    max_points: int | None = None
    variance: str = "iid"

    def __post_init__(self):
        if self.n0 < 2 or self.step < 1:
            raise ValueError(f"AdaptivePolicy: need n0 >= 2 (a spread estimate) and step >= 1, got "
                             f"n0={self.n0}, step={self.step}")
        if self.variance not in ("iid", "systematic"):
            raise ValueError(f"AdaptivePolicy: variance must be 'iid' or 'systematic', got "
                             f"{self.variance!r}")


class _Race:
    """Book-keeping of one item's elimination race (shared by the live and replayed versions)."""

    def __init__(self, n_cand: int, K: int, policy: AdaptivePolicy, cost: int):
        self.order = visit_order(K)[:policy.max_points or K]
        self.K = K
        self.policy, self.cost = policy, cost
        self.alive = list(range(n_cand))
        self.d = np.full((n_cand, len(self.order)), np.nan)
        self.n = 0
        self.evals = 0

    def request(self):
        """(alive candidates, new grid indices) or None when finished."""
        if len(self.alive) <= 1 or self.n >= len(self.order):
            return None
        m = self.policy.n0 if self.n == 0 else self.policy.step
        return list(self.alive), self.order[self.n:self.n + m]

    def update(self, dist):
        dist = np.asarray(dist, dtype=np.float64)
        m = dist.shape[1]
        self.d[self.alive, self.n:self.n + m] = dist
        self.n += m
        self.evals += self.cost * len(self.alive) * m
        mean = self.d[self.alive, :self.n].mean(1)
        best = self.alive[int(np.argmin(mean))]
        if not math.isfinite(self.policy.z) or self.n < 2:
            return
        keep = []
        for j in self.alive:
            diff = self.d[j, :self.n] - self.d[best, :self.n]
            if j == best or not diff.mean() > self.policy.z * self._se(diff):
                keep.append(j)
        self.alive = keep

    def _se(self, diff):
        n = len(diff)
        if self.policy.variance == "iid":
            return diff.std(ddof=1) / math.sqrt(n)
        by_t = diff[np.argsort(self.order[:n], kind="stable")]
        var = float(np.sum(np.diff(by_t) ** 2)) / (2 * (n - 1))
        return math.sqrt(var / n * max(0.0, 1.0 - n / self.K))

    def scores(self) -> np.ndarray:
        s = np.full(self.d.shape[0], -np.inf)
        s[self.alive] = -self.d[self.alive, :self.n].mean(1)
        return s


def _retrieval_shape(item, who):
    task = item.task
    if task == "group":
        raise ValueError(f"{who}: adaptive evaluation needs a retrieval item (one image or one "
                         f"caption), got {len(item.images)} images x {len(item.captions)} captions")
    return task


def _as_matrix(item, vec):
    v = torch.as_tensor(vec, dtype=torch.float64)
    return v.unsqueeze(0) if item.task == "text" else v.unsqueeze(1)


def adaptive_replay(items, dists, policy: AdaptivePolicy, img_retrieval: bool = False):
    """Run the elimination policy on precomputed grid distances (:func:`diffitm_distances`).

    Because the live version draws the same latents and the same bank[k] for grid point k, its
    distances are exactly these, so the replay returns exactly what :func:`adaptive_scores` returns
    (scores and evaluations), without spending UNet evaluations.  Returns (scores, evals per item).
    """
    scores, evals = [], []
    for it, d in zip(items, dists):
        task = _retrieval_shape(it, "adaptive_replay")
        D = (d[0] if task == "text" else d[:, 0]).double().numpy()      # [n_cand, K]
        race = _Race(D.shape[0], D.shape[1], policy, 2 if (task == "image" and img_retrieval) else 1)
        while (req := race.request()) is not None:
            alive, kidx = req
            race.update(D[np.ix_(alive, kidx)])
        scores.append(_as_matrix(it, race.scores()))
        evals.append(race.evals)
    return scores, evals


@dataclass
class AdaptiveResult:
    """Scores [I, J] per item (-inf for eliminated candidates), UNet evaluations per item (the
    count the policy spends; the unconditional error of an image costs one more per point), and
    grid points seen per item."""

    scores: list
    evals: list
    points: list = field(default_factory=list)


def adaptive_scores(model, items, S: int = 250, seed: int = 0, policy: AdaptivePolicy | None = None,
                    latent_mode: str = "mean", img_retrieval: bool = False,
                    batch_size: int | None = None, cache=None, progress: bool = True,
                    chunk: int = 64, shard=None) -> AdaptiveResult:
    """Adaptive DiffusionITM (beyond the paper): score all candidates on a few grid points, drop the
    clear losers (:class:`AdaptivePolicy`), spend the remaining UNet evaluations on the close ones.

    Uses the same grid (S), bank and latents as :func:`~t2i_common.diffusion_itm.scoring.diffitm_scores`, so
    with ``z=inf`` it returns the grid scores.  Up to ``chunk`` races run in lock-step (each
    round's requests of all of them go to the UNet together); a finished race is saved to the
    cache at once and its place taken by the next item, so a kill loses only the races in progress.
    ``shard``: ``(i, n)`` runs the races of shard i of n (items round robin; ``accelerate launch``
    and the runner's ``--shard`` are detected by themselves; needs ``cache``).  A shard's races
    share UNet batches only with each other, so scores can differ from a one-process run in the
    last float bits (the grid score, :func:`diffitm_scores`, is byte-identical).
    """
    items = _check_items(items, "adaptive_scores")
    for it in items:
        _retrieval_shape(it, "adaptive_scores")
    S = check_S(S, "adaptive_scores")
    chunk = _check_chunk(chunk, "adaptive_scores")
    policy = policy or AdaptivePolicy()
    prep = _prepare(items)
    scorer = _Scorer(model, S, seed, latent_mode, batch_size)
    key = dict(version=SCORE_VERSION, model=model_fingerprint(model), S=S, seed=int(seed),
               latent_mode=latent_mode, img_retrieval=bool(img_retrieval), policy=vars(policy))
    rc = _make_cache(cache, "diffitm_adaptive", key)
    first = prep.first
    per_call = latent_mode == "sample_per_call"
    uncond = [""] if img_retrieval else []

    def requests_of(race, it, ks, row):
        """This round's requests of one race and how to turn their results into [n_alive, n]."""
        q = race.request()
        if q is None:
            return [], None
        alive, kidx = q
        if it.task == "text":
            caps = [str(it.captions[j]) for j in alive]
            distinct = list(dict.fromkeys(caps))
            if per_call:
                reqs = [(ks[0], [row[c]], kidx, c) for c in distinct]
                return reqs, lambda res: torch.stack([res[distinct.index(c)][0] for c in caps])
            reqs = [(ks[0], [row[c] for c in distinct], kidx, None)]
            return reqs, lambda res: res[0][[distinct.index(c) for c in caps]]
        cap = str(it.captions[0])
        reqs = [(ks[j], [row[c] for c in [cap] + uncond], kidx, cap if per_call else None)
                for j in alive]
        return reqs, lambda res: torch.stack([x[0] - x[1] if img_retrieval else x[0] for x in res])

    def gen(ids):
        queue, active = list(ids), []     # active: [id, item, image keys, race]
        while queue or active:
            fresh = []
            while queue and len(active) < chunk:
                i = queue.pop(0)
                it, ks = items[first[i]], prep.keys[first[i]]
                img_task = it.task == "image"
                race = _Race(len(ks) if img_task else len(it.captions), scorer.K, policy,
                             2 if (img_task and img_retrieval) else 1)
                active.append([i, it, ks, race])
                fresh.extend(ks)
            scorer.encode(fresh, prep.refs)
            emb, row = _prompt_table(model, [a[1] for a in active])
            reqs, owners = [], []
            for a in active:
                rq, to_d = requests_of(a[3], a[1], a[2], row)
                if rq:
                    owners.append((a[3], len(reqs), len(rq), to_d))
                    reqs.extend(rq)
            if reqs:
                res = scorer.run(reqs, emb)
                for race, pos, m, to_d in owners:
                    race.update(to_d(res[pos:pos + m]).numpy())
            still = []
            for i, it, ks, race in active:
                if race.request() is None:
                    yield i, {"scores": _as_matrix(it, race.scores()), "evals": race.evals,
                              "points": race.n}
                else:
                    still.append([i, it, ks, race])
            active = still
            scorer.forget(k for a in active for k in a[2])

    def check(i, v):
        it = items[first[i]]
        want = (len(it.images), len(it.captions))
        if not isinstance(v, dict) or not {"scores", "evals", "points"} <= set(v) or \
                tuple(getattr(v["scores"], "shape", ())) != want:
            return f"expected scores of shape {want} with evals and points"
        return None

    def blank(i):
        it = items[first[i]]
        return {"scores": torch.full((len(it.images), len(it.captions)), float("nan"),
                                     dtype=torch.float64), "evals": 0, "points": 0}

    got = cached_items(gen, list(first), rc, check, desc=f"adaptive DiffusionITM S={S}",
                       progress=progress, chunk=len(first), shard=shard, split=1, blank=blank)
    vals = [got[i] for i in prep.ids]
    return AdaptiveResult([v["scores"] for v in vals], [int(v["evals"]) for v in vals],
                          [int(v["points"]) for v in vals])


def live_vs_replay(items, live: AdaptiveResult, dists, policy: AdaptivePolicy,
                   img_retrieval: bool = False, atol: float = 1e-5) -> dict:
    """Does a live adaptive run equal its replay on the grid distances (scores to ``atol``,
    eliminated candidates and evaluation counts exactly)?"""
    sc, ev = adaptive_replay(items, dists, policy, img_retrieval)
    same = all(torch.equal(torch.isinf(a), torch.isinf(b)) and
               torch.allclose(a[~torch.isinf(a)], b[~torch.isinf(b)], atol=atol, rtol=0)
               for a, b in zip(live.scores, sc))
    return {"same_scores": bool(same), "same_evals": live.evals == ev,
            "live_evals": int(sum(live.evals)), "replay_evals": int(sum(ev))}


# ------------------------------------------------------------------------------------------------
# sampling-budget curves
# ------------------------------------------------------------------------------------------------
def grid_curve(model, items, S_values, seed: int = 0, img_retrieval: bool = False, cache=None,
               progress: bool = True):
    """Accuracy of the grid score against S (sampling steps): one row per S with the grid size K,
    UNet evaluations per example (:func:`grid_evaluations`), accuracy and ties."""
    import pandas as pd

    rows = []
    for S in S_values:
        s = diffitm_scores(model, items, S=S, seed=seed, img_retrieval=img_retrieval, cache=cache,
                           progress=progress)
        m = retrieval_metrics(items, s)
        rows.append({"S": int(S), "K": len(grid_timesteps(S)),
                     "evals_per_example": grid_evaluations(items, S, img_retrieval) / len(items),
                     "accuracy": m["accuracy"], "ties": m["ties"]})
    return pd.DataFrame(rows)


def policy_sweep(n0s=(2, 4, 8), steps=(2, 4, 8), zs=(0.5, 1.0, 1.5, 2.0, 3.0),
                 max_points=(None, 24), variances=("iid", "systematic")) -> list:
    """The :class:`AdaptivePolicy` grid used by the sampling-budget study, plus the full grid
    (z = inf, which never eliminates) as the reference row."""
    return [AdaptivePolicy(n0=a, step=b, z=z, max_points=m, variance=v)
            for v in variances for a in n0s for b in steps for z in zs for m in max_points] + \
        [AdaptivePolicy(n0=2, step=2, z=math.inf)]


def adaptive_curve(items, dists, policies, img_retrieval: bool = False):
    """Accuracy and UNet evaluations of each policy, replayed on grid distances (exact; see
    :func:`adaptive_replay`).  ``fraction_of_grid`` = evaluations / the full grid's;
    ``agreement`` = fraction of items whose pick (:func:`~t2i_common.diffusion_itm.metrics.pick`: first of
    the top-scored candidates) is the full
    grid's pick, a less noisy measure of "matches the grid" than equal accuracy."""
    import pandas as pd

    K = dists[0].shape[-1]
    full = sum(len(it.images) * (len(it.captions) + int(img_retrieval)) * K for it in items)
    grid_sc, _ = adaptive_replay(items, dists, AdaptivePolicy(n0=2, step=2, z=math.inf), img_retrieval)
    grid_pick = [pick(candidate_scores(it, s)[0]) for it, s in zip(items, grid_sc)]
    rows = []
    for pol in policies:
        sc, ev = adaptive_replay(items, dists, pol, img_retrieval)
        m = retrieval_metrics(items, sc)
        agree = np.mean([pick(candidate_scores(it, s)[0]) == g
                         for it, s, g in zip(items, sc, grid_pick)])
        rows.append({"n0": pol.n0, "step": pol.step, "z": pol.z, "max_points": pol.max_points,
                     "variance": pol.variance,
                     "evals_per_example": sum(ev) / len(items), "fraction_of_grid": sum(ev) / full,
                     "accuracy": m["accuracy"], "ties": m["ties"], "agreement": float(agree)})
    return pd.DataFrame(rows)


def cheapest_matching(curve, target_accuracy: float):
    """Row of ``curve`` with the fewest evaluations whose accuracy >= ``target_accuracy`` (None if
    no row reaches it)."""
    ok = curve[curve["accuracy"] >= target_accuracy - 1e-12]
    return None if ok.empty else ok.sort_values("evals_per_example").iloc[0]


def budget_summary(grid, adaptive, S_big: int = 250, default: AdaptivePolicy | None = None,
                   calibration=None):
    """Per task: the S_big grid's accuracy and evaluations per example, the smallest grid S that
    reaches it, the default policy's accuracy / evaluations / fraction of the grid and, with
    ``calibration`` (an :func:`adaptive_curve` on *other* items of the task, including the z=inf
    row = the grid), the policy picked there as the cheapest reaching the calibration items' grid
    accuracy, evaluated on these items.  ``best_*`` is the cheapest policy reaching the grid
    accuracy picked on these very items (optimistic: selected on the test items)."""
    import pandas as pd

    default = default or AdaptivePolicy()

    def row_of(curve, n0, step, z, mp, var="iid"):
        same_mp = curve.max_points.isna() if mp is None or mp != mp else curve.max_points == mp
        same_var = curve.variance == var if "variance" in curve else var == "iid"
        r = curve[(curve.n0 == n0) & (curve.step == step) & (curve.z == z) & same_mp & same_var]
        if r.empty:
            raise ValueError(f"budget_summary: policy n0={n0}, step={step}, z={z}, max_points={mp}, variance={var} "
                             f"is not in the sweep")
        return r.iloc[0]

    def name(r):
        mp = "" if r.max_points is None or r.max_points != r.max_points else f",max={int(r.max_points)}"
        var = ",systematic" if r.get("variance", "iid") == "systematic" else ""
        return f"n0={int(r.n0)},step={int(r.step)},z={r.z:g}{mp}{var}"

    rows = {}
    for task in grid["task"].unique():
        g, a = grid[grid.task == task], adaptive[adaptive.task == task]
        top = g[g.S == S_big].iloc[0]
        ok = g[g.accuracy >= top.accuracy - 1e-12].sort_values("evals_per_example").iloc[0]
        d = row_of(a, default.n0, default.step, default.z, default.max_points, default.variance)
        r = {"grid_accuracy": top.accuracy, "grid_evals": top.evals_per_example,
             "smallest_S_matching": int(ok.S), "smallest_S_evals": ok.evals_per_example,
             "default_accuracy": d.accuracy, "default_evals": d.evals_per_example,
             "default_fraction": d.fraction_of_grid,
             "default_agreement": d.get("agreement", float("nan"))}
        if calibration is not None:
            c = calibration[calibration.task == task]
            target = c[~np.isfinite(c.z)].accuracy.iloc[0]
            pick = cheapest_matching(c[np.isfinite(c.z)], target)
            if pick is not None:
                t = row_of(a, pick.n0, pick.step, pick.z, pick.max_points, pick.get("variance", "iid"))
                r.update({"calibrated_policy": name(pick),
                          "calibrated_accuracy": t.accuracy, "calibrated_evals": t.evals_per_example,
                          "calibrated_fraction": t.fraction_of_grid,
                          "calibrated_agreement": t.get("agreement", float("nan"))})
        best = cheapest_matching(a[np.isfinite(a.z)], top.accuracy)
        if best is not None:
            r.update({"best_policy": name(best),
                      "best_evals": best.evals_per_example, "best_fraction": best.fraction_of_grid})
        rows[task] = r
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("task")
