"""Alignment Difficulty: exact values against an O(n^2) reference, closed forms, the sampled
estimator's interval, the pickle -> embedding-cache pipeline (round trip, resume) and bad inputs."""
import json
from pathlib import Path
import pickle

import numpy as np
import pytest
import torch

from t2i_common.implosion import ad_embeddings as ae
from t2i_common.implosion import alignment as al


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_ad(u, v, alpha):
    """Direct double loop in float64, following the paper's definitions literally."""
    n = len(u)
    fea = 0.0
    for k in range(n):
        s = float(np.dot(u[k], v[k]))
        fea += 1.0 - min(max((s - 0.2) * 4.0, 0.0), 1.0)
    stru = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            stru += abs(float(np.dot(u[i], u[j])) - float(np.dot(v[i], v[j])))
    fea, stru = fea / n, 2.0 * stru / n ** 2
    return fea, stru, alpha * fea + (1 - alpha) * stru


@pytest.mark.parametrize("block_size", [7, 64, 4096, None])
def test_ad_matches_double_loop_reference(block_size):
    n, d = 150, 16
    u = _unit(n, d, 0)
    # correlated text embeddings so that similarities spread over the LAION window 0.2..0.45
    v = 0.3 * u + _unit(n, d, 1)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sims = (u * v).sum(1)
    assert sims.min() < 0.2 < 0.45 < sims.max()  # all three branches of the clip are exercised
    ref = _reference_ad(u, v, 0.7)
    got = al.alignment_difficulty(torch.tensor(u, dtype=torch.float32),
                                  torch.tensor(v, dtype=torch.float32), alpha=0.7,
                                  block_size=block_size)
    assert got["feature_ad"] == pytest.approx(ref[0], abs=1e-6)
    assert got["structure_ad"] == pytest.approx(ref[1], abs=1e-6)
    assert got["ad"] == pytest.approx(ref[2], abs=1e-6)
    assert got["n"] == n and got["alpha"] == 0.7


def test_auto_block_size_by_n():
    # n / 8 rounded up to a power of two, within 128..2048
    assert [al.auto_block_size(n) for n in (1, 500, 1000, 2000, 5000, 20_000, 10 ** 6)] == \
        [128, 128, 128, 256, 1024, 2048, 2048]
    u, v = _unit(300, 8, 2), _unit(300, 8, 3)  # several tiles (128) against one tile (4096)
    assert al.structure_ad(u, v) == pytest.approx(al.structure_ad(u, v, block_size=4096), abs=1e-7)
    with pytest.raises(ValueError, match="block_size"):
        al.structure_ad(u, v, block_size=0)


def test_structure_float64_inputs_exact():
    u, v = _unit(40, 8, 2), _unit(40, 8, 3)
    ref = _reference_ad(u, v, 0.8)[1]
    assert al.structure_ad(torch.tensor(u), torch.tensor(v), block_size=9) == pytest.approx(ref, abs=1e-12)


def test_closed_forms():
    u = _unit(50, 12, 4)
    assert al.structure_ad(u, u) == pytest.approx(0.0, abs=1e-7)
    # identical graphs but different features: AD = alpha * D_fea exactly
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(12, 12)))
    v = u @ q  # a rotation keeps every inner product <v_i, v_j> = <u_i, u_j>
    r = al.alignment_difficulty(u, v, alpha=0.8)
    assert r["structure_ad"] == pytest.approx(0.0, abs=1e-6)
    assert r["ad"] == pytest.approx(0.8 * r["feature_ad"], abs=1e-7)
    # LAION scaling: s = 0.2 -> s~ = 0 -> 1 - s~ = 1; s = 0.45 -> 0; s = 0.325 -> 0.5
    assert al.laion_scale(torch.tensor([0.1, 0.2, 0.325, 0.45, 0.9])).tolist() == \
        pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    for s, want in ((0.2, 1.0), (0.45, 0.0), (0.325, 0.5)):
        a = np.zeros((3, 4))
        a[:, 0] = 1.0
        b = np.zeros((3, 4))
        b[:, 0], b[:, 1] = s, np.sqrt(1 - s * s)  # <a_k, b_k> = s for every pair
        assert al.feature_ad(a, b) == pytest.approx(want, abs=1e-6)
    # two orthogonal image embeddings, identical text embeddings: one pair with |0 - 1| = 1
    u2 = np.eye(2)
    v2 = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert al.structure_ad(u2, v2) == pytest.approx(2 * 1 / 4)
    assert al.structure_ad(u2[:1], v2[:1]) == 0.0  # one pair: no structure


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_rejected(alpha):
    u = _unit(5, 4, 0)
    with pytest.raises(ValueError, match="alpha"):
        al.alignment_difficulty(u, u, alpha=alpha)


