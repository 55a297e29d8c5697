"""Attribution baselines, TRAK solver and retrieval metrics (t2i_common.attribution.baselines)."""
import numpy as np
import pytest
import torch

from t2i_common.attribution import unlearning as A
from t2i_common.attribution import baselines as B


def test_recall_and_average_precision_hand_cases():
    rank = [4, 1, 7, 0, 2, 3, 5, 6]
    assert B.recall_at_k(rank, [1, 3], k=2) == 0.5
    assert B.recall_at_k(rank, [1, 3], k=6) == 1.0
    # AP: hits at positions 2 and 6 -> (1/2 + 2/6) / 2
    assert B.average_precision(rank, [1, 3]) == pytest.approx((0.5 + 2 / 6) / 2)
    assert B.average_precision(rank, [4]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        B.recall_at_k(rank, [])
    t = B.retrieval_table({"m": [rank, rank]}, [[1, 3], [4]], k=2)
    assert t.loc["m", "found"] == 2 and t.loc["m", "of"] == 3
    assert t.loc["m", "recall@10" if "recall@10" in t else "recall@2"] == pytest.approx(0.75)


def test_rank_scores_is_descending_and_stable():
    r = B.rank_scores([[0.1, 0.5, 0.5, -1.0]])
    np.testing.assert_array_equal(r[0], [1, 2, 0, 3])


def test_trak_solver_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(7, 3, generator=g)
    q = torch.randn(2, 3, generator=g)
    lam = 0.7
    got = B.trak_solve(phi, q, lam)
    exact = (q.double() @ torch.linalg.inv(phi.double().T @ phi.double() + lam * torch.eye(3,
             dtype=torch.float64)) @ phi.double().T).numpy()
    # TRAK rescales the inverse by a positive constant: same scores up to one factor
    ratio = got / exact
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)
    assert ratio.flat[0] > 0
    np.testing.assert_array_equal(B.rank_scores(got), B.rank_scores(exact))


def test_trak_projection_is_a_fixed_linear_map():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 500, generator=g), torch.randn(3, 500, generator=g)
    pa, pb, pab = B.trak_project(a, 32, seed=5), B.trak_project(b, 32, seed=5), B.trak_project(a + b, 32, seed=5)
    assert pa.shape == (3, 32)
    torch.testing.assert_close(pab, pa + pb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(B.trak_project(a, 32, seed=5), pa)
    assert not torch.allclose(B.trak_project(a, 32, seed=6), pa)


def test_pixel_cosine_finds_the_identical_image():
    g = np.random.default_rng(0)
    train = g.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    s = B.pixel_cosine_scores(train[[3]], train)
    assert B.rank_scores(s)[0, 0] == 3 and s[0, 3] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same size"):
        B.pixel_cosine_scores(train[:1, :4], train)


def test_toy_clip_text_and_feature_baselines():
    import t2i_common.toyworld as tw
    from t2i_common.models import load_clip

    clip = load_clip()
    samples = tw.make_samples(6, 0, kinds=("single",))
    caps = [s.captions for s in samples]
    s = B.clip_text_scores(clip, [samples[2].captions[0]], caps)
    assert B.rank_scores(s)[0, 0] == 2 or caps[B.rank_scores(s)[0, 0]][0] == caps[2][0]
    f = B.self_supervised_features([s_.image for s_ in samples], clip)
    # the pre-projection width of the toy CLIP vision tower, not the 64-d projection
    assert f.shape == (6, clip.model.config.vision_config.hidden_size)
    fs = B.feature_scores([samples[4].image], [s_.image for s_ in samples], clip)
    assert B.rank_scores(fs)[0, 0] == 4


def test_gradient_features_loss_and_dtrak_targets(tiny_model, tiny_images):
    data = A.TrainingSet.from_images(tiny_model, np.stack(tiny_images),
                                     [["a red circle"], ["a blue square"], ["a green triangle"],
                                      ["a purple diamond"]])
    gl = B.gradient_features(tiny_model, data.latents[:2], data.text_emb[:2], target="loss",
                             subset="cross-attn-kv", n_draws=2)
    gd = B.gradient_features(tiny_model, data.latents[:2], data.text_emb[:2], target="sq_norm",
                             subset="cross-attn-kv", n_draws=2)
    dim = sum(p.numel() for n, p in tiny_model.unet.named_parameters()
              if n in A.select_parameters(tiny_model.unet, "cross-attn-kv"))
    assert gl.shape == gd.shape == (2, dim)
    assert not torch.allclose(gl, gd)
    # draw d of example i depends only on (seed, i, d): a batch of one gives the same row
    one = B.gradient_features(tiny_model, data.latents[:2], data.text_emb[:2], target="loss",
                              subset="cross-attn-kv", n_draws=2, batch_size=1)
    torch.testing.assert_close(one, gl, rtol=1e-4, atol=1e-7)
    q = A.QuerySet(data.latents[:1], data.text_emb[:1, 0])
    s = B.trak_scores(tiny_model, data, q, target="sq_norm", subset="cross-attn-kv", proj_dim=8,
                      n_draws=1)
    assert s.shape == (1, 4) and np.isfinite(s).all()
