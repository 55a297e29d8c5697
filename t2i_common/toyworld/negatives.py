"""Hard negatives built from the toy scene graph (attribute / relation swaps, ARO order shuffles,
Winoground quadruples, class prompts, word interventions) and the controlled variants (poisoned
captions, a rare concept in k known images)."""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Sequence

import numpy as np

from .world import (COLOURS, KINDS, SHAPES, WORD_TYPES, _CONTENT_TYPES, Obj, Sample, Scene, caption_for,
                    make_samples, random_scene, render, sample_from_scene)


def _describe(obj_attrs: tuple[str, str, str], with_size: bool) -> str:
    size, colour, shape = obj_attrs
    return f"a {size} {colour} {shape}" if with_size else f"a {colour} {shape}"


def attribute_swap(scene: Scene, attribute: str = "colour", pair: tuple[int, int] | None = None,
                   seed: int = 0) -> tuple[str, str]:
    """(true caption, false caption) with ``attribute`` ("colour" | "size") swapped between two objects.

    ARO VG-Attribution / CLEVR binding style: "a red circle and a blue square" ->
    "a blue circle and a red square"; the size variant names sizes
    ("a small red circle and a large blue square" -> "a large red circle and a
    small blue square").  ``pair`` picks the objects (default: two drawn with ``seed``).
    """
    if attribute not in ("colour", "size"):
        raise ValueError(f"attribute must be 'colour' or 'size', got {attribute!r}")
    n = len(scene.objects)
    if n < 2:
        raise ValueError("attribute_swap needs a scene with >= 2 objects (kind 'pair' or 'triple')")
    if pair is None:
        pair = tuple(int(k) for k in np.sort(np.random.default_rng(seed).choice(n, 2, replace=False)))
    i, j = pair
    attrs = [[o.size, o.colour, o.shape] for o in scene.objects]
    slot = 0 if attribute == "size" else 1
    if attrs[i][slot] == attrs[j][slot]:
        raise ValueError(f"objects {i} and {j} have the same {attribute} {attrs[i][slot]!r}: swapping changes nothing")
    with_size = attribute == "size"
    true = " and ".join(_describe(tuple(a), with_size) for a in attrs)
    attrs[i][slot], attrs[j][slot] = attrs[j][slot], attrs[i][slot]
    false = " and ".join(_describe(tuple(a), with_size) for a in attrs)
    return true, false


def relation_swap(scene: Scene, with_colour: bool = True) -> tuple[str, str]:
    """(true, false) with subject and object exchanged (ARO VG-Relation style).

    "a red circle to the left of a blue square" -> "a blue square to the left of a
    red circle" (``with_colour=False``: "a circle to the left of a square").
    """
    if scene.relation is None:
        raise ValueError("relation_swap needs a scene with a relation (kind 'pair')")
    i, rel, j = scene.relation

    def name(o: Obj) -> str:
        return f"a {o.colour} {o.shape}" if with_colour else f"a {o.shape}"

    a, b = scene.objects[i], scene.objects[j]
    return f"{name(a)} {rel} {name(b)}", f"{name(b)} {rel} {name(a)}"


def _shuffled(tokens: list, positions: list[int], rng: np.random.Generator, max_tries: int = 100) -> list:
    """Permute ``tokens`` at ``positions`` so that the sequence changes, when any permutation can."""
    vals = [tokens[p] for p in positions]
    if len(set(map(str, vals))) < 2:
        return list(tokens)
    for _ in range(max_tries):
        perm = rng.permutation(len(positions))
        if any(vals[k] != vals[perm[k]] for k in range(len(vals))):
            break
    out = list(tokens)
    for p, k in zip(positions, perm):
        out[p] = vals[k]
    return out


