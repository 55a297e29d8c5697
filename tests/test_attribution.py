"""Attribution by unlearning: Newton step, influence, Fisher, file formats (t2i_common.attribution)."""
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2i_common import attribution as A


# ------------------------------------------------------------------------------------------------
# a model whose gradient and Fisher are exact: eps_theta(z_t) = W z_t + b per pixel
# ------------------------------------------------------------------------------------------------
class _Out:
    def __init__(self, sample):
        self.sample = sample


class LinearEps(torch.nn.Module):
    def __init__(self, C):
        super().__init__()
        self.attn2 = torch.nn.Module()
        self.attn2.to_k = torch.nn.Linear(C, C)
        self.attn2.to_q = torch.nn.Linear(C, C)   # not in the cross-attn-kv subset
        torch.nn.init.normal_(self.attn2.to_k.weight, std=0.3)

    def forward(self, zt, t, encoder_hidden_states=None, return_dict=True):
        y = self.attn2.to_k(zt.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return _Out(y) if return_dict else (y,)


def _linear_model(C=3, h=2):
    torch.manual_seed(0)
    unet = LinearEps(C).requires_grad_(False)
    abar = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    m = SimpleNamespace(unet=unet, alphas_cumprod=abar, latent_shape=(C, h, h),
                        device=torch.device("cpu"), num_train_timesteps=1000)
    m.eps = lambda zt, t, emb: unet(zt, t, encoder_hidden_states=emb).sample
    return m


def test_newton_step_equals_closed_form_on_linear_model():
    m = _linear_model()
    C, h, _ = m.latent_shape
    z0 = torch.randn(C, h, h, generator=torch.Generator().manual_seed(1))
    emb = torch.zeros(1, 4)
    nb, bs, lr, N = 3, 7, 0.05, 11
    fisher = {"attn2.to_k.weight": torch.rand(C, C, dtype=torch.float64) + 0.5,
              "attn2.to_k.bias": torch.rand(C, dtype=torch.float64) + 0.5}
    delta = A.unlearn_delta(m, z0, emb, fisher, n_train=N, lr=lr, n_batches=nb, batch_size=bs, seed=3)
    assert set(delta) == {"attn2.to_k.weight", "attn2.to_k.bias"}   # to_q not in the subset
    # closed form in float64 with the same draws
    t, eps = A.query_draws(3, nb, bs, 1000, m.latent_shape)
    W = m.unet.attn2.to_k.weight.double()
    b = m.unet.attn2.to_k.bias.double()
    gW, gb = torch.zeros_like(W), torch.zeros_like(b)
    for k in range(nb):
        a = m.alphas_cumprod[t[k]].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0.double() + (1 - a).sqrt() * eps[k].double()
        x = zt.permute(0, 2, 3, 1).reshape(-1, C)
        r = x @ W.T + b - eps[k].double().permute(0, 2, 3, 1).reshape(-1, C)
        gW += 2 * r.T @ x / r.numel()
        gb += 2 * r.sum(0) / r.numel()
    exp_W = lr * (gW / nb) / (fisher["attn2.to_k.weight"] * N)
    exp_b = lr * (gb / nb) / (fisher["attn2.to_k.bias"] * N)
    torch.testing.assert_close(delta["attn2.to_k.weight"], exp_W, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(delta["attn2.to_k.bias"], exp_b, rtol=1e-5, atol=1e-9)
    # without the Fisher (the SGD ablation) the step is lr / N * grad
    sgd = A.newton_step({"w": gW / nb}, None, lr, N)
    torch.testing.assert_close(sgd["w"], lr * gW / nb / N)


def test_unlearned_restores_weights_exactly():
    m = _linear_model()
    before = A.weights_fingerprint(m.unet)
    delta = {"attn2.to_k.weight": torch.full((3, 3), 0.1, dtype=torch.float64)}
    with A.unlearned(m.unet, delta):
        assert A.weights_fingerprint(m.unet) != before
    assert A.weights_fingerprint(m.unet) == before


def test_newton_step_rejects_bad_fisher():
    with pytest.raises(KeyError, match="no entry"):
        A.newton_step({"a": torch.ones(2)}, {"b": torch.ones(2)}, 0.1, 10)
    with pytest.raises(ValueError, match="damping"):
        A.newton_step({"a": torch.ones(2)}, {"a": torch.zeros(2)}, 0.1, 10)


def test_weight_subsets_select_the_original_patterns(tiny_model):
    u = tiny_model.unet
    kv = A.select_parameters(u, "cross-attn-kv")
    assert kv and all("attn2" in n and ("to_k" in n or "to_v" in n) for n in kv)
    ca = A.select_parameters(u, "cross-attn")
    assert set(kv) < set(ca) and all("attn2" in n for n in ca)
    at = A.select_parameters(u, "attn")
    assert set(ca) < set(at)
    assert len(A.select_parameters(u, "all")) == len(list(u.parameters()))
    with pytest.raises(ValueError, match="choose one of"):
        A.select_parameters(u, "kv")


# ------------------------------------------------------------------------------------------------
# on the tiny SD-format model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_set(tiny_model, tiny_images):
    caps = [["a red circle", "a small red circle"], ["a blue square"], ["a green triangle"],
            ["a purple diamond", "a large purple diamond"]]
    return A.TrainingSet.from_images(tiny_model, np.stack(tiny_images), caps)


def test_training_set_layout(tiny_model, tiny_set):
    assert tiny_set.latents.shape == (8,) + tuple(tiny_model.latent_shape)
    assert tiny_set.text_emb.shape[:2] == (4, 2)
    # row N + i is the flip of row i (up to the VAE's own asymmetry, the images are flipped)
    x = tiny_model.preprocess(tiny_set.images[:1])
    torch.testing.assert_close(tiny_set.latents[4:5], tiny_model.encode_images(x.flip(-1)))
    # a one-caption image repeats its caption
    torch.testing.assert_close(tiny_set.text_emb[1, 0], tiny_set.text_emb[1, 1])


def test_influence_of_unchanged_model_is_exactly_zero(tiny_model, tiny_set, tmp_path):
    base = A.training_loss(tiny_model, tiny_set, time_samples=5, progress=False)
    assert base.shape == (8,) and np.all(base > 0)
    fisher = {n: torch.ones_like(p, dtype=torch.float64) for n, p in tiny_model.unet.named_parameters()}
    q = A.QuerySet(tiny_set.latents[:1], tiny_set.text_emb[:1, 0])
    res = A.attribute_by_unlearning(tiny_model, tiny_set, q, fisher, base, lr=0.0, n_batches=1,
                                    batch_size=4, time_samples=5, out_dir=tmp_path, progress=False)
    assert np.all(res[0]["influence"] == 0.0)
    # a real step changes losses, and the model comes back bit-exactly
    fp = A.weights_fingerprint(tiny_model.unet)
    res = A.attribute_by_unlearning(tiny_model, tiny_set, q, fisher, base, lr=50.0, n_batches=1,
                                    batch_size=4, time_samples=5, progress=False)
    assert np.abs(res[0]["influence"]).max() > 0
    assert A.weights_fingerprint(tiny_model.unet) == fp
    np.testing.assert_array_equal(A.training_loss(tiny_model, tiny_set, time_samples=5,
                                                  progress=False), base)


def test_loss_noise_independent_of_chunking_and_shards(tiny_model, tiny_set, tmp_path):
    from t2i_common.cache import ResultCache

    full = A.training_loss(tiny_model, tiny_set, time_samples=4, progress=False)
    small = A.training_loss(tiny_model, tiny_set, time_samples=4, chunk=3, batch_size=5, progress=False)
    np.testing.assert_allclose(small, full, rtol=1e-5)
    cache = ResultCache("t", {"x": 1}, root=tmp_path)
    s0 = A.training_loss(tiny_model, tiny_set, time_samples=4, chunk=3, shard=(0, 2), cache=cache,
                         progress=False)
    assert np.isnan(s0[3:6]).all() and not np.isnan(s0[:3]).any()
    A.training_loss(tiny_model, tiny_set, time_samples=4, chunk=3, shard=(1, 2), cache=cache,
                    progress=False)
    merged = A.training_loss(tiny_model, tiny_set, time_samples=4, chunk=3, cache=cache,
                             progress=False)
    np.testing.assert_allclose(merged, full, rtol=1e-5)
    # a subset of rows gets the same per-row noise as the full pass
    np.testing.assert_allclose(A.training_loss(tiny_model, tiny_set, time_samples=4, rows=[5, 2],
                                               progress=False), full[[5, 2]], rtol=1e-5)


def test_vmap_per_sample_grads_equal_a_loop(tiny_model, tiny_set):
    names = A.select_parameters(tiny_model.unet, "attn")
    g = torch.Generator().manual_seed(0)
    z0 = tiny_set.latents[:3]
    t = torch.tensor([5, 400, 900])
    eps = torch.randn(z0.shape, generator=g)
    emb = tiny_set.text_emb[:3, 0]
    abar = tiny_model.alphas_cumprod.float()
    v = A.per_sample_grads(tiny_model.unet, names, z0, t, emb, eps, abar, how="vmap")
    lo = A.per_sample_grads(tiny_model.unet, names, z0, t, emb, eps, abar, how="loop")
    for n in names:
        torch.testing.assert_close(v[n], lo[n], rtol=1e-4, atol=1e-7)
    assert any(v[n].abs().max() > 0 for n in names)
    # sample 0 alone = an ordinary backward of that sample's loss
    u = tiny_model.unet
    params = dict(u.named_parameters())
    a = abar[t[:1]].view(-1, 1, 1, 1)
    with torch.enable_grad():
        for n in names:
            params[n].requires_grad_(True)
        loss = torch.nn.functional.mse_loss(
            u(a.sqrt() * z0[:1] + (1 - a).sqrt() * eps[:1], t[:1], encoder_hidden_states=emb[:1]).sample,
            eps[:1])
        ref = torch.autograd.grad(loss, [params[n] for n in names])
        for n in names:
            params[n].requires_grad_(False)
    for n, r in zip(names, ref):
        torch.testing.assert_close(v[n][0], r, rtol=1e-4, atol=1e-7)


def test_fisher_saved_in_original_format(tiny_model, tiny_set, tmp_path):
    p = tmp_path / "fisher_info.pt"
    f = A.fisher_diagonal(tiny_model, tiny_set, "cross-attn", epochs=2, batch_size=3, path=p,
                          progress=False)
    saved = torch.load(p)
    params = dict(tiny_model.unet.named_parameters())
    assert set(saved) == set(A.select_parameters(tiny_model.unet, "cross-attn"))
    for n, v in saved.items():
        assert v.shape == params[n].shape and v.dtype == torch.float64 and (v >= 0).all()
        torch.testing.assert_close(v, f[n])
    assert any(v.sum() > 0 for v in saved.values())
    # deterministic from the seed
    f2 = A.fisher_diagonal(tiny_model, tiny_set, "cross-attn", epochs=2, batch_size=3, progress=False)
    for n in f:
        torch.testing.assert_close(f2[n], f[n])
    # per-sample gradients one row at a time (full-size memory): the same Fisher
    f1 = A.fisher_diagonal(tiny_model, tiny_set, "cross-attn", epochs=2, batch_size=3, chunk=1,
                           progress=False)
    for n in f:
        torch.testing.assert_close(f1[n], f[n], rtol=1e-5, atol=1e-10)  # float32 per-sample grads


def test_influence_pickle_round_trip(tmp_path):
    after = np.array([1.0, 2.0, 3.0, 1.5, 1.0, 5.0])
    before = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    res = A.influence_from_losses(after, before)
    np.testing.assert_array_equal(res["influence"], [0.5, 1.0, 4.0])   # max over the flips
    np.testing.assert_array_equal(res["rank"], [2, 1, 0])
    p = A.save_influence(res, tmp_path, 7)
    assert p.name == "influence_7.pkl"
    with open(p, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) == {"influence", "rank"}
    back = A.load_influence(tmp_path, 7)
    np.testing.assert_array_equal(back["influence"], res["influence"])
    np.testing.assert_array_equal(back["rank"], res["rank"])


# ------------------------------------------------------------------------------------------------
# bad files: clear errors before any work
# ------------------------------------------------------------------------------------------------
def test_bad_training_files_give_clear_errors(tmp_path):
    lat = np.zeros((8, 4, 2, 2), np.float32)
    np.save(tmp_path / "lat3d.npy", np.zeros((8, 4, 2), np.float32))
    np.save(tmp_path / "lat.npy", lat)
    np.save(tmp_path / "txt.npy", np.zeros((4, 2, 3, 5), np.float32))
    np.save(tmp_path / "txt_bad_n.npy", np.zeros((5, 2, 3, 5), np.float32))
    np.save(tmp_path / "txt3d.npy", np.zeros((4, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"lat3d.npy: latents must be \[2N, C, h, w\]"):
        A.TrainingSet.from_npy(tmp_path / "lat3d.npy", tmp_path / "txt.npy")
    with pytest.raises(ValueError, match=r"8 rows but .*txt_bad_n.npy has 5 images"):
        A.TrainingSet.from_npy(tmp_path / "lat.npy", tmp_path / "txt_bad_n.npy")
    with pytest.raises(ValueError, match=r"\[:, None\]"):
        A.TrainingSet.from_npy(tmp_path / "lat.npy", tmp_path / "txt3d.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy not found"):
        A.TrainingSet.from_npy(tmp_path / "missing.npy", tmp_path / "txt.npy")
    ts = A.TrainingSet.from_npy(tmp_path / "lat.npy", tmp_path / "txt.npy")
    assert ts.n == 4


def test_bad_query_files_and_index(tmp_path):
    np.save(tmp_path / "q_lat.npy", np.zeros((3, 4, 2, 2), np.float32))
    np.save(tmp_path / "q_txt.npy", np.zeros((2, 1, 3, 5), np.float32))
    with pytest.raises(ValueError, match="holds 3 queries but .*q_txt.npy.* holds 2"):
        A.QuerySet.from_npy(tmp_path / "q_lat.npy", tmp_path / "q_txt.npy")
    np.save(tmp_path / "q_txt.npy", np.zeros((3, 1, 3, 5), np.float32))
    with pytest.raises(FileNotFoundError, match="0.png"):
        A.QuerySet.from_npy(tmp_path / "q_lat.npy", tmp_path / "q_txt.npy", image_dir=tmp_path)
    q = A.QuerySet.from_npy(tmp_path / "q_lat.npy", tmp_path / "q_txt.npy")
    assert q.text_emb.shape == (3, 3, 5)
    with pytest.raises(IndexError, match="query index 3 is out of range"):
        q.check_index(3)


def test_incompatible_training_set_and_pretrain_loss(tiny_model, tiny_set):
    bad = A.TrainingSet(torch.zeros(8, 4, 3, 3), tiny_set.text_emb)
    with pytest.raises(ValueError, match="model expects"):
        A.training_loss(tiny_model, bad, time_samples=2, progress=False)
    q = A.QuerySet(tiny_set.latents[:1], tiny_set.text_emb[:1, 0])
    with pytest.raises(ValueError, match="pretrain_loss has shape"):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, {}, np.zeros(5), progress=False)
    with pytest.raises(IndexError, match="out of range"):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, {}, np.zeros(8), indices=[2],
                                  progress=False)
