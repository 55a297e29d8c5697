"""Attribution by unlearning: Newton step, influence, Fisher, file formats (t2i_common.attribution)."""
import json
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2i_common.attribution import unlearning as A


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


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_per_sample_grads_of_a_v_or_x0_model_are_eps_loss_grads(tiny_model, tiny_set, kind):
    """A UNet labelled v- (or x0-) prediction: the per-sample gradient is the gradient of the eps
    MSE after the conversion (eps = sqrt(abar) v + sqrt(1 - abar) z_t), as in T2IModel.eps."""
    from t2i_common.models import eps_from_output
    names = A.select_parameters(tiny_model.unet, "cross-attn-kv")
    g = torch.Generator().manual_seed(1)
    z0 = tiny_set.latents[:2]
    t = torch.tensor([30, 700])
    eps = torch.randn(z0.shape, generator=g)
    emb = tiny_set.text_emb[:2, 0]
    abar = tiny_model.alphas_cumprod.float()
    got = A.per_sample_grads(tiny_model.unet, names, z0, t, emb, eps, abar, prediction_type=kind)
    plain = A.per_sample_grads(tiny_model.unet, names, z0, t, emb, eps, abar)
    u, params = tiny_model.unet, dict(tiny_model.unet.named_parameters())
    a = abar[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    for i in range(2):
        with torch.enable_grad():
            for n in names:
                params[n].requires_grad_(True)
            out = u(zt[i:i + 1], t[i:i + 1], encoder_hidden_states=emb[i:i + 1]).sample
            e = eps_from_output(out, zt[i:i + 1], tiny_model.alphas_cumprod, t[i:i + 1], kind)
            ref = torch.autograd.grad(torch.nn.functional.mse_loss(e, eps[i:i + 1]),
                                      [params[n] for n in names])
            for n in names:
                params[n].requires_grad_(False)
        for n, r in zip(names, ref):
            torch.testing.assert_close(got[n][i], r, rtol=1e-4, atol=1e-7)
        assert max((got[n][i] - plain[n][i]).abs().max() for n in names) > 1e-6


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


# ------------------------------------------------------------------------------------------------
# bad input: every class gets a one-line error naming the input, before any work; no user file
# is ever changed (file hashes before / after)
# ------------------------------------------------------------------------------------------------
import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from t2i_common.attribution import files as AF  # noqa: E402
from t2i_common import validate as V  # noqa: E402


def _hashes(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model, tiny_set):
    """The original's file layout on the tiny model: dataroot, sample_dir, a UNet and a VAE folder."""
    root = tmp_path_factory.mktemp("abu_files")
    tiny_set.save_npy(root / "data")
    s = root / "sample"
    s.mkdir()
    np.save(s / "latents.npy", tiny_set.latents[[1, 2]].numpy())
    np.save(s / "text_embeddings.npy", tiny_set.text_emb[[1, 2], :1].numpy())
    tiny_model.unet.save_pretrained(root / "unet")
    tiny_model.vae.save_pretrained(root / "vae")
    return root


def _bad_copy(files, tmp_path, which, arr):
    """A copy of the data / sample folders with one array replaced."""
    import shutil
    for sub in ("data", "sample"):
        shutil.copytree(files / sub, tmp_path / sub)
    np.save(tmp_path / which, arr)
    return tmp_path / "data", tmp_path / "sample"


_Q = dict(n_batches=1, batch_size=2, time_samples=2, progress=False)


# ---- class 1: non-finite values ------------------------------------------------------------------
@pytest.mark.parametrize("which,index,value,name", [
    ("data/coco17_train_latents.npy", (3, 1, 0, 0), np.nan, "training latents"),
    ("data/coco17_train_latents.npy", (7, 0, 1, 1), np.inf, "training latents"),
    ("data/coco17_train_text_embeddings.npy", (2, 1, 0, 3), -np.inf, "training text embeddings"),
    ("sample/latents.npy", (1, 2, 0, 1), np.nan, "query latents"),
    ("sample/text_embeddings.npy", (0, 0, 2, 1), np.nan, "query text embeddings"),
])
def test_non_finite_arrays_are_named_with_the_first_bad_index(files, tmp_path, which, index, value,
                                                               name):
    arr = np.load(files / which).copy()
    arr[index] = value
    d, s = _bad_copy(files, tmp_path, which, arr)
    before = _hashes(tmp_path)
    loader = A.TrainingSet.from_npy if which.startswith("data") else A.QuerySet.from_npy
    args = ((d / "coco17_train_latents.npy", d / "coco17_train_text_embeddings.npy")
            if which.startswith("data") else (s / "latents.npy", s / "text_embeddings.npy"))
    with pytest.raises(V.BadInput, match=rf"{name} .*non-finite value .* at index "
                                         rf"\({', '.join(map(str, index))}\)"):
        loader(*args)
    assert _hashes(tmp_path) == before


def test_non_finite_in_memory_inputs(tiny_model, tiny_set):
    lat = tiny_set.latents.clone()
    lat[5, 0, 0, 0] = float("nan")
    with pytest.raises(V.BadInput, match=r"training latents .*at index \(5, 0, 0, 0\)"):
        A.TrainingSet(lat, tiny_set.text_emb)
    q = A.QuerySet(tiny_set.latents[:2], tiny_set.text_emb[:2, 0])
    loss = np.ones(8)
    loss[6] = np.nan
    with pytest.raises(V.BadInput, match=r"pretrain_loss .*non-finite .*index 6"):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, None, loss, use_fisher=False, **_Q)
    names = A.select_parameters(tiny_model.unet)
    fisher = {n: torch.ones_like(p, dtype=torch.float64) for n, p in tiny_model.unet.named_parameters()
              if n in names}
    fisher[names[1]] = fisher[names[1]].clone()
    fisher[names[1]].view(-1)[3] = float("inf")
    with pytest.raises(V.BadInput, match=rf"fisher .*{names[1]}.*non-finite"):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, fisher, np.ones(8), **_Q)
    emb = torch.zeros(1, 4)
    with pytest.raises(V.BadInput, match=r"query latent .*non-finite"):
        A.unlearn_delta(_linear_model(), torch.full((3, 2, 2), float("nan")), emb, None, n_train=4,
                        use_fisher=False, n_batches=1, batch_size=2)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.01, "0.01", None])
