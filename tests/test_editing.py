"""Prompt intervention: Karras/Heun inversion, prompt edits, change maps, CMI and correlations."""
import math

import pytest
import torch

from t2i_common.info_decomp import editing as ed
from t2i_common.info_decomp import information as it


class _GaussianData:
    """Exact eps-predictor for data x0 ~ N(0, I): E[eps | z_a] = sqrt(sigmoid(-a)) z_a.  Along the
    probability-flow ODE x(sigma) = x(sigma0) sqrt((1 + sigma^2) / (1 + sigma0^2))."""

    device, dtype = torch.device("cpu"), torch.float32
    logsnr_range = (-5.36, 7.07)

    def logsnr_to_t(self, a):
        return torch.as_tensor(a, dtype=torch.float64)   # hand the continuous logSNR through

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 1, 1)

    def eps(self, z, a, emb):
        return math.sqrt(torch.sigmoid(-torch.as_tensor(float(a))).item()) * z


def test_karras_sigmas():
    s = ed.karras_sigmas(10, 0.03, 14.6, rho=7.0)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)
    assert torch.all(s[1:] < s[:-1])
    mid = ed.karras_sigmas(3, 0.03, 14.6)[1]
    assert float(mid) == pytest.approx(((14.6 ** (1 / 7) + 0.03 ** (1 / 7)) / 2) ** 7)
    with pytest.raises(ValueError):
        ed.karras_sigmas(1, 0.1, 1.0)


def test_sigma_range_from_trained_logsnr(tiny_model):
    lo, hi = tiny_model.logsnr_range
    smin, smax = ed.sigma_range(tiny_model)
    assert smin == pytest.approx(math.exp(-hi / 2)) and smax == pytest.approx(math.exp(-lo / 2))


def test_heun_ode_matches_closed_form_for_gaussian_data():
    m = _GaussianData()
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    smin, smax = ed.sigma_range(m)
    exact = x0 * math.sqrt((1 + smax ** 2) / (1 + smin ** 2))
    xT = ed.invert(m, x0, ["", "", ""], num_steps=120)
    assert torch.allclose(xT, exact, rtol=1e-3)
    assert torch.allclose(ed.regenerate(m, xT, ["", "", ""], num_steps=120), x0, rtol=1e-3, atol=1e-5)
    # Heun is second order: halving the step divides the error by ~4
    err = [float((ed.invert(m, x0[:1], [""], num_steps=n) / exact[:1] - 1).abs().max())
           for n in (31, 61)]
    assert 3.5 < err[0] / err[1] < 4.5


def test_inversion_then_regeneration_reconstructs_latent(tiny_model):
    """Tiny random model, 30 Karras steps: relative squared error ~1.3e-4 (observed)."""
    z = torch.randn(2, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(1))
    caps = ["a red circle", "a blue square"]
    rec = ed.regenerate(tiny_model, ed.invert(tiny_model, z, caps, num_steps=30), caps, num_steps=30)
    rel = float((rec - z).pow(2).sum() / z.pow(2).sum())
    assert rel < 1e-3, rel
    other = ed.regenerate(tiny_model, ed.invert(tiny_model, z, caps, num_steps=30), caps[::-1],
                          num_steps=30)
    assert float((other - z).pow(2).sum() / z.pow(2).sum()) > 10 * rel


def test_prompt_edits():
    assert ed.omit_word("a red circle left of a circle", "circle") == "a red _ left of a _"
    assert ed.omit_word("two dogs and a dog", "dog", placeholder="") == "two and a"
    assert ed.swap_word("A Dog near dogs", "dog", "cat") == "A cat near cats"
    assert ed.swap_word("a teddy bear on a bed", "teddy bear", "robot") == "a robot on a bed"
    assert ed.swap_word("a bear", "bear", "elephant") == "a elephant"
    with pytest.raises(KeyError, match="zebra"):
        ed.omit_word("a dog", "zebra")
    sw = ed.symmetric_swaps({"circle": "square"})
    assert sw == {"circle": "square", "square": "circle"}
    assert ed.replace_words("a circle and a square", sw) == "a square and a circle"


