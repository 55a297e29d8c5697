"""Understanding Implosion in Text-to-Image Generative Models (Ding et al., CCS '24).

- :mod:`~t2i_common.implosion.alignment`: Alignment Difficulty of a text-image dataset, the
  poisoning and implosion experiments; command line ``python -m t2i_common.implosion.alignment``;
- :mod:`~t2i_common.implosion.ad_embeddings`: implosion pickles -> CLIP embeddings in the
  original's cache format, with a provenance sidecar.

Import the modules by name (``from t2i_common.implosion import alignment``).
"""
