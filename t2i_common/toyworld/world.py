"""The toy world itself: constants, scene graphs, exact rendering, random scenes and captioned samples.

Conventions: x is the column (grows to the right), y the row (grows downwards), so "above" means
a smaller y. ``Obj.bbox = (x0, y0, x1, y1)`` with exclusive ends. Sample ``i`` of
``make_samples(n, seed)`` depends only on ``(seed, i)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image


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
