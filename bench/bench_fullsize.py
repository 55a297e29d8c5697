"""Full-size cost measurements: every full-size reference folder (t2i_common.fullsize) loaded
through the package's own loaders, then the seconds of one denoiser evaluation (forward; forward +
backward where a paper trains or takes gradients) and the peak memory of the process.

    python bench/bench_fullsize.py [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                                   [--root DIR] [--out FILE.json] [NAME ...]

Each model runs in its own process (peak memory per model).  Timings are the second of two calls
(the first warms up).  Random weights: only the cost is meaningful.  The folders are written first
when missing (``python -m t2i_common.fullsize write all``).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from t2i_common import fullsize  # noqa: E402

#: what is measured per folder, and for which notebooks
CASES = ("sd1.5", "sd2.1-base", "sd2.1", "sd2.1-unclip-small", "clip-vit-b-32", "openclip-vit-h-14",
         "dino-vitb16")


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device, reps=2):
    out = None
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        dt = time.perf_counter() - t0
    return dt, out


def _peak_gb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def measure(name, root, device, dtype) -> dict:
    from t2i_common import models
    from t2i_common.unclip import model as unclip
    from t2i_common.attribution.baselines import self_supervised_features

    dt = models.as_dtype(dtype)
    f = fullsize.ensure(name, root)
    row = dict(name=name, device=str(device), dtype=str(dtype))
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    if name in ("sd1.5", "sd2.1-base", "sd2.1"):
        m = models.load_t2i(str(f), device=device, dtype=dt)
        row["load_s"] = time.perf_counter() - t0
        s = m.unet.config.sample_size
        emb = m.encode_prompts(["a photo of a cat"]).clone()  # a normal tensor: backward below
        z = torch.randn(1, 4, s, s, generator=g).to(device, dt)
        t = torch.tensor([500], device=device)
        with torch.no_grad():
            row["fwd_s"], _ = _timed(lambda: m.eps(z, t, emb), device)
        # gradients of the cross-attention K/V weights only (attribution's unlearning subset; a
        # LoRA fine-tune likewise trains a small subset): the backward pass still runs through
        # every activation, only the other weight gradients are skipped
        for pn, p in m.unet.named_parameters():
            p.requires_grad_("attn2.to_k" in pn or "attn2.to_v" in pn)

        def fb():
            m.unet.zero_grad(set_to_none=True)
            loss = m.unet(z, t, encoder_hidden_states=emb.to(device, dt)).sample.float().pow(2).mean()
            loss.backward()
        row["fwd_bwd_s"], _ = _timed(fb, device)
        row["latent"] = s
    elif name == "sd2.1-unclip-small":
        m = unclip.load_unclip(str(f), prior=str(fullsize.ensure("karlo-prior", root)), device=device, dtype=dt)
        row["load_s"] = time.perf_counter() - t0
        z = torch.randn(1, m.embedding_dim, generator=g)
        labels, caps, null = m._decoder_inputs(z, ["a photo of a cat"], 0, 0)
        s = m.unet.config.sample_size
        x = torch.randn(1, 4, s, s, generator=g).to(device, dt)
        t = torch.tensor([500], device=device)
        with torch.no_grad():
            row["fwd_s"], _ = _timed(lambda: m.unet(x, t, encoder_hidden_states=caps, class_labels=labels).sample,
                                     device)
            row["prior_fwd_s"], _ = _timed(lambda: m.prior_embeddings(["a photo of a cat"], num_steps=1,
                                                                      guidance_scale=1.0, seeds=[0]), device)
        row["latent"] = s
    elif name in fullsize.SCORERS:
        c = models.load_clip(str(f), device=device, dtype=dt)
        row["load_s"] = time.perf_counter() - t0
        import numpy as np
        img = np.zeros((256, 256, 3), np.uint8)
        row["image_s"], _ = _timed(lambda: c.encode_images([img]), device)
        row["text_s"], _ = _timed(lambda: c.encode_texts(["a photo of a cat"]), device)
    else:
        import numpy as np
        img = np.zeros((256, 256, 3), np.uint8)
        row["image_s"], _ = _timed(lambda: self_supervised_features([img], str(f), device=device, dtype=dt), device)
        row["load_s"] = None
    row["peak_gb"] = _peak_gb(device)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(CASES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--root", default=None, help="full-size folders' root (default: fullsize.default_root())")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print("ROW " + json.dumps(measure(a.names[0], a.root, a.device, a.dtype)), flush=True)
        return
    rows = []
    for n in a.names:
        cmd = [sys.executable, __file__, n, "--one", "--device", a.device, "--dtype", a.dtype]
        if a.root:
            cmd += ["--root", a.root]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("ROW ")]
        if r.returncode or not line:
            print(f"{n}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            rows.append(dict(name=n, error=r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"))
            continue
        rows.append(json.loads(line[0][4:]))
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
