"""unCLIP evaluation: Frechet distance against closed forms, CLIP score, edit construction, the
fidelity / attribute read-outs on real toy images (ground truth)."""
import numpy as np
import pytest

from t2i_common import toyworld as tw
from t2i_common.unclip import evaluation as ue


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()  # = 5 + 1+1+4 = 11
    got = ue.frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, abs=1e-9) and want == pytest.approx(11.0)


def test_frechet_distance_full_covariance_closed_form():
    """S2 = A S1 A^T with A = c R (R a rotation): S1 S2 has sqrt with trace c tr(S1) only when S1
    commutes with R; use S1 = s I: tr((S1 S2)^(1/2)) = c s d, so d^2 = |dmu|^2 + d s (1 - c)^2."""
    rng = np.random.default_rng(0)
    d, s, c = 5, 2.0, 3.0
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1 = s * np.eye(d)
    s2 = (c * q) @ s1 @ (c * q).T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = ((mu1 - mu2) ** 2).sum() + d * s * (1 - c) ** 2
    assert ue.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    # symmetric, zero for identical sets, positive for shifted ones
    f = rng.normal(size=(400, 4))
    assert ue.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-9)
    assert ue.frechet_distance(f, f + 1.0) == pytest.approx(4.0, abs=1e-9)
    g = rng.normal(size=(300, 4)) * 2
    assert ue.frechet_distance(f, g) == pytest.approx(ue.frechet_distance(g, f), rel=1e-9)


def test_frechet_distance_bad_shapes():
    with pytest.raises(ValueError, match="equal D"):
        ue.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_fidelity_and_main_object_on_real_toy_images():
    samples = tw.make_samples(40, 1, kinds=("single",))
    f = ue.fidelity([s.image for s in samples], [s.captions[0] for s in samples])
    assert f["n"] == 40 and f["match"] >= 0.95
    o = ue.main_object(samples[0].image)
    src = samples[0].scene.objects[0]
    assert (o["colour"], o["shape"], o["size"]) == (src.colour, src.shape, src.size)
    blank = np.full((32, 32, 3), tw.BACKGROUND, np.uint8)
    assert ue.main_object(blank) is None


@pytest.mark.parametrize("edit", ue.EDITS)
def test_text_diff_edits_change_exactly_one_attribute(edit):
    samples = tw.make_samples(12, 3, kinds=("single",))
    edits = ue.text_diff_edits(samples, edit)
    for s, src, tgt, new in edits:
        o = s.scene.objects[0]
        assert getattr(o, edit) != new
        a, b = tw.parse_prompt(src)[0][0], tw.parse_prompt(tgt)[0][0]
        assert a[edit] == getattr(o, edit) and b[edit] == new
        assert all(a[k] == b[k] for k in ("colour", "shape", "size") if k != edit)
    if edit == "colour":  # balanced targets: every colour is a target
        assert {e[3] for e in edits} == set(tw.COLOURS)


def test_best_theta_picks_the_smallest_qualifying():
    rows = [dict(theta=0.0, target=0.0, keeps_shape=1.0), dict(theta=0.3, target=0.75, keeps_shape=0.9),
            dict(theta=0.4, target=0.9, keeps_shape=0.85), dict(theta=0.6, target=1.0, keeps_shape=1.0)]
    assert ue.best_theta(rows)["theta"] == 0.3
    assert ue.best_theta(rows, target_min=0.95) is None  # 0.6 is beyond theta_max


def test_interpolation_pairs_differ_in_colour_and_shape():
    pairs = ue.interpolation_pairs(6, 2)
    assert len(pairs) == 6
    for a, b in pairs:
        oa, ob = a.scene.objects[0], b.scene.objects[0]
        assert oa.colour != ob.colour and oa.shape != ob.shape


def test_clip_score_prefers_the_right_caption(tiny_sd_dir):
    from t2i_common.models import load_clip
    clip = load_clip(tiny_sd_dir / "clip")
    ims = [np.zeros((16, 16, 3), np.uint8)] * 2
    s = ue.clip_score(clip, ims, ["a red circle", "a blue square"])
    assert 0.0 <= s <= 100.0
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        ue.clip_score(clip, ims, ["a red circle"])


