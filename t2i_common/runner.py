"""Run the notebooks headlessly through papermill: ``python -m t2i_common.runner [names] [options]``.

* no names: every ``notebooks/NN_*.ipynb`` in order; names may be stems (``00_tour``), prefixes
  (``00``) or paths.
* ``-f params.yaml``: parameters; a mapping of notebook stem -> parameters, or one flat mapping
  applied to every notebook.  ``-p key value`` overrides (values parsed as YAML).
* With no parameters the executed notebook replaces the committed one (its outputs are the
  regression reference nbval compares); with parameters it goes to ``runs/<stem>.ipynb`` so a
  parametrized run never overwrites the defaults.  ``--output-dir`` forces a folder.
* Prints each notebook's wall time and exits non-zero naming the notebook and cell that failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from . import paths


def find_notebooks(names=None) -> list[Path]:
    allnb = sorted(p for p in paths.NOTEBOOKS.glob("*.ipynb") if p.stem[:2].isdigit())
    if not names:
        return allnb
    out = []
    for n in names:
        p = Path(n)
        if p.suffix == ".ipynb" and p.exists():
            out.append(p.resolve())
            continue
        hits = [q for q in allnb if q.stem == n] or [q for q in allnb if q.stem.startswith(n)]
        if not hits:
            raise SystemExit(f"runner: no notebook named {n!r} in {paths.NOTEBOOKS}; "
                             f"available: {', '.join(q.stem for q in allnb)}")
        out.extend(hits)
    return list(dict.fromkeys(out))


def load_params(file, overrides, stem) -> dict:
    params = {}
    if file:
        f = Path(file)
        if not f.exists():
            raise SystemExit(f"runner: parameter file {f} not found")
        data = yaml.safe_load(f.read_text()) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"runner: parameter file {f} must hold a mapping")
        stems = {p.stem for p in find_notebooks()}
        if any(k in stems for k in data):
            params.update(data.get(stem, {}) or {})
        else:
            params.update(data)
    for k, v in overrides or []:
        params[k] = yaml.safe_load(v)
    return params


def notebook_parameters(nb_path: Path) -> dict:
    """Names and default values of the ``parameters`` cell (papermill's inspection)."""
    import papermill as pm
    return {k: v["default"] for k, v in pm.inspect_notebook(str(nb_path)).items()}


def run_one(nb: Path, params: dict, out: Path, kernel: str | None = None, progress=True) -> float:
    import papermill as pm

    known = notebook_parameters(nb)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise SystemExit(f"runner: {nb.name} has no parameter(s) {unknown}; its parameters are "
                         f"{sorted(known)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(paths.NOTEBOOKS),
                        kernel_name=kernel, progress_bar=progress, log_output=False,
                        request_save_on_cell_execute=False)
    return time.time() - t0


def _failure_message(nb: Path, err) -> str:
    cell = getattr(err, "cell_index", None)
    count = getattr(err, "exec_count", None)
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    where = f"cell {cell}" if cell is not None else "a cell"
    if count is not None:
        where += f" (execution count {count})"
    return f"runner: notebook {nb.stem} FAILED in {where}: {ename}: {evalue}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m t2i_common.runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="notebook stems/prefixes (default: all)")
    ap.add_argument("-f", "--params-file", help="YAML parameters (flat, or per notebook stem)")
    ap.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                    help="parameter override (VALUE parsed as YAML)")
    ap.add_argument("--output-dir", help="where executed notebooks go (default: in place without "
                                         "parameters, runs/ with parameters)")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    ap.add_argument("--list", action="store_true", help="list notebooks and their parameters")
    args = ap.parse_args(argv)

    nbs = find_notebooks(args.names)
    if args.list:
        for nb in nbs:
            print(f"{nb.stem}: {json.dumps(notebook_parameters(nb))}")
        return 0
    times = {}
    for i, nb in enumerate(nbs, 1):
        params = load_params(args.params_file, args.param, nb.stem)
        if args.output_dir:
            out = Path(args.output_dir) / nb.name
        elif params:
            out = paths.ROOT / "runs" / nb.name
        else:
            out = nb
        print(f"[{i}/{len(nbs)}] {nb.stem} {json.dumps(params) if params else '(defaults)'} -> "
              f"{out.relative_to(paths.ROOT) if out.is_relative_to(paths.ROOT) else out}", flush=True)
        try:
            times[nb.stem] = run_one(nb, params, out, args.kernel)
        except SystemExit:
            raise
        except Exception as err:
            print(_failure_message(nb, err), file=sys.stderr, flush=True)
            print(f"runner: the partially executed notebook is at {out}", file=sys.stderr)
            return 1
        print(f"[{i}/{len(nbs)}] {nb.stem} done in {times[nb.stem]:.1f} s; figures in "
              f"figures/{nb.stem}/", flush=True)
    if len(times) > 1:
        print("\nnotebook times:")
        for k, v in times.items():
            print(f"  {k:32s} {v:8.1f} s")
        print(f"  {'total':32s} {sum(times.values()):8.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
