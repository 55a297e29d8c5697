"""The toy world written in the published dataset formats (data_formats.md).

Every notebook reads the toy world through the same readers (``t2i_common.formats``) as the real
datasets, so there is no code path only the toy world exercises.  Each ``export_*`` function is
deterministic in ``seed``, writes under ``root`` and returns what the matching reader takes.
Sample streams: each export uses ``toyworld.make_samples(n, seed + offset)`` with a fixed offset
per format, so two formats never share images by accident.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import formats, paths
from .. import toyworld as tw


def default_root(name: str) -> Path:
    """``data/generated/<name>`` (git-ignored; rebuilt from the seed)."""
    return paths.GENERATED / name


def _pairs(n: int, seed: int, distinct: str | None = None):
    """n pair scenes (with a relation); ``distinct`` ('colour'/'shape'/'size') keeps only scenes
    whose two objects differ in that attribute, so a swap changes the caption."""
    out, i = [], 0
    while len(out) < n:
        s = tw.make_sample(seed, i, kinds=("pair",))
        i += 1
        a, b = s.scene.objects
        if distinct and getattr(a, distinct) == getattr(b, distinct):
            continue
        out.append(s)
    return out


def export_implosion(root, n: int, seed: int = 0, poison_rate: float = 0.0, concepts=None,
                     kinds=tw.KINDS):
    """Implosion text-image pickles of toy samples (first caption), optionally poisoned
    (``toyworld.poison``).  Returns (glob pattern, is_poisoned)."""
    samples = tw.make_samples(n, seed)
    samples, is_poisoned = tw.poison(samples, poison_rate, seed, concepts=concepts)
    formats.write_implosion_pickles([(s.image, s.captions[0]) for s in samples], root)
    return str(Path(root) / "*.pickle"), is_poisoned


def export_implosion_classes(root, n: int, seed: int = 0, attribute: str = "shape",
                             prompt_template: str | None = "a photo of a {label}"):
    """A class-label dataset (CIFAR-style): single-object images in ``root/<class>/`` with the
    label (``prompt_template=None``) or a prompt as text.  Returns the glob pattern."""
    samples = tw.make_samples(n, seed + 1, kinds=("single",))
    labels = [getattr(s.scene.objects[0], attribute) for s in samples]
    pairs = formats.class_pairs([s.image for s in samples], labels, prompt_template)
    formats.write_implosion_pickles(pairs, root, class_subfolders=labels)
    return str(Path(root) / "*" / "*.pickle")


def export_aro_vg(root, n: int, seed: int = 0, kind: str = "relation") -> Path:
    """ARO VG-Relation (subject/object swapped) or VG-Attribution (colours swapped) json + images.
    The bbox is the whole 32 px image (both objects inside)."""
    if kind not in ("relation", "attribution"):
        raise ValueError(f"export_aro_vg: kind must be 'relation' or 'attribution', got {kind!r}")
    recs = []
    samples = _pairs(n, seed + (10 if kind == "relation" else 20),
                     distinct=None if kind == "relation" else "colour")
    for i, s in enumerate(samples):
        h, w = s.image.shape[:2]
        rec = dict(image_path=f"toy_{kind}_{i:05d}.png", bbox_x=0, bbox_y=0, bbox_w=w, bbox_h=h,
                   image=s.image)
        if kind == "relation":
            rec["true_caption"], rec["false_caption"] = tw.relation_swap(s.scene)
            rec["relation_name"] = s.scene.relation[1]
        else:
            rec["true_caption"], rec["false_caption"] = tw.attribute_swap(s.scene, "colour", (0, 1))
            rec["attributes"] = [s.scene.objects[0].colour, s.scene.objects[1].colour]
            rec["relation_name"] = "and"
        recs.append(rec)
    return formats.write_aro_vg(recs, root, kind=kind)


def export_aro_order(root, n: int, seed: int = 0, task: str = "coco_order") -> Path:
    """COCO-Order / Flickr-Order json: one entry per toy image with its captions (all templates)."""
    off = 30 if task == "coco_order" else 40
    samples = tw.make_samples(n, seed + off, kinds=("pair", "triple"))
    entries, images = [], {}
    for i, s in enumerate(samples):
        name = f"images/toy_{task}_{i:05d}.png"
        entries.append(dict(image=name, caption=list(s.captions)[:5]))
        images[name] = s.image
    return formats.write_aro_order(entries, root, task=task, images=images)


def export_winoground(root, n: int, seed: int = 0) -> Path:
    """Winoground rows from ``toyworld.winoground_quadruples`` (tag = the swap family)."""
    rows = []
    fams = tw.WINOGROUND_FAMILIES
    for k, (i0, i1, c0, c1) in enumerate(tw.winoground_quadruples(n, seed + 50)):
        fam = fams[k % len(fams)]
        rows.append(dict(id=k, image_0=i0, image_1=i1, caption_0=c0, caption_1=c1,
                         tag="Object" if fam == "relation" else "Relation",
                         secondary_tag=fam, num_main_preds=1, collapsed_tag=fam))
    return formats.write_winoground(rows, root)


def export_clevr(root, n: int, seed: int = 0) -> Path:
    """GDBench CLEVR-style subtasks ({image: [[pos, neg], ...]}) from toy scenes."""
    images, subs = {}, {}

    def add(sub, s, pos, neg, i):
        name = f"{sub}_{i:05d}.png"
        images[name] = s.image
        subs.setdefault(sub, {})[name] = [[pos, neg]]

    rng = np.random.default_rng(seed + 60)
    cols, shapes = list(tw.COLOURS), list(tw.SHAPES)
    for i, s in enumerate(tw.make_samples(n, seed + 61, kinds=("single",))):
        o = s.scene.objects[0]
        other_c = cols[(cols.index(o.colour) + 1 + int(rng.integers(len(cols) - 1))) % len(cols)]
        other_s = shapes[(shapes.index(o.shape) + 1 + int(rng.integers(len(shapes) - 1))) % len(shapes)]
        add("recognition_color", s, f"a {o.colour} {o.shape}", f"a {other_c} {o.shape}", i)
        add("recognition_shape", s, f"a {o.colour} {o.shape}", f"a {o.colour} {other_s}", i)
    for i, s in enumerate(_pairs(n, seed + 62, distinct="colour")):
        add("pair_binding_color", s, *tw.attribute_swap(s.scene, "colour", (0, 1)), i)
    for i, s in enumerate(_pairs(n, seed + 63, distinct="size")):
        add("pair_binding_size", s, *tw.attribute_swap(s.scene, "size", (0, 1)), i)
    for i, s in enumerate(_pairs(n, seed + 64, distinct="shape")):
        a, b = s.scene.objects
        if a.colour == b.colour:
            continue
        add("binding_color_shape", s, f"a {a.colour} {a.shape} and a {b.colour} {b.shape}",
            f"a {a.colour} {b.shape} and a {b.colour} {a.shape}", i)
    for i, s in enumerate(_pairs(n, seed + 65)):
        i0, rel, j0 = s.scene.relation
        a, b = s.scene.objects[i0], s.scene.objects[j0]
        neg_rel = tw.CONVERSE[rel]
        add("spatial", s, f"a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}",
            f"a {a.colour} {a.shape} {neg_rel} a {b.colour} {b.shape}", i)
    formats.write_clevr(root, subs, images)
    return Path(root)


def export_coco_it(root, n: int, seed: int = 0):
    """COCO-style instances json (one instance per object, category = shape) + COCO-IT csv rows
    for nouns and colour adjectives (word type in the last column; a colour's Label is the shape it
    modifies, so the GT mask is that object).  Only words whose object's shape is unique in the
    image are exported, so the category mask is exactly the word's pixels.
    Returns (csv path, instances path, images dir)."""
    root = Path(root)
    samples = tw.make_samples(n, seed + 70, kinds=("single", "pair", "triple"))
    cats = [dict(id=k + 1, name=s) for k, s in enumerate(tw.SHAPES)]
    imgs, anns, rows = [], [], []
    for i, s in enumerate(samples):
        image_id = 100000 + i
        fname = f"{image_id:012d}.png"
        formats.save_image(s.image, root / "images" / fname)
        h, w = s.image.shape[:2]
        imgs.append(dict(id=image_id, file_name=fname, height=h, width=w))
        for o, m in zip(s.scene.objects, s.masks):
            anns.append(dict(image_id=image_id, category_id=tw.SHAPES.index(o.shape) + 1, mask=m))
        shapes = [o.shape for o in s.scene.objects]
        cap = s.captions[0]
        for word, wtype, _ in s.word_masks[0]:
            if wtype not in ("noun", "colour"):
                continue
            idx = s.word_objects[0][[w for w, _, _ in s.word_objects[0]].index(word)][2]
            shape = s.scene.objects[idx[0]].shape
            if shapes.count(shape) != 1 or cap.split().count(word) != 1:
                continue
            rows.append(dict(image_id=image_id, label=shape, caption=cap,
                             context=" ".join(t if t != word else "" for t in cap.split(" ")),
                             word=word, context_=tw.omit_word(cap, word, "_"), word_type=wtype))
    inst = formats.write_coco_instances(root / "instances_toy.json", imgs, anns, cats)
    csv = formats.write_coco_it(rows, root / "coco_it_toy.csv")
    return csv, inst, root / "images"


def export_negclip(root, n: int, seed: int = 0) -> Path:
    """NegCLIP-style training tsv with hard negatives: rows come in pairs (a pair scene and its
    colour-swapped partner image); each row's neg_caption is its colour-swapped caption and its
    neg_image the partner row."""
    root = Path(root)
    rows = []
    for k, (i0, i1, c0, c1) in enumerate(tw.winoground_quadruples(n, seed + 80, families=("colour",))):
        for j, (img, cap, neg) in enumerate(((i0, c0, c1), (i1, c1, c0))):
            rel = f"images/negclip_{k:05d}_{j}.png"
            formats.save_image(img, root / rel)
            rows.append(dict(title=cap, filepath=rel, neg_captions=[neg],
                             neg_images=[2 * k + (1 - j)]))
    return formats.write_negclip_tsv(rows, root / "negclip_toy.tsv")


def export_flickr_retrieval(root, n: int, seed: int = 0, n_candidates: int = 10) -> Path:
    """Image retrieval (Flickr30K format): caption -> 10 image paths, gold first; the distractors
    are other toy images of the same kind, drawn with ``seed``."""
    root = Path(root)
    samples = tw.make_samples(n + n_candidates, seed + 90, kinds=("pair",))
    names = []
    for i, s in enumerate(samples):
        names.append(f"images/flickr_{i:05d}.png")
        formats.save_image(s.image, root / names[-1])
    rng = np.random.default_rng(seed + 91)
    entries, seen = [], set()
    for i in range(n):
        cap = samples[i].captions[0]
        if cap in seen:
            continue
        seen.add(cap)
        others = [j for j in rng.permutation(len(samples)) if j != i][:n_candidates - 1]
        entries.append((cap, [names[i]] + [names[j] for j in others]))
    return formats.write_flickr30k_retrieval(entries, root / "flickr30k_retrieval_toy.json")


def toy_pos_tagger(words):
    """Part-of-speech tags for toy captions from the world's ground truth (shape nouns -> NOUN,
    colour and size words -> ADJ, others -> OTHER). ``formats.read_aro_order`` tags with spaCy when
    it and en_core_web_sm are installed, else with a lexicon (``formats.pos_tagger_name()`` says
    which); pass this as ``pos_tagger`` for tags that are exact on toy captions."""
    nouns, adjs = set(tw.SHAPES), set(tw.COLOURS) | set(tw.SIZES)
    return ["NOUN" if w in nouns else "ADJ" if w in adjs else "OTHER" for w in words]