def test_bad_learning_rate(tiny_model, tiny_set, lr):
    q = A.QuerySet(tiny_set.latents[:1], tiny_set.text_emb[:1, 0])
    with pytest.raises(V.BadInput, match=r"lr \(unlearn_lr\) must be"):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, None, np.ones(8), use_fisher=False,
                                  lr=lr, **_Q)


@pytest.mark.parametrize("damping", [float("nan"), -1.0, float("-inf")])
def test_bad_damping(tiny_model, tiny_set, damping):
    q = A.QuerySet(tiny_set.latents[:1], tiny_set.text_emb[:1, 0])
    with pytest.raises(V.BadInput, match="damping must be"):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, None, np.ones(8), use_fisher=False,
                                  damping=damping, **_Q)


# ---- class 2: empty inputs -------------------------------------------------------------------------
@pytest.mark.parametrize("lat,txt,match", [
    ((0, 4, 2, 2), (0, 2, 3, 5), "training set is empty"),
    ((0, 4, 2, 2), (2, 2, 3, 5), "training set is empty"),
    ((4, 4, 2, 2), (2, 0, 3, 5), "0 captions per image"),
])
def test_empty_training_files(tmp_path, lat, txt, match):
    np.save(tmp_path / "lat.npy", np.zeros(lat, np.float32))
    np.save(tmp_path / "txt.npy", np.zeros(txt, np.float32))
    with pytest.raises(V.BadInput, match=match):
        A.TrainingSet.from_npy(tmp_path / "lat.npy", tmp_path / "txt.npy")


