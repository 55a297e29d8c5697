"""Full-size reference configurations (t2i_common.fullsize) against the published ones.

The expected values are those of the released checkpoints' own config files (Hugging Face model
repositories' ``unet/config.json``, ``vae/config.json``, ``scheduler/scheduler_config.json``,
``text_encoder/config.json``, ``image_encoder/config.json``, ``prior/config.json``) and their
published parameter counts; the configurations under test are derived from the original
repositories' inference configs by diffusers' conversion helpers and from open_clip's shipped model
configs.  Nothing here writes weights: models are built on the meta device.

Heavier checks (a folder written, loaded through the package's loaders and one full-size UNet
evaluation per paper) are marked ``fullsize``: they run in ``make test`` (folders written once
into ``$T2I_FULLSIZE`` / ``~/.cache/t2i-repro/fullsize``; deselect with ``-m "not fullsize"``).
"""
import json

import pytest
import torch

from t2i_common import fullsize as fs

#: fields of the released checkpoints' config files
PUBLISHED_UNET = {
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd1.5": dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8,
                  cross_attention_dim=768, use_linear_projection=False, layers_per_block=2,
                  class_embed_type=None),
    # stabilityai/stable-diffusion-2-1-base unet/config.json
    "sd2.1-base": dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280],
                       attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                       use_linear_projection=True, layers_per_block=2, class_embed_type=None),
    # stabilityai/stable-diffusion-2-1 unet/config.json
    "sd2.1": dict(sample_size=96, block_out_channels=[320, 640, 1280, 1280],
                  attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                  use_linear_projection=True, layers_per_block=2, class_embed_type=None),
    # stabilityai/stable-diffusion-2-1-unclip-small unet/config.json
    "sd2.1-unclip-small": dict(sample_size=96, block_out_channels=[320, 640, 1280, 1280],
                               attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                               use_linear_projection=True, layers_per_block=2,
                               class_embed_type="projection", projection_class_embeddings_input_dim=1536),
}
PUBLISHED_PREDICTION = {"sd1.5": "epsilon", "sd2.1-base": "epsilon", "sd2.1": "v_prediction",
                        "sd2.1-unclip-small": "v_prediction"}
#: text_encoder/config.json: (hidden_size, num_hidden_layers, num_attention_heads, hidden_act)
PUBLISHED_TEXT = {"sd1.5": (768, 12, 12, "quick_gelu"), "sd2.1-base": (1024, 23, 16, "gelu"),
                  "sd2.1": (1024, 23, 16, "gelu"), "sd2.1-unclip-small": (1024, 23, 16, "gelu"),
                  "karlo-prior": (768, 12, 12, "quick_gelu")}
#: published parameter counts (diffusers / transformers modules as released)
PUBLISHED_PARAMS = {("sd1.5", "unet"): 859_520_964, ("sd2.1-base", "unet"): 865_910_724,
                    ("sd1.5", "vae"): 83_653_863, ("sd1.5", "text_encoder"): 123_060_480,
                    ("sd2.1-base", "text_encoder"): 340_387_840}


@pytest.mark.parametrize("name", list(PUBLISHED_UNET))
def test_sd_configs_match_the_published_checkpoints(name):
    c = fs.configs(name)
    for k, v in PUBLISHED_UNET[name].items():
        got = c["unet"].get(k)
        assert (list(got) if isinstance(got, (list, tuple)) else got) == v, (name, k, got, v)
    s = c["scheduler"]
    assert (s["beta_start"], s["beta_end"], s["beta_schedule"], s["num_train_timesteps"]) == \
        (0.00085, 0.012, "scaled_linear", 1000)
    assert s["prediction_type"] == PUBLISHED_PREDICTION[name]
    v = c["vae"]
    assert v["scaling_factor"] == 0.18215 and v["block_out_channels"] == [128, 256, 512, 512]
    assert v["latent_channels"] == 4 and v["sample_size"] == 8 * c["unet"]["sample_size"]
    t = c["text_encoder"]
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["hidden_act"]) == PUBLISHED_TEXT[name]
    assert t["hidden_size"] == c["unet"]["cross_attention_dim"]


