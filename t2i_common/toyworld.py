"""The toy world: a procedural 32x32 scene generator whose ground truth is known exactly.

Every notebook falls back to this world when no real model or dataset is at hand
(see specs/toy_world.md).  It provides

- scenes of one to three flat-coloured objects (4 shapes x 5 colours x 2 sizes) on
  a lightly textured gray background, drawn without anti-aliasing so that the
  object masks are exact;
- captions from several templates (word order and phrasing vary), with the
  pixels each caption word refers to (``Sample.word_masks``);
- hard negatives built from the scene graph, the families the papers use on real
  data: attribute swap (ARO VG-Attribution / CLEVR binding), relation swap
  (ARO VG-Relation), the four ARO order perturbations (COCO/Flickr-Order),
  Winoground-style quadruples, class prompts (zero-shot classification) and
  omit/swap-one-word interventions (Information decomposition);
- controlled variants: Nightshade-style poisoned captions (model implosion),
  a rare concept in exactly k known images (attribution), held-out attribute
  combinations (compositional generalisation);
- an automatic pixel-rule checker (``check_prompt``) that scores generated images.

Conventions: x is the column (grows to the right), y the row (grows downwards), so
"above" means a smaller y.  ``Obj.bbox = (x0, y0, x1, y1)`` with exclusive ends.
Everything is deterministic given the seeds passed in; sample ``i`` of
``make_samples(n, seed)`` depends only on ``(seed, i)``.

Deliberate simplifications: objects of one multi-object scene have distinct colours
and distinct shapes (so each caption names every object unambiguously and a swap
always yields a false caption); the order perturbations use the word types of the
toy vocabulary instead of spaCy POS tags.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

# ----------------------------------------------------------------------------- world constants
IMAGE_SIZE = 32
BACKGROUND = (118, 118, 118)
#: amplitude of the per-pixel background texture (uniform integers in [-A, A], gray)
TEXTURE_AMPLITUDE = 4
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond")
#: nominal bounding-box side in pixels
SIZES: dict[str, int] = {"small": 8, "large": 14}
RELATIONS = ("to the left of", "to the right of", "above", "below")
CONVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
KINDS = ("single", "pair", "triple")
N_OBJECTS = {"single": 1, "pair": 2, "triple": 3}
DEFAULT_WEIGHTS = {"single": 0.5, "pair": 0.3, "triple": 0.2}
#: free pixels kept between an object and the image border
MARGIN = 1
#: minimum free pixels between the bounding boxes of two objects
MIN_GAP = 2

#: caption templates per scene kind.  {zK}/{cK}/{sK} are the size/colour/shape of
#: the K-th *mentioned* object; {rel} is the scene relation, said either forwards
#: ("a X to the left of a Y") or in its converse phrasing ("a Y to the right of a X").
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("a {c0} {s0}", "a {z0} {c0} {s0}"),
    "pair": (
        "a {c0} {s0} {rel} a {c1} {s1}",
        "a {z0} {c0} {s0} {rel} a {z1} {c1} {s1}",
        "a {c0} {s0} and a {c1} {s1}",
    ),
    "triple": ("a {c0} {s0} and a {c1} {s1} and a {c2} {s2}",),
}

WORD_TYPES: dict[str, str] = {
    "a": "article", "an": "article", "and": "conjunction",
    **{w: "size" for w in SIZES}, **{w: "colour" for w in COLOURS}, **{w: "noun" for w in SHAPES},
    **{w: "relation" for rel in RELATIONS for w in rel.split()},
    # class / colour prompts ("a photo of a circle", "a photo of a red object")
    "photo": "other", "object": "noun",
    # placeholder of omit_word(..., placeholder="_") (Info-Decomp's ``context_`` column)
    "_": "other",
}
#: every word any caption, negative, class prompt or placeholder can contain
VOCAB: list[str] = sorted(WORD_TYPES)
_CONTENT_TYPES = ("noun", "colour", "size")


# ----------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class Obj:
    """One object: attributes, centre (cx, cy) in pixels and bbox (x0, y0, x1, y1), ends exclusive."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]


