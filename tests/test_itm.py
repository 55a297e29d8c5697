"""DiffusionITM scores, metrics, bias effect sizes, CLIP baseline and adaptive evaluation."""
import math

import numpy as np
import pytest
import torch

from t2i_common import diffusion_itm as itm
from t2i_common.diffusion_itm import adaptive as itm_adaptive, scoring as itm_scoring
from t2i_common.cache import ResultCache
from t2i_common.engine import NoiseBank, grid_timesteps
from t2i_common.formats import MatchItem

CAPS = ["a red circle", "a blue square to the left of a green triangle", "a small yellow diamond"]


@pytest.fixture(scope="module")
def items(tiny_images):
    im = tiny_images
    return [MatchItem([im[0]], CAPS, 0, 1),                                  # text retrieval
            MatchItem([im[1], im[2], im[0]], [CAPS[0]], 2, 0),                # image retrieval
            MatchItem([im[2], im[3]], [CAPS[1], CAPS[2]], 0, 0)]              # Winoground 2 x 2


@pytest.fixture(scope="module")
def original(tiny_model, items):
    return itm.original_loop_scores(tiny_model, items, S=10, seed=3)


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_scores_equal_original_loop(tiny_model, items, original, batch_size):
    got = itm.diffitm_scores(tiny_model, items, S=10, seed=3, batch_size=batch_size, progress=False)
    ref = original
    for g, r, it in zip(got, ref, items):
        assert g.shape == (len(it.images), len(it.captions))
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


def test_image_retrieval_equals_original_loop(tiny_model, items):
    got = itm.diffitm_scores(tiny_model, items, S=5, seed=1, img_retrieval=True, progress=False)
    ref = itm.original_loop_scores(tiny_model, items, S=5, seed=1, img_retrieval=True, batch_items=2)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


def test_hand_written_reference_score(tiny_model, tiny_images):
    """s = -mean_k ||bank[k] - eps(sqrt(abar) z0 + sqrt(1-abar) bank[k], t_k, c)||, spelled out."""
    item = MatchItem([tiny_images[1]], [CAPS[2]], 0, 0)
    s = itm.diffitm_scores(tiny_model, [item], S=4, seed=7, progress=False)[0][0, 0]
    grid = torch.tensor([10, 260, 510, 760])                  # range(10, 990, 250)
    assert torch.equal(grid_timesteps(4), grid)
    bank = NoiseBank(tiny_model.latent_shape, 7).draw(4)
    with torch.no_grad():
        z0 = tiny_model.vae.encode(tiny_model.preprocess([tiny_images[1]])).latent_dist.mean
        z0 = z0 * tiny_model.scaling_factor
        emb = tiny_model.text_encoder(tiny_model.tokenize([CAPS[2]]).input_ids)[0]
        d = []
        for k, t in enumerate(grid):
            a = tiny_model.alphas_cumprod[t]
            zt = math.sqrt(a) * z0 + math.sqrt(1 - a) * bank[k:k + 1]
            d.append((bank[k:k + 1] - tiny_model.unet(zt, t, encoder_hidden_states=emb).sample).norm())
    assert abs(float(s) + float(torch.stack(d).mean())) < 1e-5


def test_image_retrieval_normalisation(tiny_model, items):
    """d_k = ||eps - eps(z,c)|| - ||eps - eps(z,"")||: s_ir(x, c) = s(x, c) - s(x, ""), and the
    empty caption itself scores exactly 0."""
    it = MatchItem(items[1].images, [CAPS[0], ""], 0, 0)
    plain = itm.diffitm_scores(tiny_model, [it], S=5, progress=False)[0]
    norm = itm.diffitm_scores(tiny_model, [it], S=5, img_retrieval=True, progress=False)[0]
    assert torch.all(norm[:, 1] == 0)
    torch.testing.assert_close(norm[:, 0], plain[:, 0] - plain[:, 1], atol=1e-5, rtol=0)


