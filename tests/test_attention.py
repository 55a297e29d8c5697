"""Cross-attention capture, word maps, DAAM and attention + information (tiny model)."""
import numpy as np
import pytest
import torch

from t2i_common.info_decomp import attention as at

CAPS = ["a red circle", "a blue square to the left of a green triangle", "a small yellow diamond"]


def test_capture_does_not_change_predictions(tiny_model):
    m = tiny_model
    z = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    emb = m.encode_prompts(CAPS[:2])
    with torch.no_grad():
        ref = m.eps(z, torch.tensor([300, 700]), emb)
        store = at.AttentionStore(m.latent_shape[1:], 2)
        with at.capture_cross_attention(m, store):
            got = m.eps(z, torch.tensor([300, 700]), emb)
        after = m.eps(z, torch.tensor([300, 700]), emb)
    assert torch.allclose(ref, got, atol=1e-5)
    assert torch.equal(ref, after)  # processors restored
    assert len(store.layers) > 0 and all(".attn2." in n for n in store.layers)


def test_capture_probabilities_match_manual_softmax():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    x, ctx = torch.randn(3, 16, 16), torch.randn(3, 5, 8)   # 4x4 query grid, 5 tokens
    store = at.AttentionStore((4, 4), 3, skip_factors=())
    attn.set_processor(at.CrossAttentionCapture(store, "x.attn2.processor"))
    out = attn(x, encoder_hidden_states=ctx)
    q = attn.to_q(x).view(3, 16, 2, 8).transpose(1, 2)
    k = attn.to_k(ctx).view(3, 5, 2, 8).transpose(1, 2)
    p = ((q @ k.transpose(-1, -2)) / 8 ** 0.5).softmax(-1)            # [3, 2, 16, 5]
    ref = p.mean(1).transpose(1, 2).reshape(3, 5, 4, 4)
    assert torch.allclose(store.maps().float(), ref, atol=1e-6)
    v = attn.to_v(ctx).view(3, 5, 2, 8).transpose(1, 2)
    ref_out = attn.to_out[0]((p @ v).transpose(1, 2).reshape(3, 16, 16))
    assert torch.allclose(out, ref_out, atol=1e-5)


def test_token_dimension_matches_prompt_and_maps_are_distributions(tiny_model, tiny_images):
    m = tiny_model
    r = at.attention_information(m, tiny_images[:3], CAPS, n_samples=3, upsample="bilinear")
    tok = r["tokens"]
    assert tok.shape == (3, m.tokenizer.model_max_length, *m.latent_shape[1:])
    # softmax over tokens: each pixel's attention sums to 1 (bilinear upsampling keeps it)
    assert torch.allclose(tok.sum(1), torch.ones(3, *m.latent_shape[1:]), atol=1e-5)
    for b, cap in enumerate(CAPS):
        n_words = len(cap.split())                   # the tiny tokenizer: one token per word
        assert at.prompt_token_maps(tok[b], m.tokenizer, cap).shape[0] == n_words + 2


def test_word_token_indices(tiny_model):
    tk = tiny_model.tokenizer
    assert at.word_token_indices(tk, "a red circle", "circle") == [3]
    assert at.word_token_indices(tk, "a red circle and a red square", "red") == [2, 6]
    assert at.word_token_indices(tk, "a red circle", "red circle") == [2, 3]
    with pytest.raises(KeyError, match="triangle"):
        at.word_token_indices(tk, "a red circle", "triangle")


def test_word_maps_pick_the_word_tokens(tiny_model):
    tok = torch.zeros(2, tiny_model.tokenizer.model_max_length, 8, 8)
    tok[0, 3, 1, 2] = 1.0        # "circle" in "a red circle"
    tok[1, 2, 5, 5] = 4.0        # "blue" in "a blue square"
    wm = at.word_maps(tok, tiny_model.tokenizer, ["a red circle", "a blue square"], ["circle", "blue"])
    assert wm[0, 1, 2] == 1.0 and wm[0].sum() == 1.0 and wm[1, 5, 5] == 4.0 and wm[1].sum() == 4.0
    up = at.word_maps(tok, tiny_model.tokenizer, ["a red circle", "a blue square"],
                      ["circle", "blue"], size=32)
    assert up.shape == (2, 32, 32) and torch.allclose(up.sum((-2, -1)), torch.tensor([1.0, 4.0],
                                                                                   dtype=up.dtype))


def test_slots_follow_images_not_batches(tiny_model, tiny_images):
    m = tiny_model
    full = at.attention_information(m, tiny_images[:3], CAPS, n_samples=3, batch_size=4)
    one = at.attention_information(m, tiny_images[1:2], CAPS[1:2], n_samples=3, streams=[1],
                                   batch_size=2)
    assert torch.allclose(full["tokens"][1], one["tokens"][0], atol=1e-6)
    assert not torch.allclose(full["tokens"][0], full["tokens"][1])


def test_daam_maps_shapes_guidance_and_determinism(tiny_model, tiny_images):
    m = tiny_model
    r = at.daam_maps(m, tiny_images[:2], CAPS[:2], num_steps=4)
    assert r["tokens"].shape == (2, m.tokenizer.model_max_length, *m.latent_shape[1:])
    assert r["latents"].shape == (2, *m.latent_shape)
    again = at.daam_maps(m, tiny_images[:2], CAPS[:2], num_steps=4)
    assert torch.equal(r["tokens"], again["tokens"])
    g = at.daam_maps(m, captions=CAPS[:2], invert=False, guidance_scale=3.0, num_steps=3, seed=1)
    assert g["tokens"].shape == r["tokens"].shape and torch.isfinite(g["tokens"]).all()


