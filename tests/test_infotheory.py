"""Information decomposition estimators, ARO scoring, mIoU and Pearson protocols (tiny model)."""
import math

import numpy as np
import pytest
import torch

from t2i_common.info_decomp import information as it


def _gauss_integral(integ, n=200_000, m=0.5, sd=1.2, seed=0):
    a, w = integ.sample(n, torch.Generator().manual_seed(seed))
    g = torch.exp(-(a - m) ** 2 / (2 * sd ** 2))
    return float((w * g).mean()), math.sqrt(2 * math.pi) * sd


@pytest.mark.parametrize("integ", [it.Integration("logistic", 1.0, 2.0, 4.0),
                                   it.Integration("logistic", 1.0, 2.0, 3.0),
                                   it.Integration("uniform", 1.0, 2.0, 3.0)])
def test_importance_weights_integrate_gaussian_bump(integ):
    est, exact = _gauss_integral(integ)
    assert abs(est / exact - 1) < 0.01
    # the weights are 1/q: the integral of 1 over the support is its length 2 c s
    a, w = integ.sample(200_000, torch.Generator().manual_seed(1))
    lo, hi = integ.mu - integ.clip * integ.s, integ.mu + integ.clip * integ.s
    assert float(a.min()) >= lo and float(a.max()) <= hi
    assert abs(float(w.mean()) / (hi - lo) - 1) < 0.01


def test_uniform_weight_is_6s_and_logistic_formula():
    a, w = it.Integration("uniform", 1.0, 2.0, 3.0).sample(5)
    assert torch.allclose(w, torch.full_like(w, 12.0))
    integ = it.Integration("logistic", 1.0, 2.0, 4.0)
    a, w = integ.sample(7, torch.Generator().manual_seed(3))
    z = (a - 1.0) / 2.0
    q = torch.exp(-z) / (2.0 * (1 + torch.exp(-z)) ** 2) / math.tanh(2.0)  # truncated logistic pdf
    assert torch.allclose(w, 1 / q, rtol=1e-10)


def test_bad_integration_arguments():
    with pytest.raises(ValueError, match="mode"):
        it.Integration("gauss")
    with pytest.raises(ValueError, match="scale"):
        it.Integration(s=0.0)


def test_editing_integration_covers_trained_range(tiny_model):
    integ = it.Integration.for_editing(tiny_model, clip=3.0)
    lo, hi = tiny_model.logsnr_range
    assert integ.mu - 3 * integ.s == pytest.approx(lo) and integ.mu + 3 * integ.s == pytest.approx(hi)


def test_mi_is_exactly_zero_for_identical_conditions(tiny_model, tiny_images):
    r = it.pointwise_mi(tiny_model, tiny_images[:2], ["a red circle"] * 2, null="a red circle",
                        n_samples=6, pixel=True)
    assert torch.all(r["orthogonal"] == 0) and torch.all(r["standard"] == 0)
    assert torch.all(r["orthogonal_map"] == 0)


def test_mi_matches_reference_loop(tiny_model, tiny_images):
    """The batched estimator equals a plain loop over samples with model.eps."""
    m = tiny_model
    caps = ["a red circle", "a blue square"]
    r = it.pointwise_mi(m, tiny_images[:2], [caps, caps], n_samples=5, seed=3)
    z0 = m.encode_images(m.preprocess(tiny_images[:2])).float()
    emb = m.encode_prompts(caps + [""])
    for b in range(2):
        a, w, eps = it.draw_samples(it.Integration(), 5, z0.shape[1:], seed=3, stream=b)
        vals, stds = np.zeros(2), np.zeros(2)
        for k in range(5):
            ab = torch.sigmoid(a[k]).float()
            zt = ab.sqrt() * z0[b] + (1 - ab).sqrt() * eps[k]
            t = m.logsnr_to_t(a[k:k + 1])
            with torch.no_grad():
                e = m.eps(zt.expand(3, -1, -1, -1), t.expand(3), emb).float()
            for j in range(2):
                vals[j] += 0.5 * float(w[k]) * float((e[j] - e[2]).pow(2).sum()) / 5
                stds[j] += 0.5 * float(w[k]) * (float((eps[k] - e[2]).pow(2).sum())
                                                 - float((eps[k] - e[j]).pow(2).sum())) / 5
        assert np.allclose(r["orthogonal"][b].numpy(), vals, rtol=1e-4)
        assert np.allclose(r["standard"][b].numpy(), stds, rtol=1e-4, atol=1e-4)


