"""Absolute paths of the package (showyourwork style): one place, no cwd guessing.

Two folders can be moved by environment variables (both read at import, so a notebook kernel
started by the runner sees them):

* ``T2I_CACHE``: per-example result caches (default ``cache/``);
* ``T2I_FIGURES``: where notebooks write tables, figures and ``results.json`` (default
  ``figures/``, the committed reference).  The runner points it at ``runs/<name>/figures`` for
  every run with parameters, so a parametrized run never overwrites the committed figures.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
#: the committed reference figures (``figures/<notebook>/``)
REFERENCE_FIGURES = ROOT / "figures"
#: where this process writes figures (override with T2I_FIGURES)
FIGURES = Path(os.environ.get("T2I_FIGURES") or REFERENCE_FIGURES)
NOTEBOOKS = ROOT / "notebooks"
PARAMS = NOTEBOOKS / "params"
RUNS = ROOT / "runs"
#: per-example result caches (override with T2I_CACHE)
CACHE = Path(os.environ.get("T2I_CACHE") or ROOT / "cache")
#: generated toy datasets (rebuilt from seeds, never committed)
GENERATED = DATA / "generated"
#: the embedded default text-to-image checkpoint (Stable-Diffusion format)
DEFAULT_T2I = DATA / "toy-sd"
#: the toy CLIP (HF CLIPModel format), whose text tower is the toy SD text encoder
DEFAULT_CLIP = DEFAULT_T2I / "clip"
