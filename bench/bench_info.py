"""Benchmark: image-level pointwise MI i(x; caption) for one image and 5 captions at N = 100
logSNR samples, the shared engine vs a loop like the original's.

    .venv/bin/python bench/bench_info.py                       # toy checkpoint (or toy-size random model)
    .venv/bin/python bench/bench_info.py --model /path/to/sd-2-1-base --device cuda

Both compute the same estimate on the same (a_k, eps_k) draws (one pair per sample, shared by the
6 conditions = 5 captions + the empty prompt), so their values must agree; only the batching
differs:
- loop (original-like): for each sample k, one UNet call on the 6 conditions (batch 6), as
  ``DiffusionModel.mse`` does per draw; ``--loop_samples 5`` batches 5 samples per call
  (``image_level_nll_fast``'s bs_=5, batch 30);
- engine: :func:`t2i_common.info_decomp.information.pointwise_mi` -> ``engine.denoise_errors``: all 600
  evaluations in batches of ``--batch_size`` (default engine.auto_batch_size: 64 on CPU).
Prints wall times, UNet evaluations per second and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SD-format folder / hub id (default: data/toy-sd, "
                   "or a random model of the toy architecture when that is missing)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n_samples", type=int, default=100)
    p.add_argument("--loop_samples", type=int, default=1, help="samples per UNet call in the loop")
    p.add_argument("--batch_size", type=int, default=None, help="engine UNet batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (the best is reported)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_model(name, device):
    from t2i_common import paths
    from t2i_common.models import load_t2i

    if name is None and not (paths.DEFAULT_T2I / "model_index.json").exists():
        import tempfile

        from t2i_common import toyworld as tw
        from t2i_common.sdformat import TinySDConfig, build_random_sd, save_sd_folder
        parts = build_random_sd(TinySDConfig(), tw.VOCAB, seed=0)
        print("data/toy-sd missing: random-weight model of the toy architecture")
        with tempfile.TemporaryDirectory(prefix="bench_info_") as folder:
            save_sd_folder(folder, parts["tokenizer"], parts["text_encoder"], parts["vae"],
                           parts["unet"], parts["scheduler"])
            return load_t2i(folder, device=device)
    return load_t2i(name or paths.DEFAULT_T2I, device=device)


def loop_mi(model, z0, captions, n_samples, seed, per_call=1):
    """Original-like: one UNet call per draw (or per ``per_call`` draws) on all conditions."""
    import torch

    from t2i_common.info_decomp.information import Integration, draw_samples

    conds = list(captions) + [""]
    emb = model.encode_prompts(conds)
    P = len(conds)
    a, w, eps = draw_samples(Integration(), n_samples, z0.shape[1:], seed, stream=0)
    t = model.logsnr_to_t(a)
    terms = torch.zeros(P - 1, n_samples, dtype=torch.float64)
    with torch.inference_mode():
        for k0 in range(0, n_samples, per_call):
            ks = list(range(k0, min(n_samples, k0 + per_call)))
            ab = torch.sigmoid(a[ks]).float().view(-1, 1, 1, 1)
            zt = ab.sqrt() * z0[0] + (1 - ab).sqrt() * eps[ks]            # [k, C, h, w]
            zt = zt.repeat_interleave(P, 0).to(model.device, model.dtype)
            tt = t[ks].repeat_interleave(P).to(model.device)
            e = model.eps(zt, tt, emb.repeat(len(ks), 1, 1)).float().view(len(ks), P, *z0.shape[1:])
            d = (e[:, :-1] - e[:, -1:]).pow(2).flatten(2).sum(-1).double().cpu()  # [k, P-1]
            terms[:, ks] = 0.5 * w[ks] * d.T
    return terms.mean(1)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from t2i_common import toyworld as tw
    from t2i_common.info_decomp.information import pointwise_mi

    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device)
    s = tw.make_sample(args.seed, 0, kinds=("pair",))
    caps = list(dict.fromkeys(s.captions + tw.order_shuffles(s.captions[0], seed=args.seed)))[:5]
    z0 = model.encode_images(model.preprocess([s.image])).float().cpu()
    N, P = args.n_samples, len(caps) + 1
    print(f"pointwise MI, 1 image, {len(caps)} captions + empty prompt, N = {N}: {N * P} UNet "
          f"evaluations per method | model {model.name} ({sum(p.numel() for p in model.unet.parameters()) / 1e6:.1f}M "
          f"UNet params, latents {model.latent_shape}) | {args.device}, {args.threads} thread(s), torch {torch.__version__}")

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best, out

    fn_engine = lambda: pointwise_mi(model, latents=z0, captions=[caps], n_samples=N,  # noqa: E731
                                     seed=args.seed, batch_size=args.batch_size)["orthogonal"][0]
    fn_loop = lambda: loop_mi(model, z0, caps, N, args.seed, args.loop_samples)  # noqa: E731
    fn_engine()  # warm-up (prompt cache, allocator)
    t_loop, v_loop = timed(fn_loop)
    t_eng, v_eng = timed(fn_engine)
    ok = np.allclose(v_loop.numpy(), v_eng.numpy(), rtol=1e-4)
    print(f"loop   ({args.loop_samples} sample(s) x {P} conditions per UNet call): {t_loop:8.2f} s  "
          f"{N * P / t_loop:8.1f} evals/s")
    print(f"engine (batch {args.batch_size or 'auto'}):{' ' * 27}{t_eng:8.2f} s  {N * P / t_eng:8.1f} evals/s")
    print(f"speed-up engine / loop: {t_loop / t_eng:.2f}x   same MI values: {ok} "
          f"(max rel diff {float(((v_loop - v_eng).abs() / v_loop.abs()).max()):.1e})")
    print("MI per caption:", [round(float(v), 3) for v in v_eng])
    if not ok:
        raise SystemExit("engine and loop disagree")


if __name__ == "__main__":
    main()
