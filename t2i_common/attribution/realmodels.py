"""Attribution on real Stable Diffusion 1.x models: the original's MSCOCO files written from
images, the customised-model (AbC) setting with Custom-Diffusion-style fine-tuning, and a check of
both at full size.

* :func:`write_mscoco_files` encodes training images (and their horizontal flips) and captions,
  and query images and prompts, with an SD folder's VAE and text encoder into the file layout the
  original's ``mscoco/compute_influence.py`` reads (``coco17_train_latents.npy``,
  ``coco17_train_text_embeddings.npy``, ``sample/latents.npy``, ``sample/text_embeddings.npy``,
  ``sample/images/{i}.png``), which ``python -m t2i_common.attribution`` then attributes.
* :func:`finetune_cross_attention` customises a model on exemplar rows as Custom Diffusion
  (Kumari et al., CVPR '23) does for the AbC benchmark (Wang et al., ICCV '23; the paper's
  customised SD 1.4 models): only the cross-attention key/value projections are trained, with the
  diffusion loss in the model's own parameterisation.  The modifier token V* of Custom Diffusion
  is not learned: the exemplars' captions name the concept directly.
* ``python -m t2i_common.attribution.realmodels check --model SD_FOLDER --out DIR`` runs both
  paths end to end with every size cut (the dry run of ``python -m t2i_common.dryrun`` calls it on
  the full-size random-weight SD 1.5): the MSCOCO command line (loss pass, all-weights Fisher,
  one unlearning, ``influence_0.pkl``), then the AbC setting (fine-tune, generate a query,
  attribute it over exemplars + training set with the base model's Fisher).  The numbers mean
  nothing; the run shows that every shape, memory and file path of the real models works.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import files as AF, unlearning as A
from .. import report, toyworld, validate as V
from ..imageio import to_pil
from ..models import load_t2i
from ..trainloop import _fit


def write_mscoco_files(model, images, captions, query_images, query_prompts, out) -> dict:
    """The original's MSCOCO attribution files under ``out``: ``data/`` (training latents
    [2N, C, h, w], images then their flips, and text embeddings [N, P, L, D]) and ``sample/``
    (query latents [Q, C, h, w], text embeddings [Q, 1, L, D], ``images/{i}.png``).  ``model``: a
    ``models.T2IModel`` (its VAE posterior mean and text encoder).  Returns the paths."""
    if len(query_images) != len(query_prompts) or not len(query_images):
        raise V.BadInput(f"write_mscoco_files: {len(query_images)} query images for "
                         f"{len(query_prompts)} prompts; give one prompt per query (at least one)")
    out = Path(out)
    data = A.TrainingSet.from_images(model, np.asarray(images), captions)
    lat_f, txt_f = data.save_npy(out / "data")
    s = out / "sample"
    (s / "images").mkdir(parents=True, exist_ok=True)
    q_lat = model.encode_images(model.preprocess(list(query_images))).float().cpu()
    q_txt = model.encode_prompts(list(query_prompts)).float().cpu()[:, None]
    np.save(s / "latents.npy", q_lat.numpy())
    np.save(s / "text_embeddings.npy", q_txt.numpy())
    for i, im in enumerate(query_images):
        to_pil(im).save(s / "images" / f"{i}.png")
    return dict(dataroot=out / "data", sample_dir=s, train_latents=lat_f, train_text=txt_f)


def finetune_cross_attention(model, data: A.TrainingSet, rows, *, steps: int, lr: float = 1e-5,
                             batch_size: int = 1, seed: int = 0, subset: str = "cross-attn-kv",
                             progress: bool = True) -> dict:
    """Fine-tune ``model.unet``'s ``subset`` weights (default the cross-attention K/V projections,
    Custom Diffusion's trainable set) in place on the training rows ``rows`` of ``data`` (e.g. the
    exemplars and their flips), with the loss || target - unet(z_t, t, c) ||^2 in the model's own
    prediction type (eps, v or x0), t ~ U{0..T-1}, one random caption of the row.  Seeded; runs
    through :func:`t2i_common.trainloop._fit` (Accelerate).  Returns the loop's info."""
    rows = torch.as_tensor(list(rows), dtype=torch.long)
    if not len(rows) or int(rows.min()) < 0 or int(rows.max()) >= len(data.latents):
        raise V.BadInput(f"finetune_cross_attention: rows must be indices into the {len(data.latents)} "
                         f"training rows, got {rows.tolist()}")
    names = set(A.select_parameters(model.unet, subset))
    unet = model.unet
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    abar = model.alphas_cumprod.float()
    T, P, pt = len(abar), data.text_emb.shape[1], model.prediction_type
    dev, dt = model.device, model.dtype

    def loss_fn(net, g):
        pick = rows[torch.randint(len(rows), (batch_size,), generator=g)]
        cap = torch.randint(P, (batch_size,), generator=g)
        t = torch.randint(T, (batch_size,), generator=g)
        z0 = data.latents[pick]
        eps = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * z0,
                  "sample": z0}[pt]
        emb = data.text_emb[pick % data.n, cap]
        out = net(zt.to(dev, dt), t.to(dev), encoder_hidden_states=emb.to(dev, dt)).sample
        return F.mse_loss(out.float(), target.to(out.device))

    try:
        _, _, info = _fit("customise", unet, loss_fn, steps=steps, lr=lr, seed=seed, warmup=0,
                          progress=progress, desc="customise (cross-attn K/V)",
                          hparams=dict(subset=subset, rows=rows.tolist(), batch_size=batch_size))
    finally:
        unet.requires_grad_(False).eval()
    return dict(info, trained=sorted(names))


