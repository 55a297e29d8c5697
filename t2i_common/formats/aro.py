"""ARO (Yuksekgonul et al., ICLR'23): VG-Relation and VG-Attribution readers/writers and the
official (macro) and DiffusionITM (micro) accuracies of every ARO task."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ._common import FormatError, PathLike, _fail, _nonempty, _read_json, _require_keys, _write_json
from .images import ImageRef, MatchItem, _check_exists, save_image


#: Relations that ARO's official VG-Relation macro accuracy leaves out (symmetric or
#: not order-sensitive), as listed in mertyg/vision-language-models-are-bows,
#: notebooks/"Replicate ARO! VG-Relation, VG-Attribution.ipynb".
ARO_SYMMETRIC_RELATIONS = frozenset([
    'adjusting', 'attached to', 'between', 'bigger than', 'biting', 'boarding', 'brushing', 'chewing',
    'cleaning', 'climbing', 'close to', 'coming from', 'coming out of', 'contain', 'crossing', 'dragging',
    'draped over', 'drinking', 'drinking from', 'driving', 'driving down', 'driving on', 'eating from',
    'eating in', 'enclosing', 'exiting', 'facing', 'filled with', 'floating in', 'floating on', 'flying',
    'flying above', 'flying in', 'flying over', 'flying through', 'full of', 'going down', 'going into',
    'going through', 'grazing in', 'growing in', 'growing on', 'guiding', 'hanging from', 'hanging in',
    'hanging off', 'hanging over', 'higher than', 'holding onto', 'hugging', 'in between', 'jumping off',
    'jumping on', 'jumping over', 'kept in', 'larger than', 'leading', 'leaning over', 'leaving', 'licking',
    'longer than', 'looking in', 'looking into', 'looking out', 'looking over', 'looking through',
    'lying next to', 'lying on top of', 'making', 'mixed with', 'mounted on', 'moving', 'on the back of',
    'on the edge of', 'on the front of', 'on the other side of', 'opening', 'painted on', 'parked at',
    'parked beside', 'parked by', 'parked in', 'parked in front of', 'parked near', 'parked next to',
    'perched on', 'petting', 'piled on', 'playing', 'playing in', 'playing on', 'playing with', 'pouring',
    'reaching for', 'reading', 'reflected on', 'riding on', 'running in', 'running on', 'running through',
    'seen through', 'sitting behind', 'sitting beside', 'sitting by', 'sitting in front of', 'sitting near',
    'sitting next to', 'sitting under', 'skiing down', 'skiing on', 'sleeping in', 'sleeping on',
    'smiling at', 'sniffing', 'splashing', 'sprinkled on', 'stacked on', 'standing against',
    'standing around', 'standing behind', 'standing beside', 'standing in front of', 'standing near',
    'standing next to', 'staring at', 'stuck in', 'surrounding', 'swimming in', 'swinging', 'talking to',
    'topped with', 'touching', 'traveling down', 'traveling on', 'tying', 'typing on', 'underneath',
    'wading in', 'waiting for', 'walking across', 'walking by', 'walking down', 'walking next to',
    'walking through', 'working in', 'working on', 'worn on', 'wrapped around', 'wrapped in', 'by', 'of',
    'near', 'next to', 'with', 'beside', 'on the side of', 'around',
])

VG_FILES = {"relation": "visual_genome_relation.json", "attribution": "visual_genome_attribution.json"}
_VG_BBOX = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
_VG_KEYS = {"relation": ("image_path", *_VG_BBOX, "relation_name", "true_caption", "false_caption"),
            "attribution": ("image_path", *_VG_BBOX, "attributes", "true_caption", "false_caption")}


def read_aro_vg(root: PathLike, kind: str = "relation", image_dir: PathLike | None = None,
                check_images: bool = True) -> list[MatchItem]:
    """ARO VG-Relation (``kind='relation'``) or VG-Attribution (``'attribution'``) as MatchItems.

    Reads ``root/visual_genome_{relation,attribution}.json`` (or the json path itself);
    images are ``image_dir`` (default ``root/images``) / ``image_path``, cropped to
    (bbox_x, bbox_y, bbox_x + bbox_w, bbox_y + bbox_h) as ARO does. Captions are
    ``[false_caption, true_caption]`` (ARO's caption_options order), so gold_caption = 1.
    meta: aro_task, index, image_path, relation_name / attributes (+ attribute_pair 'a1_a2').
    """
    if kind not in VG_FILES:
        raise ValueError(f"kind must be one of {list(VG_FILES)}, got {kind!r}")
    root = Path(root)
    path = root if root.suffix == ".json" else root / VG_FILES[kind]
    fix = f"pass the ARO folder holding {VG_FILES[kind]} and images/ (download: ARO README)"
    data = _read_json(path, f"ARO VG-{kind} annotations", fix)
    if not isinstance(data, list):
        raise _fail(path, f"expected a JSON list of test cases, got {type(data).__name__}", fix)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    items = []
    for i, rec in enumerate(data):
        _require_keys(rec, _VG_KEYS[kind], path, f"entry {i}", fix)
        x, y, w, h = (float(rec[k]) for k in _VG_BBOX)
        if w <= 0 or h <= 0:
            raise _fail(path, f"entry {i} has an empty bbox (w={w}, h={h})", "fix the bbox fields")
        ref = ImageRef(image_dir / rec["image_path"], box=(x, y, x + w, y + h), source=f"{path} entry {i}")
        meta = {"aro_task": f"vg_{kind}", "index": i, "image_path": rec["image_path"]}
        if kind == "relation":
            meta["relation_name"] = rec["relation_name"]
        else:
            attrs = rec["attributes"]
            if not (isinstance(attrs, (list, tuple)) and len(attrs) == 2):
                raise _fail(path, f"entry {i} field 'attributes' is {attrs!r}", "it must be a list [a1, a2]")
            meta["attributes"] = list(attrs)
            meta["attribute_pair"] = f"{attrs[0]}_{attrs[1]}"
        items.append(MatchItem([ref], [rec["false_caption"], rec["true_caption"]], 0, 1, meta))
    _nonempty(items, path)
    if check_images:
        _check_exists(it.image_refs[0] for it in items)
    return items


def write_aro_vg(records: Sequence[Mapping], root: PathLike, kind: str = "relation") -> Path:
    """Write ``root/visual_genome_{kind}.json`` + ``root/images/``.

    Each record: the json fields (image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption,
    false_caption, relation_name and/or attributes) plus ``image`` (PIL/array of the full
    image; needed on the first record of each image_path only).
    """
    if kind not in VG_FILES:
        raise ValueError(f"kind must be one of {list(VG_FILES)}, got {kind!r}")
    root = Path(root)
    out, written = [], set()
    for i, rec in enumerate(records):
        _require_keys(rec, _VG_KEYS[kind], f"record {i}", "the record", "add the missing field")
        if rec["image_path"] not in written:
            if "image" not in rec:
                raise ValueError(f"record {i}: first record of image {rec['image_path']!r} needs 'image'")
            save_image(rec["image"], root / "images" / rec["image_path"])
            written.add(rec["image_path"])
        out.append({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in rec.items() if k != "image"})
    return _write_json(root / VG_FILES[kind], out)


def _group_key(meta: Mapping) -> tuple[str, str]:
    task = meta.get("aro_task")
    if task == "vg_relation":
        return task, meta["relation_name"]
    if task == "vg_attribution":
        return task, meta.get("attribute_pair") or "_".join(meta["attributes"])
    if task in ("coco_order", "flickr_order"):
        return task, "all"
    raise FormatError(f"item meta {dict(meta)!r} has no known 'aro_task'. "
                      "Fix: pass the meta of items from read_aro_vg / read_aro_order")


def aro_group_accuracy(items_meta: Sequence[Mapping], correct: Sequence[bool],
                       symmetric: Iterable[str] = ARO_SYMMETRIC_RELATIONS, vga_min_count: int = 25):
    """Per-group accuracy table (relation / attribute pair) with the official inclusion flag.

    Returns a DataFrame with columns task, group, accuracy, count, included. VG-R groups
    are excluded when symmetric; VG-A groups when they have fewer than ``vga_min_count``
    items (ARO's ``evaluate_scores`` skips attribute pairs with < 25 cases).
    """
    import pandas as pd

    correct = np.asarray(correct, dtype=bool)
    if len(items_meta) != len(correct):
        raise ValueError(f"{len(items_meta)} metas but {len(correct)} correctness values")
    if len(correct) == 0:
        raise ValueError("no items to score")
    symmetric = set(symmetric)
    keys = [_group_key(m) for m in items_meta]
    df = pd.DataFrame({"task": [k[0] for k in keys], "group": [k[1] for k in keys], "correct": correct})
    g = df.groupby(["task", "group"], sort=True)["correct"].agg(["mean", "size"]).reset_index()
    g = g.rename(columns={"mean": "accuracy", "size": "count"})
    inc = np.ones(len(g), dtype=bool)
    inc[(g.task == "vg_relation").to_numpy() & g.group.isin(symmetric).to_numpy()] = False
    inc[(g.task == "vg_attribution").to_numpy() & (g["count"] < vga_min_count).to_numpy()] = False
    g["included"] = inc
    return g


def aro_accuracy(items_meta: Sequence[Mapping], correct: Sequence[bool], protocol: str = "macro",
                 symmetric: Iterable[str] = ARO_SYMMETRIC_RELATIONS, vga_min_count: int = 25) -> float:
    """ARO accuracy of one task (VG-R, VG-A, COCO-Order or Flickr-Order).

    protocol="macro" (ARO's official numbers): VG-R = mean over relations of the per-relation
    accuracy, symmetric relations excluded; VG-A = mean over attribute pairs with at least
    ``vga_min_count`` items; COCO/Flickr-Order = precision@1 (macro = micro there).
    protocol="micro" (DiffusionITM's tables): plain mean over all items, nothing excluded.
    ``correct[n]`` = whether the model ranked the true caption first for item n.
    """
    if protocol not in ("macro", "micro"):
        raise ValueError(f"protocol must be 'macro' or 'micro', got {protocol!r}")
    tasks = {_group_key(m)[0] for m in items_meta}
    if len(tasks) != 1:
        raise ValueError(f"items mix ARO tasks {sorted(tasks)}; score each task separately")
    c = np.asarray(correct, dtype=bool)
    if protocol == "micro":
        if len(c) != len(items_meta) or len(c) == 0:
            raise ValueError(f"{len(items_meta)} metas but {len(c)} correctness values")
        return float(c.mean())
    g = aro_group_accuracy(items_meta, c, symmetric, vga_min_count)
    g = g[g.included]
    if g.empty:
        raise ValueError(f"no group is left after the official exclusions (task {tasks.pop()}; "
                         f"VG-A needs >= {vga_min_count} items per attribute pair). "
                         "Fix: pass vga_min_count=1 for small datasets, or use protocol='micro'")
    return float(g.accuracy.mean())
