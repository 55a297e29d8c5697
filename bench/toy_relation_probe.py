"""Probe: does a toy checkpoint's denoiser use the relation words?

For held-out toy pair scenes (stream ``--seed``, not the training stream 0) the true caption
"a {c0} {s0} {rel} a {c1} {s1}" and its relation-flipped twin "... {converse rel} ..." (same
words, same objects; only the relation said the other way round, so it is false for the image)
are scored with the same noise, in two units: the eps error || eps - eps_theta(z_t, t, c) ||^2
(``T2IModel.eps``: what DiffusionITM-style scorers see) and the x0 error || z0 - x0_theta(z_t, t,
c) ||^2 (x0_theta = sqrt(abar) z_t - sqrt(1-abar) v_theta for a v model, (z_t - sqrt(1-abar)
eps_theta) / sqrt(abar) for an eps model; the v loss is the x0 error / (1 - abar)).  Under zero
terminal SNR the eps error cannot see the caption at high t (eps_theta = sqrt(abar) v_theta +
sqrt(1-abar) z_t, exactly z_t at t = 999), so the x0 gap is the one that shows whether the layout
follows the relation word.  Per t bucket: the mean gaps err(flipped) - err(true) (> 0: the true
caption explains the image better) and the fraction of scenes where the true caption wins
(errors averaged over the noise draws per scene first).  A colour-swap
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
    embs = [model.encode_prompts([cc[c] for cc in caps]) for c in range(3)]
    out = {}
    for t in timesteps:
        ab = ac[t]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        errs = torch.zeros(2, 3, n, n_noise)                       # (eps, x0) x caption
        for k in range(n_noise):
            zt = a * z0 + s * noise[k]
            for c in range(3):
                for b in range(0, n, batch_size):
                    sl = slice(b, b + batch_size)
                    o = model.model_output(zt[sl], t, embs[c][sl]).float().cpu()
                    if model.prediction_type == "v_prediction":
                        e, x0 = a * o + s * zt[sl], a * zt[sl] - s * o
                    else:
                        e = o
                        x0 = (zt[sl] - s * o) / a
                    errs[0, c, sl, k] = ((e - noise[k][sl]) ** 2).mean(dim=(1, 2, 3))
                    errs[1, c, sl, k] = ((x0 - z0[sl]) ** 2).mean(dim=(1, 2, 3))
        m = errs.mean(3)                                           # [2, 3, n] noise-averaged
        row = dict(abar=float(ab))
        for u, unit in enumerate(("eps", "x0")):
            row.update({
                f"{unit}_err_true": float(m[u, 0].mean()),
                f"{unit}_relation_gap": float((m[u, 1] - m[u, 0]).mean()),
                f"{unit}_colour_gap": float((m[u, 2] - m[u, 0]).mean()),
                f"{unit}_relation_win": float((m[u, 0] < m[u, 1]).float().mean()),
                f"{unit}_colour_win": float((m[u, 0] < m[u, 2]).float().mean())})
        out[str(t)] = row
    return dict(n=n, seed=seed, n_noise=n_noise, per_t=out)


def format_table(res: dict) -> str:
    rows = [f"{'t':>4} {'abar':>8} | {'unit':>4} {'err_true':>9} {'rel_gap':>9} {'rel_win':>8} "
            f"{'col_gap':>9} {'col_win':>8}"]
    for t, r in res["per_t"].items():
        for u in ("eps", "x0"):
            rows.append(f"{t:>4} {r['abar']:8.5f} | {u:>4} {r[u + '_err_true']:9.4f} "
                        f"{r[u + '_relation_gap']:9.4f} {r[u + '_relation_win']:8.2f} "
                        f"{r[u + '_colour_gap']:9.4f} {r[u + '_colour_win']:8.2f}")
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
