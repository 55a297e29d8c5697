"""unCLIP: the Stable-unCLIP folder layout (both diffusers pipelines), the package's samplers against
the pipelines, slerp / text-diff geometry, prior selection, DDIM inversion, bad inputs, resumable
training.  A tiny random-weight checkpoint built from configs (no downloads)."""
import json

import numpy as np
import pytest
import torch

from t2i_common.toyworld import training
from t2i_common.unclip import model as unclip
from t2i_common.unclip import training as ut


@pytest.fixture(scope="module")
def tiny_unclip_dir(tiny_sd_dir, tmp_path_factory):
    from t2i_common import toyworld as tw

    parts = ut.unclip_components_from_sd(tiny_sd_dir, prior_layers=1)
    imgs = torch.from_numpy(np.stack([np.asarray(tw.to_pil(s.image).resize((16, 16)))
                                      for s in tw.make_samples(64, 0)]))
    zi = ut.image_embeddings(parts["image_encoder"], imgs)
    torch.manual_seed(0)
    parts = ut.unclip_components_from_sd(tiny_sd_dir, embed_mean=zi.mean(0), embed_std=zi.std(0),
                                         prior_layers=1)
    with torch.no_grad():  # non-trivial projection so the embedding matters
        torch.nn.init.normal_(parts["unet"].class_embedding.linear_2.weight, std=0.05)
    folder = tmp_path_factory.mktemp("tiny_unclip")
    unclip.save_unclip_folder(folder, parts)
    return folder


@pytest.fixture(scope="module")
def tiny_unclip(tiny_unclip_dir):
    return unclip.load_unclip(tiny_unclip_dir)


def _image(seed=0):
    from t2i_common import toyworld as tw
    return np.asarray(tw.to_pil(tw.make_samples(1, seed, kinds=("single",))[0].image).resize((16, 16)))


def test_folder_layout_is_stable_unclip(tiny_unclip_dir):
    idx = json.loads((tiny_unclip_dir / "model_index.json").read_text())
    assert idx["_class_name"] == "StableUnCLIPPipeline"
    for k in unclip.PRIOR_PARTS + unclip.DECODER_PARTS + unclip.ENCODER_PARTS:
        assert idx[k][0] in ("diffusers", "transformers", "stable_diffusion"), k
        assert (tiny_unclip_dir / k).is_dir(), k
    unet = json.loads((tiny_unclip_dir / "unet" / "config.json").read_text())
    assert unet["class_embed_type"] == "projection"
    assert unet["projection_class_embeddings_input_dim"] == 2 * 32
    # the VAE comes from the SD folder: its config must not carry that machine path
    for cfg in tiny_unclip_dir.glob("*/config.json"):
        assert "_name_or_path" not in json.loads(cfg.read_text()), cfg


