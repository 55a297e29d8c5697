"""GDBench (Krojer et al., NeurIPS '23): its tasks in their published formats (toy analogues
exported through the same writers), read back by the published-format readers, and one table of
every method on every task.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import formats
from ..formats import MatchItem
from ..toyworld import export as toyexport
from .metrics import candidate_scores, chance_metrics, pick, task_metrics
from .scoring import clip_scores, diffitm_scores


#: GDBench task -> (reader kind, scoring task); the toy analogue of each is written by
#: :func:`export_toy_gdbench` through the same published-format writers.
GDBENCH_TASKS = {
    "VG-A": "aro_vg_attribution", "VG-R": "aro_vg_relation", "COCO-Order": "aro_order",
    "Flickr-Order": "aro_order", "Winoground": "winoground", "CLEVR": "clevr",
    "Classes": "class_pickles", "Flickr30K-img": "flickr30k_retrieval",
}


def export_toy_gdbench(root, n: int = 40, seed: int = 0) -> dict:
    """Write the toy analogues of the GDBench tasks under ``root/n{n}-s{seed}`` in the published
    formats (:mod:`t2i_common.toyworld.export`) and return ``{task: path}`` for :func:`read_gdbench`.
    A folder already exported with the same (n, seed) is reused.  The export is written into a
    temporary folder beside it and renamed into place, so notebooks that share it (40-42, also
    when run in parallel) never read a half-written export, and a killed export leaves none."""
    import json
    import os
    import shutil
    import uuid
    from pathlib import Path

    root = Path(root) / f"n{int(n)}-s{int(seed)}"
    want = {"n": int(n), "seed": int(seed), "version": 2}   # 2: order perturbations never equal the caption
    paths = {
        "VG-A": root / "vg_attribution" / "visual_genome_attribution.json",
        "VG-R": root / "vg_relation" / "visual_genome_relation.json",
        "COCO-Order": root / "coco_order" / "coco_karpathy_test.json",
        "Flickr-Order": root / "flickr_order" / "flickr30k_test.json",
        "Winoground": root / "winoground" / "examples.jsonl",
        "CLEVR": root / "clevr",
        "Classes": root / "classes" / "*" / "*.pickle",
        "Flickr30K-img": root / "flickr30k" / "flickr30k_retrieval_toy.json",
    }
    out = {k: str(v) for k, v in paths.items()}

    def current() -> bool:
        try:
            return json.loads((root / "export.json").read_text()) == want
        except (OSError, ValueError):
            return False

    if current():
        return out
    tmp = root.with_name(f".{root.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        toyexport.export_aro_vg(tmp / "vg_attribution", n, seed, "attribution")
        toyexport.export_aro_vg(tmp / "vg_relation", n, seed, "relation")
        toyexport.export_aro_order(tmp / "coco_order", n, seed, "coco_order")
        toyexport.export_aro_order(tmp / "flickr_order", n, seed, "flickr_order")
        toyexport.export_winoground(tmp / "winoground", n, seed)
        toyexport.export_clevr(tmp / "clevr", n, seed)
        toyexport.export_implosion_classes(tmp / "classes", n, seed)
        toyexport.export_flickr_retrieval(tmp / "flickr30k", n, seed)
        (tmp / "export.json").write_text(json.dumps(want))
        if current():        # another process finished the same export meanwhile
            return out
        if root.exists():    # an older version or a killed export of an earlier release
            old = root.with_name(f".{root.name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:      # lost the race to a process that renamed its own export first
            if not current():
                raise
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def class_prompt_items(pairs) -> list:
    """Zero-shot classification (Pets / ImageNet in GDBench) as text retrieval: each image against
    every distinct class prompt (sorted), gold = its own prompt.  ``pairs``: (path, image, text)
    from :func:`t2i_common.formats.read_implosion_pickles` (class subfolders)."""
    pairs = list(pairs)
    prompts = sorted({t for _, _, t in pairs})
    if len(prompts) < 2:
        raise ValueError(f"class_prompt_items: need at least two classes, got {prompts}")
    return [MatchItem([img], prompts, 0, prompts.index(t), {"path": str(p), "class_prompt": t})
            for p, img, t in pairs]


class GDBenchTasks(dict):
    """``{task name: [MatchItem]}`` plus ``dropped``: ``{task: number of captions the reader dropped
    from the whole file}`` for the order tasks, whose perturbations could not change those captions
    (:func:`t2i_common.formats.read_aro_order`; report it beside the accuracy)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.dropped: dict = {}