def make_obj(shape: str, colour: str, size: str, x0: int, y0: int) -> Obj:
    """An object whose bounding box has its top-left corner at (x0, y0)."""
    if shape not in SHAPES or colour not in COLOURS or size not in SIZES:
        raise ValueError(f"unknown object attributes {(shape, colour, size)}; "
                         f"shapes {SHAPES}, colours {tuple(COLOURS)}, sizes {tuple(SIZES)}")
    s = SIZES[size]
    return Obj(shape, colour, size, x0 + s / 2, y0 + s / 2, (int(x0), int(y0), int(x0) + s, int(y0) + s))


@dataclass(frozen=True)
class Scene:
    """Scene graph: objects, optional relation ``(i, rel, j)`` ("object i rel object j"), kind."""

    objects: tuple[Obj, ...]
    relation: tuple[int, str, int] | None
    kind: str


@dataclass
class Sample:
    """One toy image with its ground truth.

    ``word_objects[c]`` lists ``(word, word_type, object_indices)`` for caption ``c``;
    ``word_masks`` turns the indices into masks (computed on access, so a large
    training set does not hold one mask copy per word).
    """

    image: np.ndarray  # uint8 [32, 32, 3]
    masks: np.ndarray  # bool [n_obj, 32, 32]
    scene: Scene
    captions: list[str]
    word_objects: list[list[tuple[str, str, tuple[int, ...]]]] = field(repr=False)

    @property
    def word_masks(self) -> list[list[tuple[str, str, np.ndarray | None]]]:
        """Per caption: (word, word_type, mask) with mask None for articles and "and"."""
        out = []
        for words in self.word_objects:
            row = []
            for word, wtype, objs in words:
                mask = None if not objs else np.any(self.masks[list(objs)], axis=0)
                row.append((word, wtype, mask))
            out.append(row)
        return out


