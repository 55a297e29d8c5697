"""DiffusionITM (Krojer et al., NeurIPS '23): image-text matching with a text-to-image diffusion model.

One import for the notebooks; the work lives in one module per concept:

- :mod:`t2i_common.diffusion_itm.scoring`: the score itself, s(x, c) = - 1/K sum_k ||eps_k - eps_theta(z_{t_k},
  t_k, c)||_2 on the fixed grid, its latent modes, caching, the CLIP baseline and the original's
  loop as a reference;
- :mod:`t2i_common.diffusion_itm.metrics`: retrieval accuracy / recall and their tie rules, Winoground scores,
  MMBias and gender effect sizes;
- :mod:`t2i_common.diffusion_itm.adaptive`: successive elimination over the grid (beyond the paper), its
  replay on grid distances and the sampling-budget curves;
- :mod:`t2i_common.diffusion_itm.gdbench`: the GDBench tasks (toy export, published-format readers) and the
  table of every method on every task.

Every public name of those modules is importable from here (``from t2i_common import diffusion_itm as itm;
itm.diffitm_scores(...)``).
"""
from __future__ import annotations

from .gdbench import (GDBENCH_TASKS, GDBenchTasks, before_after, class_prompt_items, clip_method, diffitm_method,
                      export_toy_gdbench, gdbench_table, item_choices, read_gdbench,
                      seed_agreement, select_tasks, table_results)
from .adaptive import (AdaptivePolicy, AdaptiveResult, adaptive_curve, adaptive_replay,
                           adaptive_scores, budget_summary, cheapest_matching, grid_curve,
                           live_vs_replay, policy_sweep, visit_order)
from .metrics import (MMBIAS_PAIRS, TIE_RTOL, TIE_RULES, bias_phi, candidate_scores,
                          chance_metrics, effect_size, gender_effect_sizes, mmbias_effect_sizes, pick,
                          retrieval_metrics, task_metrics, tie_tolerance, winoground_metrics)
from .scoring import (LATENT_MODES, SCORE_VERSION, ITMDistances, check_S, clip_scores,
                          diffitm_distances, diffitm_scores, grid_evaluations, image_key,
                          model_fingerprint, original_loop_scores)

__all__ = [
    "GDBENCH_TASKS", "GDBenchTasks", "before_after", "class_prompt_items", "clip_method", "diffitm_method",
    "export_toy_gdbench", "gdbench_table", "item_choices", "read_gdbench", "seed_agreement",
    "select_tasks", "table_results",
    "AdaptivePolicy", "AdaptiveResult", "adaptive_curve", "adaptive_replay", "adaptive_scores",
    "budget_summary", "cheapest_matching", "grid_curve", "live_vs_replay", "policy_sweep",
    "visit_order", "MMBIAS_PAIRS", "TIE_RTOL", "TIE_RULES", "pick", "tie_tolerance", "bias_phi", "candidate_scores", "chance_metrics", "effect_size",
    "gender_effect_sizes", "mmbias_effect_sizes", "retrieval_metrics", "task_metrics",
    "winoground_metrics", "LATENT_MODES", "check_S", "SCORE_VERSION", "ITMDistances", "clip_scores", "diffitm_distances",
    "diffitm_scores", "grid_evaluations", "image_key", "model_fingerprint", "original_loop_scores",
]