def test_unclip_and_karlo_configs():
    c = fs.configs("sd2.1-unclip-small")
    ie = c["image_encoder"]  # image_encoder/config.json: OpenAI CLIP ViT-L/14 vision tower
    assert (ie["hidden_size"], ie["num_hidden_layers"], ie["patch_size"], ie["image_size"],
            ie["projection_dim"]) == (1024, 24, 14, 224, 768)
    assert c["image_normalizer"]["embedding_dim"] == 768
    assert c["image_noising_scheduler"] == dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    # noise-augmented embedding (768) + its level embedding (768) enter as class labels
    assert c["unet"]["projection_class_embeddings_input_dim"] == 2 * ie["projection_dim"]
    k = fs.configs("karlo-prior")
    assert k["prior"]["embedding_dim"] == 768 == ie["projection_dim"]
    assert (k["prior"]["num_layers"], k["prior"]["num_attention_heads"], k["prior"]["attention_head_dim"]) == (20, 32, 64)
    assert k["text_encoder"]["projection_dim"] == 768
    assert k["prior_scheduler"]["_class_name"] == "UnCLIPScheduler" and "beta_schedule" not in k["prior_scheduler"]
    from diffusers import UnCLIPScheduler
    sched = UnCLIPScheduler.from_config(k["prior_scheduler"])
    assert sched.config.beta_schedule == "squaredcos_cap_v2" and sched.config.clip_sample_range == 5.0


def test_scorer_and_dino_configs():
    b = fs.configs("clip-vit-b-32")["open_clip"]
    assert (b["embed_dim"], b["vision_cfg"]["width"], b["vision_cfg"]["patch_size"], b["text_cfg"]["width"]) == \
        (512, 768, 32, 512)
    h = fs.configs("openclip-vit-h-14")["open_clip"]
    assert (h["embed_dim"], h["vision_cfg"]["width"], h["vision_cfg"]["layers"], h["text_cfg"]["width"],
            h["text_cfg"]["layers"]) == (1024, 1280, 32, 1024, 24)
    d = fs.configs("dino-vitb16")["vit"]  # facebook/dino-vitb16 config.json
    assert (d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"], d["patch_size"],
            d["image_size"], d["qkv_bias"]) == (768, 12, 12, 16, 224, True)


def _meta_params(build):
    from accelerate import init_empty_weights
    with init_empty_weights():
        m = build()
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("key", list(PUBLISHED_PARAMS))
def test_parameter_counts_equal_the_released_models(key):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    name, part = key
    c = fs.configs(name)[part]
    build = {"unet": lambda: UNet2DConditionModel(**c), "vae": lambda: AutoencoderKL(**c),
             "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**c))}[part]
    assert _meta_params(build) == PUBLISHED_PARAMS[key]


def test_open_clip_and_dino_parameter_counts():
    import open_clip
    from transformers import ViTConfig, ViTModel
    n_b32 = _meta_params(lambda: open_clip.create_model("ViT-B-32", pretrained=None, device="meta"))
    n_h14 = _meta_params(lambda: open_clip.create_model("ViT-H-14", pretrained=None, device="meta"))
    assert abs(n_b32 - 151.28e6) < 0.01e6 and abs(n_h14 - 986.11e6) < 0.01e6, (n_b32, n_h14)
    n_dino = _meta_params(lambda: ViTModel(ViTConfig(**fs.DINO_VITB16), add_pooling_layer=False))
    assert n_dino == 85_798_656


def test_tokenizer_is_the_real_clip_bpe(tmp_path):
    """The CLIPTokenizer written from open_clip's BPE file tokenizes as open_clip's own tokenizer."""
    import open_clip
    tok = fs.clip_tokenizer(tmp_path / "tok")
    assert len(tok) == 49408
    ref = open_clip.get_tokenizer("ViT-L-14")
    texts = ["a photo of a cat", "Two dogs playing in the snow, at dusk!", "an astronaut riding a horse"]
    want = ref(texts)
    got = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    # open_clip pads with 0, transformers with <|endoftext|> (49407): compare up to the end token
    for w, g in zip(want, got):
        n = int((w != 0).sum())
        assert w[:n].tolist() == g[:n].tolist()
    assert fs.clip_tokenizer(tmp_path / "tok2", pad_token="!").pad_token_id == 0  # SD 2.x's pad


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="unknown full-size model 'sd3'.*sd1.5"):
        fs.folder("sd3")


def test_default_folder_is_outside_the_repository(monkeypatch):
    from t2i_common import paths
    monkeypatch.delenv("T2I_FULLSIZE", raising=False)
    f = fs.folder("sd1.5")
    assert paths.ROOT not in f.parents and f.name == "sd1.5"