def test_pixel_map_sums_to_image_level_value(tiny_model, tiny_images):
    r = it.pointwise_mi(tiny_model, tiny_images[:2], [["a red circle", "a blue square"]] * 2,
                        n_samples=4, pixel=True)
    for est in ("orthogonal", "standard"):
        assert torch.allclose(r[est + "_map"].sum((-2, -1)), r[est], rtol=1e-5, atol=1e-4)
        up = r[est + "_map_up"]
        assert up.shape[-2:] == (tiny_model.resolution, tiny_model.resolution)
        assert torch.allclose(up.sum((-2, -1)), r[est], rtol=1e-5, atol=1e-4)


def test_upsample_preserves_mass_and_constant_density():
    m = torch.rand(3, 8, 8, dtype=torch.float64)
    up = it.upsample_map(m, 64)
    assert torch.allclose(up.sum((-2, -1)), m.sum((-2, -1)))
    c = it.upsample_map(torch.ones(1, 4, 4), 16)
    assert torch.allclose(c, torch.full_like(c, 1 / 16))


def test_conditional_mi_shares_samples_and_is_deterministic(tiny_model, tiny_images):
    cap, ctx = ["a red circle", "a blue square"], ["a red _", "a blue _"]
    r = it.conditional_mi(tiny_model, tiny_images[:2], cap, ctx, null="", n_samples=4, seed=5)
    mi_y = it.pointwise_mi(tiny_model, tiny_images[:2], cap, n_samples=4, seed=5)
    mi_c = it.pointwise_mi(tiny_model, tiny_images[:2], ctx, n_samples=4, seed=5)
    assert torch.allclose(r["orthogonal"][:, 1], mi_y["orthogonal"][:, 0], rtol=1e-5)
    assert torch.allclose(r["orthogonal"][:, 2], mi_c["orthogonal"][:, 0], rtol=1e-5)
    # standard estimator is additive on the shared samples: i(y|c) = i(y) - i(c)
    assert torch.allclose(r["standard"][:, 0], r["standard"][:, 1] - r["standard"][:, 2], atol=1e-6)
    again = it.conditional_mi(tiny_model, tiny_images[:2], cap, ctx, null="", n_samples=4, seed=5)
    assert torch.equal(r["orthogonal"], again["orthogonal"])
    other = it.conditional_mi(tiny_model, tiny_images[:2], cap, ctx, null="", n_samples=4, seed=6)
    assert not torch.equal(r["orthogonal"], other["orthogonal"])


def test_streams_make_results_independent_of_batching(tiny_model, tiny_images):
    caps = ["a red circle", "a blue square", "a green triangle"]
    full = it.pointwise_mi(tiny_model, tiny_images[:3], caps, n_samples=3)
    one = it.pointwise_mi(tiny_model, tiny_images[2:3], caps[2:], n_samples=3, streams=[2])
    assert torch.allclose(full["orthogonal"][2], one["orthogonal"][0], rtol=1e-5)


def test_noises_per_point_repeats_logsnr(tiny_model, tiny_images):
    r = it.pointwise_mi(tiny_model, tiny_images[:1], ["a red circle"], n_samples=3,
                        noises_per_point=4)
    a = r["logsnr"][0]
    assert a.shape == (12,) and len(torch.unique(a)) == 3 and torch.equal(a[:4], a[:1].repeat(4))


