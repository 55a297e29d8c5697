"""Tries of the toy-checkpoint recipe: train (resumable), score with the pixel checker, probe, log.

One call = one try: ``build_toy_checkpoint`` with a named recipe plus overrides, into
``<runs>/<name>/model`` with stage checkpoints in ``<runs>/<name>/work``.  Finished CLIP / VAE
stage checkpoints of ``--base-work`` (same seed, same CLIP / VAE budget, so the same weights a
from-scratch build would train) are linked in, so tries differ only in their UNet stage; their
recorded wall time still counts towards the from-scratch total.  Then held-out generation
fidelity (``toyworld.fidelity``: n prompts per kind, stream 1, DDIM, each guidance scale), the
relation probe (``bench/toy_relation_probe.py``) and one JSON row appended to ``--jsonl``.

    python bench/toy_tries.py --name A --recipe v3 --set unet_steps=6000 --base-work /work/toy3_runs/v3work
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2i_common.models import load_t2i  # noqa: E402
from t2i_common.toyworld import training as T  # noqa: E402
from t2i_common.toyworld.fidelity import fidelity_prompts, generation_fidelity  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_relation_probe import relation_probe  # noqa: E402

KEYS = ("colour_ok", "shape_ok", "both", "count_ok", "relation_ok", "match")


def parse_sets(sets, base: T.ToyBudget) -> T.ToyBudget:
    kw = {}
    fields = {f.name: f for f in dataclasses.fields(T.ToyBudget)}
    for s in sets:
        k, _, v = s.partition("=")
        if k not in fields:
            raise SystemExit(f"--set {s}: unknown ToyBudget field {k!r}")
        d = fields[k].default
        kw[k] = T._flag_bool(v) if isinstance(d, bool) else type(d)(v)
    return dataclasses.replace(base, **kw)


def score(folder, n: int, guidances, steps: int, seed: int = 1) -> dict:
    model = load_t2i(folder)
    out = {}
    for gs in guidances:
        for kind in ("single", "two", "relational"):
            t = time.perf_counter()
            res, _ = generation_fidelity(model, fidelity_prompts(kind, n, seed), num_steps=steps,
                                         guidance_scale=gs, seed=seed)
            out[f"g{gs:g}/{kind}"] = dict({k: round(res[k], 3) for k in KEYS if k in res},
                                          n=res["n"], wall_s=round(time.perf_counter() - t, 1))
    return out


def folder_mb(folder) -> float:
    return round(sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20, 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--recipe", default="v3", choices=sorted(T.RECIPES))
    p.add_argument("--set", action="append", default=[], help="ToyBudget field=value")
    p.add_argument("--runs", default="/work/toy3_runs/tries")
    p.add_argument("--out", default=None, help="model folder (default <runs>/<name>/model)")
    p.add_argument("--base-work", default=None, help="work dir with finished clip/vae checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0])
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--probe-n", type=int, default=50)
    p.add_argument("--note", default="")
    p.add_argument("--eval-only", default=None, help="score this existing folder, train nothing")
    p.add_argument("--jsonl", default=str(Path(__file__).resolve().parent / "toy_tries.jsonl"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    budget = parse_sets(a.set, T.RECIPES[a.recipe])
    T.check_budget(budget, optional_steps=("unet_extra_steps",))
    root = Path(a.runs) / a.name
    out, work = Path(a.out or root / "model"), root / "work"
    if not a.eval_only:
        work.mkdir(parents=True, exist_ok=True)
    if a.base_work and not a.eval_only:
        for stage in ("clip", "vae"):
            src, dst = Path(a.base_work) / f"{stage}.ckpt", work / f"{stage}.ckpt"
            if src.exists() and not dst.exists():
                os.symlink(src.resolve(), dst)
    t0 = time.perf_counter()
    if a.eval_only:
        out = Path(a.eval_only)
        log = json.loads((out / "training_log.json").read_text())
    else:
        log = T.build_toy_checkpoint(out, budget, seed=0, work_dir=work, evaluate=False,
                                     progress=False)
    build_s = time.perf_counter() - t0
    st = log["stages"]
    unet_steps = sum(st[k]["steps"] for k in ("unet", "unet_extra") if k in st)
    unet_wall = sum(st[k]["wall_s"] for k in ("unet", "unet_extra") if k in st)
    used = log.get("budget", {})
    row = dict(name=a.name, note=a.note, recipe=a.recipe if not a.eval_only else "as trained",
               changed={k: v for k, v in used.items() if v != getattr(T.ToyBudget(), k, None)},
               cfg_unet=dict(channels=log["cfg"]["unet_channels"], heads=log["cfg"]["unet_heads"],
                             layers=log["cfg"]["unet_layers"]),
               threads=torch.get_num_threads(), unet_steps=unet_steps,
               unet_wall_s=round(unet_wall, 1), s_per_step=round(unet_wall / max(1, unet_steps), 3),
               stage_wall_s={k: v["wall_s"] for k, v in st.items()},
               train_wall_s=log["train_wall_s"], build_call_s=round(build_s, 1),
               final_loss={k: round(v.get("final_loss") or 0, 5) for k, v in st.items()
                           if "final_loss" in v},
               folder=str(out), folder_mb=folder_mb(out))
    t = time.perf_counter()
    row["eval"] = score(out, a.n, a.guidance, a.eval_steps)
    row["eval_wall_s"] = round(time.perf_counter() - t, 1)
    if a.probe_n:
        pr = relation_probe(load_t2i(out), n=a.probe_n, seed=1)
        row["probe"] = {t: {k: round(v, 4) for k, v in r.items() if k != "abar"}
                        for t, r in pr["per_t"].items()}
    row["when"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if not a.eval_only:     # the held-out scores travel with the folder
        f = out / "training_log.json"
        f.write_text(json.dumps(dict(json.loads(f.read_text()), eval_tries=dict(
            n=a.n, num_steps=a.eval_steps, seed=1, fidelity=row["eval"],
            probe=row.get("probe"))), indent=1))
    with open(a.jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