def test_shared_bank_and_dedup(tiny_model, tiny_images):
    """One bank for every candidate: a caption repeated in an item scores identically; an (image,
    caption) pair shared by two items is evaluated once; each image is VAE-encoded once."""
    a = MatchItem([tiny_images[0]], [CAPS[0], CAPS[1], CAPS[0]], 0, 0)
    b = MatchItem([tiny_images[0], tiny_images[1]], [CAPS[0]], 0, 0)
    r = itm.diffitm_distances(tiny_model, [a, b], S=10, progress=False)
    assert torch.equal(r.dists[0][0, 0], r.dists[0][0, 2])
    assert torch.equal(r.dists[0][0, 0], r.dists[1][0, 0])
    assert r.unet_evals == 10 * 3 and r.vae_images == 2          # pairs (0,c0), (0,c1), (1,c0)
    other = itm.diffitm_distances(tiny_model, [a], S=10, seed=1, progress=False)
    assert not torch.equal(other.dists[0], r.dists[0])


def test_sample_mode_is_deterministic_and_batch_independent(tiny_model, items):
    both = itm.diffitm_scores(tiny_model, items[:2], S=5, latent_mode="sample", progress=False)
    alone = itm.diffitm_scores(tiny_model, items[1:2], S=5, latent_mode="sample", progress=False)
    torch.testing.assert_close(both[1], alone[0], atol=1e-6, rtol=0)
    mean = itm.diffitm_scores(tiny_model, items[:1], S=5, progress=False)
    assert not torch.allclose(both[0], mean[0])              # a posterior sample, not the mean
    with pytest.raises(ValueError, match="latent_mode"):
        itm.diffitm_scores(tiny_model, items, latent_mode="mode", progress=False)


def test_cache_resumes_and_tracks_weights(tiny_model, items, tmp_path):
    full = itm.diffitm_distances(tiny_model, items, S=5, cache=tmp_path, progress=False)
    # a run killed after two items: drop the third item's file, re-run, only it is recomputed
    key = dict(version=itm.SCORE_VERSION, model=itm.model_fingerprint(tiny_model), S=5, seed=0,
               latent_mode="mean", img_retrieval=False)
    rc = ResultCache("diffitm", key, root=tmp_path)
    assert len(rc.done_ids()) == 3
    third = itm_scoring._prepare(items[2:]).ids[0]
    rc._file(third).unlink()
    again = itm.diffitm_distances(tiny_model, items, S=5, cache=tmp_path, progress=False)
    # the slice holding item 3 (2 images x 2 captions x 5) is rerun, nothing after it
    assert 2 * 2 * len(grid_timesteps(5)) <= again.unet_evals <= full.unet_evals
    for a, b in zip(full.dists, again.dists):      # the same batches: bit-identical
        assert torch.equal(a, b)
    # any weight change gives a new fingerprint, hence a new cache
    fp = itm.model_fingerprint(tiny_model)
    p = next(tiny_model.unet.parameters())
    saved = p.detach().clone()
    with torch.no_grad():
        p[(0,) * p.ndim] += 1e-3
    try:
        assert itm.model_fingerprint(tiny_model) != fp
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert itm.model_fingerprint(tiny_model) == fp


def test_clip_scores_are_cosines(tiny_sd_dir, items):
    from t2i_common.models import load_clip

    clip = load_clip(tiny_sd_dir / "clip")
    s = itm.clip_scores(clip, items)
    for it, m in zip(items, s):
        f = clip.encode_images(it.images).double()
        g = clip.encode_texts(it.captions).double()
        torch.testing.assert_close(m, f @ g.T, atol=1e-6, rtol=0)
        assert float(m.abs().max()) <= 1 + 1e-6


# ------------------------------------------------------------------------------------------------
# metrics on hand-made score matrices
# ------------------------------------------------------------------------------------------------
def _text_item(n, gold):
    return MatchItem([np.zeros((4, 4, 3), np.uint8)], [f"c{j}" for j in range(n)], 0, gold)


