"""Dry run: every notebook's paper settings, end to end, on the full-size random-weight reference
folders (:mod:`t2i_common.fullsize`) and on small toy exports in the published dataset formats,
with only the sizes cut - CPU, float32, the numbers meaningless.

    python -m t2i_common.dryrun [NOTEBOOK ...] [--output-dir DIR] [--fullsize-root DIR] [--list]

Per notebook: its ``notebooks/params/<notebook>.yaml`` (the paper's settings), then its section of
``notebooks/dryrun.yaml`` (models -> ``fullsize:NAME`` folders, dataset paths -> null, sizes
cut), then ``device=cpu``, ``dtype=float32`` (or ``--device`` / ``--dtype``) and one thread.  Outputs go to ``runs/dryrun/`` (not
``figures/``): the executed notebooks, ``figures/<notebook>/`` with a ``DRY_RUN.md`` beside every
table and ``"dry_run"`` in every ``results.json``, its own result cache, and ``dryrun_times.json``
(wall seconds per notebook).  Every notebook runs even if one fails; the exit status is 1 then.

After the notebooks come the real-model paths that no notebook takes (``EXTRA``): attribution's
MSCOCO command line and its customised-model (AbC) setting on the full-size SD 1.5
(``python -m t2i_common.attribution.realmodels check``), run as a command (the shared layer
imports no paper), outputs in ``runs/dryrun/attribution-real/``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import fullsize, paths, report, runner

OVERLAY = paths.NOTEBOOKS / "dryrun.yaml"
PREFIX = "fullsize:"
LABEL = report.DRY_RUN_LABEL


#: {name: (full-size folder it needs, command given that folder and the output folder)}
EXTRA = {
    "attribution-real": ("sd1.5", lambda model, out: [
        sys.executable, "-m", "t2i_common.attribution.realmodels", "check", "--model", str(model),
        "--out", str(out)]),
}


def extra_plan(names=None, root=None, write: bool = False) -> list:
    """[(name, folder, command builder)] of the extra steps selected by ``names`` (all without)."""
    chosen = [n for n in EXTRA if not names or any(n.startswith(x) for x in names)]
    out = []
    for n in chosen:
        need, cmd = EXTRA[n]
        out.append((n, fullsize.ensure(need, root) if write else fullsize.folder(need, root), cmd))
    return out


def _resolve(v, root, write: bool):
    if isinstance(v, str) and v.startswith(PREFIX):
        name = v[len(PREFIX):]
        return str(fullsize.ensure(name, root) if write else fullsize.folder(name, root))
    if isinstance(v, list):
        return [_resolve(x, root, write) for x in v]
    if isinstance(v, dict):
        return {k: _resolve(x, root, write) for k, x in v.items()}
    return v


def plan(names=None, root=None, write: bool = False, device: str = "cpu", dtypes=None) -> list:
    """[(notebook path, parameters)] of the dry run, checked against each notebook's parameters
    cell.  ``write``: write missing full-size folders now (else only their paths).  ``device``,
    ``dtypes`` ({notebook stem: dtype}, default float32): for the GPU check."""

    overlay = yaml.safe_load(OVERLAY.read_text()) or {}
    if names:   # names of extra steps select no notebook
        names = [x for x in names if not any(e.startswith(x) for e in EXTRA)] or None
        if names is None:
            return []
    nbs = runner.find_notebooks(names)
    unknown = sorted(set(overlay) - {p.stem for p in runner.all_notebooks()})
    if unknown:
        raise ValueError(f"{OVERLAY}: sections {unknown} name no notebook")
    out = []
    for nb in nbs:
        paper = paths.NOTEBOOKS / "params" / f"{nb.stem}.yaml"
        params = runner.load_params(paper, None, nb.stem) if paper.exists() else {}
        params.update(overlay.get(nb.stem) or {})
        declared = runner.notebook_parameters(nb)
        params.update(device=device, dtype=(dtypes or {}).get(nb.stem, "float32"))
        for t in ("threads", "cpu_threads"):
            if t in declared:
                params[t] = 1
        params = {k: _resolve(v, root, write) for k, v in params.items()}
        runner.check_parameters(nb, params, f" (dry run: {paper.name} + {OVERLAY.name})")
        out.append((nb, params))
    return out


def main(argv=None) -> int:

    ap = argparse.ArgumentParser(prog="python -m t2i_common.dryrun", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="notebook stems/prefixes (default: all)")
    ap.add_argument("--output-dir", default=str(paths.RUNS / "dryrun"))
    ap.add_argument("--fullsize-root", default=None, help="full-size folders' root "
                                                          "(default: $T2I_FULLSIZE or ~/.cache/t2i-repro/fullsize)")
    ap.add_argument("--list", action="store_true", help="print each notebook's dry-run parameters")
    ap.add_argument("--device", default="cpu", help="cpu (the dry run) or cuda (the GPU check)")
    ap.add_argument("--dtype", default="float32", help="dtype of every notebook's models, or "
                                                         "STEM=DTYPE,... per notebook (rest float32)")
    a = ap.parse_args(argv)
    if "=" in a.dtype:
        dtypes = dict(kv.split("=", 1) for kv in a.dtype.split(","))
    else:
        dtypes = {p.stem: a.dtype for p in runner.all_notebooks()}
    if a.list:
        for nb, params in plan(a.names, a.fullsize_root, device=a.device, dtypes=dtypes):
            print(f"{nb.stem}: {json.dumps(params)}")
        for name, folder, cmd in extra_plan(a.names, a.fullsize_root):
            print(f"{name}: {' '.join(cmd(folder, Path(a.output_dir) / name))}")
        return 0
    out = Path(a.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    planned = plan(a.names, a.fullsize_root, write=True, device=a.device, dtypes=dtypes)
    extras = extra_plan(a.names, a.fullsize_root, write=True) if a.device == "cpu" else []
    os.environ["T2I_DRYRUN"] = "1"
    os.environ.setdefault("T2I_CACHE", str(out / "cache"))
    times_f = out / "dryrun_times.json"
    times = json.loads(times_f.read_text()) if times_f.exists() else {}
    failed = []
    t_all = time.time()
    for i, (nb, params) in enumerate(planned, 1):
        print(f"[{i}/{len(planned)}] {nb.stem} (dry run) {json.dumps(params)}", flush=True)
        try:
            dt = runner.run_one(nb, params, out / nb.name, figures=out / "figures", threads=1)
        except Exception as err:
            print(runner._failure_message(nb, err, injected=True), file=sys.stderr, flush=True)
            failed.append(nb.stem)
            times[nb.stem] = None
        else:
            times[nb.stem] = round(dt, 1)
            print(f"[{i}/{len(planned)}] {nb.stem} done in {dt:.0f} s", flush=True)
        times_f.write_text(json.dumps(times, indent=1) + "\n")
    for name, folder, cmd in extras:
        argv = cmd(folder, out / name)
        print(f"[{name}] (dry run) {' '.join(argv)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(argv, env=dict(os.environ, OMP_NUM_THREADS="1"))
        times[name] = round(time.time() - t0, 1) if rc == 0 else None
        if rc:
            print(f"[{name}] FAILED (exit {rc})", file=sys.stderr, flush=True)
            failed.append(name)
        else:
            print(f"[{name}] done in {times[name]:.0f} s", flush=True)
        times_f.write_text(json.dumps(times, indent=1) + "\n")
    n_all = len(planned) + len(extras)
    print(f"dry run: {n_all - len(failed)}/{n_all} notebooks and real-model steps ran in {time.time() - t_all:.0f} s; "
          f"outputs in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