def test_paired_comparison_exact_mcnemar():
    a = [True] * 10 + [False] * 5 + [True] * 5
    b = [False] * 10 + [False] * 5 + [True] * 5
    r = ue.paired_comparison(a, b)
    assert (r["only_a"], r["only_b"], r["n"]) == (10, 0, 20)
    assert r["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert ue.paired_comparison(a, a)["p_value"] == 1.0


def test_sd_with_vae_of_needs_one_latent_space_and_keys_caches_by_weights():
    """The GLIDE-analogue comparison may decode the toy SD with the unCLIP folder's VAE only
    because the encoders are identical; a changed encoder weight is refused, and the cache key
    of a generator follows its weights, not just its name."""
    import copy

    import torch

    from t2i_common import models
    from t2i_common.unclip import model as unclip
    sd = models.load_t2i("toy")
    m = unclip.load_unclip("toy-unclip")
    shared = ue.sd_with_vae_of(sd, m)
    assert shared.vae is m.vae and shared.unet is sd.unet and shared.name != sd.name
    assert ue.model_key(shared) != ue.model_key(sd)
    z = torch.randn((1,) + sd.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        own = sd.vae.decode(z / sd.scaling_factor).sample
        other = shared.vae.decode(z / shared.scaling_factor).sample
    assert float((own - other).abs().max()) > 1e-3  # the fine-tuned decoder really differs
    m2 = copy.copy(m)
    m2.vae = copy.deepcopy(m.vae)
    m2._t2i_cache_key = None
    with torch.no_grad():
        m2.vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.1
    with pytest.raises(ValueError, match="encoders differ"):
        ue.sd_with_vae_of(sd, m2)
    assert ue.model_key(m2)["name"] == ue.model_key(m)["name"]
    assert ue.model_key(m2)["weights"]["vae"] != ue.model_key(m)["weights"]["vae"]
    assert ue.model_key(m2)["weights"]["unet"] == ue.model_key(m)["weights"]["unet"]
    m3 = copy.copy(m)
    m3.scaling_factor = m.scaling_factor * 2
    with pytest.raises(ValueError, match="scaling factors differ"):
        ue.sd_with_vae_of(sd, m3)
    # bf16 weights (numpy has no bf16) are fingerprinted too, and differ from the float32 ones
    m4 = copy.copy(m)
    m4.vae, m4._t2i_cache_key = copy.deepcopy(m.vae).to(torch.bfloat16), None
    assert ue.model_key(m4)["weights"]["vae"] != ue.model_key(m)["weights"]["vae"]


def test_vae_round_trip_reads_counts_and_rejects_scenes_with_several_objects():
    """An identity 'VAE' (decode(encode(x)) = x) gives the checker's reading of the images
    themselves: every real toy image read right; scenes with two objects are refused."""
    import torch

    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return type("E", (), {"latent_dist": type("D", (), {"mean": x})()})()

        def decode(self, z):
            return type("O", (), {"sample": z})()

    single = tw.make_samples(40, 3, kinds=("single",))
    reads = ue.vae_round_trip_reads(Identity(), single)
    assert sum(n for _, n in reads.values()) == 40
    assert all(ok == n for ok, n in reads.values())
    with pytest.raises(ValueError, match="single-object"):
        ue.vae_round_trip_reads(Identity(), tw.make_samples(3, 3, kinds=("pair",)))


def test_generators_load_on_first_use_and_hold_one_at_a_time():
    import gc
    import weakref

    class Model:  # stands in for a generator; weakref shows when it is freed
        pass

    calls = []

    def loader(name):
        def load():
            calls.append(name)
            return Model()
        return load

    methods = {"prior": "unclip", "text": "unclip", "sd": "sd"}
    g = ue.Generators({"unclip": loader("unclip"), "sd": loader("sd")}, methods)
    a = g("prior")
    assert g("text") is a and calls == ["unclip"] and g.held == ["unclip"]
    b = g("sd")
    assert g.held == ["unclip", "sd"] and g("prior") is a and calls == ["unclip", "sd"]

    one = ue.Generators({"unclip": loader("unclip"), "sd": loader("sd")}, methods, one_at_a_time=True)
    calls.clear()
    ref = weakref.ref(one("prior"))
    one("sd")
    gc.collect()
    assert ref() is None and one.held == ["sd"] and calls == ["unclip", "sd"]
    one("text")
    assert one.held == ["unclip"] and calls == ["unclip", "sd", "unclip"] and one.loads == 3
    with pytest.raises(ValueError, match="unknown method 'glide'"):
        one("glide")
    with pytest.raises(ValueError, match=r"unknown models \['dalle'\]"):
        ue.Generators({"sd": loader("sd")}, {"sd": "dalle"})
    del a, b