def test_retrieval_metrics_ties_and_recall():
    items = [_text_item(3, 1), _text_item(3, 1), _text_item(3, 2), _text_item(6, 0)]
    scores = [torch.tensor([[0.1, 0.5, 0.2]]),      # correct
              torch.tensor([[0.5, 0.5, 0.2]]),      # tie at the top with gold: miss (strict), 1/2 split
              torch.tensor([[0.3, 0.3, 0.1]]),      # tie at the top without gold: miss
              torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.0, 0.1]])]   # gold tied with one other at rank 5/6
    m = itm.retrieval_metrics(items, scores, ks=(1, 2, 5))
    assert m["n"] == 4 and m["ties"] == 2
    assert m["accuracy"] == pytest.approx(1 / 4)
    assert m["accuracy_tie_split"] == pytest.approx((1 + 0.5) / 4)
    assert m["accuracy_first"] == pytest.approx(2 / 4)     # the original's rule: item 2's tie is correct
    assert m["R@2"] == pytest.approx(2 / 4)                 # pessimistic ranks: 1, 2, 3, 6
    assert "R@5" not in m                                    # not all items have > 5 candidates
    img = MatchItem([np.zeros((4, 4, 3), np.uint8)] * 3, ["c"], 2, 0)
    assert itm.retrieval_metrics([img], [torch.tensor([[0.0], [0.1], [0.3]])])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="2 items but 1"):
        itm.retrieval_metrics(items[:2], scores[:1])


def test_winoground_metrics_strict_and_convention():
    # s[image, caption]; text: s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)
    both = [[1.0, 0.0], [0.0, 1.0]]
    text_only = [[1.0, 0.0], [2.0, 3.0]]   # i1 likes both captions more: image score fails
    image_only = [[1.0, 2.0], [0.0, 2.5]]  # c1 beats c0 on i0: text fails; each caption's image wins
    tie = [[1.0, 1.0], [0.0, 2.0]]         # s(c0,i0) == s(c1,i0): a tie is a miss for text
    m = itm.winoground_metrics([both, text_only, image_only, tie])
    assert m["n"] == 4
    assert m["text"] == pytest.approx(2 / 4)    # both, text_only
    assert m["image"] == pytest.approx(3 / 4)   # both, image_only, tie
    assert m["group"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="2 x 2"):
        itm.winoground_metrics([np.zeros((2, 3))])


def test_bias_phi_and_effect_size_by_hand():
    s = np.array([[3.0, 1.0, 0.0, 2.0], [1.0, 1.0, 4.0, 0.0]])
    np.testing.assert_allclose(itm.bias_phi(s, 2), [2.0 - 1.0, 1.0 - 2.0])
    # X = [1, 2, 3], Y = [0, 0, 3]: means 2 and 1; union std (ddof 0) = sqrt(9.5 / 6)
    assert itm.effect_size([1, 2, 3], [0, 0, 3]) == pytest.approx(1 / math.sqrt(9.5 / 6))
    assert itm.effect_size([0, 0, 3], [1, 2, 3]) == pytest.approx(-1 / math.sqrt(9.5 / 6))
    es = itm.mmbias_effect_sizes({"Christian": [1, 2, 3], "Muslim": [0, 0, 3], "Hindu": [5]})
    assert set(es) == {"Christian-Muslim", "Hindu-Muslim"}           # pairs with both groups present
    assert es["Hindu-Muslim"] == pytest.approx((5 - 1) / np.std([5, 0, 0, 3]))
    # gender: phi = s(img, male word) - s(img, female word); male imgs phi [1, 3], female [-1, -3]
    g = itm.gender_effect_sizes({"male_bags": [2, 4], "female_bags": [0, 0]},
                                {"male_bags": [1, 1], "female_bags": [1, 3]})
    assert g == {"bags": pytest.approx((2 - (-2)) / np.std([1, 3, -1, -3]))}
    with pytest.raises(ValueError, match="zero spread"):
        itm.effect_size([1, 1], [1])


# ------------------------------------------------------------------------------------------------
# adaptive evaluation
# ------------------------------------------------------------------------------------------------
def test_visit_order():
    assert itm.visit_order(10) == [0, 8, 4, 2, 6, 1, 9, 5, 3, 7]
    for K in (1, 2, 7, 245):
        assert sorted(itm.visit_order(K)) == list(range(K))


