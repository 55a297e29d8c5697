"""Benchmark: the Alignment Difficulty step from an embedding cache, this package against the
original's implementation structure, on a grid of sizes.

Both sides start from the same cache file on disk, written in the original's format
``{filepath: {'img_emb': (d,), 'txt_emb': (d,)}}`` (random unit vectors, text correlated with
image), and end with the AD number:

* package: ``alignment.compute_ad_from_embeddings`` (cache validated on the stacked arrays, one
  pass; structure term by blocked matrix products, tile side picked from n);
* original: ``compute_AD(save_emb_path, alpha)`` of compute_AD.py re-written without its prints:
  unpickle, collect the entries in Python lists, ``np.array(..., float32)``, LAION scaling, and
  the structure term as a Python loop over rows i with two matrix-vector products against the
  rows > i.

    .venv/bin/python bench/bench_alignment.py                      # n 500/2000/20000 x d 64/512
    .venv/bin/python bench/bench_alignment.py --ns 500 2000 --reps 5

Each cell is timed ``--reps`` times (1 for n >= 10,000, where one original run takes up to a
minute) and the fastest run is reported for each side; the ratio is original / package, so a
ratio above 1 means the package is faster.  All BLAS/torch work runs on ``--threads`` threads
(default 1).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=[500, 2000, 20_000])
    p.add_argument("--ds", type=int, nargs="+", default=[64, 512])
    p.add_argument("--reps", type=int, default=5, help="timed runs per cell below n = 10,000")
    p.add_argument("--threads", type=int, default=1, help="BLAS/torch threads for both sides")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def original_compute_ad(save_emb_path, alpha=0.8):
    """compute_AD.py's AD step (its structure, without the prints)."""
    import pickle

    import numpy as np
    with open(save_emb_path, "rb") as f:
        emb = pickle.load(f)
    img_clip, txt_clip = [], []
    for key in emb.keys():
        img_clip.append(emb[key]["img_emb"])
        txt_clip.append(emb[key]["txt_emb"])
    n = len(img_clip)
    img_clip, txt_clip = np.array(img_clip, dtype=np.float32), np.array(txt_clip, dtype=np.float32)
    sim = (np.sum(img_clip * txt_clip, axis=1) - 0.2) * 4
    sim[sim < 0] = 0
    sim[sim > 1] = 1
    feature = n - np.sum(sim)
    structure = 0
    for i in range(n - 1):
        a = np.dot(img_clip[i], img_clip[i + 1:].T)
        b = np.dot(txt_clip[i], txt_clip[i + 1:].T)
        structure += np.sum(np.abs(a - b))
    return alpha * feature / n + (1 - alpha) * structure * 2 / n ** 2


def write_cache(path, n, d, seed):
    """A cache in the original's format: n pairs of d-dim unit vectors, float32 numpy."""
    import pickle

    import torch
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    v = torch.nn.functional.normalize(0.5 * u + torch.randn(n, d, generator=g), dim=1)
    un, vn = u.numpy(), v.numpy()
    cache = {f"./data/{i:06d}.pickle": {"img_emb": un[i].copy(), "txt_emb": vn[i].copy()}
             for i in range(n)}
    with open(path, "wb") as f:
        pickle.dump(cache, f, protocol=pickle.HIGHEST_PROTOCOL)


def best_time(fn, reps):
    best, value = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main(argv=None):
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy/torch load their BLAS
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from t2i_common.implosion.alignment import compute_ad_from_embeddings

    torch.set_num_threads(args.threads)
    print(f"AD step from an embedding cache, {args.threads} thread(s), torch {torch.__version__}, "
          f"numpy {np.__version__}")
    print(f"{'n':>7} {'d':>4} {'package [s]':>12} {'original [s]':>13} {'ratio':>7} {'|AD diff|':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        warm = os.path.join(tmp, "warm.pickle")
        write_cache(warm, 64, 8, args.seed)
        compute_ad_from_embeddings(warm, args.alpha, verbose=False)  # imports, allocator warm-up
        original_compute_ad(warm, args.alpha)
        for n in args.ns:
            for d in args.ds:
                path = os.path.join(tmp, f"emb_{n}_{d}.pickle")
                write_cache(path, n, d, args.seed)
                reps = args.reps if n < 10_000 else 1
                t_pkg, res = best_time(
                    lambda: compute_ad_from_embeddings(path, args.alpha, verbose=False), reps)
                t_orig, ad_orig = best_time(lambda: original_compute_ad(path, args.alpha), reps)
                print(f"{n:>7,} {d:>4} {t_pkg:>12.4f} {t_orig:>13.4f} {t_orig / t_pkg:>6.1f}x "
                      f"{abs(res['ad'] - float(ad_orig)):>10.1e}", flush=True)
                os.unlink(path)


if __name__ == "__main__":
    main()
