"""Benchmark: UNet evaluations per second of the engine vs a plain loop.

The plain loop calls the UNet once per (example, condition, timestep), as the original code bases
do; the engine packs all conditions x timesteps of the same noised latents into batches.  Both
compute the same numbers (tests/test_engine.py checks them to 1e-5).

    python bench/bench_engine.py                 # toy checkpoint (or its architecture, random)
    python bench/bench_engine.py --arch sd21     # SD 2.1-base UNet architecture, random weights
"""
from __future__ import annotations

import argparse
import time

import torch

from t2i_common import paths
from t2i_common.engine import NoiseBank, denoise_errors, grid_timesteps
from t2i_common.models import T2IModel, load_t2i
from t2i_common.sdformat import (TinySDConfig, build_random_sd, build_unet, sd21_base_unet_config)


def model_for(arch: str, device: str) -> T2IModel:
    if arch == "toy" and (paths.DEFAULT_T2I / "model_index.json").exists():
        return load_t2i(paths.DEFAULT_T2I, device=device)
    words = ["a", "red", "blue", "circle", "square"]
    parts = build_random_sd(TinySDConfig(), words, seed=0)
    if arch == "sd21":
        from diffusers import UNet2DConditionModel
        cfg = sd21_base_unet_config()
        cfg.update(sample_size=32, cross_attention_dim=parts["text_encoder"].config.hidden_size)
        parts["unet"] = UNet2DConditionModel(**cfg)
    return T2IModel(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                    parts["scheduler"], name=f"random-{arch}", device=device)


def plain_loop(m, z0, emb, t, noise):
    out = torch.empty(z0.shape[0], emb.shape[0], len(t))
    with torch.inference_mode():
        for b in range(z0.shape[0]):
            for p in range(emb.shape[0]):
                for k in range(len(t)):
                    ab = m.alphas_cumprod[t[k]].float()
                    zt = ab.sqrt() * z0[b:b + 1] + (1 - ab).sqrt() * noise[k:k + 1]
                    pred = m.unet(zt.to(m.device), t[k:k + 1].to(m.device),
                                  encoder_hidden_states=emb[p:p + 1]).sample
                    out[b, p, k] = (noise[k:k + 1].to(m.device) - pred).flatten().norm().cpu()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="toy", choices=["toy", "sd21"])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--conditions", type=int, default=5)
    ap.add_argument("--S", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    m = model_for(a.arch, a.device)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn((a.images,) + m.latent_shape, generator=g)
    emb = m.encode_prompts([f"a red circle {i}" if i else "" for i in range(a.conditions)])
    t = grid_timesteps(a.S)
    noise = NoiseBank(m.latent_shape, 0).draw(len(t))
    n = a.images * a.conditions * len(t)
    # warm-up both paths once (allocator, kernels)
    denoise_errors(m, z0[:1], emb, list(range(a.conditions)), timesteps=t[:2], noise=noise[:2],
                   outputs=("l2",), batch_size=a.batch_size)
    plain_loop(m, z0[:1], emb[:1], t[:1], noise[:1])
    t0 = time.perf_counter()
    ref = plain_loop(m, z0, emb, t, noise)
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = denoise_errors(m, z0, emb, list(range(a.conditions)), timesteps=t, noise=noise,
                         outputs=("l2",), batch_size=a.batch_size)
    t_eng = time.perf_counter() - t0
    err = float((res["l2"] - ref).abs().max())
    print(f"model {m.name} on {a.device} ({torch.get_num_threads()} threads): {a.images} images x "
          f"{a.conditions} conditions x {len(t)} timesteps = {n} UNet evaluations")
    print(f"plain loop : {n / t_loop:9.1f} UNet evals/s  ({t_loop:.2f} s)")
    print(f"engine     : {n / t_eng:9.1f} UNet evals/s  ({t_eng:.2f} s)")
    print(f"ratio      : {t_loop / t_eng:9.2f}x   (max |difference| {err:.2e})")


if __name__ == "__main__":
    main()
