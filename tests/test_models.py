"""Model loading: SD-format folders, schedule maps, prompt cache, CLIP, clear errors."""
import json

import numpy as np
import pytest
import torch

from t2i_common.models import WeightsNotAvailable, load_clip, load_t2i


def test_schedule_maps(tiny_model):
    m = tiny_model
    ac = m.alphas_cumprod
    assert ac.dtype == torch.float64 and len(ac) == 1000
    t = torch.arange(1000)
    a = m.t_to_logsnr(t)
    torch.testing.assert_close(a, torch.log(ac / (1 - ac)))
    assert torch.all(a[1:] < a[:-1])  # logSNR decreases with t
    assert torch.equal(m.logsnr_to_t(a), t)  # exact round trip on the grid
    lo, hi = m.logsnr_range
    # SD's scaled_linear schedule: trained logSNR range about [-5.36, 7.07]
    assert abs(lo + 5.364) < 1e-2 and abs(hi - 7.069) < 1e-2
    assert m.logsnr_to_t(torch.tensor([100.0, -100.0])).tolist() == [0, 999]  # clamped
    mid = (a[499] + a[500]) / 2 + 1e-6
    assert int(m.logsnr_to_t(mid)) == 499


def test_prompt_embeddings_encoded_once(tiny_model, monkeypatch):
    m = tiny_model
    calls = []
    orig = m.text_encoder.forward

    def counting(ids, *a, **k):
        calls.append(ids.shape[0])
        return orig(ids, *a, **k)

    monkeypatch.setattr(m.text_encoder, "forward", counting)
    m._prompt_cache.clear()
    e = m.encode_prompts(["a red circle", "", "a red circle", "a blue square"])
    assert e.shape[0] == 4 and torch.equal(e[0], e[2])
    assert sum(calls) == 3  # three distinct prompts, the empty one included
    m.encode_prompts(["", "a blue square"])
    assert sum(calls) == 3


def test_vae_mean_vs_sample(tiny_model, tiny_images):
    x = tiny_model.preprocess(tiny_images[:2])
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    z1, z2 = tiny_model.encode_images(x), tiny_model.encode_images(x)
    assert torch.equal(z1, z2) and z1.shape == (2, *tiny_model.latent_shape)
    g = lambda: torch.Generator().manual_seed(0)
    s1 = tiny_model.encode_images(x, mode="sample", generator=g())
    s2 = tiny_model.encode_images(x, mode="sample", generator=g())
    assert torch.equal(s1, s2) and not torch.equal(s1, z1)
    assert tiny_model.decode_latents(z1).shape == x.shape
    with pytest.raises(ValueError, match="mode"):
        tiny_model.encode_images(x, mode="median")


