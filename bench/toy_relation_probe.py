"""Probe: does a toy checkpoint's denoiser use the relation words?

For held-out toy pair scenes (stream ``--seed``, not the training stream 0) the true caption
"a {c0} {s0} {rel} a {c1} {s1}" and its relation-flipped twin "... {converse rel} ..." (same
words, same objects; only the relation said the other way round, so it is false for the image)
are scored with the same noise: err(c) = || eps - eps_theta(sqrt(abar_t) z0 + sqrt(1-abar_t) eps,
t, c) ||^2 (``T2IModel.eps``, so a v-prediction model is scored in eps units).  Per t bucket:
the mean gap err(flipped) - err(true) (> 0: the true caption explains the image better) and the
fraction of scenes where the true caption wins (mean over noise draws per scene).  A colour-swap
twin ("a {c1} {s0} ... a {c0} {s1}") is scored alongside as the reference of a gap the model
does read.  The error at t = 999 is scored too: under zero terminal SNR z_t holds no image
information there, and the gap shows whether the caption alone fixes the layout.

    python bench/toy_relation_probe.py /work/toy3_runs/toy-sd-v3 --n 100
    python bench/toy_relation_probe.py data/toy-sd --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2i_common import toyworld as tw  # noqa: E402
from t2i_common.models import load_t2i  # noqa: E402

TIMESTEPS = (100, 300, 500, 700, 850, 950, 999)
TEMPLATE = "a {c0} {s0} {rel} a {c1} {s1}"


def twin_captions(scene) -> tuple[str, str, str]:
    """(true, relation-flipped, colour-swapped) captions of a pair scene, canonical mention order."""
    (i, rel, j) = scene.relation
    a, b = scene.objects[i], scene.objects[j]
    true = f"a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}"
    flip = f"a {a.colour} {a.shape} {tw.CONVERSE[rel]} a {b.colour} {b.shape}"
    swap = f"a {b.colour} {a.shape} {rel} a {a.colour} {b.shape}"
    return true, flip, swap


@torch.inference_mode()
def relation_probe(model, n: int = 100, seed: int = 1, timesteps=TIMESTEPS, n_noise: int = 4,
                   batch_size: int = 128) -> dict:
    """Per timestep: mean error of true / flipped / swapped captions, the mean gaps and the
    fraction of scenes where the true caption has the lower (noise-averaged) error."""
    samples = tw.make_samples(n, seed, kinds=("pair",))
    caps = [twin_captions(s.scene) for s in samples]
    x = model.preprocess([s.image for s in samples])
    z0 = model.encode_images(x)                                    # [n, C, h, w]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_noise,) + tuple(z0.shape), generator=g)  # shared by the three captions
    ac = model.alphas_cumprod.float()
    out = {}
    for t in timesteps:
        ab = ac[t]
        errs = torch.zeros(3, n, n_noise)
        for k in range(n_noise):
            zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise[k]
            for c in range(3):
                emb = model.encode_prompts([cc[c] for cc in caps])
                for b in range(0, n, batch_size):
                    e = model.eps(zt[b:b + batch_size], t, emb[b:b + batch_size]).float().cpu()
                    errs[c, b:b + batch_size, k] = ((e - noise[k][b:b + batch_size]) ** 2).mean(dim=(1, 2, 3))
        m = errs.mean(2)                                           # [3, n] noise-averaged
        out[str(t)] = dict(
            abar=float(ab), err_true=float(m[0].mean()), err_flip=float(m[1].mean()),
            err_swap=float(m[2].mean()),
            relation_gap=float((m[1] - m[0]).mean()), colour_gap=float((m[2] - m[0]).mean()),
            relation_win=float((m[0] < m[1]).float().mean()),
            colour_win=float((m[0] < m[2]).float().mean()))
    return dict(n=n, seed=seed, n_noise=n_noise, per_t=out)


def format_table(res: dict) -> str:
    rows = [f"{'t':>4} {'abar':>8} {'err_true':>9} {'rel_gap':>9} {'rel_win':>8} {'col_gap':>9} "
            f"{'col_win':>8}"]
    for t, r in res["per_t"].items():
        rows.append(f"{t:>4} {r['abar']:8.5f} {r['err_true']:9.4f} {r['relation_gap']:9.4f} "
                    f"{r['relation_win']:8.2f} {r['colour_gap']:9.4f} {r['colour_win']:8.2f}")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="SD-format toy checkpoint folder")
    p.add_argument("--n", type=int, default=100, help="held-out pair scenes")
    p.add_argument("--seed", type=int, default=1, help="sample stream (training uses 0)")
    p.add_argument("--n-noise", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = relation_probe(load_t2i(a.folder), n=a.n, seed=a.seed, n_noise=a.n_noise)
    res["folder"] = str(a.folder)
    print(format_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