def test_runs_in_plain_diffusers_pipelines(tiny_unclip_dir):
    from diffusers import StableUnCLIPImg2ImgPipeline, StableUnCLIPPipeline

    pipe = StableUnCLIPPipeline.from_pretrained(tiny_unclip_dir)
    out = pipe(["a red circle", "a blue square"], height=16, width=16, num_inference_steps=2,
               prior_num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()
    pipe2 = StableUnCLIPImg2ImgPipeline.from_pretrained(tiny_unclip_dir)
    from PIL import Image
    out2 = pipe2(Image.fromarray(_image()), prompt="", height=16, width=16, num_inference_steps=2,
                 noise_level=10, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out2.shape == (1, 16, 16, 3) and np.isfinite(out2).all()


def _ddim_pipe(cls, folder, m):
    from diffusers import DDIMScheduler
    pipe = cls.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                               set_alpha_to_one=False)
    if hasattr(pipe, "prior_scheduler"):
        pipe.prior_scheduler = DDIMScheduler.from_config(pipe.prior_scheduler.config)
    return pipe


def test_decode_equals_img2img_pipeline(tiny_unclip_dir, tiny_unclip):
    """Same image, same initial latents, DDIM in both: the package's decoder sampler reproduces
    StableUnCLIPImg2ImgPipeline (guidance 3, caption and image embedding)."""
    from diffusers import StableUnCLIPImg2ImgPipeline
    from PIL import Image

    m = tiny_unclip
    pipe = _ddim_pipe(StableUnCLIPImg2ImgPipeline, tiny_unclip_dir, m)
    lat = torch.randn((1,) + m.latent_shape, generator=torch.Generator().manual_seed(3))
    img = Image.fromarray(_image())
    ref = pipe(img, prompt="a red circle", height=16, width=16, num_inference_steps=4,
               guidance_scale=3.0, latents=lat.clone(), output_type="pt").images
    z = m.encode_images([img])
    ours = m.decode(z, ["a red circle"], num_steps=4, guidance_scale=3.0, latents=lat, output="tensor")
    torch.testing.assert_close((ours + 1) / 2, ref.clamp(0, 1), atol=1e-4, rtol=0)
    # the image embedding matters: another embedding gives another image
    other = m.decode(z * 0.5, ["a red circle"], num_steps=4, latents=lat, output="tensor")
    assert (other - ours).abs().max() > 1e-3


def test_prior_and_decoder_equal_text_pipeline(tiny_unclip_dir, tiny_unclip):
    """Prior (guided, DDIM) then decoder: the package reproduces StableUnCLIPPipeline given the same
    prior and decoder starting noise."""
    from diffusers import StableUnCLIPPipeline

    m = tiny_unclip
    pipe = _ddim_pipe(StableUnCLIPPipeline, tiny_unclip_dir, m)
    g = torch.Generator().manual_seed(5)
    plat = torch.randn(1, m.embedding_dim, generator=g)
    lat = torch.randn((1,) + m.latent_shape, generator=g)
    ref = pipe("a red circle", height=16, width=16, num_inference_steps=3, guidance_scale=2.0,
               prior_num_inference_steps=3, prior_guidance_scale=4.0, prior_latents=plat.clone(),
               latents=lat.clone(), output_type="pt").images
    z = m.prior_embeddings(["a red circle"], num_steps=3, guidance_scale=4.0, latents=plat)
    ours = m.decode(z, ["a red circle"], num_steps=3, guidance_scale=2.0, latents=lat, output="tensor")
    torch.testing.assert_close((ours + 1) / 2, ref.clamp(0, 1), atol=1e-4, rtol=0)


def test_noised_class_labels_match_pipeline(tiny_unclip):
    """The batched training conditioning equals the pipeline's noise_image_embeddings per level."""
    m = tiny_unclip
    z = torch.randn(3, m.embedding_dim, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, m.embedding_dim, generator=torch.Generator().manual_seed(2))
    levels = torch.tensor([0, 250, 999])
    batched = ut.noised_class_labels(z, levels, noise, m.image_normalizer.mean.detach(),
                                     m.image_normalizer.std.detach(),
                                     torch.as_tensor(m.image_noising_scheduler.alphas_cumprod))
    for i, lv in enumerate(levels.tolist()):
        one = m.noise_image_embeddings(z[i:i + 1], lv, noise[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], one, atol=1e-5, rtol=1e-5)
    # level 0 keeps the embedding (abar_0 ~ 1) up to the first beta
    assert (batched[0, :m.embedding_dim] - z[0]).abs().max() < 0.05 * z[0].abs().max()


# ---- geometry ------------------------------------------------------------------------------------
def test_slerp_endpoints_norms_and_angle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 5
    assert torch.equal(unclip.slerp(a, b, 0.0), a) and torch.equal(unclip.slerp(a, b, 1.0), b)
    th = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    z = unclip.slerp(a, b, th)
    torch.testing.assert_close(z.norm(dim=1), (1 - th) * a.norm() + th * b.norm())
    ua, ub = a / a.norm(), b / b.norm()
    w = torch.arccos(ua @ ub)
    ang = torch.arccos(((z / z.norm(dim=1, keepdim=True)) @ ua).clamp(-1, 1))
    torch.testing.assert_close(ang, th * w, atol=1e-5, rtol=0)  # constant angular speed
    zu = unclip.slerp(ua, ub, th)  # unit vectors stay on the sphere
    torch.testing.assert_close(zu.norm(dim=1), torch.ones(5))
    # orthogonal unit vectors: slerp at 0.5 is (e1 + e2) / sqrt 2
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    torch.testing.assert_close(unclip.slerp(e1, e2, 0.5), (e1 + e2) / 2 ** 0.5)


@pytest.mark.parametrize("theta", [-0.1, 1.5, float("nan")])
def test_theta_outside_unit_interval_is_an_error(theta, tiny_unclip):
    with pytest.raises(ValueError, match=r"theta must lie in \[0, 1\]"):
        unclip.slerp(torch.ones(4), torch.ones(4), theta)
    with pytest.raises(ValueError, match=r"thetas must lie in \[0, 1\]"):
        tiny_unclip.text_diff(_image(), "a red circle", "a blue circle", [0.0, theta])


def test_text_diff_direction_closed_form():
    zt, zt0 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    torch.testing.assert_close(unclip.text_diff_direction(zt, zt0), torch.tensor([1.0, -1.0, 0]) / 2 ** 0.5)


def test_select_by_dot_product_keeps_larger():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[[0.2, 1.0], [5.0, 0.1]], [[0.0, 3.0], [1.0, 1.0]]])
    chosen, scores, idx = unclip.select_by_dot_product(cands, text)
    assert idx.tolist() == [1, 0]
    torch.testing.assert_close(chosen, torch.stack([cands[0, 1], cands[1, 0]]))


