"""Tables, figures and recorded headline numbers written by the notebooks.

The ``save_*`` functions return None on purpose: called as the last line of a notebook cell they
would otherwise echo a ``PosixPath`` of the executing machine into the committed outputs.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from . import paths

#: written beside every output of a dry run (``python -m t2i_common.dryrun``, ``T2I_DRYRUN=1``)
DRY_RUN_LABEL = ("DRY RUN: full-size random-weight models (t2i_common.fullsize) and cut sizes; every "
                 "number here is meaningless - the run only shows that the paper settings execute "
                 "end to end.")


def outdir(notebook_name: str, root=None) -> Path:
    """``<figures root>/<notebook_name>/`` (created): ``runs/interactive/<notebook_name>/`` in an
    interactive run, ``figures/<notebook_name>/`` when the runner regenerates the reference
    (:func:`t2i_common.paths.figures_root`)."""
    d = Path(root or paths.FIGURES) / notebook_name
    d.mkdir(parents=True, exist_ok=True)
    if _dry_run():
        (d / "DRY_RUN.md").write_text(DRY_RUN_LABEL + "\n")
    return d


def _dry_run() -> bool:
    return os.environ.get("T2I_DRYRUN", "") not in ("", "0")


def save_table(df, out: Path, name: str, floatfmt: str = ".4g") -> None:
    """Write ``name.csv`` and ``name.md`` (GitHub markdown) of a pandas DataFrame."""
    out = Path(out)
    df.to_csv(out / f"{name}.csv", index=True)
    try:
        md = df.to_markdown(floatfmt=floatfmt)
    except ImportError:  # tabulate missing: plain pipe table
        cols = [str(df.index.name or "")] + [str(c) for c in df.columns]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for idx, row in df.iterrows():
            vals = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
            lines.append("| " + " | ".join([str(idx)] + vals) + " |")
        md = "\n".join(lines)
    (out / f"{name}.md").write_text(md + "\n")


def save_figure(fig, out: Path, name: str, dpi: int = 120) -> None:
    """Write ``name.png`` (the figure stays open, so the notebook still shows it)."""
    fig.savefig(Path(out) / f"{name}.png", dpi=dpi, bbox_inches="tight")


def _clean(v):
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if hasattr(v, "tolist"):
        return _clean(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def save_results(out: Path, results: dict) -> None:
    """Merge ``results`` into ``out/results.json`` (machine-readable headline numbers)."""
    p = Path(out) / "results.json"
    old = json.loads(p.read_text()) if p.exists() else {}
    old.update(_clean(results))
    if _dry_run():
        old["dry_run"] = DRY_RUN_LABEL
    p.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")


def load_results(notebook_name: str) -> dict:
    """``results.json`` of a notebook: this process's figures folder first, else the committed
    reference (an interactive session reads the reference of notebooks it has not run)."""
    for root in dict.fromkeys([Path(paths.FIGURES), Path(paths.REFERENCE_FIGURES)]):
        p = root / notebook_name / "results.json"
        if p.exists():
            return json.loads(p.read_text())
    raise FileNotFoundError(f"{Path(paths.FIGURES) / notebook_name / 'results.json'} not found; "
                            f"run `python -m t2i_common.runner {notebook_name}` first")


def setup_matplotlib():
    """A consistent style for every notebook figure (scripts outside Jupyter get the Agg backend)."""
    import sys

    import matplotlib
    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="notebook")
