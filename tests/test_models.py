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
    with pytest.raises(WeightsNotAvailable, match="not available offline.*local folder"):
        load_t2i("someone/not-cached-model", allow_download=False)
    with pytest.raises(WeightsNotAvailable, match="not available offline"):
        load_clip("ViT-B-32", pretrained="openai", allow_download=False)


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