def test_sample_prior_keeps_candidate_with_larger_dot_product(tiny_unclip):
    m = tiny_unclip
    out = m.sample_prior(["a red circle", "a blue square", "a green diamond"], n_candidates=2,
                         num_steps=3, seed=1)
    assert out["candidates"].shape == (3, 2, m.embedding_dim)
    cos = torch.nn.functional.cosine_similarity(out["candidates"], out["text_embeds"][:, None], dim=-1)
    torch.testing.assert_close(out["scores"], cos, atol=1e-5, rtol=0)
    for i in range(3):
        k = int(cos[i].argmax())
        assert torch.equal(out["chosen"][i], out["candidates"][i, k])
    assert not torch.allclose(out["candidates"][:, 0], out["candidates"][:, 1])  # 2 distinct draws
    # seeded: the same call gives the same candidates; a sample does not depend on its batch
    again = m.sample_prior(["a red circle"], n_candidates=2, num_steps=3, seed=1)
    torch.testing.assert_close(again["candidates"][0], out["candidates"][0])


def test_text_diff_at_theta_zero_is_the_ddim_reconstruction(tiny_unclip):
    m = tiny_unclip
    im = _image(2)
    out, x_T = m.text_diff(im, "a red circle", "a blue circle", [0.0, 0.3], num_steps=5,
                           guidance_scale=2.0, return_inversion=True)
    rec = m.decode(m.encode_images([im]), num_steps=5, guidance_scale=2.0, latents=x_T.cpu())
    assert np.array_equal(out[0], rec[0])
    assert not np.array_equal(out[0], out[1])


def test_ddim_inversion_inverts_the_sampler(tiny_unclip):
    """Decoding x_T obtained by inverting a decoded sample returns (nearly) that sample; the
    inversion is exact up to the eps(x_t) ~ eps(x_t-1) approximation, so with many steps the
    latents agree closely."""
    m = tiny_unclip
    z = m.encode_images([_image(3)])
    x0 = m.decode(z, num_steps=50, guidance_scale=1.0, seed=4, output="latents")
    x_T = m.invert(x0, z, num_steps=50, guidance_scale=1.0)
    back = m.decode(z, num_steps=50, guidance_scale=1.0, latents=x_T.cpu(), output="latents")
    err = float((back - x0).pow(2).mean() / x0.pow(2).mean())
    assert err < 1e-2, err


def test_ddim_eta_is_seeded_per_item_and_zero_is_plain_ddim(tiny_unclip):
    m = tiny_unclip
    z = m.encode_images([_image(3), _image(4)])
    plain = m.decode(z, num_steps=4, guidance_scale=1.0, seed=2, output="latents")
    torch.testing.assert_close(m.decode(z, num_steps=4, guidance_scale=1.0, seed=2, eta=0.0,
                                        output="latents"), plain)
    a = m.decode(z, num_steps=4, guidance_scale=1.0, seeds=[7, 8], eta=1.0, output="latents")
    b = m.decode(z, num_steps=4, guidance_scale=1.0, seeds=[7, 8], eta=1.0, output="latents")
    torch.testing.assert_close(a, b)                                   # deterministic
    one = m.decode(z[1:], num_steps=4, guidance_scale=1.0, seeds=[8], eta=1.0, output="latents")
    torch.testing.assert_close(one[0], a[1])                           # independent of the batch
    c = m.decode(z, num_steps=4, guidance_scale=1.0, seeds=[9, 8], eta=1.0, output="latents")
    assert not torch.allclose(c[0], a[0]) and torch.allclose(c[1], a[1])
    noeta = m.decode(z, num_steps=4, guidance_scale=1.0, seeds=[7, 8], output="latents")
    assert not torch.allclose(noeta, a)                                # eta adds noise


def test_inversion_variations_at_eta_zero_are_the_ddim_reconstruction(tiny_unclip):
    m = tiny_unclip
    im = _image(2)
    v = m.variations([im], 3, method="ddim_inversion", eta=0.0, num_steps=5, guidance_scale=2.0)
    x_T = m.invert(m.encode_latents([im]), m.encode_images([im]), num_steps=5, guidance_scale=2.0)
    rec = m.decode(m.encode_images([im]), num_steps=5, guidance_scale=2.0, latents=x_T.cpu())
    assert v.shape == (1, 3) + rec.shape[1:]
    assert all(np.array_equal(v[0, j], rec[0]) for j in range(3))
    w = m.variations([im], 3, method="ddim_inversion", eta=1.0, num_steps=5, guidance_scale=2.0)
    assert not np.array_equal(w[0, 0], w[0, 1])                     # eta > 0: distinct variations
    assert np.array_equal(w, m.variations([im], 3, method="ddim_inversion", eta=1.0, num_steps=5,
                                          guidance_scale=2.0))       # the same seed: the same
    assert not np.array_equal(w, m.variations([im], 3, method="ddim_inversion", eta=1.0, seed=1,
                                              num_steps=5, guidance_scale=2.0))


