"""GDBench ImageCoDe: ``{split}_data.json`` + ``image-sets/{set}/img{k}.jpg`` as image-retrieval items."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._common import PathLike, _fail, _nonempty, _read_json, _require_dir, _write_json
from .images import IMAGE_EXTS, ImageRef, MatchItem, _check_exists, save_image


_IMGCODE_NAME = re.compile(r"^img(\d+)$")


def read_imagecode(json_path: PathLike, image_sets_dir: PathLike | None = None, static_only: bool = False,
                   check_images: bool = True) -> list[MatchItem]:
    """ImageCoDe ``{split}_data.json`` = ``{set_dir: {img_idx: text}}`` -> image-retrieval items.

    Images: ``image_sets_dir`` (default ``<json folder>/image-sets``) / set_dir / ``img{k}.jpg``
    (png accepted), ordered by k; gold_image = img_idx. ``static_only=True`` keeps the static
    sets (set names containing 'open-images'), which is what DiffusionITM's ``imagecode`` task uses.
    """
    json_path = Path(json_path)
    fix = "ImageCoDe json maps image-set folder -> {image index: description}"
    data = _read_json(json_path, "ImageCoDe annotations", "pass e.g. valid_data.json")
    if not isinstance(data, Mapping):
        raise _fail(json_path, f"expected a JSON object, got {type(data).__name__}", fix)
    sets_dir = Path(image_sets_dir) if image_sets_dir is not None else json_path.parent / "image-sets"
    items = []
    for set_name, descs in data.items():
        if static_only and "open-images" not in set_name:
            continue
        if not isinstance(descs, Mapping):
            raise _fail(json_path, f"set {set_name!r} maps to {type(descs).__name__}", fix)
        folder = _require_dir(sets_dir / set_name, f"ImageCoDe image set {set_name!r}",
                              "pass image_sets_dir (the folder holding the image-set folders)")
        files = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS and _IMGCODE_NAME.match(f.stem)]
        files.sort(key=lambda f: int(_IMGCODE_NAME.match(f.stem).group(1)))
        if not files:
            raise _fail(folder, "no img{k}.jpg files", "restore the image set")
        for idx, text in descs.items():
            if not str(idx).strip().isdigit():
                raise _fail(json_path, f"set {set_name!r} has image index {idx!r}", "indices are 0..9 as strings")
            k = int(idx)
            if not 0 <= k < len(files):
                raise _fail(json_path, f"set {set_name!r} description index {k} but only {len(files)} images",
                            "check the image set folder")
            refs = [ImageRef(f, source=f"{json_path} [{set_name!r}]") for f in files]
            items.append(MatchItem(refs, [text], k, 0, {"set": set_name, "img_idx": k}))
    _nonempty(items, json_path, f"check the file (static_only={static_only})")
    if check_images:
        _check_exists(r for it in items for r in it.image_refs)
    return items


def write_imagecode(root: PathLike, sets: Mapping[str, Sequence[Any]], descriptions: Mapping[str, Mapping[int, str]],
                    split: str = "valid", image_ext: str = ".jpg") -> Path:
    """Write ``root/{split}_data.json`` and ``root/image-sets/{set}/img{k}{image_ext}``."""
    root = Path(root)
    for set_name, imgs in sets.items():
        for k, img in enumerate(imgs):
            save_image(img, root / "image-sets" / set_name / f"img{k}{image_ext}")
    return _write_json(root / f"{split}_data.json",
                       {s: {str(k): t for k, t in d.items()} for s, d in descriptions.items()})
