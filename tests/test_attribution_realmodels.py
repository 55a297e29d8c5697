"""Attribution's real-model paths (t2i_common.attribution.realmodels) on the tiny random SD: the
original's MSCOCO files written from images, Custom-Diffusion-style customisation, and the check
that runs the command line and the AbC setting end to end (the dry run runs it at full size)."""
import json

import numpy as np
import pytest
import torch

from t2i_common import toyworld as tw
from t2i_common.attribution import realmodels as R, unlearning as A


def test_mscoco_files_have_the_original_layout_and_read_back(tiny_model, tmp_path):
    s = tw.make_samples(3, 0)
    f = R.write_mscoco_files(tiny_model, [x.image for x in s[:2]], [list(x.captions[:2]) for x in s[:2]],
                             [s[2].image], [s[2].captions[0]], tmp_path)
    C, h, w = tiny_model.unet.config.in_channels, *tiny_model.latent_shape[1:]
    lat = np.load(f["train_latents"])
    assert lat.shape == (4, C, h, w)                       # two images, then their flips
    assert np.load(f["train_text"]).shape[:2] == (2, 2)    # N images x P captions
    data = A.TrainingSet.from_npy(f["train_latents"], f["train_text"])
    q = A.QuerySet.from_npy(f["sample_dir"] / "latents.npy", f["sample_dir"] / "text_embeddings.npy",
                            f["sample_dir"] / "images")
    assert len(q) == 1 and np.array_equal(q.images[0], s[2].image)   # the PNG round trip is exact
    # the flips are the flipped images' latents, not the latents flipped
    x = tiny_model.preprocess([s[0].image])
    assert np.allclose(lat[2], tiny_model.encode_images(x.flip(-1))[0].numpy(), atol=1e-5)
    assert data.n == 2
    with pytest.raises(ValueError, match="one prompt per query"):
        R.write_mscoco_files(tiny_model, [s[0].image], [["a red circle"]], [s[1].image], [], tmp_path / "x")


def test_customisation_trains_only_the_cross_attention_kv(tiny_sd_dir, tmp_path):
    from t2i_common.models import load_t2i
    m = load_t2i(tiny_sd_dir)
    s = tw.make_samples(2, 1)
    data = A.TrainingSet.from_images(m, np.stack([x.image for x in s]), [x.captions[:1] for x in s])
    before = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    info = R.finetune_cross_attention(m, data, [0, data.n], steps=3, lr=1e-2, progress=False)
    kv = set(A.select_parameters(m.unet, "cross-attn-kv"))
    assert info["trained"] == sorted(kv) and kv
    changed = {n for n, p in m.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == kv
    assert not any(p.requires_grad for p in m.unet.parameters()) and not m.unet.training
    # seeded: the same call from the same weights gives the same weights
    m2 = load_t2i(tiny_sd_dir)
    R.finetune_cross_attention(m2, data, [0, data.n], steps=3, lr=1e-2, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(m.unet.parameters(), m2.unet.parameters()))
    with pytest.raises(ValueError, match="rows must be indices"):
        R.finetune_cross_attention(m, data, [7], steps=1, progress=False)


def test_check_runs_the_command_line_and_the_abc_setting(tiny_sd_dir, tmp_path):
    s = R.check(tiny_sd_dir, tmp_path, steps=1, gen_steps=2, progress=False)
    assert (tmp_path / "mscoco" / "results" / "influence_0.pkl").exists()
    assert (tmp_path / "mscoco" / "fisher_info.pt").exists() and (tmp_path / "DRY_RUN.md").exists()
    assert s["mscoco"]["influence_shape"] == [1]           # per training image (max over it and its flip)
    assert s["abc"]["influence_shape"] == [2]              # the exemplar, then the training image
    n_all = sum(1 for _ in A.select_parameters(R.load_t2i(tiny_sd_dir).unet, "all"))
    assert s["mscoco"]["fisher_entries"] == n_all          # the command line's Fisher: all weights
    assert json.loads((tmp_path / "summary.json").read_text())["abc"]["trained_tensors"] == \
        len(A.select_parameters(R.load_t2i(tiny_sd_dir).unet, "cross-attn-kv"))
    assert R.main(["check", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