def test_alpha_endpoints():
    u, v = _unit(30, 6, 6), _unit(30, 6, 7)
    r0, r1 = al.alignment_difficulty(u, v, alpha=0.0), al.alignment_difficulty(u, v, alpha=1.0)
    assert r0["ad"] == pytest.approx(r0["structure_ad"]) and r1["ad"] == pytest.approx(r1["feature_ad"])


def test_mismatched_and_unnormalised_embeddings():
    u = _unit(10, 8, 0)
    with pytest.raises(ValueError, match=r"\(10, 8\).*\(9, 8\)"):
        al.alignment_difficulty(u, _unit(9, 8, 1))
    with pytest.raises(ValueError, match=r"\(10, 8\).*\(10, 4\)"):
        al.structure_ad(u, _unit(10, 4, 1))
    with pytest.raises(ValueError, match="not L2-normalised"):
        al.feature_ad(3 * u, u)
    assert al.feature_ad(3 * u, u, normalize=True) == pytest.approx(al.feature_ad(u, u))
    with pytest.raises(ValueError, match="matrix"):
        al.structure_ad(u[0], u[0])
    with pytest.raises(ValueError, match="n = 0"):
        al.structure_ad(u[:0], u[:0])
    for bad in (np.nan, np.inf):
        w = u.copy()
        w[3, 2] = bad
        with pytest.raises(ValueError, match="text embeddings v contain NaN or inf"):
            al.alignment_difficulty(u, w, normalize=True)


def test_sampled_estimator_ci_covers_exact_and_is_unbiased():
    u = _unit(300, 8, 8)
    v = 0.5 * u + _unit(300, 8, 9)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    exact = al.structure_ad(u, v)
    est = al.structure_ad_sampled(u, v, num_pairs=20_000, seed=0)
    assert est.ci_low < exact < est.ci_high
    assert est.stderr > 0 and est.ci_high - est.ci_low < 0.1 * exact
    # same seed -> same numbers; the interval's coverage over many seeds is near 95 %
    assert al.structure_ad_sampled(u, v, num_pairs=20_000, seed=0).estimate == est.estimate
    runs = [al.structure_ad_sampled(u, v, num_pairs=2_000, seed=s) for s in range(200)]
    cover = np.mean([r.ci_low < exact < r.ci_high for r in runs])
    assert 0.88 <= cover <= 0.99
    # unbiased: the mean of 200 independent estimates is within 4 standard errors of the truth
    mean_est = np.mean([r.estimate for r in runs])
    assert abs(mean_est - exact) < 4 * runs[0].stderr / np.sqrt(200)
    r = al.alignment_difficulty(u, v, structure="sampled", num_pairs=20_000, seed=0)
    assert r["structure_ad"] == est.estimate and r["structure_ad_ci"] == [est.ci_low, est.ci_high]
    with pytest.raises(ValueError, match="n >= 2"):
        al.structure_ad_sampled(u[:1], v[:1])


# ------------------------------------------------------------------------------------------------
# pickles -> embeddings -> cache
# ------------------------------------------------------------------------------------------------
class CountingCLIP:
    """Wraps a CLIP embedder and counts how many images / texts it was asked to embed."""

    def __init__(self, inner):
        self.inner, self.name, self.images, self.texts = inner, inner.name, 0, 0

    def encode_images(self, images, **kw):
        self.images += len(images)
        return self.inner.encode_images(images, **kw)

    def encode_texts(self, texts, **kw):
        self.texts += len(texts)
        return self.inner.encode_texts(texts, **kw)


@pytest.fixture(scope="module")
def tiny_clip(tiny_sd_dir):
    from t2i_common.models import load_clip
    return load_clip(tiny_sd_dir / "clip")


def _write_pairs(folder, n, seed=0):
    from t2i_common.formats import write_implosion_pickles
    rng = np.random.default_rng(seed)
    words = ["red circle", "blue square", "a photo of a triangle", "green diamond"]
    pairs = [(rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8), words[i % 4]) for i in range(n)]
    pairs[1] = (pairs[1][0][..., 0], pairs[1][1])  # one grayscale image (H, W)
    write_implosion_pickles(pairs, folder)
    return pairs


