"""GDBench CLEVR: ``captions/{subtask}.json`` = ``{image: [[pos, neg], ...]}`` + ``images/``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ._common import PathLike, _fail, _nonempty, _read_json, _require_dir, _write_json
from .images import ImageRef, MatchItem, _check_exists, save_image


CLEVR_SUBTASKS = ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape", "spatial",
                  "binding_color_shape", "binding_shape_color")


def read_clevr(root: PathLike, subtasks: Sequence[str] | None = None, check_images: bool = True) -> list[MatchItem]:
    """GDBench CLEVR: ``root/captions/{subtask}.json`` = ``{image: [[pos, neg], ...]}``, images in ``root/images``.

    One text-retrieval item per pair, captions [pos, neg], gold 0 (DiffusionITM also uses
    columns 0/1 for 'spatial': its special case never fires). ``subtasks=None`` reads every
    published subtask file present; named subtasks must exist. meta: subtask, image.
    """
    root = Path(root)
    cap_dir = _require_dir(root / "captions", "CLEVR captions folder", "pass the folder holding captions/ and images/")
    names = list(subtasks) if subtasks is not None else [s for s in CLEVR_SUBTASKS if (cap_dir / f"{s}.json").is_file()]
    if not names:
        raise FileNotFoundError(f"no CLEVR subtask file in {cap_dir}. Fix: expected some of "
                                f"{[s + '.json' for s in CLEVR_SUBTASKS]}")
    items = []
    for sub in names:
        path = cap_dir / f"{sub}.json"
        fix = "each subtask file maps image name -> list of [positive caption, negative caption]"
        data = _read_json(path, f"CLEVR subtask {sub!r}", f"expected {path}; known subtasks {list(CLEVR_SUBTASKS)}")
        if not isinstance(data, Mapping):
            raise _fail(path, f"expected a JSON object, got {type(data).__name__}", fix)
        for img, pairs in data.items():
            ref = ImageRef(root / "images" / img, source=f"{path} [{img!r}]")
            for j, pair in enumerate(pairs):
                if not (isinstance(pair, (list, tuple)) and len(pair) >= 2):
                    raise _fail(path, f"image {img!r} pair {j} is {pair!r}", fix)
                items.append(MatchItem([ref], [pair[0], pair[1]], 0, 0, {"subtask": sub, "image": img, "pair": j}))
    _nonempty(items, cap_dir)
    if check_images:
        _check_exists(it.image_refs[0] for it in items)
    return items


def write_clevr(root: PathLike, subtask_pairs: Mapping[str, Mapping[str, Sequence[Sequence[str]]]],
                images: Mapping[str, Any]) -> list[Path]:
    """Write ``root/captions/{subtask}.json`` and ``root/images/{name}`` (names as in the json, e.g. .png)."""
    root = Path(root)
    for name, img in images.items():
        save_image(img, root / "images" / name)
    return [_write_json(root / "captions" / f"{sub}.json", {k: [list(p) for p in v] for k, v in pairs.items()})
            for sub, pairs in subtask_pairs.items()]