def test_empty_queries_and_indices(tmp_path, tiny_model, tiny_set):
    np.save(tmp_path / "q.npy", np.zeros((0, 4, 2, 2), np.float32))
    np.save(tmp_path / "t.npy", np.zeros((0, 1, 3, 5), np.float32))
    with pytest.raises(V.BadInput, match=r"query latents .*q.npy holds no queries"):
        A.QuerySet.from_npy(tmp_path / "q.npy", tmp_path / "t.npy")
    with pytest.raises(V.BadInput, match="holds no queries"):
        A.QuerySet(torch.zeros(0, 4, 2, 2), torch.zeros(0, 3, 5))
    q = A.QuerySet(tiny_set.latents[:1], tiny_set.text_emb[:1, 0])
    with pytest.raises(V.BadInput, match="indices is empty"):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, None, np.ones(8), indices=[],
                                  use_fisher=False, **_Q)


# ---- class 3: a user's file is never overwritten -----------------------------------------------------
def _fisher_files(tmp_path, tiny_model):
    names = A.select_parameters(tiny_model.unet)
    p = {n: v for n, v in tiny_model.unet.named_parameters()}
    out = {}
    torch.save(torch.ones(3, 3), tmp_path / "tensor.pt")
    out["tensor.pt"] = r"holds a tensor of shape \(3, 3\), expected a \{parameter name: tensor\} dict"
    torch.save([1, 2], tmp_path / "list.pt")
    out["list.pt"] = r"holds a list, expected a \{parameter name"
    torch.save({}, tmp_path / "empty.pt")
    out["empty.pt"] = "holds an empty dict"
    torch.save({"down_blocks.0.x": torch.ones(2)}, tmp_path / "other.pt")
    out["other.pt"] = r"lacks \d+ of the \d+ parameters of this weight subset"
    torch.save({n: torch.ones(2) for n in names}, tmp_path / "shape.pt")
    out["shape.pt"] = "has shape \\(2,\\) but the UNet's parameter is"
    torch.save({n: -torch.ones_like(p[n]) for n in names}, tmp_path / "neg.pt")
    out["neg.pt"] = "negative values"
    (tmp_path / "bytes.pt").write_bytes(np.random.default_rng(0).bytes(300))
    out["bytes.pt"] = "is not a readable torch file"
    torch.save({n: torch.ones_like(p[n]) for n in names}, tmp_path / "full.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:200])
    out["trunc.pt"] = "is not a readable torch file"
    (tmp_path / "full.pt").unlink()
    return out


def test_fisher_file_that_does_not_fit_is_an_error_and_stays_unchanged(tiny_model, tiny_set, tmp_path):
    cases = _fisher_files(tmp_path, tiny_model)
    before = _hashes(tmp_path)
    for name, match in cases.items():
        with pytest.raises(V.BadInput, match=match):
            A.fisher_diagonal(tiny_model, tiny_set, "cross-attn-kv", epochs=1, batch_size=4,
                              path=tmp_path / name, progress=False)
    assert _hashes(tmp_path) == before
    assert not list(tmp_path.glob("*.meta.json"))


def test_fisher_of_another_subset_is_refused_not_recomputed(tiny_model, tiny_set, tmp_path):
    p = tmp_path / "fisher_info.pt"
    A.fisher_diagonal(tiny_model, tiny_set, "cross-attn-kv", epochs=1, batch_size=4, path=p,
                      progress=False)
    before = _hashes(tmp_path)
    with pytest.raises(V.BadInput, match="lacks .* parameters of this weight subset"):
        A.fisher_diagonal(tiny_model, tiny_set, "attn", epochs=1, batch_size=4, path=p, progress=False)
    assert _hashes(tmp_path) == before


# ---- class 4: stale results --------------------------------------------------------------------------
def test_fisher_made_with_other_parameters_is_refused(tiny_model, tiny_set, tmp_path):
    p = tmp_path / "fisher_info.pt"
    f1 = A.fisher_diagonal(tiny_model, tiny_set, "all", epochs=1, batch_size=4, path=p, seed=0,
                           progress=False)
    rec = json.loads((tmp_path / "fisher_info.pt.meta.json").read_text())
    assert rec["epochs"] == 1 and rec["kind"] == "fisher" and rec["seed"] == 0
    before = _hashes(tmp_path)
    for kw, match in [(dict(epochs=2), r"epochs=1 \(now 2\)"), (dict(seed=3), r"seed=0 \(now 3\)"),
                      (dict(batch_size=2), r"batch_size=4 \(now 2\)")]:
        args = dict(dict(epochs=1, batch_size=4, seed=0), **kw)
        with pytest.raises(V.BadInput, match=match):
            A.fisher_diagonal(tiny_model, tiny_set, "all", path=p, progress=False, **args)
    other = A.TrainingSet(tiny_set.latents + 0.5, tiny_set.text_emb)
    with pytest.raises(V.BadInput, match="data="):
        A.fisher_diagonal(tiny_model, other, "all", epochs=1, batch_size=4, path=p, progress=False)
    assert _hashes(tmp_path) == before
    # the same parameters read the file back (a subset of it)
    f2 = A.fisher_diagonal(tiny_model, tiny_set, "cross-attn", epochs=1, batch_size=4, path=p,
                           progress=False)
    for n in f2:
        assert torch.equal(f2[n], f1[n])


def test_influence_of_other_settings_is_refused(tiny_model, tiny_set, tmp_path):
    q = A.QuerySet(tiny_set.latents[:2], tiny_set.text_emb[:2, 0])
    loss = A.training_loss(tiny_model, tiny_set, time_samples=2, progress=False)
    out = tmp_path / "res"
    kw = dict(use_fisher=False, out_dir=out, **_Q)
    first = A.attribute_by_unlearning(tiny_model, tiny_set, q, None, loss, lr=0.5, **kw)
    assert (out / "influence_1.pkl.meta.json").exists()
    before = _hashes(out)
    for change, match in [(dict(lr=0.7), r"lr=0.5 \(now 0.7\)"),
                          (dict(lr=0.5, seed=1), r"seed=0 \(now 1\)"),
                          (dict(lr=0.5, n_train=9), r"n_train=4 \(now 9\)")]:
        with pytest.raises(V.BadInput, match=rf"influence of query 0: .* {match}.*never overwritten"):
            A.attribute_by_unlearning(tiny_model, tiny_set, q, None, loss, **dict(kw, **change))
    q2 = A.QuerySet(tiny_set.latents[2:4], tiny_set.text_emb[2:4, 0])      # other queries
    with pytest.raises(V.BadInput, match="query_data="):
        A.attribute_by_unlearning(tiny_model, tiny_set, q2, None, loss, lr=0.5, **kw)
    assert _hashes(out) == before
    # the same settings resume: read back, identical
    again = A.attribute_by_unlearning(tiny_model, tiny_set, q, None, loss, lr=0.5, **kw)
    assert all(np.array_equal(again[i]["influence"], first[i]["influence"]) for i in (0, 1))
    # a file without a record (an older run's / the original code's) is refused, unchanged
    (out / "influence_0.pkl.meta.json").unlink()
    before = _hashes(out)
    with pytest.raises(V.BadInput, match="has no record of the settings"):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, None, loss, lr=0.5, **kw)
    assert _hashes(out) == before
    # ... unless the folder is keyed by the settings (the package's cache)
    res = A.attribute_by_unlearning(tiny_model, tiny_set, q, None, loss, lr=0.5,
                                    reuse_unrecorded=True, **kw)
    assert np.array_equal(res[0]["influence"], first[0]["influence"])