def test_pipeline_loads_same_folder(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert pipe.unet.config.sample_size == 8


def test_generate_deterministic(tiny_model):
    a = tiny_model.generate(["a red circle", "a blue square"], num_steps=3, seed=1)
    b = tiny_model.generate(["a blue square"], num_steps=3, seed=1)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    c = tiny_model.generate(["a red circle", "a blue square"], num_steps=3, seed=1)
    assert np.array_equal(a, c)
    assert b.shape == (1, 16, 16, 3)


def test_clip_embeddings_normalised(tiny_sd_dir, tiny_images):
    clip = load_clip(tiny_sd_dir / "clip")
    t = clip.encode_texts(["a red circle", "a blue square", "a red circle"], batch_size=2)
    i = clip.encode_images(tiny_images, batch_size=3)
    assert t.shape == (3, 32) and i.shape == (4, 32)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(t[0], t[2], atol=1e-6, rtol=1e-6)


def test_unknown_model_name_is_clear():
    with pytest.raises(WeightsNotAvailable, match="unknown model 'no-such-model'.*local"):
        load_t2i("no-such-model")
    with pytest.raises(WeightsNotAvailable, match="unknown CLIP model"):
        load_clip("no-such-clip")


def test_hub_id_offline_is_clear():
    with pytest.raises(WeightsNotAvailable, match="not available offline.*huggingface-cli download "
                       "someone/not-cached-model.*load_t2i\\('/path/to/sd-folder'\\)"):
        load_t2i("someone/not-cached-model", allow_download=False)


def test_open_clip_name_offline_gives_the_clip_fix():
    """An open_clip ARCH/TAG is not a hub id: the fix is open_clip's cache or a checkpoint file."""
    for args in (("ViT-B-32/openai",), ("ViT-B-32", "openai")):
        with pytest.raises(WeightsNotAvailable) as e:
            load_clip(*args, allow_download=False)
        msg = str(e.value)
        assert "'ViT-B-32/openai'" in msg and "pretrained='openai'" in msg
        assert "load_clip('ViT-B-32', pretrained='/path/to/ViT-B-32.safetensors')" in msg
        assert "huggingface-cli download ViT-B-32" not in msg and "load_t2i" not in msg


def test_hf_clip_id_offline_gives_the_folder_fix():
    with pytest.raises(WeightsNotAvailable, match="huggingface-cli download someone/clip-x.*"
                       "load_clip\\('/path/to/clip-folder'\\)"):
        load_clip("someone/clip-x", allow_download=False)


def test_unknown_open_clip_tag_and_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="'nope' is not a pretrained tag of open_clip's ViT-B-32.*openai"):
        load_clip("ViT-B-32", pretrained="nope")
    with pytest.raises(FileNotFoundError, match="checkpoint file .*missing.pt .*does not exist"):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="needs a pretrained tag.*openai"):
        load_clip("ViT-B-32")