def test_embed_pairs_matches_direct_clip_and_cache_round_trip(tmp_path, tiny_clip):
    from t2i_common.formats import read_embedding_cache
    pairs = _write_pairs(tmp_path / "data", 7)
    cache = tmp_path / "emb.pickle"
    emb = al.embed_pairs(str(tmp_path / "data" / "*.pickle"), tiny_clip, cache, batch_size=3,
                         resize=64, progress=False)
    assert len(emb) == 7 and emb.num_new == 7 and emb.img_emb.shape == (7, 32)
    # same numbers as embedding the preprocessed images / texts directly
    direct_i = tiny_clip.encode_images([al.original_preprocess(im, 64) for im, _ in pairs])
    direct_t = tiny_clip.encode_texts([t for _, t in pairs])
    assert torch.allclose(emb.img_emb, direct_i, atol=1e-5)
    assert torch.allclose(emb.txt_emb, direct_t, atol=1e-5)
    # the cache is the original's format: {filepath: {'img_emb': (d,), 'txt_emb': (d,)}}
    with open(cache, "rb") as f:
        raw = pickle.load(f)
    assert sorted(raw) == emb.paths and set(raw[emb.paths[0]]) == {"img_emb", "txt_emb"}
    assert raw[emb.paths[3]]["img_emb"].shape == (32,)
    back = read_embedding_cache(cache)
    assert np.allclose(back[emb.paths[4]]["txt_emb"], emb.txt_emb[4].numpy())
    # AD through the original's interface equals AD of the embeddings; json saved next to the cache
    res = al.compute_ad(str(tmp_path / "data" / "*.pickle"), cache, alpha=0.6, clip=tiny_clip,
                        resize=64, progress=False, verbose=False)
    ref = _reference_ad(emb.img_emb.double().numpy(), emb.txt_emb.double().numpy(), 0.6)
    assert res["ad"] == pytest.approx(ref[2], abs=1e-6)
    saved = json.loads((tmp_path / "emb.ad.json").read_text())
    assert saved["ad"] == pytest.approx(res["ad"]) and saved["structure_ad"] == pytest.approx(ref[1], abs=1e-6)
    assert al.compute_ad_from_embeddings(cache, alpha=0.6, verbose=False)["ad"] == pytest.approx(res["ad"])


def test_preprocess_is_deterministic_centre_crop():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, 5:15] = 255  # a white band in the centre of a wide image
    out = np.asarray(al.original_preprocess(img, resize=10))
    assert out.shape == (10, 10, 3) and (out[:, 2:8] == 255).all()  # centre crop keeps the band
    assert np.array_equal(out, np.asarray(al.original_preprocess(img, resize=10)))
    g = np.asarray(al.original_preprocess(np.full((6, 6), 7, np.uint8), resize=None))
    assert g.shape == (6, 6, 3) and (g == 7).all()


def test_embed_pairs_resumes_without_re_embedding(tmp_path, tiny_clip):
    _write_pairs(tmp_path / "data", 10)
    glob = str(tmp_path / "data" / "*.pickle")
    full = al.embed_pairs(glob, tiny_clip, tmp_path / "full.pickle", batch_size=4, resize=32,
                          progress=False)
    # a cache holding the first half only, as an interrupted run leaves it
    import shutil
    from t2i_common.formats import read_embedding_cache, write_embedding_cache
    half = {k: v for k, v in list(read_embedding_cache(tmp_path / "full.pickle").items())[:5]}
    write_embedding_cache(half, tmp_path / "half.pickle")
    shutil.copy(tmp_path / "full.pickle.meta.json", tmp_path / "half.pickle.meta.json")
    counter = CountingCLIP(tiny_clip)
    res = al.embed_pairs(glob, counter, tmp_path / "half.pickle", batch_size=4, resize=32,
                         progress=False)
    assert counter.images == 5 and counter.texts == 5 and res.num_new == 5
    assert torch.allclose(res.img_emb, full.img_emb, atol=1e-6)
    assert len(read_embedding_cache(tmp_path / "half.pickle")) == 10
    # a finished cache: nothing is embedded again
    again = CountingCLIP(tiny_clip)
    al.embed_pairs(glob, again, tmp_path / "half.pickle", batch_size=4, resize=32, progress=False)
    assert again.images == 0 and again.texts == 0


def test_cache_saved_every_k_batches_and_on_error(tmp_path, tiny_clip):
    from t2i_common.formats import read_embedding_cache
    _write_pairs(tmp_path / "data", 9)
    # a broken pickle at the end: the run stops naming it, the pairs embedded before are kept
    with open(tmp_path / "data" / "000099.pickle", "wb") as f:
        pickle.dump({"img": np.zeros((4, 4, 3), np.uint8)}, f)  # no 'text'
    with pytest.raises(ValueError, match=r"000099\.pickle.*'text'"):
        al.embed_pairs(str(tmp_path / "data" / "*.pickle"), tiny_clip, tmp_path / "e.pickle",
                       batch_size=3, save_every=2, resize=32, progress=False)
    assert len(read_embedding_cache(tmp_path / "e.pickle")) == 9