def test_bad_inputs_raise(tiny_model, tiny_images):
    with pytest.raises(ValueError, match="caption"):
        it.pointwise_mi(tiny_model, tiny_images[:2], ["a red circle"], n_samples=2)
    with pytest.raises(ValueError, match="n_samples"):
        it.pointwise_mi(tiny_model, tiny_images[:1], ["a red circle"], n_samples=0)


def test_aro_scores_match_pointwise_mi_and_resume(tiny_model, tiny_images, tmp_path):
    from t2i_common.cache import ResultCache

    items = [{"image_options": [im], "caption_options": ["a blue square", "a red circle"]}
             for im in tiny_images[:3]]
    cache = ResultCache("aro_test", {"k": 1}, root=tmp_path)
    s = it.aro_scores(tiny_model, items, n_samples=3, cache=cache, images_per_call=2, progress=False)
    assert s.shape == (3, 2)
    ref = it.pointwise_mi(tiny_model, tiny_images[:3], [it_["caption_options"] for it_ in items],
                          n_samples=3)
    assert np.allclose(s, ref["orthogonal"].numpy(), rtol=1e-5)
    assert len(cache.done_ids()) == 3
    s2 = it.aro_scores(tiny_model, items, n_samples=3, cache=cache, progress=False)
    assert np.array_equal(s, s2)
    both = it.aro_scores(tiny_model, items, n_samples=3, estimator="both", progress=False)
    assert np.allclose(both["orthogonal"], s, rtol=1e-5)
    assert np.allclose(both["standard"], ref["standard"].numpy(), rtol=1e-5, atol=1e-5)
    dup = it.aro_scores(tiny_model, [{"image_options": [tiny_images[0]],
                                      "caption_options": ["a red circle", "a blue square", "a red circle"]}],
                        n_samples=3, progress=False)
    assert dup[0, 0] == dup[0, 2] and dup[0, 0] != dup[0, 1]
    with pytest.raises(ValueError, match="caption options"):
        it.aro_scores(tiny_model, items + [{"image_options": [tiny_images[0]],
                                            "caption_options": ["a"]}], n_samples=2)


def test_miou_ground_truth_is_one_and_empty_is_zero():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 16, 16, generator=g) > 0.6
    r = it.localisation_miou(masks.double(), masks)
    assert r["oracle"] == 1.0 and r["heldout"] == 1.0
    r0 = it.localisation_miou(torch.zeros(6, 16, 16), masks)
    assert r0["oracle"] == 0.0 and r0["heldout"] == 0.0
    frac = masks.double().mean((-2, -1))
    assert it.whole_image_miou(masks) == pytest.approx(float(frac.mean()))


def test_miou_threshold_curve_closed_form():
    # a ramp map 0..1 over 10 columns; GT = the 5 rightmost columns
    hm = torch.linspace(0, 1, 10).expand(10, 10).unsqueeze(0)
    gt = torch.zeros(1, 10, 10, dtype=torch.bool)
    gt[..., 5:] = True
    th = torch.tensor([0.1, 0.5, 0.9])
    curve = it.iou_curve(hm, gt, th)[0]
    # columns with value > tau: 9, 5 (5/9 = 0.555 > 0.5), 1
    assert torch.allclose(curve, torch.tensor([5 / 9, 1.0, 1 / 5], dtype=torch.float64))
    r = it.localisation_miou(hm.repeat(4, 1, 1), gt.repeat(4, 1, 1), thresholds=th)
    assert r["oracle"] == 1.0 and r["oracle_threshold"] == 0.5 and r["heldout_thresholds"] == [0.5, 0.5]


