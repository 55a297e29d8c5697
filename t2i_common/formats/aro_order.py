"""ARO COCO-Order / Flickr-Order: the four word-order perturbations and the order json reader/writer."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ._common import PathLike, _fail, _nonempty, _read_json, _require_keys, _write_json
from .captions import POS_ADJ, POS_NOUN, POS_OTHER, LexiconTagger, _check_tags, normalize_caption, tokenize
from .images import ImageRef, MatchItem, _check_exists, save_image


def _permute_positions(tokens: list[str], positions: Sequence[int], rng: np.random.Generator) -> None:
    if len(positions) > 1:
        vals = [tokens[p] for p in positions]
        for p, j in zip(positions, rng.permutation(len(positions))):
            tokens[p] = vals[j]


def _tagged(caption: str, pos_tagger: Callable | None) -> tuple[list[str], list[str]]:
    tokens = tokenize(caption)
    return tokens, _check_tags((pos_tagger or LexiconTagger())(tokens), tokens)


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


# token-level perturbations: (tokens, tags, rng) -> tokens; the tags are computed once per caption
def _nouns_and_adj(tokens: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    out = list(tokens)
    _permute_positions(out, [i for i, t in enumerate(tags) if t == POS_NOUN], rng)
    _permute_positions(out, [i for i, t in enumerate(tags) if t == POS_ADJ], rng)
    return out


def _allbut_nouns_and_adj(tokens: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    out = list(tokens)
    _permute_positions(out, [i for i, t in enumerate(tags) if t == POS_OTHER], rng)
    return out


def _within_trigrams(tokens: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    return [g[j] for g in _trigrams(tokens) for j in rng.permutation(len(g))]


def _trigram_order(tokens: list[str], tags: list[str], rng: np.random.Generator) -> list[str]:
    grams = _trigrams(tokens)
    return [w for j in rng.permutation(len(grams)) for w in grams[j]]


def shuffle_nouns_and_adj(caption: str, rng: np.random.Generator, pos_tagger: Callable | None = None) -> str:
    """ARO perturbation 1: permute the nouns among noun positions and the adjectives among adjective positions."""
    return " ".join(_nouns_and_adj(*_tagged(caption, pos_tagger), rng))


def shuffle_allbut_nouns_and_adj(caption: str, rng: np.random.Generator, pos_tagger: Callable | None = None) -> str:
    """ARO perturbation 2: permute every token that is neither a noun nor an adjective."""
    return " ".join(_allbut_nouns_and_adj(*_tagged(caption, pos_tagger), rng))


def shuffle_within_trigrams(caption: str, rng: np.random.Generator, pos_tagger: Callable | None = None) -> str:
    """ARO perturbation 3: cut the tokens into consecutive trigrams and permute inside each."""
    return " ".join(_within_trigrams(tokenize(caption), [], rng))


def shuffle_trigrams(caption: str, rng: np.random.Generator, pos_tagger: Callable | None = None) -> str:
    """ARO perturbation 4: permute the order of the consecutive trigrams."""
    return " ".join(_trigram_order(tokenize(caption), [], rng))


ORDER_PERTURBATIONS = (shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj, shuffle_within_trigrams,
                       shuffle_trigrams)
_TOKEN_PERTURBATIONS = (_nouns_and_adj, _allbut_nouns_and_adj, _within_trigrams, _trigram_order)


class NoOrderNegative(ValueError):
    """No draw of an ARO order perturbation changes the caption (e.g. a caption with one noun and
    one adjective cannot be perturbed by "shuffle nouns and adjectives"); ``perturbation`` names it."""

    def __init__(self, caption: str, perturbation: str, tries: int):
        self.caption, self.perturbation, self.tries = caption, perturbation, tries
        super().__init__(f"caption {caption!r}: {tries} draws of {perturbation} all reproduce the caption, so it "
                         "has no order negative. Fix: drop the caption (read_aro_order does and reports it "
                         "in .dropped) or use a longer caption")


def order_caption_options(caption: str, seed: int, max_words: int = 30,
                          pos_tagger: Callable | None = None, max_tries: int = 100) -> list[str]:
    """``[true, 4 perturbations]`` for one caption, each ``normalize_caption``-ed.

    As in ARO, the perturbations act on the raw caption and are normalised afterwards.
    ARO draws from the unseeded global RNG; here every draw comes from
    ``np.random.default_rng(seed)`` (deliberate difference: reproducible captions).
    A perturbation that reproduces the caption (same tokens after normalisation, e.g. the
    identity permutation) is not a negative: it is redrawn, retry ``t`` of perturbation
    ``k`` from ``np.random.default_rng([seed, k, t])`` (so the other perturbations keep their
    draws), up to ``max_tries`` draws in all. Where every draw reproduces the caption,
    :class:`NoOrderNegative` is raised. Deliberate difference: the original keeps such
    "negatives", which makes the item an exact tie.
    """
    if int(max_tries) < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    rng = np.random.default_rng(seed)
    tokens, tags = _tagged(caption, pos_tagger)
    true = normalize_caption(caption, max_words)
    true_tokens = tokenize(true)
    opts = [true]
    for k, perturb in enumerate(_TOKEN_PERTURBATIONS):
        for t in range(int(max_tries)):
            draw = rng if t == 0 else np.random.default_rng([int(seed), k, t])
            cand = normalize_caption(" ".join(perturb(tokens, tags, draw)), max_words)
            if tokenize(cand) != true_tokens:
                break
        else:
            raise NoOrderNegative(caption, ORDER_PERTURBATIONS[k].__name__, int(max_tries))
        opts.append(cand)
    return opts


class OrderItems(list):
    """:func:`read_aro_order`'s result: the list of :class:`MatchItem` s, plus ``dropped``, one dict
    ``{entry, caption_index, caption, perturbation}`` per caption left out because a perturbation
    could not change it (report ``len(items.dropped)`` beside the accuracy). Slicing gives a plain list."""

    def __init__(self, items: Iterable[MatchItem] = (), dropped: Sequence[dict] = ()):
        super().__init__(items)
        self.dropped = list(dropped)


ORDER_FILES = {"coco_order": "coco_karpathy_test.json", "flickr_order": "flickr30k_test.json"}


def read_aro_order(json_path: PathLike, image_root: PathLike | None = None, seed: int = 0, max_words: int = 30,
                   pos_tagger: Callable | None = None, task: str | None = None,
                   check_images: bool = True) -> OrderItems:
    """COCO-Order / Flickr-Order: one item per (image, caption) with captions ``[true, 4 perturbed]``, gold 0.

    ``json_path``: ``coco_karpathy_test.json`` / ``flickr30k_test.json`` (entries
    ``{image, caption: [captions]}``); ``image`` is relative to ``image_root`` (default: the
    json's folder, as in ARO where both live in the dataset root). The item for caption k of
    entry e uses seed ``[seed, e, k]``, so subsets and reorderings keep the same perturbations.
    ``pos_tagger``: words -> NOUN/ADJ/OTHER tags (default :class:`LexiconTagger`, see there).
    A caption some perturbation cannot change (:func:`order_caption_options`) gives no item;
    the result's ``dropped`` lists those captions (ARO's protocol for short captions).
    meta: aro_task, image, entry, caption_index.
    """
    json_path = Path(json_path)
    fix = "pass coco_karpathy_test.json or flickr30k_test.json (entries {image, caption: [...]})"
    data = _read_json(json_path, "ARO order annotations", fix)
    if not isinstance(data, list):
        raise _fail(json_path, f"expected a JSON list of entries, got {type(data).__name__}", fix)
    task = task or ("flickr_order" if "flickr" in json_path.name.lower() else "coco_order")
    if task not in ORDER_FILES:
        raise ValueError(f"task must be one of {list(ORDER_FILES)}, got {task!r}")
    image_root = Path(image_root) if image_root is not None else json_path.parent
    tagger = pos_tagger or LexiconTagger()
    items, dropped = OrderItems(), []
    for e, ent in enumerate(data):
        _require_keys(ent, ("image", "caption"), json_path, f"entry {e}", fix)
        caps = [ent["caption"]] if isinstance(ent["caption"], str) else ent["caption"]
        ref = ImageRef(image_root / ent["image"], source=f"{json_path} entry {e}")
        for k, cap in enumerate(caps):
            seq = np.random.SeedSequence([int(seed), e, k])
            try:
                opts = order_caption_options(cap, int(seq.generate_state(1)[0]), max_words, tagger)
            except NoOrderNegative as err:
                dropped.append({"entry": e, "caption_index": k, "caption": cap, "perturbation": err.perturbation})
                continue
            items.append(MatchItem([ref], opts, 0, 0,
                                   {"aro_task": task, "image": ent["image"], "entry": e, "caption_index": k}))
    items.dropped = dropped
    _nonempty(items, json_path, f"check the file ({len(dropped)} caption(s) were dropped because an order "
                                "perturbation cannot change them)")
    if check_images:
        _check_exists(it.image_refs[0] for it in items)
    return items


def write_aro_order(entries: Sequence[Mapping], root: PathLike, task: str = "coco_order",
                    images: Mapping[str, Any] | None = None) -> Path:
    """Write ``root/coco_karpathy_test.json`` (or ``flickr30k_test.json``): entries ``{image, caption: [...]}``.

    ``images`` maps each relative ``image`` path to a PIL/array written under ``root``.
    """
    if task not in ORDER_FILES:
        raise ValueError(f"task must be one of {list(ORDER_FILES)}, got {task!r}")
    root = Path(root)
    out = []
    for i, ent in enumerate(entries):
        _require_keys(ent, ("image", "caption"), f"entry {i}", "the entry", "add the missing field")
        caps = [ent["caption"]] if isinstance(ent["caption"], str) else list(ent["caption"])
        out.append({"image": ent["image"], "caption": caps,
                    **{k: v for k, v in ent.items() if k not in ("image", "caption")}})
    for rel, img in (images or {}).items():
        save_image(img, root / rel)
    return _write_json(root / ORDER_FILES[task], out)
