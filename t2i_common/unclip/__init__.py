"""Hierarchical text-conditional image generation with CLIP latents (unCLIP, Ramesh et al. 2022).

- :mod:`~t2i_common.unclip.model`: the prior and the CLIP-image-embedding decoder in the Stable
  unCLIP layout (``load_unclip``), variations, interpolations and text diffs;
- :mod:`~t2i_common.unclip.training`: resumable training of the toy unCLIP; command line
  ``python -m t2i_common.unclip.training``;
- :mod:`~t2i_common.unclip.evaluation`: cached generation, the variation and text-diff
  experiments and their metrics.

Import the modules by name (``from t2i_common.unclip import model as unclip``).
"""