@pytest.mark.parametrize("kw, match", [
    (dict(method="inversion"), "method must be 'fresh_noise' or 'ddim_inversion'"),
    (dict(method="ddim_inversion", eta=1.5), r"eta must be in \[0, 1\]"),
    (dict(eta=-0.1), r"decode: eta must be in \[0, 1\]"),
])
def test_bad_variation_options_are_errors(tiny_unclip, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_unclip.variations([_image(1)], 2, num_steps=2, **kw)


# ---- bad inputs ------------------------------------------------------------------------------
def test_embedding_of_wrong_width_is_an_error(tiny_unclip):
    with pytest.raises(ValueError, match=r"expected CLIP embeddings \[B, 32\].*got \(2, 31\)"):
        tiny_unclip.decode(torch.zeros(2, 31), num_steps=2)


def _without_prior(src, folder):
    """A copy of the Stable unCLIP folder ``src`` in the layout of the image-variation release
    (``stabilityai/stable-diffusion-2-1-unclip``): no prior parts."""
    import shutil
    shutil.copytree(src, folder)
    idx = json.loads((folder / "model_index.json").read_text())
    for k in unclip.PRIOR_PARTS:
        idx.pop(k)
        shutil.rmtree(folder / k)
    idx["_class_name"] = "StableUnCLIPImg2ImgPipeline"
    (folder / "model_index.json").write_text(json.dumps(idx))
    return folder


def test_folder_lacking_the_prior_is_an_error(tiny_unclip_dir, tmp_path):
    folder = _without_prior(tiny_unclip_dir, tmp_path / "no_prior")
    with pytest.raises(FileNotFoundError, match="has no diffusion prior.*karlo"):
        unclip.load_unclip(folder)
    m = unclip.load_unclip(folder, need_prior=False)  # the decoder alone still loads and runs
    assert m.decode(m.encode_images([_image()]), num_steps=2).shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="needs the diffusion prior"):
        m.generate(["a red circle"], num_steps=2)
    # the prior taken from another folder (the Karlo route)
    m2 = unclip.load_unclip(folder, prior=tiny_unclip_dir)
    assert m2.has_prior


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        unclip.load_unclip(tmp_path)


# ---- training ------------------------------------------------------------------------------------
def _tiny_training_inputs(tiny_sd_dir):
    from t2i_common import toyworld as tw

    parts = ut.unclip_components_from_sd(tiny_sd_dir, prior_layers=1)
    samples = tw.make_samples(32, 0)
    pairs = training.PairData(torch.from_numpy(np.stack(
        [np.asarray(tw.to_pil(s.image).resize((16, 16))) for s in samples])), [s.captions for s in samples])
    zi = ut.image_embeddings(parts["image_encoder"], pairs.images)
    parts = ut.unclip_components_from_sd(tiny_sd_dir, embed_mean=zi.mean(0), embed_std=zi.std(0),
                                         prior_layers=1)
    return parts, pairs, zi


def test_prior_training_resumes_bit_exactly(tiny_sd_dir, tmp_path):
    def run(out, stop=None):
        parts, pairs, zi = _tiny_training_inputs(tiny_sd_dir)
        return ut.train_prior(pairs, parts["prior"], parts["prior_text_encoder"], parts["prior_tokenizer"],
                              zi, parts["prior_scheduler"], 6, batch_size=8, out_dir=out,
                              ckpt_every=2, progress=False, stop_after=stop, warmup=2)

    ref, info = run(tmp_path / "a")
    with pytest.raises(training.Interrupted):
        run(tmp_path / "b", stop=3)
    res, info2 = run(tmp_path / "b")
    assert info2["resumed_from"] == 2
    for (k, v), (_, w) in zip(ref.state_dict().items(), res.state_dict().items()):
        assert torch.equal(v, w), k
    assert info["losses"] == info2["losses"]