def test_bad_inputs(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="no pickle files match"):
        al.embed_pairs(str(tmp_path / "nothing" / "*.pickle"), tiny_clip, progress=False)
    (tmp_path / "d").mkdir()
    for name, obj, field in (("noimg", {"text": "a red circle"}, "img"),
                             ("notext", {"img": np.zeros((4, 4, 3), np.uint8)}, "text"),
                             ("shape", {"img": np.zeros((4, 4, 5), np.uint8), "text": "x"}, "shape")):
        with open(tmp_path / "d" / f"{name}.pickle", "wb") as f:
            pickle.dump(obj, f)
        with pytest.raises(ValueError, match=rf"{name}\.pickle.*{field}"):
            al.embed_pairs(str(tmp_path / "d" / f"{name}.pickle"), tiny_clip, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        al.compute_ad(str(tmp_path / "d" / "*.pickle"), tmp_path / "e.pickle", alpha=2.0,
                      clip=tiny_clip)
    # a cache made with another CLIP / preprocessing is not silently mixed
    _write_pairs(tmp_path / "ok", 3)
    al.embed_pairs(str(tmp_path / "ok" / "*.pickle"), tiny_clip, tmp_path / "c.pickle", resize=32,
                   progress=False)
    with pytest.raises(ValueError, match="was made with"):
        al.embed_pairs(str(tmp_path / "ok" / "*.pickle"), tiny_clip, tmp_path / "c.pickle",
                       resize=64, progress=False)


def test_cli(tmp_path, tiny_sd_dir, capsys):
    _write_pairs(tmp_path / "data", 4)
    res = al.main(["--data_dir", str(tmp_path / "data" / "*.pickle"), "--emb_path",
                   str(tmp_path / "emb.pickle"), "--alpha", "0.5", "--clip", str(tiny_sd_dir / "clip"),
                   "--resize", "32"])
    out = capsys.readouterr().out
    assert f"AD (alpha = 0.5) = {res['ad']:.6f}" in out
    assert json.loads((tmp_path / "emb.ad.json").read_text())["n"] == 4
    # the original's single-dash flags work too
    res2 = al.main(["-data_glob_path", str(tmp_path / "data" / "*.pickle"), "-save_emb_path",
                    str(tmp_path / "emb.pickle"), "-alpha", "0.5", "--clip", str(tiny_sd_dir / "clip"),
                    "--resize", "32"])
    assert res2["ad"] == res["ad"]


# ------------------------------------------------------------------------------------------------
# toy datasets, AD vs poisoning (against an oracle CLIP with known embeddings), fidelity
# ------------------------------------------------------------------------------------------------
class OracleCLIP:
    """A 'perfect' CLIP on single-object toy images: image -> one-hot of the detected shape,
    text -> one-hot of the shape word.  Matching pairs have similarity 1, mismatched 0."""
    name = "oracle-shape-clip"

    def __init__(self):
        from t2i_common import toyworld
        self.tw = toyworld

    def _onehot(self, shapes):
        return torch.eye(len(self.tw.SHAPES))[[self.tw.SHAPES.index(s) for s in shapes]]

    def encode_images(self, images, **kw):
        return self._onehot([self.tw.classify_object(np.asarray(im))[1] for im in images])

    def encode_texts(self, texts, **kw):
        return self._onehot([next(w for w in t.split() if w in self.tw.SHAPES) for t in texts])


def test_poisoned_ad_matches_ground_truth_with_oracle_clip(tmp_path):
    from t2i_common import toyworld
    samples = toyworld.make_samples(40, 3, kinds=("single",))
    oracle = OracleCLIP()
    table = al.ad_vs_poison_rate(samples, [0.0, 0.25, 0.5, 1.0], oracle, tmp_path, resize=None,
                                 seed=1, progress=False)
    # feature term: clean pairs have s = 1 (s~ = 1), poisoned pairs s = 0 (s~ = 0)
    assert table["feature_ad"].tolist() == pytest.approx(table["poisoned_fraction"].tolist(), abs=1e-7)
    assert table["poisoned_fraction"].tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert table.loc[0.0, "ad"] == pytest.approx(0.0, abs=1e-7)  # clean oracle data: AD 0
    # structure term against a loop over the ground-truth shapes of image and (poisoned) caption
    poisoned, is_p = toyworld.poison(samples, 0.5, 1)
    img_shape = [s.scene.objects[0].shape for s in samples]
    txt_shape = [next(w for w in c.split() if w in toyworld.SHAPES) for _, c in al.toy_pairs(poisoned, 1)]
    assert [a != b for a, b in zip(img_shape, txt_shape)] == list(is_p)
    n = len(samples)
    ref = sum(abs(float(img_shape[i] == img_shape[j]) - float(txt_shape[i] == txt_shape[j]))
              for i in range(n) for j in range(i + 1, n)) * 2 / n ** 2
    assert table.loc[0.5, "structure_ad"] == pytest.approx(ref, abs=1e-7)
    assert table["ad"].is_monotonic_increasing
    # more poisoned concepts at a fixed rate -> more poisoned pairs -> higher AD
    by_k = al.ad_vs_poisoned_concepts(samples, [0, 1, 2, 4], 1.0, oracle, tmp_path, resize=None,
                                      seed=1, progress=False)
    assert by_k["n_poisoned"].tolist() == sorted(by_k["n_poisoned"]) and by_k.loc[0, "n_poisoned"] == 0
    assert by_k.loc[4, "feature_ad"] == pytest.approx(1.0)
    assert by_k["ad"].is_monotonic_increasing
    with pytest.raises(ValueError, match="n_concepts"):
        al.ad_vs_poisoned_concepts(samples, [5], 0.5, oracle, tmp_path, progress=False)


def test_pairs_dataset_reused_and_toy_datasets(tmp_path, tiny_clip):
    from t2i_common import toyworld
    samples = toyworld.make_samples(6, 0)
    pairs = al.toy_pairs(samples, seed=2)
    assert all(c in s.captions for (_, c), s in zip(pairs, samples))
    # the poisoned copy keeps the caption template: only the poisoned words differ
    poisoned, is_p = toyworld.poison(samples, 1.0, 0)
    for (_, a), (_, b) in zip(pairs, al.toy_pairs(poisoned, seed=2)):
        assert len(a.split()) == len(b.split()) and a != b
    g1 = al.write_pairs_dataset(pairs, tmp_path, "x")
    assert al.write_pairs_dataset(pairs, tmp_path, "x") == g1  # same content: same files
    g2 = al.write_pairs_dataset(pairs[:5], tmp_path, "x")
    from t2i_common.formats import implosion_pickle_paths
    assert g2 != g1 and len(implosion_pickle_paths(g2)) == 5
    assert al.default_cache_path(g1, "some/clip").parent == Path(g1).parent.parent
    sets = al.toy_ad_datasets(tmp_path / "toy", n=8, seed=0)
    from t2i_common.formats import read_implosion_pickles
    lab = read_implosion_pickles(sets["shape label"])
    assert len(lab) == 8 and all(t in toyworld.SHAPES and p.parent.name == t for p, _, t in lab)
    assert all(t.startswith("a photo of a ") for _, _, t in read_implosion_pickles(sets["shape prompt"]))
    tab = al.ad_table(sets, [tiny_clip], progress=False, resize=32)
    assert len(tab) == 5 and (tab["n"] == 8).all()
    assert ((tab["ad"] - (0.8 * tab["feature_ad"] + 0.2 * tab["structure_ad"])).abs() < 1e-9).all()


def test_prompt_fidelity_on_ground_truth_images():
    from t2i_common import toyworld
    samples = toyworld.make_samples(12, 5, kinds=("single",))
    right = [f"a {s.scene.objects[0].colour} {s.scene.objects[0].shape}" for s in samples]
    assert al.prompt_fidelity([s.image for s in samples], right) == \
        {"fidelity": 1.0, "shape_ok": 1.0, "colour_ok": 1.0}
    nxt = {a: toyworld.SHAPES[(k + 1) % 4] for k, a in enumerate(toyworld.SHAPES)}
    wrong = [f"a {s.scene.objects[0].colour} {nxt[s.scene.objects[0].shape]}" for s in samples]
    f = al.prompt_fidelity([s.image for s in samples], wrong)
    assert f["fidelity"] == 0.0 and f["shape_ok"] == 0.0 and f["colour_ok"] == 1.0
    assert len(al.single_object_prompts()) == 20


def test_implosion_experiment_runs_and_caches(tiny_sd_dir, tmp_path, monkeypatch):
    from t2i_common import paths
    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")
    kw = dict(rates=[0.0, 1.0], n_train=24, steps=2, batch_size=4, n_seeds=1, gen_steps=2,
              resize=None, root=tmp_path / "gen", progress=False)
    tab, extra = al.implosion_experiment(tiny_sd_dir, **kw)
    assert tab.index.tolist() == [0.0, 1.0] and tab["poisoned_fraction"].tolist() == [0.0, 1.0]
    assert extra["images"][1.0].shape == (20, 16, 16, 3) and len(extra["prompts"]) == 20
    assert tab["fidelity_untouched"].isna().all()  # every shape is touched when all are poisoned
    assert {"fidelity_circle", "fidelity_diamond"} <= set(tab.columns)
    assert ((tab["ad"] - (0.8 * tab["feature_ad"] + 0.2 * tab["structure_ad"])).abs() < 1e-9).all()
    # a second call loads every rate from the cache: no training
    from t2i_common.toyworld import training
    monkeypatch.setattr(training, "train_unet", lambda *a, **k: pytest.fail("retrained"))
    tab2, _ = al.implosion_experiment(tiny_sd_dir, **kw)
    assert tab2.equals(tab)


# ------------------------------------------------------------------------------------------------
# embedding caches written by the original, provenance, the CLI's files, the parity preprocessing
# ------------------------------------------------------------------------------------------------
def _original_cache(path, keys, img, txt):
    """An embedding cache as compute_AD.py writes it: keys as its glob spells them, fp16 vectors
    (its CLIP runs in fp16 on the GPU), no sidecar."""
    emb = {k: {"img_emb": np.asarray(a, np.float16), "txt_emb": np.asarray(t, np.float16)}
           for k, a, t in zip(keys, img, txt)}
    with open(path, "wb") as f:
        pickle.dump(emb, f)
    return emb


def _original_compute_ad(path, alpha):
    """compute_AD(save_emb_path, alpha) of the original, re-written: float32, row loop."""
    with open(path, "rb") as f:
        emb = pickle.load(f)
    a = np.array([e["img_emb"] for e in emb.values()], dtype=np.float32)
    b = np.array([e["txt_emb"] for e in emb.values()], dtype=np.float32)
    n = len(a)
    sim = np.clip((np.sum(a * b, axis=1) - 0.2) * 4, 0, 1)
    stru = sum(np.sum(np.abs(a[i] @ a[i + 1:].T - b[i] @ b[i + 1:].T)) for i in range(n - 1))
    return alpha * (n - sim.sum()) / n + (1 - alpha) * stru * 2 / n ** 2


def test_original_cache_without_sidecar_is_used_with_a_note(tmp_path, tiny_clip, monkeypatch, capsys):
    _write_pairs(tmp_path / "data", 6)
    monkeypatch.chdir(tmp_path)  # the original ran here with -data_glob_path './data/*.pickle'
    ref = al.embed_pairs(str(tmp_path / "data" / "*.pickle"), tiny_clip, resize=32, progress=False)
    keys = [f"./data/{Path(p).name}" for p in ref.paths]
    cache = tmp_path / "orig.pickle"
    _original_cache(cache, keys, ref.img_emb.numpy(), ref.txt_emb.numpy())
    before = cache.read_bytes()
    counter = CountingCLIP(tiny_clip)
    with pytest.warns(al.CacheProvenanceWarning, match=r"orig\.pickle.*unknown provenance.*all 6 pairs"):
        res = al.compute_ad(str(tmp_path / "data" / "*.pickle"), cache, clip=counter, resize=32,
                            progress=False, verbose=False)
    assert counter.images == 0 and counter.texts == 0  # absolute glob, './data/...' keys: all found
    assert res["ad"] == pytest.approx(_original_compute_ad(cache, 0.8), abs=1e-6)
    assert res["clip"] is None and "unknown provenance" in res["cache_provenance"]
    saved = json.loads((tmp_path / "orig.ad.json").read_text())
    assert saved["clip"] is None and saved["preprocess"] is None and "orig.pickle" in saved["cache_provenance"]
    assert cache.read_bytes() == before and not (tmp_path / "orig.pickle.meta.json").exists()
    # the command line: the AD line on stdout, the note on stderr
    out = al.main(["--data_dir", "data/*.pickle", "--emb_path", "orig.pickle", "--clip",
                   str(tiny_clip.name), "--resize", "32"])
    cap = capsys.readouterr()
    assert f"AD (alpha = 0.8) = {out['ad']:.6f}" in cap.out
    assert "note: embedding cache orig.pickle is of unknown provenance" in cap.err
    # the AD step alone reads the original's fp16 cache too
    assert al.compute_ad_from_embeddings(cache, 0.8, verbose=False)["ad"] == pytest.approx(res["ad"])


def test_partial_cache_of_unknown_or_other_provenance_is_not_mixed(tmp_path, tiny_clip):
    _write_pairs(tmp_path / "data", 6)
    glob = str(tmp_path / "data" / "*.pickle")
    paths = [str(p) for p in sorted((tmp_path / "data").glob("*.pickle"))]
    other = _unit(3, 32, 9)  # another model of the same width
    cache = tmp_path / "part.pickle"
    _original_cache(cache, paths[:3], other, other)
    before = cache.read_bytes()
    counter = CountingCLIP(tiny_clip)
    with pytest.raises(ValueError, match=r"part\.pickle is of unknown provenance \(no sidecar "
                       r"part\.pickle\.meta\.json.*3 of the 6 pairs are missing.*mixed with its 3 "
                       r"entries.*Fix: delete .*part\.pickle.*trust_cache=True \(--trust_cache\)"):
        al.embed_pairs(glob, counter, cache, resize=32, progress=False)
    assert counter.images == 0 and cache.read_bytes() == before
    assert not ae.meta_path(cache).exists()
    # on the user's word: mixed, and the sidecar says which entries were taken on trust
    with pytest.warns(al.CacheProvenanceWarning, match="used on the user's word"):
        res = al.embed_pairs(glob, counter, cache, resize=32, progress=False, trust_cache=True)
    assert counter.images == 3 and res.num_new == 3 and np.allclose(res.img_emb[:3], other, atol=1e-3)
    side = json.loads(ae.meta_path(cache).read_text())
    assert side["clip"] == tiny_clip.name and side["inherited"]["entries"] == 3
    assert side["inherited"]["source"] == "unknown (no sidecar)"
    # a later run with the same model resumes, and still reports the trusted entries
    again = al.embed_pairs(glob, counter, cache, resize=32, progress=False)
    assert again.num_new == 0 and "3 of its entries were taken on trust" in again.provenance
    # a sidecar naming another model: refused whether the cache is partial or complete
    ae.meta_path(cache).write_text(json.dumps(
        {"clip": "ViT-B-32/openai", "resize": 512, "crop": "center"}))
    with pytest.raises(ValueError, match=r"part\.pickle was made with CLIP 'ViT-B-32/openai' .*"
                       r"this run uses CLIP '.*clip' \(resize 32.*taken for this run's.*--trust_cache"):
        al.embed_pairs(glob, counter, cache, resize=32, progress=False)
    _original_cache(cache, paths[:3], other, other)
    with pytest.raises(ValueError, match=r"'ViT-B-32/openai'.*3 of the 6 pairs are missing"):
        al.embed_pairs(glob, counter, cache, resize=32, progress=False)
    ae.meta_path(cache).write_text("{not json")
    with pytest.raises(ValueError, match=r"part\.pickle\.meta\.json is not valid json.*Fix: delete"):
        al.embed_pairs(glob, counter, cache, resize=32, progress=False)


def test_glob_never_reads_the_cache_files(tmp_path, tiny_clip):
    _write_pairs(tmp_path / "data", 5)
    cache = tmp_path / "data" / "emb.pickle"  # in the folder the glob covers
    first = al.compute_ad(str(tmp_path / "data" / "*.pickle"), cache, clip=tiny_clip, resize=32,
                          progress=False, verbose=False)
    for pattern in ("*.pickle", "*"):  # the cache, its sidecar and emb.ad.json now all match
        res = al.compute_ad(str(tmp_path / "data" / pattern), cache, clip=tiny_clip, resize=32,
                            progress=False, verbose=False)
        assert res["n"] == 5 and res["ad"] == first["ad"]
    lone = tmp_path / "lone"
    lone.mkdir()
    with pytest.raises(FileNotFoundError, match=r"besides the embedding cache .*emb\.pickle"):
        al.embed_pairs(str(lone / "*.pickle"), tiny_clip, cache.rename(lone / "emb.pickle"),
                       progress=False)


def test_unwritable_cache_path_fails_before_embedding(tmp_path, tiny_clip):
    import os
    _write_pairs(tmp_path / "data", 3)
    glob = str(tmp_path / "data" / "*.pickle")
    (tmp_path / "afile").write_text("x")
    counter = CountingCLIP(tiny_clip)
    with pytest.raises(PermissionError, match=r"cannot write the embedding cache .*afile/emb\.pickle"
                       r".*Fix: pass a path for the embedding cache \(--emb_path\)"):
        al.compute_ad(glob, tmp_path / "afile" / "emb.pickle", clip=counter, progress=False)
    with pytest.raises(IsADirectoryError, match=r"data is a folder, not a file.*emb\.pickle"):
        al.main(["--data_dir", glob, "--emb_path", str(tmp_path / "data")])
    assert counter.images == 0
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match=r"ro/emb\.pickle"):
            al.embed_pairs(glob, counter, ro / "emb.pickle", progress=False)
        assert counter.images == 0


