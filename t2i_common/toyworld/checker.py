"""The automatic pixel-rule checker: detects the objects of a (generated) toy image and checks a prompt."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .world import BACKGROUND, COLOURS, SHAPES, SIZES, WORD_TYPES, shape_mask


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
    and centroid come from its coverage map (``_coverage``).  A component with no coverage of
    any palette colour (a blob far from the background in no colour's direction, e.g. cyan-gray)
    is not an object and is left out.
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
        area = float(cov.sum())
        if area <= 0:
            # far from the background but no palette colour over it (e.g. a cyan-gray blob of a
            # random-weight decoder): not an object of the toy world
            continue
        shape = classify_shape(cov)
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
    cov = _coverage(img, mask, colour, None)
    # no coverage of the majority colour under the mask: its shape is the mask's own
    return colour, classify_shape(cov if cov.sum() > 0 else mask.astype(float))


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
