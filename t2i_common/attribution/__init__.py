"""Data attribution by unlearning synthesized images (Wang et al., NeurIPS '24).

- :mod:`~t2i_common.attribution.unlearning`: training-set loss pass, diagonal Fisher, the
  Newton-step unlearning and the original's ``influence_{idx}.pkl``; command line
  ``python -m t2i_common.attribution`` (:mod:`~t2i_common.attribution.__main__`);
- :mod:`~t2i_common.attribution.baselines`: the feature-similarity baselines (random, pixel, CLIP,
  DINO) and the ranking metrics;
- :mod:`~t2i_common.attribution.counterfactual`: leave-k-out retraining and the ablations.

Import the modules by name (``from t2i_common.attribution import unlearning as A``).
"""