# ---- written folders through the package's loaders (heavy: minutes, GBs) -----------------------
@pytest.mark.fullsize
def test_sd21_base_loads_and_evaluates_at_full_size():
    """Papers 4 and 5 (DiffusionITM, Info-Decomp): SD 2.1-base written (once; cached under
    T2I_FULLSIZE), loaded by load_t2i in fp32 from fp16 files; one 512 px image through the VAE and
    two captions through the 23-layer OpenCLIP-H text tower, then the scorers' engine
    (``engine.denoise_errors``) at one timestep: one batched UNet call at 64 x 64 latents for both
    captions, sharing the noise.  The captions' errors differ (they are conditioned) and agree with
    a direct ``eps`` call."""
    import numpy as np
    from t2i_common import engine, models
    f = fs.ensure("sd2.1-base")
    info = json.loads((f / fs.MARKER).read_text())
    assert info["random_weights"] and info["dtype"] == "torch.float16"
    m = models.load_t2i(str(f))
    assert m.unet.dtype == torch.float32 and m.text_encoder.config.num_hidden_layers == 23
    emb = m.encode_prompts(["a photo of a cat", "a photo of a dog"])
    assert tuple(emb.shape) == (2, 77, 1024)
    img = np.random.default_rng(0).integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    z0 = m.encode_images(m.preprocess(list(img)))
    assert tuple(z0.shape) == (1, 4, 64, 64)
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    out = engine.denoise_errors(m, z0, emb, torch.tensor([0, 1]), timesteps=t, noise=noise, batch_size=2)
    mse = out["mse"]
    assert tuple(mse.shape) == (1, 2, 1) and torch.isfinite(mse).all() and mse[0, 0, 0] != mse[0, 1, 0]
    a = m.alphas_cumprod[500].to(z0.dtype)
    with torch.no_grad():
        e = m.eps(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, emb[:1])
    assert torch.allclose(((e - noise) ** 2).mean(), mse[0, 0, 0], rtol=1e-4)


def test_every_notebook_has_device_and_dtype_parameters():
    """Every notebook can be moved to a GPU and to half precision by parameter."""
    from t2i_common import runner
    nbs = runner.all_notebooks()
    assert len(nbs) == 17
    for nb in nbs:
        p = runner.notebook_parameters(nb)
        assert p["device"][0] == "cpu" and p["dtype"][0] == "float32", (nb.name, p.get("device"), p.get("dtype"))


@pytest.mark.fullsize
def test_sd15_attribution_gradient_at_full_size():
    """Paper 2 (attribution, SD 1.x): the SD 1.5 folder through load_attribution_model, one
    training-loss gradient of the cross-attention K/V weights (the unlearning subset) at 64 x 64."""
    from t2i_common.attribution import files, unlearning
    m = files.load_attribution_model(str(fs.ensure("sd1.5")))
    names = set(unlearning.select_parameters(m.unet, "cross-attn-kv"))
    assert len(names) == 32  # 16 cross-attention blocks x (K, V)
    emb = m.encode_prompts(["a photo of a cat"]).clone()  # out of inference mode, for backward
    assert tuple(emb.shape) == (1, 77, 768)
    for n, p in m.unet.named_parameters():
        p.requires_grad_(n in names)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    loss = m.unet(z, torch.tensor([500]), encoder_hidden_states=emb).sample.pow(2).mean()
    loss.backward()
    grads = [p.grad for n, p in m.unet.named_parameters() if n in names]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.fullsize
def test_unclip_small_with_karlo_prior_at_full_size():
    """Paper 3 (unCLIP): the Stable unCLIP small folder with the Karlo-layout prior through
    load_unclip; one prior step and one guided decoder step at 96 x 96 latents (no VAE decode)."""
    from t2i_common.unclip import model as unclip
    m = unclip.load_unclip(str(fs.ensure("sd2.1-unclip-small")), prior=str(fs.ensure("karlo-prior")))
    assert type(m.prior_scheduler).__name__ == "UnCLIPScheduler" and m.embedding_dim == 768
    assert abs(float(m._prior_ddim(25).alphas_cumprod[500]) - 0.492) < 0.005
    z = m.prior_embeddings(["a photo of a cat"], num_steps=1, guidance_scale=4.0, seeds=[0])
    assert tuple(z.shape) == (1, 768) and torch.isfinite(z).all()
    lat = m.decode(z, ["a photo of a cat"], num_steps=1, noise_level=100, seeds=[0], output="latents")
    assert tuple(lat.shape) == (1, 4, 96, 96) and torch.isfinite(lat).all()


