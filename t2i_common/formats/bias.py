"""DiffusionITM's bias data: MMBias (groups x pleasant / unpleasant phrases) and the gender-bias folders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._common import FormatError, PathLike, _fail, _nonempty, _read_json, _require_dir, _require_keys, _write_json
from .images import IMAGE_EXTS, save_image


#: MMBias target groups by category (DiffusionITM ``BiasDataset``; folder data/Images/<category>/<group>).
MMBIAS_GROUPS = {"Religion": ("Christian", "Muslim", "Jewish", "Hindu", "Buddhist"),
                 "Nationality": ("American", "Arab"), "Sexual Orientation": ("Heterosexual", "LGBT")}

#: Gender-bias word pairs (male-, female-associated) per target (DiffusionITM ``GenderBiasDataset``).
GENDER_WORD_PAIRS = {"clothes": ("suit", "apron"), "bags": ("briefcase", "purse"), "drinks": ("beer", "wine")}


@dataclass
class MMBias:
    """MMBias: image paths per group, the group's category, and the pleasant / unpleasant phrases."""

    groups: dict[str, list[Path]]
    categories: dict[str, str]
    pleasant: list[str]
    unpleasant: list[str]


def read_mmbias(root: PathLike, groups: Sequence[str] | None = None) -> MMBias:
    """MMBias: ``root/textual_phrases.txt`` (JSON with pleasant_phrases / unpleasant_phrases) and
    images ``root/data/Images/<category>/<group>/*.jpg``. ``groups`` selects target groups."""
    root = Path(root)
    fix = "the MMBias root holds textual_phrases.txt and data/Images/<category>/<group>/"
    phrases = _read_json(root / "textual_phrases.txt", "MMBias textual_phrases.txt", fix)
    _require_keys(phrases, ("pleasant_phrases", "unpleasant_phrases"), root / "textual_phrases.txt",
                  "the top-level object", fix)
    img_root = _require_dir(root / "data" / "Images", "MMBias image folder", fix)
    found: dict[str, list[Path]] = {}
    cats: dict[str, str] = {}
    for cat_dir in sorted(p for p in img_root.iterdir() if p.is_dir()):
        for g_dir in sorted(p for p in cat_dir.iterdir() if p.is_dir()):
            files = sorted(f for f in g_dir.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if files:
                found[g_dir.name], cats[g_dir.name] = files, cat_dir.name
    if groups is not None:
        missing = [g for g in groups if g not in found]
        if missing:
            raise FileNotFoundError(f"MMBias groups {missing} have no images under {img_root} "
                                    f"(found {sorted(found)}). Fix: check the group names")
        found = {g: found[g] for g in groups}
    if not found:
        raise FormatError(f"dataset {img_root} has no items (no group folder with images). Fix: {fix}")
    pleasant, unpleasant = list(phrases["pleasant_phrases"]), list(phrases["unpleasant_phrases"])
    if not pleasant or not unpleasant:
        raise _fail(root / "textual_phrases.txt", "a phrase list is empty", "give both pleasant and unpleasant phrases")
    return MMBias(found, {g: cats[g] for g in found}, pleasant, unpleasant)


def write_mmbias(root: PathLike, images: Mapping[str, Sequence[Any]], pleasant: Sequence[str],
                 unpleasant: Sequence[str], categories: Mapping[str, str] | None = None,
                 image_ext: str = ".jpg") -> Path:
    """Write the MMBias layout; a group's category defaults to its MMBias category, else 'Other'."""
    root = Path(root)
    known = {g: c for c, gs in MMBIAS_GROUPS.items() for g in gs}
    for g, imgs in images.items():
        cat = (categories or {}).get(g, known.get(g, "Other"))
        for k, img in enumerate(imgs):
            save_image(img, root / "data" / "Images" / cat / g / f"{k:04d}{image_ext}")
    return _write_json(root / "textual_phrases.txt",
                       {"pleasant_phrases": list(pleasant), "unpleasant_phrases": list(unpleasant)}, indent=2)


def read_gender_bias(root: PathLike) -> list[dict]:
    """Gender-bias images ``root/{word}-images/{n}.jpg`` for the words of :data:`GENDER_WORD_PAIRS`.

    As in DiffusionITM, images numbered <= 6 are the 'male' ones and the rest 'female'.
    Returns dicts: path, target (clothes/bags/drinks), words (male word, female word), gender.
    """
    root = Path(root)
    out = []
    for target, words in GENDER_WORD_PAIRS.items():
        for word in words:
            folder = _require_dir(root / f"{word}-images", f"gender-bias folder for {word!r}",
                                  f"the root holds {[w + '-images' for ws in GENDER_WORD_PAIRS.values() for w in ws]}")
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() not in IMAGE_EXTS:
                    continue
                if not f.stem.isdigit():
                    raise _fail(f, "gender-bias image names must be numbers", "rename to 1.jpg, 2.jpg, ...")
                out.append({"path": f, "target": target, "words": words,
                            "gender": "male" if int(f.stem) <= 6 else "female"})
    return _nonempty(out, root)


def write_gender_bias(root: PathLike, images: Mapping[str, Mapping[str, Sequence[Any]]],
                      image_ext: str = ".jpg") -> list[Path]:
    """Write ``root/{word}-images/{n}.jpg``: images[word]['male'] as 1..6, ['female'] from 7 on."""
    root = Path(root)
    out = []
    for word, by_gender in images.items():
        male, female = list(by_gender.get("male", [])), list(by_gender.get("female", []))
        if len(male) > 6:
            raise ValueError(f"{word}: at most 6 'male' images fit the published numbering (1..6)")
        for n, img in list(zip(range(1, 7), male)) + list(zip(range(7, 7 + len(female)), female)):
            out.append(save_image(img, root / f"{word}-images" / f"{n}{image_ext}"))
    return out