# ---- class 5: counts, steps, sizes --------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(n_batches=0), r"n_batches .* must be positive, got 0"),
    (dict(n_batches=-3), "must be positive"),
    (dict(n_batches=2.5), "must be a whole number"),
    (dict(n_batches=True), "must be a whole number"),
    (dict(batch_size=0), r"batch_size .* must be positive"),
    (dict(batch_size=1001), r"batch_size .* must be <= 1000"),
    (dict(time_samples=0), "time_samples must be positive"),
    (dict(time_samples=3), "must divide the 1000"),
    (dict(time_samples="20"), "time_samples must be a whole number"),
    (dict(n_train=0), "n_train must be positive"),
    (dict(loss_batch_size=-1), "loss_batch_size must be positive"),
])
def test_bad_counts_before_any_work(tiny_model, tiny_set, kw, match):
    q = A.QuerySet(tiny_set.latents[:1], tiny_set.text_emb[:1, 0])
    args = dict(dict(n_batches=1, batch_size=2, time_samples=2, progress=False, use_fisher=False), **kw)
    with pytest.raises(V.BadInput, match=match):
        A.attribute_by_unlearning(tiny_model, tiny_set, q, None, np.ones(8), **args)


@pytest.mark.parametrize("kw,match", [(dict(epochs=0), "epochs must be positive"),
                                      (dict(epochs=1.5), "epochs must be a whole number"),
                                      (dict(batch_size=0), "batch_size must be positive")])
