"""Benchmark: exact structure term of Alignment Difficulty, blocked matrix products vs the original's
row-by-row loop (a Python loop over rows i, each row two matrix-vector products against rows > i,
as in compute_AD.py), on the same random normalised embeddings in the same run.

    .venv/bin/python bench/bench_alignment.py                # n = 20,000, d = 512, 1 thread
    .venv/bin/python bench/bench_alignment.py --n 5000 --threads 2

The loop is first timed on its first ``--probe_rows`` rows; if the whole loop is predicted to take
longer than ``--max_loop_s`` (default 300 s), it is run in full at a smaller n instead and its time
extrapolated to n by the exact pair count (n^2 scaling), and the output says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="BLAS/torch threads for both methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe_rows", type=int, default=500)
    p.add_argument("--max_loop_s", type=float, default=300.0)
    p.add_argument("--small_n", type=int, default=8000, help="loop size when extrapolating")
    return p.parse_args(argv)


def rowloop_structure(img, txt):
    """The original algorithm: for each row i, |img_i . img_{>i} - txt_i . txt_{>i}| summed;
    D_stru = 2 * sum / n^2 (numpy float32, one row per Python iteration)."""
    import numpy as np
    n = len(img)
    total = 0.0
    for i in range(n - 1):
        total += np.sum(np.abs(np.dot(img[i], img[i + 1:].T) - np.dot(txt[i], txt[i + 1:].T)))
    return total * 2 / n ** 2


def main(argv=None):
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy/torch load their BLAS
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from t2i_common.alignment import structure_ad

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    u = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1)
    v = torch.nn.functional.normalize(0.5 * u + torch.randn(args.n, args.d, generator=g), dim=1)
    un, vn = u.numpy(), v.numpy()
    print(f"structure AD, n = {args.n:,}, d = {args.d}, float32, {args.threads} thread(s), "
          f"torch {torch.__version__}, numpy {np.__version__}")

    t0 = time.perf_counter()
    blocked = structure_ad(u, v, block_size=args.block_size)
    t_blocked = time.perf_counter() - t0
    print(f"blocked (tiles {args.block_size}): {t_blocked:8.2f} s   D_stru = {blocked:.8f}")

    # probe the loop on its first rows (the longest ones) to predict its full time
    n, k = args.n, min(args.probe_rows, args.n - 1)
    t0 = time.perf_counter()
    for i in range(k):
        np.sum(np.abs(np.dot(un[i], un[i + 1:].T) - np.dot(vn[i], vn[i + 1:].T)))
    t_probe = time.perf_counter() - t0
    pairs_all = n * (n - 1) / 2
    pairs_probe = sum(n - 1 - i for i in range(k))
    predicted = t_probe * pairs_all / pairs_probe
    print(f"row loop probe: {k} rows in {t_probe:.2f} s -> full loop predicted {predicted:.1f} s")

    if predicted <= args.max_loop_s:
        t0 = time.perf_counter()
        loop = rowloop_structure(un, vn)
        t_loop = time.perf_counter() - t0
        print(f"row loop (full, n = {n:,}):   {t_loop:8.2f} s   D_stru = {loop:.8f}")
        print(f"|blocked - loop| = {abs(blocked - loop):.2e}")
    else:
        m = min(args.small_n, n)
        t0 = time.perf_counter()
        loop = rowloop_structure(un[:m], vn[:m])
        t_small = time.perf_counter() - t0
        ref = structure_ad(u[:m], v[:m], block_size=args.block_size)
        t_loop = t_small * pairs_all / (m * (m - 1) / 2)
        print(f"row loop predicted > {args.max_loop_s:.0f} s: run at n = {m:,} ({t_small:.2f} s, "
              f"D_stru = {loop:.8f}, blocked at the same n {ref:.8f}, |diff| = {abs(ref - loop):.2e})")
        print(f"row loop EXTRAPOLATED to n = {n:,} by the pair count (n^2 scaling): {t_loop:8.2f} s")
    print(f"speed-up blocked vs row loop: {t_loop / t_blocked:.1f}x")


if __name__ == "__main__":
    main()
