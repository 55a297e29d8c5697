"""The toy attribution world, exact retraining, the counterfactual measures and the original's
file-based (MSCOCO) path on a tiny model."""
import numpy as np
import pytest
import torch

from t2i_common.attribution import files as AF
from t2i_common.attribution import unlearning as A
from t2i_common.attribution import counterfactual as CF

TINY_WORLD = dict(n_train=12, k=2, steps=3, batch_size=4, warmup=1, unet_channels=(32, 64))


@pytest.mark.parametrize("rare", ["colour", "combination"])
def test_world_places_rare_concepts_in_exactly_k_images(rare):
    w = CF.AttributionWorld(n_train=40, k=3, rare=rare)
    samples, where = CF.make_world(w)
    for (c, s), idx in where.items():
        assert len(idx) == 3
        has = [i for i, smp in enumerate(samples)
               if any(o.colour == c and o.shape == s for o in smp.scene.objects)]
        assert has == sorted(idx.tolist())
        # rare="colour": the colour word and colour occur in the concept's k images only
        has_colour = [i for i, smp in enumerate(samples) if any(o.colour == c for o in smp.scene.objects)]
        if rare == "colour":
            assert has_colour == sorted(idx.tolist())
            assert not any(c in cap for i, smp in enumerate(samples) if i not in idx for cap in smp.captions)
        else:
            assert len(has_colour) > 3
    ab = tuple(w.abc_concept)
    assert not any((o.colour, o.shape) == ab for smp in samples for o in smp.scene.objects)
    ex = CF.abc_exemplars(w, 3)
    assert all((o.colour, o.shape) == ab for e in ex for o in e.scene.objects)


def test_bad_world_settings_are_errors():
    with pytest.raises(ValueError, match="distinct colours"):
        CF.make_world(CF.AttributionWorld(concepts=(("purple", "diamond"), ("purple", "circle"))))
    with pytest.raises(ValueError, match="at most 2 concepts"):
        CF.make_world(CF.AttributionWorld(concepts=(("purple", "diamond"), ("yellow", "circle"),
                                                    ("red", "square"))))
    with pytest.raises(ValueError, match="rare must be"):
        CF.make_world(CF.AttributionWorld(rare="shape"))


def test_retraining_with_nothing_removed_reproduces_the_base_exactly(tmp_path):
    w = CF.AttributionWorld(**TINY_WORLD)
    samples, _ = CF.make_world(w)
    m1, _ = CF.train_world_model(w, samples, cache_root=tmp_path / "a", progress=False)
    m2, _ = CF.train_world_model(w, samples, cache_root=tmp_path / "b", progress=False)
    assert A.weights_fingerprint(m1.unet) == A.weights_fingerprint(m2.unet)
    m3, info = CF.train_world_model(w, samples, exclude=[0, 5], cache_root=tmp_path / "a",
                                    progress=False)
    assert info["n_train"] == 10 and info["removed"] == 2
    assert A.weights_fingerprint(m3.unet) != A.weights_fingerprint(m1.unet)
    # cached by the removed set: a second call loads the same weights
    m4, _ = CF.train_world_model(w, samples, exclude=[5, 0], cache_root=tmp_path / "a",
                                 progress=False)
    assert A.weights_fingerprint(m4.unet) == A.weights_fingerprint(m3.unet)
    # the counterfactual measures: an unchanged model has Delta L exactly 0 (shared noise)
    q = CF.generate_queries(m1, ["a purple diamond"], num_steps=2)
    np.testing.assert_array_equal(CF.query_loss(m1, q, time_samples=4, n_noise=1),
                                  CF.query_loss(m2, q, time_samples=4, n_noise=1))
    np.testing.assert_array_equal(CF._query_loss_at(m1, q, 0, 4, 1, 0),
                                  CF.query_loss(m1, q, time_samples=4, n_noise=1))
    g = CF.generation_change(m1, m2, ["a purple diamond"], num_steps=2)
    assert g["mse"][0] == 0.0
    g = CF.generation_change(m1, m3, ["a purple diamond"], num_steps=2)
    assert g["mse"][0] > 0.0