def test_bad_fisher_counts(tiny_model, tiny_set, kw, match):
    with pytest.raises(V.BadInput, match=match):
        A.fisher_diagonal(tiny_model, tiny_set, "all", progress=False, **dict(dict(epochs=1), **kw))


@pytest.mark.parametrize("idx", ["0", 1.5, None, True])
def test_query_index_of_the_wrong_type(idx):
    q = A.QuerySet(torch.zeros(2, 4, 2, 2), torch.zeros(2, 3, 5))
    with pytest.raises(V.BadInput, match="query index must be a whole number"):
        q.check_index(idx)


# ---- unreadable files ----------------------------------------------------------------------------------
def _unreadable(tmp_path):
    good = np.zeros((8, 4, 2, 2), np.float32)
    np.save(tmp_path / "good.npy", good)
    (tmp_path / "bytes.npy").write_bytes(np.random.default_rng(1).bytes(500))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:300])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    (tmp_path / "folder.npy").mkdir()
    (tmp_path / "text.npy").write_text("1, 2, 3\n")
    return {"bytes.npy": "is not a .npy array file", "trunc.npy": "is truncated",
            "objects.npy": "holds pickled Python objects", "strings.npy": "holds <U1 data",
            "folder.npy": "is a folder, expected a file", "text.npy": "is not a .npy array file"}


def test_unreadable_arrays_are_named_as_what_they_are(tmp_path):
    cases = _unreadable(tmp_path)
    np.save(tmp_path / "txt.npy", np.zeros((4, 1, 3, 5), np.float32))
    before = _hashes(tmp_path)
    for name, match in cases.items():
        with pytest.raises(V.BadInput, match=rf"training latents: .*{name} {match}"):
            A.TrainingSet.from_npy(tmp_path / name, tmp_path / "txt.npy")
        with pytest.raises(V.BadInput, match=rf"query text embeddings: .*{name} {match}"):
            A.QuerySet.from_npy(tmp_path / "good.npy", tmp_path / name)
    assert _hashes(tmp_path) == before