def test_decoder_training_starts_from_the_base_unet_and_learns(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    parts, pairs, zi = _tiny_training_inputs(tiny_sd_dir)
    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # zero-initialised projection: identical to the base at the start
        torch.testing.assert_close(parts["unet"](x, 10, encoder_hidden_states=h,
                                                 class_labels=torch.randn(2, 64)).sample,
                                   base(x, 10, encoder_hidden_states=h).sample)
    unet, info = ut.train_decoder(pairs, parts["unet"], parts["text_encoder"], parts["vae"],
                                  parts["tokenizer"], zi, parts["image_normalizer"],
                                  parts["image_noising_scheduler"], parts["scheduler"], 4,
                                  batch_size=4, out_dir=tmp_path, ckpt_every=2, progress=False,
                                  ema_decay=None, warmup=1)
    assert len(info["losses"]) == 4
    assert unet.class_embedding.linear_2.weight.abs().sum() > 0  # the embedding pathway is trained
    with pytest.raises(ValueError, match="embedding_dropout must be in"):
        ut.train_decoder(pairs, parts["unet"], parts["text_encoder"], parts["vae"], parts["tokenizer"],
                         zi, parts["image_normalizer"], parts["image_noising_scheduler"],
                         parts["scheduler"], 1, embedding_dropout=1.5, progress=False)


def test_generation_does_not_depend_on_the_batch(tiny_unclip):
    m = tiny_unclip
    both = m.generate(["a red circle", "a blue square"], seeds=[5, 6], num_steps=2, prior_steps=2)
    one = m.generate(["a blue square"], seeds=[6], num_steps=2, prior_steps=2)
    assert np.array_equal(both[1], one[0])
    cap = m.generate(["a red circle", "a blue square"], mode="caption", seeds=[5, 6], num_steps=2)
    assert np.array_equal(cap[1], m.generate(["a blue square"], mode="caption", seeds=[6], num_steps=2)[0])
    with pytest.raises(ValueError, match="mode must be"):
        m.generate(["a red circle"], mode="nope")


#: kakaobrain/karlo-v1-alpha prior_scheduler/scheduler_config.json as published (printed in full in
#: diffusers' examples/community/README.md, "UnCLIP Image Interpolation"): no beta_schedule entry
KARLO_PRIOR_SCHEDULER = {"_class_name": "UnCLIPScheduler", "_diffusers_version": "0.12.0.dev0",
                         "clip_sample": True, "clip_sample_range": 5.0, "num_train_timesteps": 1000,
                         "prediction_type": "sample", "variance_type": "fixed_small_log"}


def _karlo_folder(tiny_unclip_dir, karlo):
    """A Karlo-layout prior folder (prior/, prior_scheduler/ with Karlo's own scheduler config,
    text_encoder/, tokenizer/) built from the tiny checkpoint's prior parts."""
    import shutil
    karlo.mkdir()
    for src, dst in (("prior", "prior"), ("prior_text_encoder", "text_encoder"),
                     ("prior_tokenizer", "tokenizer")):
        shutil.copytree(tiny_unclip_dir / src, karlo / dst)
    (karlo / "prior_scheduler").mkdir()
    (karlo / "prior_scheduler" / "scheduler_config.json").write_text(json.dumps(KARLO_PRIOR_SCHEDULER))
    (karlo / "model_index.json").write_text(json.dumps({
        "_class_name": "UnCLIPPipeline", "prior": ["diffusers", "PriorTransformer"],
        "prior_scheduler": ["diffusers", "UnCLIPScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return karlo


def test_karlo_prior_samples_on_the_unclip_schedule(tiny_unclip_dir, tmp_path):
    """Karlo's UnCLIPScheduler config names no beta_schedule; the prior's DDIM must still run on
    UnCLIPScheduler's squaredcos_cap_v2 alphas (DDIMScheduler.from_config alone falls back to
    linear), with Karlo's prediction type and clip range."""
    from diffusers import DDIMScheduler, UnCLIPScheduler

    ref = UnCLIPScheduler.from_config(KARLO_PRIOR_SCHEDULER)
    m = unclip.load_unclip(_without_prior(tiny_unclip_dir, tmp_path / "img2img"),
                           prior=_karlo_folder(tiny_unclip_dir, tmp_path / "karlo"))
    assert type(m.prior_scheduler).__name__ == "UnCLIPScheduler"
    d = m._prior_ddim(25)
    torch.testing.assert_close(d.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    assert abs(float(d.alphas_cumprod[500]) - 0.492) < 0.005
    assert (d.config.prediction_type, d.config.clip_sample, d.config.clip_sample_range) == ("sample", True, 5.0)
    # what the naive conversion gives: the linear schedule the fix avoids
    naive = DDIMScheduler.from_config(ref.config)
    assert abs(float(naive.alphas_cumprod[500]) - 0.078) < 0.005


def test_karlo_prior_equals_the_pipeline_prior(tiny_unclip_dir, tmp_path):
    """The Karlo route sampled against diffusers' StableUnCLIPPipeline prior stage, given the same
    prior noise and the same sampler (DDIM, eta 0, on squaredcos_cap_v2 with Karlo's prediction type
    and clip range, configured here by hand), 25 steps, guidance 4."""
    from diffusers import DDIMScheduler, StableUnCLIPPipeline

    m = unclip.load_unclip(_without_prior(tiny_unclip_dir, tmp_path / "img2img"),
                           prior=_karlo_folder(tiny_unclip_dir, tmp_path / "karlo"))
    pipe = StableUnCLIPPipeline.from_pretrained(tiny_unclip_dir)
    pipe.prior_scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                         prediction_type="sample", clip_sample=True, clip_sample_range=5.0)
    captured = []

    class _Stop(Exception):
        pass

    def grab(image_embeds, **kw):
        captured.append(image_embeds.detach().clone())
        raise _Stop

    pipe.noise_image_embeddings = grab
    prompts = ["a red circle", "a blue square"]
    plat = torch.randn(2, m.embedding_dim, generator=torch.Generator().manual_seed(11))
    for i, p in enumerate(prompts):
        with pytest.raises(_Stop):
            pipe(p, height=16, width=16, prior_num_inference_steps=25, prior_guidance_scale=4.0,
                 prior_latents=plat[i:i + 1].clone(), num_inference_steps=1)
    ref = torch.cat(captured)
    ours = m.prior_embeddings(prompts, num_steps=25, guidance_scale=4.0, latents=plat)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_decode_augmentation_noise_follows_the_items_seed(tiny_unclip):
    """decode(seeds=..., noise_level > 0): item i's embedding noise comes from seeds[i], so an item
    gives the same image alone and in a batch (and another seed another image)."""
    m = tiny_unclip
    z = torch.randn(3, m.embedding_dim, generator=torch.Generator().manual_seed(4))
    both = m.decode(z, num_steps=2, noise_level=500, seeds=[7, 8, 9])
    one = m.decode(z[1:2], num_steps=2, noise_level=500, seeds=[8])
    assert np.array_equal(both[1], one[0])
    labels = m._decoder_inputs(z[1:2], None, 500, 0, [8])[0]
    other = m._decoder_inputs(z[1:2], None, 500, 0, [18])[0]
    assert (labels - other).abs().max() > 1e-2
    with pytest.raises(ValueError, match="3 embeddings but 2 seeds"):
        m.decode(z, num_steps=2, noise_level=500, seeds=[7, 8])


def test_prior_from_a_karlo_layout_folder(tiny_unclip_dir, tiny_unclip, tmp_path):
    """The real route: the image-variation release (no prior parts) plus a Karlo-layout folder
    (``kakaobrain/karlo-v1-alpha``: prior/, prior_scheduler/, text_encoder/ - a CLIP text tower with
    projection - and tokenizer/, beside Karlo's own decoder parts).  Built here from the tiny
    checkpoint's prior parts; the loaded model must generate exactly what the one-folder model
    does."""
    import shutil
    decoder_only = _without_prior(tiny_unclip_dir, tmp_path / "img2img")
    karlo = _karlo_folder(tiny_unclip_dir, tmp_path / "karlo")
    m = unclip.load_unclip(decoder_only, prior=karlo)
    assert m.has_prior
    want = tiny_unclip.generate(["a red circle", "a blue square"], seeds=[3, 4], num_steps=2, prior_steps=25)
    got = m.generate(["a red circle", "a blue square"], seeds=[3, 4], num_steps=2, prior_steps=25)
    assert np.array_equal(got, want)
    shutil.rmtree(karlo / "text_encoder")
    with pytest.raises(FileNotFoundError):
        unclip.load_unclip(decoder_only, prior=karlo)


# ---- bad input, by class: one-line errors naming the input, before any sampling ---------------------
from t2i_common import validate as V  # noqa: E402


@pytest.mark.parametrize("index", [(0, 0), (1, 31), (2, 7)])
def test_non_finite_embeddings_are_named_with_their_index(tiny_unclip, index):
    z = torch.randn(3, 32)
    z[index] = float("nan") if index[1] % 2 else float("inf")
    with pytest.raises(V.BadInput, match=rf"image_embeds holds a non-finite value .* at index "
                                         rf"\({index[0]}, {index[1]}\)"):
        tiny_unclip.decode(z, num_steps=2)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.decode(torch.zeros(1, 32), num_steps=2, guidance_scale=float("nan")),
     "guidance_scale must be a finite number"),
    (lambda m: m.decode(torch.zeros(1, 32), num_steps=2, guidance_scale=float("inf")),
     "guidance_scale must be a finite number"),
    (lambda m: m.generate(["a red circle"], num_steps=2, prior_steps=2, prior_guidance=float("nan")),
     "prior_guidance must be a finite number"),
    (lambda m: m.generate(["a red circle"], num_steps=2, prior_steps=2, guidance_scale="3"),
     "guidance_scale must be a number"),
    (lambda m: m.decode(torch.zeros(1, 32), num_steps=2,
                        latents=torch.full((1, 4, 8, 8), float("nan"))),
     r"latents holds a non-finite value .* index \(0, 0, 0, 0\)"),
    (lambda m: m.interpolate(_image(0), _image(1), [0.2, float("nan")], num_steps=2),
     "thetas must lie in"),
    (lambda m: m.invert(torch.zeros(1, 4, 8, 8), torch.zeros(1, 32), guidance_scale=float("-inf")),
     "guidance_scale must be a finite number"),
])
def test_non_finite_parameters(tiny_unclip, call, match):
    with pytest.raises(V.BadInput, match=match):
        call(tiny_unclip)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate([], num_steps=2), "prompts is empty"),
    (lambda m: m.decode(torch.zeros(0, 32), num_steps=2), "image_embeds holds no embeddings"),
    (lambda m: m.interpolate(_image(0), _image(1), [], num_steps=2), "thetas is empty"),
    (lambda m: m.sample_prior([], num_steps=2), "prompts is empty"),
    (lambda m: m.text_diff(_image(0), "a red circle", "a blue circle", [], num_steps=2),
     "thetas is empty"),
])
def test_empty_inputs(tiny_unclip, call, match):
    with pytest.raises(V.BadInput, match=match):
        call(tiny_unclip)