def test_adaptive_full_budget_equals_grid(tiny_model, items):
    ret = items[:2]
    grid = itm.diffitm_scores(tiny_model, ret, S=10, progress=False)
    ad = itm.adaptive_scores(tiny_model, ret, S=10, policy=itm.AdaptivePolicy(z=math.inf),
                             progress=False)
    for a, g in zip(ad.scores, grid):
        torch.testing.assert_close(a, g, atol=1e-5, rtol=0)
    assert sum(ad.evals) == itm.grid_evaluations(ret, S=10) and ad.points == [10, 10]
    adi = itm.adaptive_scores(tiny_model, ret[1:], S=10, img_retrieval=True,
                              policy=itm.AdaptivePolicy(z=math.inf), progress=False)
    gi = itm.diffitm_scores(tiny_model, ret[1:], S=10, img_retrieval=True, progress=False)
    torch.testing.assert_close(adi.scores[0], gi[0], atol=1e-5, rtol=0)
    assert adi.evals == [itm.grid_evaluations(ret[1:], S=10, img_retrieval=True)] == [60]


def test_adaptive_live_equals_replay_and_saves(tiny_model, items):
    ret = items[:2]
    pol = itm.AdaptivePolicy(n0=2, step=2, z=0.5)
    d = itm.diffitm_distances(tiny_model, ret, S=20, progress=False).dists
    rs, revals = itm.adaptive_replay(ret, d, pol)
    live = itm.adaptive_scores(tiny_model, ret, S=20, policy=pol, progress=False)
    assert live.evals == revals
    for a, b in zip(live.scores, rs):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert sum(revals) < itm.grid_evaluations(ret, S=20)
    with pytest.raises(ValueError, match="retrieval item"):
        itm.adaptive_scores(tiny_model, items[2:], S=10, progress=False)


def test_adaptive_elimination_on_known_distances():
    """Candidate 1 is worse by a constant 1.0 at every point: dropped after the first round;
    candidate 2 is worse by alternating +-3 +0.1 (noisy, tiny mean): kept to the end."""
    K = 16
    base = np.linspace(10, 20, K)
    noise = np.zeros(K)
    noise[itm.visit_order(K)] = np.where(np.arange(K) % 2 == 0, 3.0, -3.0)   # alternates as visited
    D = torch.tensor(np.stack([base, base + 1.0, base + 0.1 + noise]))[None]     # [1, 3, K]
    it = _text_item(3, 0)
    s, ev = itm.adaptive_replay([it], [D], itm.AdaptivePolicy(n0=4, step=4, z=2.0))
    assert math.isinf(s[0][0, 1]) and math.isfinite(s[0][0, 2])
    assert ev == [3 * 4 + 2 * 12]
    assert s[0][0, 0] == pytest.approx(-base.mean())



def test_adaptive_systematic_variance_cancels_a_smooth_trend():
    """Delta_k = 0.3 + (t_k - 0.5) rises linearly over the grid.  After the first 4 visited points
    (t = 0, 8/15, 4/15, 12/15: mean Delta 0.2) its iid standard error is 0.17 (no drop at z=2);
    the systematic one is built from successive differences in t order (4/15 each) times
    sqrt(1 - n/K): 0.08, so the loser goes at once.  Checked against the formula by hand."""
    K = 16
    tk = np.arange(K) / (K - 1)
    base = np.full(K, 10.0)
    D = torch.tensor(np.stack([base, base + 0.3 + (tk - 0.5)]))[None]           # [1, 2, K]
    it = _text_item(2, 0)
    s_iid, ev_iid = itm.adaptive_replay([it], [D], itm.AdaptivePolicy(n0=4, step=4, z=2.0))
    s_sys, ev_sys = itm.adaptive_replay([it], [D], itm.AdaptivePolicy(n0=4, step=4, z=2.0,
                                                                        variance="systematic"))
    assert ev_sys == [2 * 4] and ev_iid[0] > 2 * 4
    assert math.isinf(s_sys[0][0, 1]) and s_sys[0][0, 0] == pytest.approx(-10.0)
    # by hand: visited grid indices 0, 8, 4, 12 -> t order 0, 4, 8, 12
    seen = sorted(itm.visit_order(K)[:4])
    delta = 0.3 + (tk[seen] - 0.5)
    var = np.sum(np.diff(delta) ** 2) / (2 * 3)
    race = itm_adaptive._Race(2, K, itm.AdaptivePolicy(variance="systematic"), 1)
    race.n = 4
    assert race._se(0.3 + (tk[itm.visit_order(K)[:4]] - 0.5)) == pytest.approx(
        math.sqrt(var / 4 * (1 - 4 / K)), rel=1e-12)
    with pytest.raises(ValueError, match="variance"):
        itm.AdaptivePolicy(variance="bootstrap")


