"""Worker of tests/test_distributed.py, started by ``accelerate launch --cpu --num_processes N``.

``score``: MI relation-testing scores (:func:`t2i_common.info_decomp.information.aro_scores`) of toy items on
the toy checkpoint and the attribution training-loss pass, sharded over the launched processes
through the shared cache; each rank writes its complete results and its :class:`~t2i_common.distributed.MapStats` to ``--out``.
``--kill-rank R --kill-after K``: rank R dies (``os._exit``) when it starts its (K+1)-th batch,
after K batches are in the cache (a lost process).
``lora``: a few data-parallel HardNeg LoRA steps on the toy checkpoint
(:func:`t2i_common.diffusion_itm.hardneg.finetune_hardneg`, 2 micro-batches per step: one per process).
``train``: a few data-parallel steps of the toy UNet (:func:`t2i_common.toyworld.training.train_unet`);
the main process writes the loss curve and the weights (``--stage vae`` / ``clip`` /
``unclip_prior`` / ``unclip_decoder`` (with ``--sd-folder``): those stages).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def toy_items(n: int, seed: int = 3):
    """n ARO-style items: a toy image with its caption and the caption with two words swapped."""
    from t2i_common import toyworld as tw

    items = []
    for s in tw.make_samples(n, seed, kinds=("single",)):
        cap = s.captions[0]
        words = cap.split()
        alt = " ".join(words[:-2] + [words[-1], words[-2]])
        items.append({"image_options": [s.image], "caption_options": [cap, alt]})
    return items


def attribution_loss(model, items, cache):
    """The attribution paper's training-set loss pass over 4 toy images (8 rows with the flips),
    chunks of 2 rows, cached: under accelerate launch every process computes its chunks."""
    from t2i_common.attribution import unlearning as A
    from t2i_common.cache import ResultCache

    ts = A.TrainingSet.from_images(model, np.stack([it["image_options"][0] for it in items[:4]]),
                                   [[it["caption_options"][0]] for it in items[:4]])
    rc = ResultCache("dist_test_loss", {"n": 4}, root=cache) if cache else None
    return A.training_loss(model, ts, time_samples=2, chunk=2, cache=rc, progress=False)


def score(a):
    from t2i_common import distributed
    from t2i_common.info_decomp import information as infotheory
    from t2i_common.cache import ResultCache
    from t2i_common.models import load_t2i

    model = load_t2i("toy")
    items = toy_items(a.n)
    rank = distributed.resolve_shard().rank
    if a.kill_after is not None and rank == a.kill_rank:
        inner, calls = infotheory.pointwise_mi, [0]

        def dying(*args, **kw):
            if calls[0] == a.kill_after:
                os._exit(3)
            calls[0] += 1
            return inner(*args, **kw)

        infotheory.pointwise_mi = dying
    rc = ResultCache("dist_test", dict(n=a.n, samples=a.samples), root=a.cache)
    res = infotheory.aro_scores(model, items, n_samples=a.samples, estimator="both", cache=rc,
                                images_per_call=a.chunk, progress=False)
    st = distributed.last_stats
    res["training_loss"] = attribution_loss(model, items, a.cache)
    out = Path(a.out)
    np.savez(out / f"scores_rank{rank}.npz", **res)
    (out / f"stats_rank{rank}.json").write_text(json.dumps(dict(
        rank=st.shard.rank, world=st.shard.world, source=st.shard.source, mine=st.mine,
        computed=st.computed, reused=st.reused, missing=st.missing)))


def train(a):
    from accelerate import PartialState

    from t2i_common import sdformat
    from t2i_common.toyworld import training as T
    from tests.test_training import _pairs
    from tests.conftest import TINY_WORDS
    from transformers import CLIPModel

    cfg = sdformat.TinySDConfig.tiny()
    tok = sdformat.build_tokenizer(TINY_WORDS, max_length=cfg.max_length)
    torch.manual_seed(0)
    clip = CLIPModel(sdformat.clip_config(cfg, tok))
    te, vae = sdformat.text_encoder_from_clip(clip), sdformat.build_vae(cfg)
    kw = dict(batch_size=a.batch, lr=2e-3, warmup=2, seed=1, progress=False, out_dir=a.ckpt,
              ckpt_every=a.ckpt_every)
    if a.stage.startswith("unclip_"):
        unet, info = unclip_train(a.stage, a.sd_folder, a.steps, a.batch, a.grad_accum, a.ckpt,
                                  a.ckpt_every)
    elif a.stage == "unet":
        unet, info = T.train_unet(_pairs(), te, vae, tok, cfg, a.steps, ema_decay=None,
                                  grad_accum=a.grad_accum, **kw)
    elif a.stage == "vae":
        unet, info = T.train_vae(np.stack([p[0] for p in _pairs()]), cfg, a.steps,
                                 grad_accum=a.grad_accum, **kw)
    else:
        unet, info = T.train_clip(_pairs(), cfg, tok, a.steps, **kw)
    if PartialState().is_main_process:
        torch.save(dict(losses=info["losses"], state=unet.state_dict(), world=info["world_size"],
                        resumed_from=info["resumed_from"]), Path(a.out) / "train.pt")


def unclip_train(stage, sd_folder, steps, batch, grad_accum=1, ckpt=None, ckpt_every=2):
    """A few steps of the unCLIP prior or decoder on 32 toy images at the tiny SD's size (also the
    one-process reference of tests/test_distributed.py)."""
    from t2i_common import toyworld as tw
    from t2i_common.toyworld import training
    from t2i_common.unclip import training as ut

    samples = tw.make_samples(32, 0)
    pairs = training.PairData(torch.from_numpy(np.stack(
        [np.asarray(tw.to_pil(s.image).resize((16, 16))) for s in samples])), [s.captions for s in samples])
    parts = ut.unclip_components_from_sd(sd_folder, prior_layers=1)
    zi = ut.image_embeddings(parts["image_encoder"], pairs.images)
    parts = ut.unclip_components_from_sd(sd_folder, embed_mean=zi.mean(0), embed_std=zi.std(0),
                                         prior_layers=1)
    kw = dict(batch_size=batch, lr=2e-3, warmup=2, seed=1, progress=False, out_dir=ckpt,
              ckpt_every=ckpt_every, ema_decay=None, grad_accum=grad_accum)
    if stage == "unclip_prior":
        return ut.train_prior(pairs, parts["prior"], parts["prior_text_encoder"], parts["prior_tokenizer"],
                              zi, parts["prior_scheduler"], steps, **kw)
    return ut.train_decoder(pairs, parts["unet"], parts["text_encoder"], parts["vae"], parts["tokenizer"],
                            zi, parts["image_normalizer"], parts["image_noising_scheduler"],
                            parts["scheduler"], steps, **kw)


def lora_data():
    """HardNeg data of 4 toy images: captions, swapped-word hard negatives, image negatives."""
    from t2i_common.diffusion_itm import hardneg as lora

    items = toy_items(4, seed=5)
    return lora.HardNegData([it["image_options"][0] for it in items],
                            [it["caption_options"][0] for it in items],
                            [[it["caption_options"][1]] for it in items], [[1], [0], [3], [2]])


def lora_cfg(steps):
    from t2i_common.diffusion_itm import hardneg as lora

    return lora.HardNegConfig(batch_size=2, grad_accum=2, steps=steps, lr=1e-3, val_every=1000,
                              ckpt_every=1000)


def lora_train(a):
    from accelerate import PartialState

    from t2i_common.diffusion_itm import hardneg as lora
    from t2i_common.models import load_t2i

    model = load_t2i("toy")
    hist = lora.finetune_hardneg(model, lora_data(), None, lora_cfg(a.steps), progress=False)
    if PartialState().is_main_process:
        torch.save(dict(history=hist.to_dict("list"), state=lora.lora_state_dict(model)),
                   Path(a.out) / "lora.pt")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["score", "train", "lora"])
    p.add_argument("--out", required=True)
    p.add_argument("--cache")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--chunk", type=int, default=2)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--kill-after", type=int, default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--stage", choices=["unet", "vae", "clip", "unclip_prior", "unclip_decoder"],
                   default="unet")
    p.add_argument("--sd-folder", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    {"score": score, "train": train, "lora": lora_train}[a.task](a)


if __name__ == "__main__":
    main()