@pytest.mark.parametrize("kw,match", [
    (dict(num_steps=-1), "num_steps must be positive, got -1"),
    (dict(num_steps=0), "num_steps must be positive, got 0"),
    (dict(num_steps=2.5), "num_steps must be a whole number"),
    (dict(num_steps="3"), "num_steps must be a whole number"),
    (dict(prior_steps=0), "prior_steps must be positive"),
    (dict(n_candidates=0), "n_candidates must be positive"),
    (dict(n_candidates=1.5), "n_candidates must be a whole number"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(seeds=[1, -2]), r"seeds\[1\] must be >= 0"),
    (dict(seeds=[1, 2, 3]), "seeds has 3 entries for 2 prompts"),
    (dict(seeds="12"), "seeds must be a list of 2 whole numbers"),
])
def test_bad_counts_in_generate(tiny_unclip, kw, match):
    with pytest.raises(V.BadInput, match=match):
        tiny_unclip.generate(["a red circle", "a blue square"], **dict(dict(num_steps=2, prior_steps=2), **kw))


@pytest.mark.parametrize("call,match", [
    (lambda m: m.decode(torch.zeros(1, 32), num_steps=-1), "num_steps must be positive"),
    (lambda m: m.decode(torch.zeros(1, 32), num_steps=2, noise_level=-5), "noise_level must be >= 0"),
    (lambda m: m.decode(torch.zeros(1, 32), num_steps=2, noise_level=2.5), "noise_level must be a whole"),
    (lambda m: m.decode(torch.zeros(1, 32), num_steps=2, batch_size=0), "batch_size must be positive"),
    (lambda m: m.decode(torch.zeros(1, 32), num_steps=2, output="png"), "output must be"),
    (lambda m: m.variations([_image(0)], n=0, num_steps=2), "n must be positive"),
    (lambda m: m.sample_prior(["a red circle"], num_steps=0), "num_steps must be positive"),
    (lambda m: m.invert(torch.zeros(1, 4, 8, 8), torch.zeros(1, 32), num_steps=0),
     "num_steps must be positive"),
    (lambda m: m.text_diff(_image(0), "a red circle", "a blue circle", [0.5], num_steps=-3),
     "num_steps must be positive"),
])
def test_bad_counts_elsewhere(tiny_unclip, call, match):
    with pytest.raises(V.BadInput, match=match):
        call(tiny_unclip)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate("a red circle", num_steps=2), r"prompts must be a list of strings, got the "
                                                         r"string 'a red circle'; wrap it"),
    (lambda m: m.generate("a red circle", mode="caption", num_steps=2), "got the string"),
    (lambda m: m.sample_prior("a red circle", num_steps=2), "got the string"),
    (lambda m: m.prior_embeddings("a red circle", num_steps=2), "got the string"),
    (lambda m: m.encode_prior_texts("a red circle"), "got the string"),
    (lambda m: m.generate([1, 2], num_steps=2), r"prompts\[0\] is int"),
    (lambda m: m.generate(None, num_steps=2), "prompts must be a list of strings, got NoneType"),
    (lambda m: m.text_diff(_image(0), ["a red circle"], "a blue circle", [0.5], num_steps=2),
     "source_caption must be one caption string"),
    (lambda m: m.text_diff(_image(0), "a red circle", None, [0.5], num_steps=2),
     "target_caption must be one caption string"),
    (lambda m: m.encode_images(_image(0)), "got a single one; wrap it in a list"),
    (lambda m: m.interpolate(_image(0), _image(1), "0.5", num_steps=2), "got the string"),
])
def test_wrong_containers(tiny_unclip, call, match):
    with pytest.raises(V.BadInput, match=match):
        call(tiny_unclip)