def read_gdbench(paths: dict, max_items: int | None = None) -> dict:
    """Read GDBench tasks with the published-format readers: ``{task: path}`` (task names of
    :data:`GDBENCH_TASKS`; a path may be a mapping ``{"path": ..., **reader kwargs}``, e.g.
    ``image_root`` for Flickr30K) -> ``{task name: [MatchItem]}``; CLEVR is split into one task per
    subtask ("CLEVR/spatial", ...).  ``max_items`` keeps the first items of each task.  Returns a
    :class:`GDBenchTasks` (its ``dropped`` counts the order captions the reader dropped)."""
    out = GDBenchTasks()
    for task, path in paths.items():
        kind = GDBENCH_TASKS.get(task)
        if kind is None:
            raise KeyError(f"read_gdbench: unknown task {task!r}; known: {sorted(GDBENCH_TASKS)}")
        kw = {}
        if isinstance(path, dict):   # {"path": ..., reader keyword arguments (image_root, ...)}
            kw = dict(path)
            if "path" not in kw:
                raise KeyError(f"read_gdbench: task {task!r} is given as a mapping without 'path': {path}")
            path = kw.pop("path")
        if kind == "aro_vg_attribution":
            got = {task: formats.read_aro_vg(path, "attribution", **kw)}
        elif kind == "aro_vg_relation":
            got = {task: formats.read_aro_vg(path, "relation", **kw)}
        elif kind == "aro_order":
            got = {task: formats.read_aro_order(path, task="coco_order" if task == "COCO-Order"
                                                else "flickr_order", **kw)}
        elif kind == "winoground":
            got = {task: formats.read_winoground(path, **kw)}
        elif kind == "clevr":
            got = {}
            for it in formats.read_clevr(path, **kw):
                got.setdefault(f"CLEVR/{it.meta['subtask']}", []).append(it)
        elif kind == "class_pickles":
            got = {task: class_prompt_items(formats.read_implosion_pickles(path))}
        else:
            got = {task: formats.read_flickr30k_retrieval(path, **kw)}
        out.dropped.update({k: len(v.dropped) for k, v in got.items() if hasattr(v, "dropped")})
        out.update({k: list(v)[:max_items] for k, v in got.items()})
    return out


def select_tasks(paths: dict, names, max_items: int | None = None) -> dict:
    """Read only the named tasks (``"CLEVR/<subtask>"`` names select one CLEVR subtask)."""
    base = {n.split("/")[0] for n in names}
    missing = base - set(paths)
    if missing:
        raise KeyError(f"select_tasks: no path for {sorted(missing)}; paths has {sorted(paths)}")
    got = read_gdbench({b: paths[b] for b in base}, max_items=max_items)
    absent = [n for n in names if n not in got]
    if absent:
        raise KeyError(f"select_tasks: {absent} not found; available {sorted(got)}")
    out = GDBenchTasks({n: got[n] for n in names})
    out.dropped = {n: got.dropped[n] for n in names if n in got.dropped}
    return out


def diffitm_method(model, S: int = 10, seed: int = 0, latent_mode: str = "mean", cache=None,
                   batch_size: int | None = None, progress: bool = True, shard=None):
    """A scoring function ``(items, img_retrieval) -> scores`` for :func:`gdbench_table`
    (``shard``: see :func:`~t2i_common.diffusion_itm.scoring.diffitm_distances`)."""
    def score(items, img_retrieval):
        return diffitm_scores(model, items, S=S, seed=seed, latent_mode=latent_mode,
                              img_retrieval=img_retrieval, batch_size=batch_size, cache=cache,
                              progress=progress, shard=shard)
    return score


def clip_method(clip):
    """CLIP cosine scores as a ``(items, img_retrieval) -> scores`` function (no normalisation)."""
    return lambda items, img_retrieval: clip_scores(clip, items)


