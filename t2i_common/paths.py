"""Absolute paths of the package (showyourwork style): one place, no cwd guessing.

Two folders can be moved by environment variables (both read at import, so a notebook kernel
started by the runner sees them):

* ``T2I_CACHE``: per-example result caches (default ``cache/``);
* ``T2I_FIGURES``: where notebooks write tables, figures and ``results.json``.  The runner points
  it at ``runs/<name>/figures`` for every run with parameters, so a parametrized run never
  overwrites the committed figures.

Without ``T2I_FIGURES`` a notebook writes to ``runs/interactive/<notebook>/`` (ignored by git), so
running a notebook in JupyterLab leaves the clone clean.  Only a reference regeneration writes the
committed ``figures/<notebook>/``: the runner without parameters (``make figures``) sets
``T2I_REFERENCE=1`` in the kernel's environment (a user can do the same to regenerate the
reference from JupyterLab: ``T2I_REFERENCE=1 make lab``).
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
#: the committed reference figures (``figures/<notebook>/``)
REFERENCE_FIGURES = ROOT / "figures"
NOTEBOOKS = ROOT / "notebooks"
PARAMS = NOTEBOOKS / "params"
RUNS = ROOT / "runs"
#: where an interactive run (JupyterLab, a script) writes its figures: beside the reference
INTERACTIVE_FIGURES = RUNS / "interactive"
#: the environment variable the runner sets when it regenerates the committed reference
REFERENCE_FLAG = "T2I_REFERENCE"


def figures_root(environ=None) -> Path:
    """Where notebooks write their outputs: ``T2I_FIGURES`` if set; the committed reference
    ``figures/`` when ``T2I_REFERENCE`` is 1/true/yes (the runner's reference regeneration);
    otherwise ``runs/interactive/``."""
    env = os.environ if environ is None else environ
    if env.get("T2I_FIGURES"):
        return Path(env["T2I_FIGURES"])
    if str(env.get(REFERENCE_FLAG, "")).strip().lower() in ("1", "true", "yes"):
        return REFERENCE_FIGURES
    return INTERACTIVE_FIGURES


#: where this process writes figures (see :func:`figures_root`)
FIGURES = figures_root()
#: per-example result caches (override with T2I_CACHE)
CACHE = Path(os.environ.get("T2I_CACHE") or ROOT / "cache")
#: generated toy datasets (rebuilt from seeds, never committed)
GENERATED = DATA / "generated"
#: the embedded default text-to-image checkpoint (Stable-Diffusion format)
DEFAULT_T2I = DATA / "toy-sd"
#: the toy CLIP (HF CLIPModel format), whose text tower is the toy SD text encoder
DEFAULT_CLIP = DEFAULT_T2I / "clip"