def test_pearson_bootstrap():
    g = np.random.default_rng(0)
    x = g.normal(size=50)
    y = 2 * x + g.normal(size=50)
    r = it.pearson_bootstrap(x, y, n_boot=100, seed=1)
    assert r["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert 0 < r["std"] < 0.2 and r["err"] == pytest.approx(r["std"] / 10)
    lin = it.pearson_bootstrap(x, 3 * x + 1, n_boot=20)
    assert lin["r"] == pytest.approx(1.0) and lin["std"] < 1e-12
    maps_x, maps_y = g.normal(size=(5, 4, 4)), g.normal(size=(5, 4, 4))
    per = it.pearson_bootstrap(maps_x, maps_y, per_item=True, n_boot=10)
    ref = np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps_x, maps_y)])
    assert per["r"] == pytest.approx(ref)
    again = it.pearson_bootstrap(maps_x, maps_y, per_item=True, n_boot=10)
    assert np.array_equal(per["draws"], again["draws"])


def test_keep_samples_gives_nested_estimates(tiny_model, tiny_images):
    r = it.pointwise_mi(tiny_model, tiny_images[:2], ["a red circle"] * 2, n_samples=6, pixel=True,
                        keep_samples=True)
    s = r["orthogonal_samples"]
    assert s.shape == (2, 1, 6) and torch.allclose(s.mean(-1), r["orthogonal"])
    assert torch.allclose(r["orthogonal_map_samples"].double().mean(2), r["orthogonal_map"], rtol=1e-5)
    assert torch.allclose(r["orthogonal_map_samples"].double().sum((-2, -1)), s, rtol=1e-5)


def test_iou_curve_upsamples_coarse_maps():
    coarse = torch.zeros(1, 4, 4)
    coarse[0, :, 2:] = 1.0                                  # right half
    gt = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt[0, :, 8:] = True
    curve = it.iou_curve(coarse, gt, thresholds=[0.5])
    assert curve.shape == (1, 1) and curve[0, 0] == 1.0     # bilinear edge crosses 0.5 at the middle


def test_relation_testing_with_match_items(tiny_model, tiny_images):
    from t2i_common.formats import MatchItem

    items = [MatchItem([im], ["a blue square", "a red circle"], 0, 1,
                       {"aro_task": "vg_relation", "relation_name": "above" if i % 2 else "below"})
             for i, im in enumerate(tiny_images)]
    info = it.info_methods(tiny_model, n_samples=3, progress=False)["orthogonal"]
    first = lambda its, img_ret: [np.array([[1.0, 0.0]]) for _ in its]   # noqa: E731
    tie = lambda its, img_ret: [np.array([[0.5, 0.5]]) for _ in its]     # noqa: E731
    df = it.relation_testing({"VG-R": items}, {"Info": info, "first": first, "tie": tie},
                             progress=False)
    tab = it.relation_table(df, "micro")
    assert tab.loc["first", "VG-R"] == 0.0 and tab.loc["tie", "VG-R"] == 0.0
    assert int(df[(df.method == "tie") & (df.protocol == "micro")].n_tied.iloc[0]) == 4
    # the original's argmax: the first option wins a tie -> the false caption (listed first in VG)
    assert it.relation_table(df, "micro", ties="first").loc["tie", "VG-R"] == 0.0
    s = it.aro_scores(tiny_model, items, n_samples=3, progress=False)
    expect = 100 * np.mean(s[:, 1] > s[:, 0])
    assert tab.loc["Info", "VG-R"] == pytest.approx(expect)
    assert list(tab.index) == ["Info", "first", "tie"]


def test_relation_testing_tie_rules_on_order_items(tiny_images):
    from t2i_common.formats import MatchItem

    items = [MatchItem([im], ["a red circle", "circle red a", "a red circle"], 0, 0,
                       {"aro_task": "coco_order"}) for im in tiny_images]
    tie = lambda its, img_ret: [np.array([[0.5, 0.1, 0.5]]) for _ in its]   # noqa: E731
    df = it.relation_testing({"COCO-Order": items}, {"tie": tie}, progress=False)
    assert it.relation_table(df, "macro", "strict").loc["tie", "COCO-Order"] == 0.0
    assert it.relation_table(df, "macro", "first").loc["tie", "COCO-Order"] == 100.0