@pytest.mark.fullsize
@pytest.mark.parametrize("name", ["clip-vit-b-32", "openclip-vit-h-14"])
def test_scorers_at_full_size(name):
    """Paper 1 (Alignment Difficulty) and the CLIP baselines: the open_clip folders through
    load_clip, with the real BPE tokenizer."""
    import numpy as np
    from t2i_common import models
    c = models.load_clip(str(fs.ensure(name)))
    assert c.backend == "open_clip"
    img = c.encode_images([np.zeros((64, 64, 3), np.uint8)])
    txt = c.encode_texts(["a photo of a cat"])
    d = fs.configs(name)["open_clip"]["embed_dim"]
    assert img.shape == (1, d) and txt.shape == (1, d)
    assert torch.allclose(img.norm(dim=-1), torch.ones(1), atol=1e-4)


@pytest.mark.fullsize
def test_dino_features_at_full_size():
    """Paper 2's DINO baseline: the ViT-B/16 folder through self_supervised_features (CLS token)."""
    import numpy as np
    from t2i_common.attribution.baselines import self_supervised_features
    f = self_supervised_features([np.zeros((64, 64, 3), np.uint8)] * 2, str(fs.ensure("dino-vitb16")))
    assert tuple(f.shape) == (2, 768) and torch.isfinite(f).all()


def test_dry_run_plan_covers_every_notebook(tmp_path):
    """The dry-run overlay names only notebooks, every notebook's paper settings + overlay pass the
    runner's parameter checks, models point at the full-size folders, and the run is CPU float32."""
    from t2i_common import dryrun
    plan = dryrun.plan(root=tmp_path)
    assert len(plan) == 17
    for nb, params in plan:
        assert params["device"] == "cpu" and params["dtype"] == "float32", nb.stem
        for k in ("model", "clip", "clip_model", "prior", "sd_model"):
            v = params.get(k)
            if isinstance(v, str) and v.startswith(str(tmp_path)):
                assert (tmp_path / v[len(str(tmp_path)) + 1:]).name in fs.NAMES
        assert not any(isinstance(v, str) and v.startswith("/data/") for v in params.values()), nb.stem
    by = {nb.stem: p for nb, p in plan}
    assert by["40_gdbench"]["model"] == str(tmp_path / "sd2.1-base")
    assert by["30_unclip_quality"]["prior"] == str(tmp_path / "karlo-prior")
    assert by["10_ad_datasets"]["clips"] == [str(tmp_path / "clip-vit-b-32"), str(tmp_path / "openclip-vit-h-14")]
    assert by["42_hardneg"]["steps"] == 1 and by["42_hardneg"]["train_tsv"] is None
    assert by["30_unclip_quality"]["one_model_at_a_time"] is True
    # after the notebooks: attribution's real-model paths (MSCOCO command line, AbC) on SD 1.5
    extra = dryrun.extra_plan(root=tmp_path)
    assert [(n, f) for n, f, _ in extra] == [("attribution-real", tmp_path / "sd1.5")]
    cmd = extra[0][2](tmp_path / "sd1.5", tmp_path / "out")
    assert cmd[1:5] == ["-m", "t2i_common.attribution.realmodels", "check", "--model"]
    assert dryrun.plan(["attribution-real"], root=tmp_path) == []      # its name selects no notebook
    assert [n for n, _, _ in dryrun.extra_plan(["30"], root=tmp_path)] == []
    assert not list(tmp_path.iterdir())  # planning writes nothing


def test_dry_run_outputs_are_labelled(tmp_path, monkeypatch):
    from t2i_common import report
    monkeypatch.setenv("T2I_DRYRUN", "1")
    out = report.outdir("x", root=tmp_path)
    report.save_results(out, {"a": 1.0})
    assert "meaningless" in (out / "DRY_RUN.md").read_text()
    assert "meaningless" in json.loads((out / "results.json").read_text())["dry_run"]
    monkeypatch.delenv("T2I_DRYRUN")
    out2 = report.outdir("y", root=tmp_path)
    report.save_results(out2, {"a": 1.0})
    assert not (out2 / "DRY_RUN.md").exists() and "dry_run" not in json.loads((out2 / "results.json").read_text())