def order_shuffles(caption: str, seed: int = 0) -> list[str]:
    """The four ARO order perturbations of a caption (COCO/Flickr-Order), in ARO's order:

    1. shuffle nouns and adjectives, 2. shuffle all other tokens, 3. shuffle
    within trigrams, 4. shuffle the order of trigrams.  Word types come from the
    toy ground truth (``WORD_TYPES``) instead of spaCy POS tags.  Each shuffle is
    redrawn until the caption changes; where no permutation can change it (e.g.
    a single trigram) the caption is returned unchanged.
    """
    rng = np.random.default_rng(seed)
    tokens = caption.split()
    types = [WORD_TYPES.get(t, "other") for t in tokens]
    content = [k for k, t in enumerate(types) if t in _CONTENT_TYPES]
    other = [k for k, t in enumerate(types) if t not in _CONTENT_TYPES]
    out = [_shuffled(tokens, content, rng), _shuffled(tokens, other, rng)]
    # within trigrams: permute each trigram; redraw until something changed
    trigrams = [tokens[k:k + 3] for k in range(0, len(tokens), 3)]
    can_change = any(len(set(t)) > 1 for t in trigrams)
    for _ in range(100):
        within = [w for t in trigrams for w in _plain_perm(t, rng)]
        if within != tokens or not can_change:
            break
    out.append(within)
    out.append([w for t in _shuffled(trigrams, list(range(len(trigrams))), rng) for w in t])
    return [" ".join(t) for t in out]


def _plain_perm(tokens: list[str], rng: np.random.Generator) -> list[str]:
    return [tokens[k] for k in rng.permutation(len(tokens))]


def _swap_objects_scene(scene: Scene, family: str) -> Scene:
    """The partner scene of a Winoground quadruple: colours (or positions) of objects 0 and 1 exchanged."""
    a, b = scene.objects[0], scene.objects[1]
    if family == "colour":
        na, nb = replace(a, colour=b.colour), replace(b, colour=a.colour)
    else:  # relation: same sizes, so the boxes can trade places exactly
        na = replace(a, cx=b.cx, cy=b.cy, bbox=b.bbox)
        nb = replace(b, cx=a.cx, cy=a.cy, bbox=a.bbox)
    return replace(scene, objects=(na, nb) + scene.objects[2:])


WINOGROUND_FAMILIES = ("colour", "relation")


def winoground_quadruples(n: int, seed: int, families: Sequence[str] = WINOGROUND_FAMILIES
                          ) -> list[tuple[np.ndarray, np.ndarray, str, str]]:
    """``n`` Winoground-style items (img0, img1, cap0, cap1); item k uses ``families[k % len]``.

    Both captions hold the same words in a different order and each is true for
    exactly its own image.  "colour": "a red circle to the left of a blue square" vs
    "a blue circle to the left of a red square" (img1 = colours swapped);
    "relation": "a red circle to the left of a blue square" vs "a blue square to the
    left of a red circle" (img1 = the two objects trade places).
    """
    for f in families:
        if f not in WINOGROUND_FAMILIES:
            raise ValueError(f"unknown Winoground family {f!r}; expected some of {WINOGROUND_FAMILIES}")
    out = []
    for k in range(int(n)):
        family = families[k % len(families)]
        rng = np.random.default_rng([int(seed), k])
        scene = random_scene(rng, "pair", same_size=(family == "relation"))
        tex_seed = int(rng.integers(2**31))
        partner = _swap_objects_scene(scene, family)
        img0, _ = render(scene, tex_seed)
        img1, _ = render(partner, tex_seed)
        cap0 = caption_for(scene, "a {c0} {s0} {rel} a {c1} {s1}")
        i, rel, j = scene.relation
        if family == "colour":
            cap1 = caption_for(partner, "a {c0} {s0} {rel} a {c1} {s1}")
        else:
            p = partner.objects
            cap1 = f"a {p[j].colour} {p[j].shape} {rel} a {p[i].colour} {p[i].shape}"
        out.append((img0, img1, cap0, cap1))
    return out


def class_prompts(attribute: str = "shape", template: str = "a photo of a {}") -> list[str]:
    """Zero-shot prompts, one per class in ``SHAPES`` / ``COLOURS`` order.

    shape: "a photo of a circle", ...; colour: "a photo of a red object", ...
    """
    if attribute == "shape":
        return [template.format(s) for s in SHAPES]
    if attribute == "colour":
        return [template.format(f"{c} object") for c in COLOURS]
    raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}")