def test_adaptive_curve_agreement_with_the_grid_pick():
    """Item A: candidate 1 is worse by 1 everywhere (adaptive and grid both pick 0).  Item B:
    candidate 1 is worse by 1 on the first 4 visited points (zero spread: dropped after round 1)
    but better by 2 on the other 12, so the grid picks 1: agreement 1/2, accuracy of the grid 1/2."""
    K = 16
    base = np.full(K, 5.0)
    a = torch.tensor(np.stack([base, base + 1.0]))[None]
    off = np.full(K, -2.0)
    off[itm.visit_order(K)[:4]] = 1.0
    b = torch.tensor(np.stack([base, base + off]))[None]
    items = [_text_item(2, 0), _text_item(2, 0)]
    curve = itm.adaptive_curve(items, [a, b], [itm.AdaptivePolicy(n0=4, step=4, z=2.0),
                                                 itm.AdaptivePolicy(n0=2, step=2, z=math.inf)])
    assert curve.agreement.tolist() == [0.5, 1.0]
    assert curve.accuracy.tolist() == [1.0, 0.5]

# ------------------------------------------------------------------------------------------------
# GDBench tasks and tables (toy export -> published formats -> readers)
# ------------------------------------------------------------------------------------------------
def _oracle(items, img_retrieval):
    """Scores that rank every gold candidate first (Winoground: the diagonal)."""
    out = []
    for it in items:
        s = torch.zeros(len(it.images), len(it.captions), dtype=torch.float64)
        if it.task == "group":
            s += torch.eye(2, dtype=torch.float64)
        elif it.task == "text":
            s[0, it.gold_caption] = 1
        else:
            s[it.gold_image, 0] = 1
        out.append(s)
    return out


def test_gdbench_read_and_table(tmp_path):
    paths = itm.export_toy_gdbench(tmp_path, n=3, seed=0)
    tasks = itm.read_gdbench(paths, max_items=3)
    assert {"VG-A", "VG-R", "COCO-Order", "Flickr-Order", "Winoground", "Classes",
            "Flickr30K-img", "CLEVR/spatial"} <= set(tasks)
    assert all(0 < len(v) <= 3 for v in tasks.values())
    cls = tasks["Classes"][0]
    assert cls.captions == sorted(cls.captions) and cls.captions[cls.gold_caption] == cls.meta["class_prompt"]
    const = lambda items, ir: [torch.zeros(len(i.images), len(i.captions)) for i in items]   # noqa: E731
    df = itm.gdbench_table(tasks, {"oracle": _oracle, "const": const}, progress=False)
    assert (df.xs("accuracy", level="metric")["oracle"] == 1).all()
    assert (df.xs("accuracy", level="metric")["const"] == 0).all()          # all tied: strict misses
    ties = df.xs("ties", level="metric")
    assert (ties["const"] == ties["n"]).all() and (ties["oracle"] == 0).all()
    assert df.loc[("Winoground", "group"), "oracle"] == 1 and df.loc[("Winoground", "group"), "const"] == 0
    assert df.loc[("VG-A", "accuracy"), "chance"] == 0.5
    assert df.loc[("Flickr30K-img", "R@5"), "chance"] == 0.5
    assert df.loc[("Winoground", "group"), "chance"] == pytest.approx(1 / 6)
    res = itm.table_results(df, "gd/")
    assert res["gd/VG-A/accuracy/oracle"] == 1.0 and len(res) == df.size
    with pytest.raises(KeyError, match="unknown task"):
        itm.read_gdbench({"Nope": tmp_path})