def test_corrupt_influence_file_and_image(tmp_path):
    (tmp_path / "influence_0.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(V.BadInput, match=r"influence_0.pkl is not a readable pickle"):
        A.load_influence(tmp_path, 0)
    with open(tmp_path / "influence_1.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="influence_1.pkl is not an influence file: it holds a list"):
        A.load_influence(tmp_path, 1)
    np.save(tmp_path / "q.npy", np.zeros((1, 4, 2, 2), np.float32))
    np.save(tmp_path / "t.npy", np.zeros((1, 1, 3, 5), np.float32))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.png").write_bytes(b"not a png at all")
    with pytest.raises(V.BadInput, match=r"query image .*0.png is not a readable image"):
        A.QuerySet.from_npy(tmp_path / "q.npy", tmp_path / "t.npy", image_dir=tmp_path / "img")


# ---- the wrong model -----------------------------------------------------------------------------
def test_wrong_model_folder_says_what_was_found(files, tmp_path):
    with pytest.raises(V.BadInput, match=r"holds a AutoencoderKL .*expected a text-conditioned "
                                         r"UNet2DConditionModel"):
        AF.check_model_folder(files / "vae")
    (tmp_path / "f").write_text("x")
    with pytest.raises(V.BadInput, match="is a file"):
        AF.check_model_folder(tmp_path / "f")
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "config.json").write_text((files / "unet" / "config.json").read_text())
    with pytest.raises(V.BadInput, match="no weights"):
        AF.check_model_folder(tmp_path / "u")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "config.json").write_text("{not json")
    with pytest.raises(V.BadInput, match="is not valid JSON"):
        AF.check_model_folder(tmp_path / "j")


# ---- the command line ------------------------------------------------------------------------------
def _cli_args(files, result, **over):
    a = {"--model": files / "unet", "--dataroot": files / "data", "--sample_dir": files / "sample",
         "--result_dir": result, "--unlearn_batch_size": 2, "--unlearn_grad_accum_steps": 1,
         "--loss_time_samples": 2, "--fisher_epochs": 1, "--device": "cpu"}
    a.update(over)
    out = []
    for k, v in a.items():
        if v is not None:
            out += [k, str(v)]
    return out