def gdbench_table(tasks: dict, methods: dict, chance: bool = True, progress: bool = True):
    """One row per (task, metric), one column per method, plus ``chance`` and n.  Image-retrieval
    tasks are scored with ``img_retrieval=True`` (the original's flag for Flickr30K / ImageCoDe /
    SVO).  Accuracies are micro averages (DiffusionITM's convention, not ARO's macro one)."""
    import pandas as pd
    from tqdm.auto import tqdm

    rows = {}
    for task, items in tqdm(list(tasks.items()), desc="GDBench tasks", disable=not progress):
        img_ret = all(it.task == "image" for it in items)
        for name, fn in methods.items():
            for metric, v in task_metrics(items, fn(items, img_ret)).items():
                rows.setdefault((task, metric), {"n": len(items)})[name] = v
        if chance:
            for metric, v in chance_metrics(items).items():
                rows[(task, metric)]["chance"] = v
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index = pd.MultiIndex.from_tuples(df.index, names=["task", "metric"])
    return df[list(methods) + (["chance"] if chance else []) + ["n"]]


def before_after(before, after):
    """Join two one-method GDBench tables: columns before, after, delta (after - before), chance, n."""
    b, a = before.columns[0], after.columns[0]
    out = before[[b]].join(after[[a]], how="inner")
    out["delta"] = out[a] - out[b]
    for c in ("chance", "n"):
        if c in before:
            out[c] = before[c]
    return out


def table_results(df, prefix: str = "") -> dict:
    """Every cell of a (task, metric) x method table as ``{"prefix/task/metric/method": value}``."""
    out = {}
    for (task, metric), row in df.iterrows():
        for col, v in row.items():
            out[f"{prefix}{task}/{metric}/{col}"] = None if v != v else float(v)
    return out


def item_choices(items, scores) -> list:
    """The choice a method makes on each item: the picked candidate (:func:`~t2i_common.diffusion_itm.metrics.pick`)
    of a retrieval item; for a 2 x 2 Winoground item the picked caption of each image and the picked
    image of each caption."""
    out = []
    for it, s in zip(items, scores):
        if it.task == "group":
            a = np.asarray(torch.as_tensor(s, dtype=torch.float64))
            out.append((pick(a[0]), pick(a[1]), pick(a[:, 0]), pick(a[:, 1])))
        else:
            out.append(pick(candidate_scores(it, s)[0]))
    return out


def seed_agreement(model, tasks: dict, latent_modes=("mean", "sample", "sample_per_call"),
                   seeds=(0, 1, 2), S: int = 10, cache=None, progress: bool = True):
    """Seed-to-seed stability of DiffusionITM's item-level choices for each latent mode.

    For every task and mode the items are scored once per seed (the seed draws the noise bank and,
    in the sample modes, the posterior samples); ``agreement`` is the mean over pairs of seeds of
    the fraction of items with the same choice (:func:`item_choices`), ``all_agree`` the fraction of
    items with one choice under every seed, ``accuracy_min`` / ``accuracy_max`` the range of the
    task's main metric (strict accuracy, Winoground group score) over the seeds."""
    import itertools

    import pandas as pd

    rows = []
    for task, items in tasks.items():
        img_ret = all(it.task == "image" for it in items)
        for mode in latent_modes:
            choices, accs = [], []
            for seed in seeds:
                s = diffitm_scores(model, items, S=S, seed=seed, latent_mode=mode,
                                   img_retrieval=img_ret, cache=cache, progress=progress)
                choices.append(item_choices(items, s))
                m = task_metrics(items, s)
                accs.append(m["group"] if "group" in m else m["accuracy"])
            pairs = list(itertools.combinations(range(len(seeds)), 2))
            agree = [np.mean([a == b for a, b in zip(choices[i], choices[j])]) for i, j in pairs]
            rows.append({"task": task, "latent_mode": mode, "n": len(items), "seeds": len(seeds),
                         "agreement": float(np.mean(agree)),
                         "all_agree": float(np.mean([len(set(c)) == 1 for c in zip(*choices)])),
                         "accuracy_min": float(min(accs)), "accuracy_max": float(max(accs))})
    cols = ["task", "latent_mode", "n", "seeds", "agreement", "all_agree", "accuracy_min", "accuracy_max"]
    return pd.DataFrame(rows, columns=cols).set_index(["task", "latent_mode"])