def omit_word(caption: str, word: str, placeholder: str = "") -> str:
    """Caption with every occurrence of ``word`` removed (or replaced by ``placeholder``, e.g. "_").

    Info-Decomp's prompt intervention: ``context`` (removed) / ``context_`` ("_").
    """
    tokens = caption.split()
    if word not in tokens:
        raise ValueError(f"word {word!r} does not occur in caption {caption!r}")
    kept = [placeholder if t == word else t for t in tokens]
    return " ".join(t for t in kept if t)


def swap_word(caption: str, word: str, new: str) -> str:
    """Caption with every occurrence of ``word`` replaced by ``new``."""
    tokens = caption.split()
    if word not in tokens:
        raise ValueError(f"word {word!r} does not occur in caption {caption!r}")
    return " ".join(new if t == word else t for t in tokens)


def poison(samples: Sequence[Sample], rate: float, seed: int, concepts: Iterable[str] | None = None,
           attribute: str = "shape") -> tuple[list[Sample], np.ndarray]:
    """Nightshade-style mismatched pairs (model implosion): (new samples, is_poisoned).

    Eligible samples are those whose image contains one of ``concepts`` (values of
    ``attribute``, "shape" or "colour"; None: every sample).  Exactly
    ``round(rate * n_eligible)`` eligible samples, drawn with ``seed``, get every
    caption rewritten: each word of ``attribute`` that names an object whose value is
    in ``concepts`` is replaced by the next value in ``SHAPES`` / ``COLOURS`` order
    (a fixed source -> target map, as Nightshade maps one concept to another), so
    the caption no longer matches the image.  Images and masks are shared, not copied.
    """
    if attribute not in ("shape", "colour"):
        raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    values = list(SHAPES) if attribute == "shape" else list(COLOURS)
    chosen_concepts = set(values if concepts is None else concepts)
    bad = chosen_concepts - set(values)
    if bad:
        raise ValueError(f"concepts {sorted(bad)} are not {attribute}s; expected some of {values}")
    target = {v: values[(k + 1) % len(values)] for k, v in enumerate(values)}
    wtype = "noun" if attribute == "shape" else "colour"
    eligible = [k for k, s in enumerate(samples)
                if any(getattr(o, attribute) in chosen_concepts for o in s.scene.objects)]
    n_poison = int(round(rate * len(eligible)))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(eligible), n_poison, replace=False) if n_poison else np.array([], int)
    is_poisoned = np.zeros(len(samples), bool)
    is_poisoned[[eligible[k] for k in picked]] = True
    out = list(samples)
    for k in np.flatnonzero(is_poisoned):
        s = samples[k]
        new_words = []
        for words in s.word_objects:
            row = []
            for w, t, objs in words:
                if t == wtype and getattr(s.scene.objects[objs[0]], attribute) in chosen_concepts:
                    w = target[w]
                row.append((w, t, objs))
            new_words.append(row)
        out[k] = replace(s, captions=[" ".join(w for w, _, _ in r) for r in new_words], word_objects=new_words)
    return out, is_poisoned


def rare_concept(n: int, k: int, concept: tuple[str, str], seed: int, kinds: Sequence[str] = KINDS,
                 weights=None) -> tuple[list[Sample], np.ndarray]:
    """``n`` samples in which the (colour, shape) ``concept`` appears in exactly the ``k`` returned indices.

    Attribution ground truth: all other samples come from ``make_samples`` with
    the concept excluded; the k chosen indices (drawn with ``seed``) hold a
    single-object image of the concept (random size and position).
    """
    concept = tuple(concept)
    if len(concept) != 2 or concept[0] not in COLOURS or concept[1] not in SHAPES:
        raise ValueError(f"concept {concept!r} must be a (colour, shape) pair, e.g. ('purple', 'diamond')")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be between 0 and n={n}")
    samples = make_samples(n, seed, kinds, weights, exclude_combinations=[concept])
    idx = np.sort(np.random.default_rng([int(seed), 1]).choice(n, k, replace=False)) if k else np.array([], int)
    for i in idx:
        rng = np.random.default_rng([int(seed), int(i), 2])
        scene = random_scene(rng, "single", colours=[concept[0]], shapes=[concept[1]])
        samples[i] = sample_from_scene(scene, rng)
    return samples, idx