def _cli_cases(files, tmp_path):
    (tmp_path / "afile").write_text("user data")
    torch.save(torch.ones(3), tmp_path / "tensor_fisher.pt")
    (tmp_path / "loss_bytes.npy").write_bytes(b"\x00" * 64)
    np.save(tmp_path / "loss_short.npy", np.zeros(5))
    nan_loss = np.ones(8)
    nan_loss[2] = np.nan
    np.save(tmp_path / "loss_nan.npy", nan_loss)
    return [
        (dict(), ["--model", "vae"], r"--model: .*vae holds a AutoencoderKL"),
        (dict(), ["--result_dir", "afile/sub"], r"--result_dir: .*lies under .*afile, which is a file"),
        (dict(), ["--result_dir", "afile"], r"--result_dir: .*afile is a file"),
        (dict(), ["--fisher_path", "tensor_fisher.pt"], r"fisher: .*holds a tensor of shape \(3,\)"),
        (dict(), ["--pretrain_loss_path", "loss_bytes.npy"], r"--pretrain_loss_path: .*is not a .npy"),
        (dict(), ["--pretrain_loss_path", "loss_short.npy"], r"loss_short.npy has shape \(5,\)"),
        (dict(), ["--pretrain_loss_path", "loss_nan.npy"], r"loss_nan.npy holds a non-finite .*index 2"),
        (dict(), ["--unlearn_lr", "nan"], r"lr \(unlearn_lr\) must be a finite number"),
        (dict(), ["--unlearn_lr", "-1"], r"lr \(unlearn_lr\) must be >= 0"),
        (dict(), ["--unlearn_grad_accum_steps", "0"], r"n_batches \(unlearn_grad_accum_steps\) must be positive"),
        (dict(), ["--unlearn_batch_size", "-2"], r"batch_size \(unlearn_batch_size\) must be positive"),
        (dict(), ["--loss_time_samples", "7"], "time_samples must divide"),
        (dict(), ["--fisher_epochs", "0"], "fisher_epochs must be positive"),
        (dict(), ["--sample_idx", "5"], "query index 5 is out of range"),
        (dict(), ["--dataroot", "afile"], r"--dataroot: .*afile is a file"),
        (dict(), ["--sample_dir", "missing"], r"--sample_dir: .*missing not found"),
        (dict(), ["--model", "missing"], r"--model: .*missing not found"),
        (dict(), ["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "--device"),
    ]


def test_cli_bad_inputs_one_line_no_traceback_files_unchanged(files, tmp_path, capsys):
    cases = _cli_cases(files, tmp_path)
    before = _hashes(tmp_path), _hashes(files)
    for _, over, match in cases:
        key, val = over
        path_like = key not in ("--unlearn_lr", "--unlearn_grad_accum_steps", "--unlearn_batch_size",
                                "--loss_time_samples", "--fisher_epochs", "--sample_idx", "--device")
        if key == "--model" and val == "vae":
            val = files / "vae"
        elif path_like:
            val = tmp_path / val
        args = _cli_args(files, tmp_path / "res", **{key: val})
        assert AF.main(args) == 2, over
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln]
        assert len(lines) == 1, (over, err)
        assert "Traceback" not in err and re.search(match, lines[0]), (over, err)
        assert lines[0].startswith("python -m t2i_common.attribution: error: ")
    assert (_hashes(tmp_path), _hashes(files)) == before
    assert not (tmp_path / "res").exists()         # nothing written for a bad call


def test_cli_subprocess_no_traceback_and_debug_shows_it(files, tmp_path):
    (tmp_path / "afile").write_text("user data")
    env = dict(os.environ, PYTHONPATH=str(Path(A.__file__).parents[1]))
    base = [sys.executable, "-m", "t2i_common.attribution"]
    for over, match in [({"--model": files / "vae"}, "holds a AutoencoderKL"),
                        ({"--result_dir": tmp_path / "afile" / "r"}, "--result_dir")]:
        r = subprocess.run(base + _cli_args(files, tmp_path / "res", **over), capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr and match in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(base + _cli_args(files, tmp_path / "res", **{"--model": files / "vae"})
                       + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_cli_end_to_end_then_stale_rerun_is_refused(files, tmp_path, capsys):
    res = tmp_path / "res"
    extra = ["--fisher_path", str(tmp_path / "f.pt"), "--pretrain_loss_path", str(tmp_path / "l.npy"),
             "--sample_idx", "0"]
    assert AF.main(_cli_args(files, res) + extra) == 0
    assert (res / "influence_0.pkl").exists() and (res / "influence_0.pkl.meta.json").exists()
    assert (tmp_path / "f.pt.meta.json").exists() and (tmp_path / "l.npy.meta.json").exists()
    capsys.readouterr()
    before = _hashes(tmp_path)
    assert AF.main(_cli_args(files, res, **{"--unlearn_lr": 0.02}) + extra) == 2
    err = capsys.readouterr().err
    assert re.search(r"--result_dir: .*influence_0.pkl was made with other settings: lr=0.01 "
                     r"\(now 0.02\)", err) and "Traceback" not in err
    assert AF.main(_cli_args(files, res, **{"--loss_time_samples": 4}) + extra) == 2
    assert re.search(r"--pretrain_loss_path: .*l.npy was made with other parameters: time_samples=2 "
                     r"\(now 4\)", capsys.readouterr().err)
    assert AF.main(_cli_args(files, res, **{"--fisher_epochs": 2}) + extra) == 2
    assert re.search(r"fisher: .*f.pt was made with other parameters: epochs=1 \(now 2\)",
                     capsys.readouterr().err)
    assert _hashes(tmp_path) == before
    # the same command again resumes (reads the results back), writes nothing
    assert AF.main(_cli_args(files, res) + extra) == 0
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("caps,match", [
    ([["a red circle"], ["a blue q"], ["a green triangle"], ["a purple diamond"]], r"\['q'\]"),
    ([["a red circle"], ["a blue square"], ["a green triangles"], ["a purple diamond"]],
     r"\['triangles'\]"),
    ("a red circle", "got the string 'a red circle'"),
])
def test_training_set_from_images_bad_captions(tiny_model, tiny_images, caps, match):
    with pytest.raises(V.BadInput, match=match):
        A.TrainingSet.from_images(tiny_model, np.stack(tiny_images), caps)