# ----------------------------------------------------------------------------- rendering
def shape_mask(shape: str, bbox: Sequence[int], height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
    """Exact (aliased) mask of ``shape`` filling ``bbox`` in a height x width image.

    A pixel belongs to the shape when its centre does (for the triangle, when the
    bottom edge of its row does, so that the apex row is not empty).  In
    coordinates u, v normalised to [-1, 1] over the box: circle u^2+v^2 <= 1,
    diamond |u|+|v| <= 1, square the whole box, triangle (apex up) |u| <= row fraction.
    """
    x0, y0, x1, y1 = (int(b) for b in bbox)
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        raise ValueError(f"empty bbox {tuple(bbox)}")
    ys, xs = np.mgrid[0:h, 0:w]
    u = (xs + 0.5 - w / 2) / (w / 2)
    v = (ys + 0.5 - h / 2) / (h / 2)
    eps = 1e-9
    if shape == "square":
        local = np.ones((h, w), bool)
    elif shape == "circle":
        local = u**2 + v**2 <= 1 + eps
    elif shape == "diamond":
        local = np.abs(u) + np.abs(v) <= 1 + eps
    elif shape == "triangle":
        local = np.abs(u) <= (ys + 1) / h + eps
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    out = np.zeros((height, width), bool)
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y1, height), min(x1, width)
    if cy1 > cy0 and cx1 > cx0:
        out[cy0:cy1, cx0:cx1] = local[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


def render(scene: Scene, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene: (image uint8 [32,32,3], masks bool [n_obj,32,32]); the texture is seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1, size=(IMAGE_SIZE, IMAGE_SIZE))
    image = (np.array(BACKGROUND)[None, None, :] + texture[:, :, None]).astype(np.uint8)
    masks = np.zeros((len(scene.objects), IMAGE_SIZE, IMAGE_SIZE), bool)
    for k, obj in enumerate(scene.objects):
        masks[k] = shape_mask(obj.shape, obj.bbox)
        image[masks[k]] = COLOURS[obj.colour]
    return image, masks


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 HxWx3 array -> PIL RGB image."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"to_pil expects a uint8 HxWx3 array, got {image.dtype} {image.shape}")
    return Image.fromarray(image, "RGB")


# ----------------------------------------------------------------------------- scene sampling
def _separated(a: np.ndarray, b: np.ndarray, sa: int, sb: int) -> np.ndarray:
    """Vectorised: boxes with top-left corners a, b ([N,2] as x, y) keep >= MIN_GAP px apart."""
    return ((b[:, 0] >= a[:, 0] + sa + MIN_GAP) | (a[:, 0] >= b[:, 0] + sb + MIN_GAP)
            | (b[:, 1] >= a[:, 1] + sa + MIN_GAP) | (a[:, 1] >= b[:, 1] + sb + MIN_GAP))


def _place_free(rng: np.random.Generator, sides: list[int], tries: int = 256) -> list[tuple[int, int]] | None:
    """Top-left corners of non-overlapping boxes (rejection sampling, ``tries`` candidates at once)."""
    corners = [rng.integers(MARGIN, IMAGE_SIZE - MARGIN - s + 1, size=(tries, 2)) for s in sides]
    ok = np.ones(tries, bool)
    for i in range(len(sides)):
        for j in range(i + 1, len(sides)):
            ok &= _separated(corners[i], corners[j], sides[i], sides[j])
    hits = np.flatnonzero(ok)
    if len(hits) == 0:
        return None
    t = hits[0]
    return [(int(c[t, 0]), int(c[t, 1])) for c in corners]


def _place_related(rng: np.random.Generator, s_subj: int, s_obj: int, rel: str,
                   tries: int = 256) -> list[tuple[int, int]] | None:
    """Corners of (subject, object) such that "subject rel object" is unambiguous.

    Along the relation axis the boxes are >= MIN_GAP apart; across it the centre
    offset is at most half the centre offset along it.
    """
    axis = 0 if rel in ("to the left of", "to the right of") else 1  # 0: x, 1: y
    subj_first = rel in ("to the left of", "above")
    s_first, s_second = (s_subj, s_obj) if subj_first else (s_obj, s_subj)
    hi = IMAGE_SIZE - MARGIN
    if s_first + MIN_GAP + s_second > hi - MARGIN:
        return None
    a0 = rng.integers(MARGIN, hi - (s_first + MIN_GAP + s_second) + 1, size=tries)
    lo_b = a0 + s_first + MIN_GAP
    b0 = lo_b + np.floor(rng.random(tries) * (hi - s_second - lo_b + 1)).astype(int)
    pa = rng.integers(MARGIN, hi - s_first + 1, size=tries)
    pb = rng.integers(MARGIN, hi - s_second + 1, size=tries)
    d_axis = (b0 + s_second / 2) - (a0 + s_first / 2)
    d_perp = (pb + s_second / 2) - (pa + s_first / 2)
    hits = np.flatnonzero(np.abs(d_perp) <= d_axis / 2)
    if len(hits) == 0:
        return None
    t = hits[0]
    first = (int(a0[t]), int(pa[t])) if axis == 0 else (int(pa[t]), int(a0[t]))
    second = (int(b0[t]), int(pb[t])) if axis == 0 else (int(pb[t]), int(b0[t]))
    return [first, second] if subj_first else [second, first]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def random_scene(rng: np.random.Generator, kind: str, exclude_combinations: Iterable[tuple[str, str]] | None = None,
                 *, colours: Sequence[str] | None = None, shapes: Sequence[str] | None = None,
                 sizes: Sequence[str] | None = None, relation: str | None = None,
                 same_size: bool = False, max_tries: int = 200) -> Scene:
    """Draw a random scene of ``kind`` ("single" | "pair" | "triple").

    Multi-object scenes have distinct colours and distinct shapes, a triple scene
    at most two large objects (three 14 px boxes with 2 px gaps rarely fit); no object has a
    (colour, shape) pair from ``exclude_combinations``.  ``colours``/``shapes``/
    ``sizes``/``relation`` fix those attributes (one entry per object); a pair
    scene always has a relation ``(0, rel, 1)``; ``same_size`` forces equal sizes.
    """
    _check_kind(kind)
    n = N_OBJECTS[kind]
    excluded = {tuple(c) for c in (exclude_combinations or ())}
    for c in excluded:
        if len(c) != 2 or c[0] not in COLOURS or c[1] not in SHAPES:
            raise ValueError(f"exclude_combinations entry {c!r} must be a (colour, shape) pair")
    for name, fixed, allowed in (("colours", colours, COLOURS), ("shapes", shapes, SHAPES), ("sizes", sizes, SIZES)):
        if fixed is not None and (len(fixed) != n or any(v not in allowed for v in fixed)):
            raise ValueError(f"{name}={fixed!r} must list {n} values from {tuple(allowed)} for kind {kind!r}")
    if kind == "triple" and sizes is not None and list(sizes).count("large") == 3:
        raise ValueError("sizes=['large'] * 3: at most two large objects fit a triple scene (32 px image)")
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    colour_names, size_names = list(COLOURS), list(SIZES)
    for _ in range(max_tries):
        cs = list(colours) if colours is not None else [colour_names[k] for k in rng.choice(5, n, replace=False)]
        ss = list(shapes) if shapes is not None else [SHAPES[k] for k in rng.choice(4, n, replace=False)]
        if sizes is not None:
            zs = list(sizes)
        elif same_size:
            zs = [size_names[int(rng.integers(2))]] * n
        else:
            zs = [size_names[k] for k in rng.integers(2, size=n)]
        if any((c, s) in excluded for c, s in zip(cs, ss)) or (n == 3 and zs.count("large") == 3):
            continue
        sides = [SIZES[z] for z in zs]
        rel = None
        if kind == "pair":
            rel = relation or RELATIONS[int(rng.integers(len(RELATIONS)))]
            corners = _place_related(rng, sides[0], sides[1], rel)
        else:
            corners = _place_free(rng, sides, tries=256 if n == 1 else 2048)
        if corners is None:
            continue
        objs = tuple(make_obj(s, c, z, x, y) for s, c, z, (x, y) in zip(ss, cs, zs, corners))
        return Scene(objs, (0, rel, 1) if rel else None, kind)
    raise ValueError(f"could not draw a {kind!r} scene in {max_tries} tries with colours={colours}, "
                     f"shapes={shapes}, sizes={sizes}, excluded={sorted(excluded)}: constraints too tight")


# ----------------------------------------------------------------------------- captions
_SLOT = re.compile(r"^\{([zcs])(\d)\}$")


def caption_tokens(scene: Scene, template: str | int, rng: np.random.Generator | None = None
                   ) -> list[tuple[str, str, tuple[int, ...]]]:
    """Fill a template: list of (word, word_type, indices of the objects the word refers to).

    ``template`` is a template string or an index into ``TEMPLATES[scene.kind]``.
    With ``rng`` the mention order is random (a random permutation, or for a
    relational template forwards / converse with probability 1/2 each); with
    ``rng=None`` it is canonical (scene order, relation said forwards).
    """
    if isinstance(template, (int, np.integer)):
        template = TEMPLATES[scene.kind][int(template)]
    n = len(scene.objects)
    words = template.split()
    if "{rel}" in words:
        if scene.relation is None:
            raise ValueError(f"template {template!r} needs a relation but the scene has none")
        i, rel, j = scene.relation
        if rng is not None and rng.random() < 0.5:
            i, j, rel = j, i, CONVERSE[rel]
        order = [i, j] + [k for k in range(n) if k not in (i, j)]
        related = (min(i, j), max(i, j))
    else:
        order = list(rng.permutation(n)) if rng is not None else list(range(n))
        rel, related = None, ()
    out = []
    for w in words:
        if w == "{rel}":
            out.extend((r, "relation", related) for r in rel.split())
            continue
        m = _SLOT.match(w)
        if m:
            k = int(m.group(2))
            if k >= n:
                raise ValueError(f"template {template!r} names object {k} but the scene has {n}")
            obj = scene.objects[order[k]]
            attr, wtype = {"z": (obj.size, "size"), "c": (obj.colour, "colour"), "s": (obj.shape, "noun")}[m.group(1)]
            out.append((attr, wtype, (int(order[k]),)))
        elif w in WORD_TYPES:
            out.append((w, WORD_TYPES[w], related if WORD_TYPES[w] == "relation" else ()))
        else:
            raise ValueError(f"template {template!r}: word {w!r} is not in VOCAB")
    return out


def caption_for(scene: Scene, template: str | int, rng: np.random.Generator | None = None) -> str:
    """Caption of ``scene`` from ``template`` (see ``caption_tokens``): lower case, single spaces."""
    return " ".join(w for w, _, _ in caption_tokens(scene, template, rng))


def sample_from_scene(scene: Scene, rng: np.random.Generator) -> Sample:
    """Render ``scene`` (texture seed drawn from ``rng``) and caption it with every template of its kind."""
    image, masks = render(scene, int(rng.integers(2**31)))
    tokens = [caption_tokens(scene, t, rng) for t in TEMPLATES[scene.kind]]
    return Sample(image, masks, scene, [" ".join(w for w, _, _ in t) for t in tokens], tokens)


def _kind_probs(kinds: Sequence[str], weights) -> np.ndarray:
    kinds = tuple(kinds)
    for k in kinds:
        _check_kind(k)
    if not kinds:
        raise ValueError("kinds must name at least one of " + str(KINDS))
    if weights is None:
        w = np.array([DEFAULT_WEIGHTS[k] for k in kinds], float)
    elif isinstance(weights, dict):
        w = np.array([weights[k] for k in kinds], float)
    else:
        w = np.asarray(weights, float)
    if w.shape != (len(kinds),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {weights!r} must be {len(kinds)} non-negative numbers (one per kind {kinds})")
    return w / w.sum()


def make_sample(seed: int, index: int, kinds: Sequence[str] = KINDS, weights=None,
                exclude_combinations: Iterable[tuple[str, str]] | None = None) -> Sample:
    """Sample ``index`` of the stream ``seed`` (depends on nothing else)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    p = _kind_probs(kinds, weights)
    rng = np.random.default_rng([int(seed), int(index)])
    kind = tuple(kinds)[int(rng.choice(len(p), p=p))]
    return sample_from_scene(random_scene(rng, kind, exclude_combinations), rng)


def make_samples(n: int, seed: int, kinds: Sequence[str] = KINDS, weights=None,
                 exclude_combinations: Iterable[tuple[str, str]] | None = None,
                 progress: bool = False) -> list[Sample]:
    """``n`` toy samples; sample i depends only on (seed, i), so prefixes are stable.

    ``weights`` (sequence aligned with ``kinds`` or dict kind -> weight) defaults to
    single 0.5 / pair 0.3 / triple 0.2.  ``exclude_combinations``: (colour, shape)
    pairs that never appear (held-out combinations for compositional tests).
    """
    excl = list(exclude_combinations or ())
    _kind_probs(kinds, weights)  # validate once, with a clear error
    it = range(int(n))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="toy samples")
    return [make_sample(seed, i, kinds, weights, excl) for i in it]


# ----------------------------------------------------------------------------- hard negatives
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


# ----------------------------------------------------------------------------- controlled variants
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


# ----------------------------------------------------------------------------- automatic checker
#: a pixel farther than this (RGB Euclidean) from the background gray is an object pixel
CHECK_TOLERANCE = 40.0
#: connected components smaller than this (pixels) are noise
MIN_AREA = 6
#: bounding-box side (px) from which an object counts as "large" (small 8, large 14)
LARGE_THRESHOLD = 11
_PALETTE = np.array(list(COLOURS.values()), float)
_COLOUR_NAMES = list(COLOURS)


def _as_image(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image HxWx3, got shape {arr.shape}")
    return arr.astype(float)


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest palette colour of each [N,3] pixel."""
    d = ((pixels[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)
    return d.argmin(1)


def shape_features(weights: np.ndarray) -> tuple[float, float, float]:
    """Blur-invariant shape descriptors of a non-negative weight map (object coverage per pixel).

    Treating the normalised weights as a distribution of pixel positions with
    total mass A (the area), returns ``(skew, quad, A)`` with
    skew = kappa_03 / A^1.5 (third cumulant of y: a triangle with its apex up is
    negative, every 4-fold symmetric shape ~0) and
    quad = (kappa_40 + kappa_04 - 6 kappa_22) / A^2 (the cos 4theta part of the
    fourth cumulants: square -1/60, diamond +1/60, circle ~0).  A Gaussian blur of
    the image adds only to the second cumulants, so these are unchanged by blur;
    that is why the checker uses them instead of a thresholded outline.
    """
    w = np.asarray(weights, float)
    total = w.sum()
    if total <= 0:
        raise ValueError("shape_features got an empty weight map")
    ys, xs = np.mgrid[0:w.shape[0], 0:w.shape[1]] + 0.5
    p = w / total
    x = xs - (p * xs).sum()
    y = ys - (p * ys).sum()
    m = lambda f: float((p * f).sum())  # noqa: E731
    k40 = m(x**4) - 3 * m(x**2) ** 2
    k04 = m(y**4) - 3 * m(y**2) ** 2
    k22 = m(x**2 * y**2) - m(x**2) * m(y**2) - 2 * m(x * y) ** 2
    return m(y**3) / total**1.5, (k40 + k04 - 6 * k22) / total**2, float(total)


_PROTOTYPES: dict[str, tuple[float, float, float]] = {}


def shape_prototypes() -> dict[str, tuple[float, float, float]]:
    """Per shape: (skew, quad, fill fraction) of the exactly rendered shape, averaged over SIZES."""
    if not _PROTOTYPES:
        for s in SHAPES:
            rows = []
            for side in SIZES.values():
                m = shape_mask(s, (0, 0, side, side), side, side)
                skew, quad, area = shape_features(m)
                rows.append((skew, quad, area / side**2))
            _PROTOTYPES[s] = tuple(float(v) for v in np.mean(rows, axis=0))
    return _PROTOTYPES


def classify_shape(weights: np.ndarray) -> str:
    """Shape whose prototype (``shape_prototypes``) is nearest in (skew, quad) to a weight map/mask.

    This is the filled-fraction / symmetry rule in moment form: ``quad`` separates
    square (full box), circle and diamond (same 4-fold symmetry, rotated by 45
    degrees); ``skew`` separates the triangle (row widths grow downwards) from the
    diamond (widest in the middle).
    """
    skew, quad, _ = shape_features(weights)
    protos = shape_prototypes()
    return min(protos, key=lambda s: (skew - protos[s][0]) ** 2 + (quad - protos[s][1]) ** 2)


#: pixels around a component (px) whose coverage still counts (blurred edges)
WINDOW_PAD = 2
#: coverage below this (noise floor of a sigma-10 image is ~0.07) is set to 0
COVERAGE_FLOOR = 0.1


def _coverage(img: np.ndarray, mask: np.ndarray, colour: str, exclude: np.ndarray | None) -> np.ndarray:
    """Per-pixel coverage alpha of ``colour`` over the background, near ``mask`` (0 elsewhere).

    alpha = <pixel - gray, colour - gray> / |colour - gray|^2 (1 inside a flat
    object, a blurred edge gives the blurred mask); rescaled so that the object's
    interior (75th percentile inside ``mask``) is 1, which makes dimmer generated
    colours count fully.
    """
    c = np.array(COLOURS[colour], float) - np.array(BACKGROUND, float)
    alpha = ((img - np.array(BACKGROUND, float)) @ c) / (c @ c)
    alpha /= max(float(np.percentile(alpha[mask], 75)), 0.3)
    window = ndimage.binary_dilation(mask, iterations=WINDOW_PAD) | mask
    if exclude is not None:
        window &= ~(ndimage.binary_dilation(exclude, iterations=1) & ~mask)
    return np.where(window & (alpha >= COVERAGE_FLOOR), alpha, 0.0)


def detect_objects(image, tolerance: float = CHECK_TOLERANCE, min_area: int = MIN_AREA) -> list[dict]:
    """Objects in an image, largest first: dicts with colour, shape, size, centroid (x, y), area, bbox, mask.

    Object pixels are those farther than ``tolerance`` from the background gray;
    they are grouped into 4-connected components (``scipy.ndimage.label``) of at
    least ``min_area`` pixels.  A component's colour is the majority nearest
    palette colour of its pixels; its shape, area (blur-invariant coverage sum),
    size (side sqrt(area / fill fraction of the shape) >= LARGE_THRESHOLD: large)
    and centroid come from its coverage map (``_coverage``).
    """
    img = _as_image(image)
    fg = np.sqrt(((img - np.array(BACKGROUND, float)) ** 2).sum(-1)) > tolerance
    labels, n = ndimage.label(fg)
    out = []
    for lab in range(1, n + 1):
        m = labels == lab
        if m.sum() < min_area:
            continue
        votes = np.bincount(_nearest_colour(img[m]), minlength=len(_PALETTE))
        colour = _COLOUR_NAMES[int(votes.argmax())]
        cov = _coverage(img, m, colour, fg & ~m)
        shape = classify_shape(cov)
        area = float(cov.sum())
        ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]] + 0.5
        side = np.sqrt(area / shape_prototypes()[shape][2])
        my, mx = np.nonzero(m)
        out.append({
            "colour": colour,
            "shape": shape,
            "size": "large" if side >= LARGE_THRESHOLD else "small",
            "centroid": (float((cov * xs).sum() / area), float((cov * ys).sum() / area)),
            "area": area,
            "bbox": (int(mx.min()), int(my.min()), int(mx.max()) + 1, int(my.max()) + 1),
            "mask": m,
        })
    out.sort(key=lambda d: -d["area"])
    return out


def classify_object(image, mask: np.ndarray | None = None) -> tuple[str, str]:
    """(colour, shape) of the object under ``mask``, or of the largest detected object.

    Raises ValueError when the image holds no object.
    """
    img = _as_image(image)
    if mask is None:
        found = detect_objects(img)
        if not found:
            raise ValueError("classify_object: no object pixels found (image is background only)")
        return found[0]["colour"], found[0]["shape"]
    mask = np.asarray(mask, bool)
    if mask.shape != img.shape[:2] or not mask.any():
        raise ValueError(f"mask must be a non-empty bool array of shape {img.shape[:2]}, got {mask.shape}")
    votes = np.bincount(_nearest_colour(img[mask]), minlength=len(_PALETTE))
    colour = _COLOUR_NAMES[int(votes.argmax())]
    return colour, classify_shape(_coverage(img, mask, colour, None))


def parse_prompt(prompt: str) -> tuple[list[dict], tuple[int, str, int] | None]:
    """Objects ({size, colour, shape}, None where unsaid) and relation (i, rel, j) named by a toy prompt.

    Understands every caption template, the negatives and the class prompts
    ("a photo of a circle", "a photo of a red object").
    """
    tokens = prompt.lower().split()
    objects, pending, relation, pending_rel = [], {}, None, None
    for k, t in enumerate(tokens):
        wtype = WORD_TYPES.get(t)
        if wtype is None:
            raise ValueError(f"prompt {prompt!r}: word {t!r} is not in the toy VOCAB")
        if wtype in ("size", "colour"):
            pending[wtype] = t
        elif wtype == "noun":
            objects.append({"size": pending.get("size"), "colour": pending.get("colour"),
                            "shape": t if t in SHAPES else None})
            pending = {}
            if pending_rel is not None:
                relation, pending_rel = (len(objects) - 2, pending_rel, len(objects) - 1), None
        elif t in ("left", "right", "above", "below") and objects:
            pending_rel = {"left": "to the left of", "right": "to the right of"}.get(t, t)
    if pending:
        objects.append({"size": pending.get("size"), "colour": pending.get("colour"), "shape": None})
    if not objects:
        raise ValueError(f"prompt {prompt!r} names no object (no shape, colour or size word)")
    return objects, relation


def _matches(want: dict, got: dict, keys: Sequence[str]) -> bool:
    return all(want[k] is None or want[k] == got[k] for k in keys)


def _best_assignment(want: list[dict], found: list[dict], keys: Sequence[str]) -> tuple[int, ...] | None:
    """Distinct detected objects matching each wanted object on ``keys`` (first in area order), or None."""
    def search(k: int, used: tuple[int, ...]):
        if k == len(want):
            return used
        for d in range(len(found)):
            if d not in used and _matches(want[k], found[d], keys):
                r = search(k + 1, used + (d,))
                if r is not None:
                    return r
        return None
    return search(0, ())


def _relation_holds(a: tuple[float, float], b: tuple[float, float], rel: str) -> bool:
    """Centroid a is ``rel`` centroid b, along an axis that dominates the other."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if rel == "to the left of":
        return dx > 0 and abs(dx) > abs(dy)
    if rel == "to the right of":
        return dx < 0 and abs(dx) > abs(dy)
    if rel == "above":
        return dy > 0 and abs(dy) > abs(dx)
    return dy < 0 and abs(dy) > abs(dx)  # below


def check_prompt(image, prompt: str, tolerance: float = CHECK_TOLERANCE, min_area: int = MIN_AREA) -> dict:
    """Automatic pixel-rule checker of a (generated) image against a toy prompt.

    Returns booleans: ``colour_ok`` / ``shape_ok`` / ``size_ok`` (each wanted value
    is carried by a distinct detected object; for a one-object prompt: by the
    largest detected object), ``both`` (colour and shape bound to the same
    objects), ``count_ok`` (as many objects detected as named) and, for a
    relational prompt, ``relation_ok`` (the bound objects' centroids are in the
    named order along the dominant axis).  Unsaid attributes always match.
    """
    want, relation = parse_prompt(prompt)
    found = detect_objects(image, tolerance, min_area)
    pool = found[:1] if len(want) == 1 else found
    result = {
        "colour_ok": _best_assignment(want, pool, ("colour",)) is not None,
        "shape_ok": _best_assignment(want, pool, ("shape",)) is not None,
        "size_ok": _best_assignment(want, pool, ("size",)) is not None,
    }
    bound = _best_assignment(want, pool, ("colour", "shape"))
    result["both"] = bound is not None
    result["count_ok"] = len(found) == len(want)
    if relation is not None:
        ok = False
        if len(found) >= 2:
            # try every binding (not only the first) for one satisfying the relation
            i, rel, j = relation
            for di in range(len(found)):
                for dj in range(len(found)):
                    if di != dj and _matches(want[i], found[di], ("colour", "shape")) \
                            and _matches(want[j], found[dj], ("colour", "shape")) \
                            and _relation_holds(found[di]["centroid"], found[dj]["centroid"], rel):
                        ok = True
        result["relation_ok"] = ok
    return result
