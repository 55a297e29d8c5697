"""Interpretable diffusion via information decomposition (Kong et al., ICLR '24).

- :mod:`~t2i_common.info_decomp.information`: the pointwise (conditional) mutual information
  estimators, ARO retrieval by i(x; caption), localisation mIoU and correlations;
- :mod:`~t2i_common.info_decomp.attention`: word-localisation heatmaps from MI and from
  cross-attention;
- :mod:`~t2i_common.info_decomp.editing`: prompt interventions (word omission / swap) and
  their effect on generated images.

Import the modules by name (``from t2i_common.info_decomp import information``).
"""