@pytest.mark.parametrize("prompt,word", [("a red circle q blue square", "q"),
                                         ("a red circles", "circles"),
                                         ("a red, circle", "red,")])
def test_unknown_words_are_named(tiny_unclip, prompt, word):
    m = tiny_unclip
    with pytest.raises(V.BadInput, match=rf"does not know the word\(s\) \['{word}'\]"):
        m.generate([prompt], num_steps=2, prior_steps=2)
    with pytest.raises(V.BadInput, match=rf"\['{word}'\]"):
        m.encode_prior_texts(["a red circle", prompt])
    with pytest.raises(V.BadInput, match=rf"\['{word}'\]"):
        m.generate([prompt], mode="caption", num_steps=2)
    with pytest.raises(V.BadInput, match=rf"\['{word}'\]"):
        m.text_diff(_image(0), "a red circle", prompt, [0.5], num_steps=2)


def test_zero_edit_direction_returns_the_reconstruction(tiny_unclip):
    m = tiny_unclip
    im = _image(2)
    for cap in ("a red circle", "a blue square"):
        out, x_T = m.text_diff(im, cap, cap, [0.0, 0.5, 1.0], num_steps=4, guidance_scale=2.0,
                               return_inversion=True)
        rec = m.decode(m.encode_images([im]), num_steps=4, guidance_scale=2.0, latents=x_T.cpu())
        for k in range(3):
            assert np.array_equal(out[k], rec[0])
    # a real direction still edits
    out = m.text_diff(im, "a red circle", "a blue circle", [0.0, 0.5], num_steps=4)
    assert not np.array_equal(out[0], out[1])