def test_change_map():
    a = torch.zeros(1, 4, 2, 2)
    b = a.clone()
    b[0, :, 1, 0] = torch.tensor([1.0, 2.0, 0.0, 2.0])
    c = ed.change_map(a, b)
    assert c.shape == (1, 2, 2) and c[0, 1, 0] == 9.0 and c.sum() == 9.0


def test_prompt_intervention_end_to_end(tiny_model, tiny_images):
    caps = ["a red circle", "a blue square", "a green triangle", "a yellow diamond"]
    words = ["circle", "square", "triangle", "diamond"]
    kw = dict(swaps=ed.symmetric_swaps({"circle": "square", "triangle": "diamond"}), num_steps=4,
              n_points=3, noises_per_point=2, seed=4)
    res = ed.prompt_intervention(tiny_model, tiny_images, caps, words, **kw)
    h, w = tiny_model.latent_shape[1:]
    assert res["omit_prompts"] == ["a red _", "a blue _", "a green _", "a yellow _"]
    assert res["swap_prompts"][0] == "a red square" and res["swap_prompts"][2] == "a green diamond"
    for k in ("change_omit", "change_swap", "cmi_omit_map", "attention"):
        assert res[k].shape == (4, h, w)
    assert torch.allclose(res["change_omit"], ed.change_map(res["recon"], res["omit"]))
    # CMI equals a direct information() call with the same draws
    integ = it.Integration.for_editing(tiny_model)
    ref = it.conditional_mi(tiny_model, tiny_images, caps, res["omit_prompts"], n_samples=3,
                            noises_per_point=2, integration=integ, seed=4)
    assert torch.allclose(res["cmi_omit"], ref["standard"][:, 0], rtol=1e-5)
    assert torch.allclose(res["cmi_omit_orth"], ref["orthogonal"][:, 0], rtol=1e-5)
    again = ed.prompt_intervention(tiny_model, tiny_images, caps, words, **kw)
    assert torch.equal(res["change_omit"], again["change_omit"])
    rows = ed.intervention_correlations(res, n_boot=10)
    got = {(r["intervention"], r["level"], r["predictor"]) for r in rows}
    assert ("omit", "image", "cmi") in got and ("swap", "pixel", "attention") in got
    assert all(-1 <= r["r"] <= 1 for r in rows)


def test_missing_swap_partner_gives_nan(tiny_model, tiny_images):
    res = ed.prompt_intervention(tiny_model, tiny_images[:2], ["a red circle", "a blue square"],
                                 ["circle", "square"], swaps={"circle": "triangle"}, num_steps=3,
                                 n_points=2, noises_per_point=1)
    assert res["swap_prompts"] == ["a red triangle", None]
    assert torch.isfinite(res["cmi_swap"][0]) and torch.isnan(res["cmi_swap"][1])
    assert torch.isnan(res["change_swap"][1]).all() and torch.isfinite(res["change_omit"]).all()


def test_intervention_rows_from_coco_it(tmp_path):
    from t2i_common.info_decomp import information as infotheory

    rows = infotheory.coco_it_items(toy_root=tmp_path, toy_n=6, seed=1, mask_size=16)
    assert rows[0].mask.shape == (16, 16) and rows[0].mask.any()
    sel = ed.intervention_rows(rows, ("noun",), swaps={"circle": "square"})
    ids = [r.image_id for r in rows if r.word_type == "noun"]
    assert sel["image_ids"] == list(dict.fromkeys(ids))            # one row per image, file order
    for img_id, cap, word in zip(sel["image_ids"], sel["captions"], sel["words"]):
        nouns = [r.word for r in rows if r.image_id == img_id and r.word_type == "noun"]
        assert word in nouns and word in cap.split()
        if "circle" in nouns:
            assert word == "circle"                                # rows with a swap partner first
    assert len(ed.intervention_rows(rows, ("noun",), max_images=2)["images"]) == 2
    with pytest.raises(ValueError, match="word type"):
        ed.intervention_rows(rows, ("verb",))


def test_correlation_table_says_how_many_images_a_correlation_needs():
    with pytest.raises(ValueError, match=r"fewer than 3 edited images.*max_images >= 3"):
        ed.correlation_table([{"intervention": "swap", "level": "image", "predictor": "cmi", "r": 0.1,
                              "err": 0.1, "std": 0.1, "n": 3}], "omit")