def check(model_folder, out, *, seed: int = 0, steps: int = 1, gen_steps: int = 1,
          progress: bool = True) -> dict:
    """Both real-model attribution paths end to end on ``model_folder`` (an SD 1.x folder), every
    size cut: one training image, one query, one loss timestep, one Fisher epoch in chunks of one
    row, one unlearning draw; AbC: one exemplar, ``steps`` fine-tuning steps, a query generated in
    ``gen_steps`` steps.  Writes under ``out``; returns what was produced and the wall times."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = toyworld.make_samples(3, seed)
    times, t0 = {}, time.time()
    # ---- the MSCOCO command line on files written in the original's format
    m = load_t2i(model_folder)
    f = write_mscoco_files(m, [samples[0].image], [list(samples[0].captions[:1])],
                           [samples[2].image], [samples[2].captions[0]], out / "mscoco")
    del m
    gc.collect()
    fisher_f, loss_f = out / "mscoco" / "fisher_info.pt", out / "mscoco" / "pretrain_loss.npy"
    argv = ["--model", str(model_folder), "--dataroot", str(f["dataroot"]), "--sample_dir",
            str(f["sample_dir"]), "--result_dir", str(out / "mscoco" / "results"), "--sample_idx", "0",
            "--fisher_path", str(fisher_f), "--pretrain_loss_path", str(loss_f),
            "--loss_time_samples", "1", "--fisher_epochs", "1", "--fisher_chunk", "1",
            "--unlearn_batch_size", "1", "--unlearn_grad_accum_steps", "1", "--device", "cpu",
            "--seed", str(seed)]
    if AF.main(argv) != 0:
        raise RuntimeError(f"the attribution command line failed on {model_folder} (arguments {argv})")
    influence = A.load_influence(out / "mscoco" / "results", 0)
    times["mscoco_cli_s"] = round(time.time() - t0, 1)
    # ---- AbC: customise on one exemplar, generate a query, attribute over exemplar + training set
    t1 = time.time()
    m = load_t2i(model_folder)
    ex, train = samples[1], samples[0]
    data = A.TrainingSet.from_images(m, np.stack([ex.image, train.image]),
                                     [list(ex.captions[:1]), list(train.captions[:1])])
    names = A.select_parameters(m.unet, "cross-attn-kv")
    fisher = A.check_fisher(A.read_fisher(fisher_f), m.unet, names, fisher_f)   # the base model's
    info = finetune_cross_attention(m, data, [0, data.n], steps=steps, seed=seed, progress=progress)
    prompt = ex.captions[0]
    img = m.generate([prompt], num_steps=gen_steps, guidance_scale=3.0, seed=seed + 1)
    queries = A.QuerySet(m.encode_images(m.preprocess(list(img))).float().cpu(),
                         m.encode_prompts([prompt]).float().cpu(), np.asarray(img), [prompt])
    loss = A.training_loss(m, data, time_samples=1, seed=seed, progress=progress)
    abc = A.attribute_by_unlearning(m, data, queries, fisher, loss, out_dir=out / "abc" / "results",
                                    lr=0.01, n_batches=1, batch_size=1, time_samples=1, seed=seed,
                                    n_train=data.n, progress=progress)
    times["abc_s"] = round(time.time() - t1, 1)
    summary = dict(
        model=str(model_folder), label=report.DRY_RUN_LABEL, times=times,
        mscoco=dict(files={k: str(v) for k, v in f.items()}, fisher=str(fisher_f),
                    fisher_entries=len(A.read_fisher(fisher_f)), influence_shape=list(
                        np.shape(influence["influence"]))),
        abc=dict(trained_tensors=len(info["trained"]), steps=steps, query=prompt,
                 influence_shape=list(np.shape(abc[0]["influence"]))))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "DRY_RUN.md").write_text(report.DRY_RUN_LABEL + "\n")
    return summary


def _run(argv):
    ap = argparse.ArgumentParser(prog="python -m t2i_common.attribution.realmodels",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="both real-model paths end to end, every size cut")
    c.add_argument("--model", required=True, help="SD 1.x folder (e.g. the full-size sd1.5 of "
                                                  "python -m t2i_common.fullsize)")
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=1, help="AbC fine-tuning steps")
    c.add_argument("--gen-steps", type=int, default=1, help="DDIM steps of the AbC query")
    a = ap.parse_args(argv)
    if AF.check_model_folder(a.model) != "sd":
        raise V.BadInput(f"--model: {a.model} is a bare UNet folder; the check encodes images and "
                         f"prompts, so it needs a Stable-Diffusion folder (model_index.json)")
    s = check(a.model, a.out, seed=V.count(a.seed, "--seed", low=0), steps=V.count(a.steps, "--steps"),
              gen_steps=V.count(a.gen_steps, "--gen-steps"))
    print(json.dumps(s["times"]))


def main(argv=None) -> int:
    return V.cli(_run, "python -m t2i_common.attribution.realmodels", argv)


if __name__ == "__main__":
    sys.exit(main())