def test_adaptive_curve_and_cheapest():
    it = _text_item(2, 0)
    K = 8
    d = [torch.stack([torch.full((K,), 1.0), torch.full((K,), 2.0 + g)])[None] for g in range(3)]
    pols = [itm.AdaptivePolicy(n0=2, step=2, z=math.inf), itm.AdaptivePolicy(n0=2, step=2, z=1.0)]
    curve = itm.adaptive_curve([it] * 3, d, pols)
    assert list(curve["evals_per_example"]) == [2 * K, 2 * 2]       # constant gaps: stop at once
    assert list(curve["accuracy"]) == [1.0, 1.0]
    assert list(curve["fraction_of_grid"]) == [1.0, 0.25]
    best = itm.cheapest_matching(curve, 1.0)
    assert best["z"] == 1.0
    assert itm.cheapest_matching(curve, 1.01) is None


def test_budget_summary_with_calibration():
    import pandas as pd

    grid = pd.DataFrame({"task": ["t"] * 3, "S": [1, 10, 250], "K": [1, 10, 245],
                         "evals_per_example": [2.0, 20.0, 490.0], "accuracy": [0.6, 0.8, 0.8],
                         "ties": [0, 0, 0]})

    def curve(rows):
        return pd.DataFrame([{"task": "t", "n0": n0, "step": 2, "z": z, "max_points": None,
                              "evals_per_example": e, "fraction_of_grid": e / 490, "accuracy": acc,
                              "ties": 0} for n0, z, e, acc in rows])

    test = curve([(4, 2.0, 40.0, 0.8), (2, 0.5, 5.0, 0.8), (2, 1.0, 10.0, 0.7), (2, math.inf, 490.0, 0.8)])
    cal = curve([(4, 2.0, 40.0, 0.9), (2, 0.5, 5.0, 0.7), (2, 1.0, 10.0, 0.9), (2, math.inf, 490.0, 0.9)])
    s = itm.budget_summary(grid, test, 250, default=itm.AdaptivePolicy(n0=4, step=2, z=2.0),
                           calibration=cal).loc["t"]
    assert s.grid_accuracy == 0.8 and s.smallest_S_matching == 10 and s.default_evals == 40
    # calibration picks the cheapest policy reaching 0.9 there (n0=2, z=1), reported on test items
    assert s.calibrated_policy == "n0=2,step=2,z=1" and s.calibrated_accuracy == 0.7
    assert s.best_policy == "n0=2,step=2,z=0.5" and s.best_evals == 5.0


def test_gdbench_export_is_atomic_and_shared(tmp_path):
    """40-42 share one export: concurrent exports of the same folder all return a complete one,
    no temporary folder is left, no exported file names the temporary folder, and a stale export
    (another version) is replaced whole."""
    import json
    import threading
    res = []
    threads = [threading.Thread(target=lambda: res.append(itm.export_toy_gdbench(tmp_path, n=3, seed=1)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(res) == 3 and res[0] == res[1] == res[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n3-s1"]
    root = tmp_path / "n3-s1"
    for f in root.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".csv", ".tsv"):
            assert ".tmp" not in f.read_text(), f
    assert {t: len(v) for t, v in itm.read_gdbench(res[0], max_items=3).items()}["VG-A"] == 3
    # a stale export (an older version stamp, a stray file) is replaced, not mixed with the new one
    (root / "export.json").write_text(json.dumps({"n": 3, "seed": 1, "version": 1}))
    (root / "stray.txt").write_text("old")
    again = itm.export_toy_gdbench(tmp_path, n=3, seed=1)
    assert again == res[0] and not (root / "stray.txt").exists()
    assert json.loads((root / "export.json").read_text())["version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n3-s1"]