@pytest.fixture()
def unreachable_hub(monkeypatch):
    """A hub endpoint nothing listens on (connection refused at once)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_unreachable_hub_fails_fast(unreachable_hub):
    import time
    t0 = time.time()
    with pytest.raises(WeightsNotAvailable, match="hub cannot be reached.*huggingface-cli download "
                       "someone/not-cached-model"):
        load_t2i("someone/not-cached-model", allow_download=True)
    with pytest.raises(WeightsNotAvailable, match="hub cannot be reached.*pretrained='openai'"):
        load_clip("ViT-B-32/openai", allow_download=True)
    with pytest.raises(WeightsNotAvailable, match="hub cannot be reached.*clip-folder"):
        load_clip("someone/clip-x", allow_download=True)
    assert time.time() - t0 < 15  # huggingface_hub alone retries for minutes


def test_hub_probe_does_not_wait_for_a_hanging_resolver(monkeypatch):
    import socket
    import time

    from t2i_common import models

    def hang(*a, **k):  # a resolver that blocks, then gives up
        time.sleep(5)
        raise OSError("name resolution timed out")
    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.time()
    assert models.hub_reachable(timeout=0.5) is False
    assert time.time() - t0 < 3


def _copy_sd(tiny_sd_dir, tmp_path):
    import shutil
    d = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, d)
    return d


@pytest.mark.parametrize("damage, expected", [
    ("rm tokenizer", r"incomplete: tokenizer/ is missing"),
    ("empty unet", r"incomplete: unet/ is empty"),
    ("rm vae/config.json", r"incomplete: vae/ has no config.json"),
    ("rm scheduler", r"incomplete: scheduler/ is missing"),
    ("rm text_encoder weights", r"text_encoder/ has no \*.safetensors or \*.bin"),
])
def test_incomplete_sd_folder_names_the_component(tiny_sd_dir, tmp_path, damage, expected):
    import shutil
    d = _copy_sd(tiny_sd_dir, tmp_path)
    verb, what = damage.split(" ", 1)
    if what == "text_encoder weights":
        for w in (d / "text_encoder").glob("*.safetensors"):
            w.unlink()
    elif verb == "rm" and (d / what).is_dir():
        shutil.rmtree(d / what)
    elif verb == "rm":
        (d / what).unlink()
    else:
        shutil.rmtree(d / what)
        (d / what).mkdir()
    with pytest.raises(FileNotFoundError, match=expected + r".*Copy the missing component"):
        load_t2i(d)


def test_damaged_sd_component_names_the_file(tiny_sd_dir, tmp_path):
    from t2i_common.models import ModelFolderError
    d = _copy_sd(tiny_sd_dir, tmp_path)
    w = d / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match=r"component unet/ .*unet/diffusion_pytorch_model"
                       r"\.safetensors could not be read.*damaged or incomplete"):
        load_t2i(d)
    d2 = _copy_sd(tiny_sd_dir, tmp_path / "b")
    (d2 / "vae" / "config.json").write_text('{"in_channels": ')
    with pytest.raises(ModelFolderError, match=r"component vae/ .*vae/config\.json is not valid JSON"):
        load_t2i(d2)


def test_inconsistent_sd_components_are_named(tiny_sd_dir, tmp_path):
    from t2i_common.models import ModelFolderError
    d = _copy_sd(tiny_sd_dir, tmp_path)
    f = d / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    cfg["model_max_length"] = 77
    f.write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=r"model_max_length=77 but text_encoder/ has only \d+ "
                       r"positions; set \"model_max_length\": \d+ in tokenizer/tokenizer_config.json"):
        load_t2i(d)
    d2 = _copy_sd(tiny_sd_dir, tmp_path / "b")
    f = d2 / "unet" / "config.json"
    cfg = json.loads(f.read_text())
    cfg["cross_attention_dim"] = cfg["cross_attention_dim"] * 2
    f.write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=r"component unet/ .*could not be loaded.*expected "
                       r"shape.*check unet/config.json"):
        load_t2i(d2)


def test_cross_component_checks(tiny_model):
    """A UNet from another checkpoint: width and channels are checked by name, not in torch."""
    from types import SimpleNamespace

    from t2i_common.models import ModelFolderError, _check_consistent
    m = tiny_model
    width = m.text_encoder.config.hidden_size
    unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=width * 2, in_channels=4))
    with pytest.raises(ModelFolderError, match=rf"cross_attention_dim={width * 2} but text_encoder/ "
                       rf"produces {width}-wide"):
        _check_consistent("ckpt", m.tokenizer, m.text_encoder, m.vae, unet)
    unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=width, in_channels=9))
    with pytest.raises(ModelFolderError, match=r"in_channels=9 but vae/ has latent_channels=4.*"
                       r"not inpainting"):
        _check_consistent("ckpt", m.tokenizer, m.text_encoder, m.vae, unet)


def test_truncated_clip_folder_names_the_file(tiny_sd_dir, tmp_path):
    import shutil

    from t2i_common.models import ModelFolderError
    d = tmp_path / "clip"
    shutil.copytree(tiny_sd_dir / "clip", d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    with pytest.raises(ModelFolderError, match=r"CLIP folder .*clip/model\.safetensors could not be "
                       r"read.*damaged or incomplete"):
        load_clip(d)
    with pytest.raises(FileNotFoundError, match=r"is a file; an open_clip checkpoint file is the "
                       r"pretrained tag"):
        load_clip(w)


def test_missing_model_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*nowhere does not exist"):
        load_t2i(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"CLIP folder .*nowhere does not exist"):
        load_clip(str(tmp_path / "nowhere"))


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_t2i(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(tmp_path)


def test_missing_and_unreadable_image(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        tiny_model.preprocess([tmp_path / "nope.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        tiny_model.preprocess([bad])
    with pytest.raises(ValueError, match="no images"):
        tiny_model.preprocess([])
    with pytest.raises(ValueError, match="shape"):
        tiny_model.preprocess([np.zeros((4, 4, 5), np.uint8)])


def test_half_precision_opt_in(tiny_sd_dir):
    m = load_t2i(tiny_sd_dir, dtype=torch.bfloat16)
    assert m.unet.dtype == torch.bfloat16
    e = m.encode_prompts(["a red circle"])
    assert e.dtype == torch.bfloat16


def test_tokenizer_identical_across_processes():
    """build_tokenizer must not depend on the hash seed of the process."""
    import os
    import subprocess
    import sys
    code = ("from t2i_common.sdformat import build_tokenizer; import json; "
            "t = build_tokenizer(['a', 'red', 'circle', 'green', 'square', 'left']); "
            "print(json.dumps(t('a red circle left of a green square').input_ids))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2, 3)}
    assert len(outs) == 1


# ---- prediction types: SD 2.x at 768 px predicts v, every score is an eps error -------------------
def _relabelled(tiny_sd_dir, tmp_path, prediction_type):
    import shutil
    folder = tmp_path / f"tiny_{prediction_type}"
    shutil.copytree(tiny_sd_dir, folder)
    f = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(f.read_text())
    cfg["prediction_type"] = prediction_type
    f.write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_eps_from_output_inverts_the_parameterization(kind):
    from t2i_common.models import eps_from_output
    g = torch.Generator().manual_seed(0)
    abar = torch.linspace(0.999, 0.0, 1000, dtype=torch.float64)   # last step: zero terminal SNR
    t = torch.tensor([0, 250, 700, 998] + ([999] if kind == "v_prediction" else []))
    z0 = torch.randn(len(t), 4, 3, 3, generator=g)
    eps = torch.randn(len(t), 4, 3, 3, generator=g)
    a = abar[t].sqrt().float().view(-1, 1, 1, 1)
    s = (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1)
    zt = a * z0 + s * eps
    out = a * eps - s * z0 if kind == "v_prediction" else z0
    torch.testing.assert_close(eps_from_output(out, zt, abar, t, kind), eps, atol=1e-5, rtol=0)
    assert eps_from_output(out, zt, abar, t, "epsilon") is out


def test_v_prediction_checkpoint_scores_eps_errors(tiny_sd_dir, tmp_path, tiny_model, tiny_images):
    """The same weights labelled v_prediction: eps() is sqrt(abar) v + sqrt(1 - abar) z_t of the raw
    output, and both DiffusionITM paths (fast and the original loop) score with it."""
    from t2i_common.diffusion_itm import scoring as itm
    from t2i_common.formats import MatchItem
    vm = load_t2i(_relabelled(tiny_sd_dir, tmp_path, "v_prediction"))
    assert vm.prediction_type == "v_prediction" and tiny_model.prediction_type == "epsilon"
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, *vm.latent_shape, generator=g)
    t = torch.tensor([10, 500, 990])
    emb = vm.encode_prompts(["a red circle"] * 3)
    raw = tiny_model.eps(z, t, emb)                 # eps model: the raw output
    torch.testing.assert_close(vm.model_output(z, t, emb), raw)
    ab = vm.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(vm.eps(z, t, emb), ab.sqrt() * raw + (1 - ab).sqrt() * z,
                               atol=1e-6, rtol=0)
    item = [MatchItem([tiny_images[0]], ["a red circle", "a blue square"], 0, 1)]
    fast = itm.diffitm_scores(vm, item, S=4, seed=2, progress=False)[0]
    loop = itm.original_loop_scores(vm, item, S=4, seed=2)[0]
    torch.testing.assert_close(fast, loop, atol=1e-5, rtol=0)
    as_eps = itm.diffitm_scores(tiny_model, item, S=4, seed=2, progress=False)[0]
    assert (fast - as_eps).abs().max() > 1e-3      # the conversion changed the scores
    img = vm.generate(["a red circle"], num_steps=3, seed=1)   # DDIM in the model's own v space
    assert img.shape == (1, 16, 16, 3)


def test_unknown_prediction_type_is_named(tiny_sd_dir, tmp_path):
    with pytest.raises(ValueError, match="prediction_type 'x0'.*scheduler_config.json"):
        load_t2i(_relabelled(tiny_sd_dir, tmp_path, "x0"))