def test_masked_retraining_is_train_unet_with_removed_terms_dropped(tmp_path):
    """With nothing removed, the masked loop is train_unet's run (same init and draws); removing
    images changes the weights; the 'resample' variant (the paper's) also reproduces itself."""
    import dataclasses

    from t2i_common.toyworld import training

    w = CF.AttributionWorld(**TINY_WORLD)
    samples, _ = CF.make_world(w)
    base = CF._components(w.base)
    cfg = CF._cfg(w, base)
    kw = dict(caption_dropout=w.caption_dropout, batch_size=4, lr=w.lr, seed=0, warmup=1,
              scheduler=base.scheduler, progress=False)
    pairs = training.toy_training_pairs(samples)
    masked, _ = CF.train_unet_masked(pairs, np.zeros(len(samples), bool), base.text_encoder,
                                     base.vae, base.tokenizer, cfg, 3, **kw)
    ref, _ = training.train_unet(pairs, base.text_encoder, base.vae, base.tokenizer, cfg, 3,
                                 ema_decay=None, **kw)
    for (n, a), (_, b) in zip(masked.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)
    rs = dataclasses.replace(w, retrain="resample")
    r1, _ = CF.train_world_model(rs, samples, exclude=[1], cache_root=tmp_path / "a", progress=False)
    r2, _ = CF.train_world_model(rs, samples, exclude=[1], cache_root=tmp_path / "b", progress=False)
    assert A.weights_fingerprint(r1.unet) == A.weights_fingerprint(r2.unet)
    with pytest.raises(ValueError, match="retrain must be"):
        CF.train_world_model(dataclasses.replace(w, retrain="x"), samples, cache_root=tmp_path / "c",
                             progress=False)


# ------------------------------------------------------------------------------------------------
# the original's MSCOCO files on a tiny model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mscoco_files(tmp_path_factory, tiny_model, tiny_images):
    from PIL import Image

    root = tmp_path_factory.mktemp("mscoco")
    data = A.TrainingSet.from_images(tiny_model, np.stack(tiny_images),
                                     [["a red circle", "a small red circle"], ["a blue square"],
                                      ["a green triangle"], ["a purple diamond"]])
    data.save_npy(root)                                      # coco17_train_*.npy
    tiny_model.unet.save_pretrained(root / "unet")           # a bare diffusers UNet folder
    s = root / "sample"
    (s / "images").mkdir(parents=True)
    np.save(s / "latents.npy", data.latents[[1, 2]].numpy())
    np.save(s / "text_embeddings.npy", data.text_emb[[1, 2], :1].numpy())   # [Q, 1, L, D]
    for i in range(2):
        Image.fromarray(tiny_images[i + 1]).save(s / "images" / f"{i}.png")
    return root


def test_mscoco_file_path_on_a_tiny_model(mscoco_files, tmp_path):
    r = mscoco_files
    out = tmp_path / "results"
    kw = dict(query_images=r / "sample" / "images", n_batches=1, batch_size=4, time_samples=5,
              fisher_epochs=1, progress=False, lr=10.0)
    res = AF.attribute_from_files(r / "unet", r / "coco17_train_latents.npy",
                                 r / "coco17_train_text_embeddings.npy", r / "sample" / "latents.npy",
                                 r / "sample" / "text_embeddings.npy", out, indices=[1],
                                 fisher_path=tmp_path / "fisher_info.pt",
                                 pretrain_loss_path=tmp_path / "pretrain_loss.npy", **kw)
    assert (out / "influence_1.pkl").exists() and not (out / "influence_0.pkl").exists()
    assert (tmp_path / "fisher_info.pt").exists() and np.load(tmp_path / "pretrain_loss.npy").shape == (8,)
    back = A.load_influence(out, 1)
    assert back["influence"].shape == (4,) and sorted(back["rank"].tolist()) == [0, 1, 2, 3]
    np.testing.assert_array_equal(back["influence"], res[1]["influence"])
    # the bare UNet gets the original's DDPMScheduler(1000) (linear betas)
    m = AF.load_attribution_model(r / "unet")
    assert m.num_train_timesteps == 1000 and m.alphas_cumprod[0] == pytest.approx(1 - 1e-4)
    # bad query index: a clear error before any model work
    with pytest.raises(IndexError, match="query index 2 is out of range"):
        AF.attribute_from_files(r / "unet", r / "coco17_train_latents.npy",
                               r / "coco17_train_text_embeddings.npy", r / "sample" / "latents.npy",
                               r / "sample" / "text_embeddings.npy", out, indices=[2], **kw)
    # a pretrain loss of the wrong length
    np.save(tmp_path / "bad_loss.npy", np.zeros(5))
    with pytest.raises(ValueError, match="bad_loss.npy has shape"):
        AF.attribute_from_files(r / "unet", r / "coco17_train_latents.npy",
                               r / "coco17_train_text_embeddings.npy", r / "sample" / "latents.npy",
                               r / "sample" / "text_embeddings.npy", out, indices=[0],
                               pretrain_loss_path=tmp_path / "bad_loss.npy", **kw)
    with pytest.raises(FileNotFoundError, match="neither a Stable-Diffusion folder"):
        AF.load_attribution_model(tmp_path)


def test_oracle_ranking_puts_the_ground_truth_first():
    r = CF.oracle_ranking([np.array([3, 1]), np.array([0])], 5)
    np.testing.assert_array_equal(r[0], [3, 1, 0, 2, 4])
    np.testing.assert_array_equal(r[1], [0, 1, 2, 3, 4])
    from t2i_common.attribution import baselines as B
    assert B.recall_at_k(r[0], [1, 3], k=2) == 1.0