def test_progress_saved_on_time_and_on_interrupt(tmp_path, tiny_clip):
    from t2i_common.formats import read_embedding_cache
    _write_pairs(tmp_path / "data", 8)
    cache = tmp_path / "e.pickle"
    seen = []

    class Interrupted(CountingCLIP):
        def encode_images(self, images, **kw):
            if self.images == 4:  # the third batch: what is on disk after two batches?
                seen.append(len(read_embedding_cache(cache)))
            if self.images == 6:
                raise KeyboardInterrupt
            return super().encode_images(images, **kw)

    with pytest.raises(KeyboardInterrupt):
        al.embed_pairs(str(tmp_path / "data" / "*.pickle"), Interrupted(tiny_clip), cache,
                       batch_size=2, save_every=100, save_every_s=0.0, resize=32, progress=False)
    assert seen == [4] and len(read_embedding_cache(cache)) == 6


def test_original_preprocessing_parity_option(tmp_path, tiny_clip):
    from PIL import Image
    from torchvision import transforms
    # hand-computed: 1 / 255 in float32, then 2x - 1 and (y + 1) / 2, gives 255 * x = 0.99999994,
    # truncated to 0; the same for every value 1..63; 0 and 64..255 come back unchanged
    k = np.arange(256, dtype=np.uint8)
    want = k.copy()
    want[1:64] -= 1
    assert np.array_equal(al.uint8_round_trip(k), want)
    # the original's chain itself (torchvision ToTensor + Normalize, clamp, 255 *, astype)
    rng = np.random.default_rng(0)
    for img in (rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), rng.integers(0, 256, (6, 4), dtype=np.uint8)):
        x = transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(Image.fromarray(img)))
        x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
        orig = np.squeeze((255. * x.permute(1, 2, 0).numpy()).astype(np.uint8))
        assert np.array_equal(al.uint8_round_trip(img), orig)
        pkg = np.asarray(al.original_preprocess(img, None))
        par = np.asarray(al.original_preprocess(img, None, preprocess="original"))
        assert np.array_equal(par, al.uint8_round_trip(pkg)) and par.shape == pkg.shape
    with pytest.raises(ValueError, match="uint8"):
        al.uint8_round_trip(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"preprocess must be one of \('package', 'original'\)"):
        al.embed_pairs(str(tmp_path / "*.pickle"), tiny_clip, preprocess="orig")
    # the option reaches the embeddings and the sidecar; a package-preprocessed cache is not reused
    _write_pairs(tmp_path / "data", 4)
    glob = str(tmp_path / "data" / "*.pickle")
    e = al.embed_pairs(glob, tiny_clip, tmp_path / "o.pickle", resize=32, preprocess="original",
                       progress=False)
    from t2i_common.formats import read_implosion_pickle
    imgs = [al.original_preprocess(read_implosion_pickle(p)[0], 32, "original") for p in e.paths]
    assert torch.allclose(e.img_emb, tiny_clip.encode_images(imgs), atol=1e-5)
    assert json.loads((tmp_path / "o.pickle.meta.json").read_text())["preprocess"] == "original"
    with pytest.raises(ValueError, match="original preprocessing.*package preprocessing"):
        al.embed_pairs(glob, tiny_clip, tmp_path / "o.pickle", resize=32, progress=False)
    assert al.default_cache_path(glob, "c", 32, preprocess="original") != al.default_cache_path(glob, "c", 32)


def test_cache_reader_vectorised_checks_name_the_entry(tmp_path):
    good = _unit(4, 6, 0).astype(np.float32)
    bad = dict({f"f{i}": {"img_emb": good[i], "txt_emb": good[i]} for i in range(4)})
    bad["f2"] = {"img_emb": good[2][:5], "txt_emb": good[2]}
    with open(tmp_path / "d.pickle", "wb") as f:
        pickle.dump(bad, f)
    with pytest.raises(ValueError, match=r"d\.pickle.*entry 'f2' field 'img_emb' has d=5"):
        al.read_cache_arrays(tmp_path / "d.pickle")
    bad["f2"] = {"img_emb": 2 * good[2], "txt_emb": good[2]}
    with open(tmp_path / "n.pickle", "wb") as f:
        pickle.dump(bad, f)
    with pytest.raises(ValueError, match=r"n\.pickle.*entry 'f2' field 'img_emb' has L2 norm 2"):
        al.compute_ad_from_embeddings(tmp_path / "n.pickle")
    with pytest.raises(FileNotFoundError, match="embedding cache not found.*missing.pickle"):
        al.read_cache_arrays(tmp_path / "missing.pickle")