@pytest.mark.parametrize("caption,match", [(False, "caption=False would leave no conditioning"),
                                           ("no", "caption must be True or False"),
                                           (0, "caption must be True or False")])
def test_caption_mode_needs_the_caption(tiny_unclip, caption, match):
    with pytest.raises(V.BadInput, match=match):
        tiny_unclip.generate(["a red circle"], mode="caption", caption=caption, num_steps=2)


# ---- damaged folders: the component, its folder and what is wrong --------------------------------
def _damaged(src, dst, damage):
    import shutil
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def _drop_index_entry(key):
    def f(d):
        idx = json.loads((d / "model_index.json").read_text())
        idx.pop(key)
        (d / "model_index.json").write_text(json.dumps(idx))
    return f


def _rm(rel):
    import shutil

    def f(d):
        p = d / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f


def _write(rel, text):
    def f(d):
        (d / rel).write_text(text)
    return f


def _rm_weights(sub):
    def f(d):
        for p in (d / sub).iterdir():
            if p.suffix in (".safetensors", ".bin"):
                p.unlink()
    return f


@pytest.mark.parametrize("damage,exc,match", [
    (_rm("prior/config.json"), FileNotFoundError,
     r"unCLIP component prior: .*prior has no config.json; restore it"),
    (_drop_index_entry("unet"), V.BadInput,
     r"unCLIP component unet: .*model_index.json does not list it although .*unet/ exists; add "
     r"\"unet\": \[\"diffusers\", \"UNet2DConditionModel\"\]"),
    (_rm("unet"), FileNotFoundError, r"unCLIP component unet: .*unet is missing"),
    (_rm_weights("vae"), FileNotFoundError, r"unCLIP component vae: .*vae has a config.json but no weights"),
    (_write("scheduler/scheduler_config.json", "{oops"), V.BadInput,
     r"unCLIP component scheduler: .*scheduler_config.json is not valid JSON"),
    (_rm("image_noising_scheduler/scheduler_config.json"), FileNotFoundError,
     r"unCLIP component image_noising_scheduler: .* has no scheduler_config.json"),
    (_rm("prior_tokenizer"), FileNotFoundError, r"unCLIP component prior_tokenizer: .*is missing"),
    (_write("model_index.json", "[1, 2"), V.BadInput, r"model_index.json is not valid JSON"),
    (_write("model_index.json", "[1, 2]"), V.BadInput, r"model_index.json holds a list"),
])
def test_damaged_folder_names_the_component(tiny_unclip_dir, tmp_path, damage, exc, match):
    d = _damaged(tiny_unclip_dir, tmp_path / "dmg", damage)
    with pytest.raises(exc, match=match) as info:
        unclip.load_unclip(d)
    assert "huggingface-cli" not in str(info.value)


def test_sd_folder_or_file_is_not_an_unclip_folder(tiny_sd_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"unCLIP component image_normalizer: .* has no "
                                                r"image_normalizer/ folder .*StableDiffusionPipeline"):
        unclip.load_unclip(tiny_sd_dir)
    (tmp_path / "f").write_text("x")
    with pytest.raises(V.BadInput, match="is a file, not a Stable unCLIP folder"):
        unclip.load_unclip(tmp_path / "f")
