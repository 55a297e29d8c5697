"""Absolute paths of the package (showyourwork style): one place, no cwd guessing."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
FIGURES = ROOT / "figures"
NOTEBOOKS = ROOT / "notebooks"
PARAMS = NOTEBOOKS / "params"
#: per-example result caches (override with T2I_CACHE)
CACHE = Path(os.environ.get("T2I_CACHE", ROOT / "cache"))
#: generated toy datasets (rebuilt from seeds, never committed)
GENERATED = DATA / "generated"
#: the embedded default text-to-image checkpoint (Stable-Diffusion format)
DEFAULT_T2I = DATA / "toy-sd"
#: the toy CLIP (HF CLIPModel format), whose text tower is the toy SD text encoder
DEFAULT_CLIP = DEFAULT_T2I / "clip"