class _ConstEps:
    """The tiny model's schedule with a constant eps prediction (DDIM steps become exact maps)."""

    def __init__(self, base, value):
        self.base, self.value = base, value
        self.device, self.dtype = base.device, base.dtype
        self.alphas_cumprod, self.scheduler = base.alphas_cumprod, base.scheduler

    def eps(self, z, t, emb):
        return torch.full_like(z, self.value)


def test_ddim_inversion_closed_forms(tiny_model):
    z = torch.randn(2, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(2))
    cond = tiny_model.encode_prompts(CAPS[:2])
    ts = at.ddim_timesteps(tiny_model, 20)
    ac = tiny_model.alphas_cumprod
    # eps = 0: every step rescales by sqrt(a_to / a_from), so x_T = x_0 sqrt(a(t_max) / a(0))
    zT = at.ddim_invert(_ConstEps(tiny_model, 0.0), z, cond, num_steps=20)
    assert torch.allclose(zT, z * float((ac[ts.max()] / ac[0]).sqrt()), rtol=1e-5)
    # constant eps: inversion and denoising are exact inverses of each other
    m = _ConstEps(tiny_model, 0.3)
    rec = at.ddim_denoise(m, at.ddim_invert(m, z, cond, num_steps=20), cond, num_steps=20)
    assert torch.allclose(rec, z, atol=1e-4)


def test_store_errors():
    s = at.AttentionStore((8, 8), 2)
    with pytest.raises(RuntimeError, match="no cross-attention"):
        s.maps()
    with pytest.raises(ValueError, match="query positions"):
        s.add(torch.rand(2, 1, 10, 4), "bad")


@pytest.fixture(scope="module")
def coco_it_rows(tmp_path_factory):
    from t2i_common import formats
    from t2i_common.toyworld import export as toyexport

    root = tmp_path_factory.mktemp("coco_it")
    csv, inst, imgs = toyexport.export_coco_it(root, 4, seed=0)
    return formats.read_coco_it(csv, instances=inst, image_dir=imgs, mask_shape=(16, 16))


def test_localisation_maps_nested_and_consistent(tiny_model, coco_it_rows):
    from t2i_common.info_decomp import information as it

    rows = coco_it_rows[:5]
    maps = at.localisation_maps(tiny_model, rows, steps=(2, 4), groups_per_call=2, progress=False)
    assert set(maps) == {"Attention", "CMI", "Attention+Information"}
    assert maps["CMI"][4].shape == (len(rows), *tiny_model.latent_shape[1:])
    groups = at._groups(rows)
    g0 = groups[0]
    # nested estimate with 2 samples == a direct 2-sample CMI of the same group (stream 0)
    conds = [[g0["caption"], ""] + [rows[r].context for r in g0["rows"]]]
    direct = it.information(tiny_model, it._as_latents(tiny_model, [g0["image"]]), conds,
                            [(0, 2 + i) for i in range(len(g0["rows"]))], n_samples=2,
                            pixel=True, streams=[0])
    for i, r in enumerate(g0["rows"]):
        assert torch.allclose(maps["CMI"][2][r].double(), direct["orthogonal_map"][0, i], rtol=1e-4)
    ai = at.attention_information(tiny_model, [g0["image"]], [g0["caption"]], n_samples=2,
                                  streams=[0])
    wm = at.word_maps(ai["tokens"], tiny_model.tokenizer, [g0["caption"]], [rows[g0["rows"][0]].word])
    assert torch.allclose(maps["Attention+Information"][2][g0["rows"][0]], wm[0], atol=1e-5)


def test_localisation_table_with_oracle_maps(coco_it_rows):
    from t2i_common.info_decomp import information as it

    rows = coco_it_rows
    masks = torch.as_tensor(np.stack([r.mask for r in rows]))
    maps = {"CMI": {10: masks.float()}, "Attention": {10: torch.zeros_like(masks, dtype=torch.float)}}
    df = at.localisation_table(maps, rows)
    allr = df[df.word_type == "all"].set_index("method")
    assert allr.loc["CMI", "oracle"] == 100.0 and allr.loc["Attention", "oracle"] == 0.0
    assert allr.loc["Whole image", "oracle"] == pytest.approx(100 * it.whole_image_miou(masks))
    assert set(df.word_type) >= {"all", "noun", "colour"}
    tab = at.localisation_pivot(df)
    assert list(tab.index) == ["Whole image", "Attention", "CMI"] and list(tab.columns) == ["10 steps"]


def test_heatmap_examples_fall_back_to_noun_and_colour_then_name_the_problem(tmp_path):
    from t2i_common.info_decomp import attention as at, information as inf
    rows = inf.coco_it_items(None, None, None, 32, toy_root=tmp_path, toy_n=3, seed=42)
    full = at.heatmap_examples(rows, n=3)
    assert full and all([t for t, _ in e["words"]] == ["noun", "colour", "relation"] for e in full)
    # the first image's rows alone: a caption without a relation word -> noun and colour only
    first = [r for r in rows if r.caption == rows[0].caption]
    assert all(w not in rows[0].caption.split() for w in ("above", "below", "left", "right"))
    part = at.heatmap_examples(first, n=3)
    assert len(part) == 1 and [t for t, _ in part[0]["words"]] == ["noun", "colour"]
    with pytest.raises(ValueError, match="noun row and a colour"):
        at.heatmap_examples([r for r in first if r.word_type == "noun"], n=3)
