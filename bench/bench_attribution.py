"""Benchmark: the two hot loops of attribution by unlearning.

1. Training-set loss pass: :func:`t2i_common.attribution.unlearning.training_loss` (the engine, all captions
   x timesteps of a noised latent in one UNet batch) against the original's loop structure
   (``collect_loss``: per batch of images, latents repeated captions x timesteps, one ``randn``
   per batch, ``add_noise``, one UNet call, reshape-mean).  Same rows, same UNet, same number of
   evaluations; the noise differs (the original's is per batch), so only the time is compared.
2. Fisher per-sample gradients: ``torch.func`` vmap of grad against a loop of single-sample
   gradients (tests/test_attribution.py checks they are equal).

    python bench/bench_attribution.py                  # toy checkpoint's UNet
    python bench/bench_attribution.py --rows 128 --samples 64 --threads 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from t2i_common.attribution import unlearning as A
from t2i_common import toyworld as tw
from t2i_common.models import load_t2i


def original_loop_loss(model, data, time_samples=20, batch_size=8000, seed=0):
    """The original's ``collect_loss`` structure (written for this benchmark)."""
    P = data.text_emb.shape[1]
    small = max(1, batch_size // time_samples // P)
    ts = A.loss_timesteps(time_samples, model.num_train_timesteps)
    abar = model.alphas_cumprod.float()
    out = []
    with torch.inference_mode():
        for b, s in enumerate(range(0, len(data.latents), small)):
            r = torch.arange(s, min(s + small, len(data.latents)))
            lat = data.latents[r].repeat_interleave(P * time_samples, dim=0)
            cond = data.text_emb[r % data.n].reshape(-1, *data.text_emb.shape[2:])
            cond = cond.repeat_interleave(time_samples, dim=0)
            t = ts.repeat(len(r) * P)
            g = torch.Generator().manual_seed(seed + b)
            noise = torch.randn(lat.shape, generator=g)
            a = abar[t].view(-1, 1, 1, 1)
            pred = model.eps(a.sqrt() * lat + (1 - a).sqrt() * noise, t, cond)
            loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            out.append(loss.view(len(r), P, time_samples).mean(dim=(1, 2)).double().numpy())
    return np.concatenate(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--rows", type=int, default=64, help="training images (x2 with flips)")
    ap.add_argument("--time-samples", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256, help="UNet evaluations per call, both")
    ap.add_argument("--samples", type=int, default=32, help="per-sample gradients for the Fisher")
    ap.add_argument("--subset", default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_t2i(a.model)
    samples = tw.make_samples(a.rows, 0)
    data = A.TrainingSet.from_images(model, np.stack([s.image for s in samples]),
                                     [s.captions[:2] for s in samples])
    P = data.text_emb.shape[1]

    def best(fn):
        ts = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    n_eval = len(data.latents) * P * a.time_samples
    t_engine = best(lambda: A.training_loss(model, data, time_samples=a.time_samples,
                                            batch_size=a.batch_size, chunk=64, progress=False))
    t_orig = best(lambda: original_loop_loss(model, data, a.time_samples, a.batch_size))
    print(f"loss pass, {n_eval} UNet evaluations ({len(data.latents)} rows x {P} captions x "
          f"{a.time_samples} timesteps):")
    print(f"  engine (training_loss)   {t_engine:7.2f} s  {n_eval / t_engine:8.0f} eval/s")
    print(f"  original loop structure  {t_orig:7.2f} s  {n_eval / t_orig:8.0f} eval/s")
    print(f"  ratio original / engine: {t_orig / t_engine:.2f}")

    names = A.select_parameters(model.unet, a.subset)
    g = torch.Generator().manual_seed(0)
    B = min(a.samples, len(data.latents))
    z0 = data.latents[:B]
    t = torch.randint(model.num_train_timesteps, (B,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    emb = data.text_emb[torch.arange(B) % data.n, 0]
    abar = model.alphas_cumprod.float()
    t_vmap = best(lambda: A.per_sample_grads(model.unet, names, z0, t, emb, eps, abar, how="vmap"))
    t_loop = best(lambda: A.per_sample_grads(model.unet, names, z0, t, emb, eps, abar, how="loop"))
    n_par = sum(p.numel() for n, p in model.unet.named_parameters() if n in names)
    print(f"Fisher per-sample gradients, {B} samples x {n_par} parameters ({a.subset}):")
    print(f"  vmap(grad)          {t_vmap:7.2f} s")
    print(f"  loop of grad        {t_loop:7.2f} s")
    print(f"  ratio loop / vmap: {t_loop / t_vmap:.2f}")


if __name__ == "__main__":
    main()
