"""In-memory training data of the toy checkpoint's stages and their seeded batch draws: images
with one or more captions each (:class:`PairData`), pixel conversions for the VAE and the CLIP
vision tower, the caption table (each distinct caption tokenized once), and the draws of rows,
captions (with caption dropout) and data-parallel row slices that every stage's loss uses.
Re-exported by :mod:`t2i_common.toyworld.training`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..validate import known_words

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
@dataclass
class PairData:
    """Images (uint8 [N, H, W, 3]) and, per image, one or more captions (a random one is used
    each time the image is drawn)."""
    images: torch.Tensor
    captions: list

    def __len__(self):
        return len(self.images)


def _as_image_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        t = images
    else:
        t = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3] (RGB), got {tuple(t.shape)} {t.dtype}")
    return t.contiguous()


def as_pairs(data) -> PairData:
    """Accept a list of ``(image, caption)`` / ``(image, [captions])`` pairs, a :class:`PairData`,
    or a dataset object with ``.image``/``.images`` (uint8 [N, H, W, 3]) and ``.captions`` (one
    string or a list of strings per image, e.g. ``toyworld.make_samples(...)``)."""
    if isinstance(data, PairData):
        caps = [[c] if isinstance(c, str) else [str(x) for x in c] for c in data.captions]
        if len(caps) != len(data.images) or any(len(c) == 0 for c in caps):
            raise ValueError(f"PairData: {len(data.images)} images need as many non-empty caption "
                             f"lists, got {len(caps)}")
        return PairData(_as_image_tensor(data.images), caps)
    if hasattr(data, "captions") and (hasattr(data, "image") or hasattr(data, "images")):
        images = getattr(data, "images", None)
        if images is None:
            images = data.image
        caps = list(data.captions)
    else:
        data = list(data)
        if data and all(hasattr(d, "image") and hasattr(d, "captions") for d in data):
            return as_pairs(PairData(_as_image_tensor([d.image for d in data]),
                                     [d.captions for d in data]))
        if not data or not all(isinstance(d, (tuple, list)) and len(d) == 2 for d in data):
            raise ValueError("pairs must be a non-empty list of (image uint8 HxWx3, caption) tuples, "
                             "a PairData, or an object with .image/.images and .captions")
        images, caps = [d[0] for d in data], [d[1] for d in data]
    images = _as_image_tensor(images)
    caps = [[c] if isinstance(c, str) else [str(x) for x in c] for c in caps]
    if len(caps) != len(images):
        raise ValueError(f"{len(images)} images but {len(caps)} caption entries")
    if any(len(c) == 0 for c in caps):
        raise ValueError("every image needs at least one caption")
    return PairData(images, caps)


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the VAE / SD convention)."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_clip_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, H, W], identical to what
    ``models.load_clip`` does for an image already at the model's size."""
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _caption_table(pairs: PairData, extra=("",), tokenizer=None):
    """Distinct captions -> index; per image the list of its caption indices.  With a
    ``tokenizer``, a word it does not know (the toy tokenizer maps it to <|endoftext|>) is an
    error naming the word."""
    table: dict[str, int] = {}
    for c in extra:
        table.setdefault(c, len(table))
    per_image = []
    for caps in pairs.captions:
        per_image.append([table.setdefault(c, len(table)) for c in caps])
    if tokenizer is not None:
        known_words(tokenizer, list(table), "training captions")
    return list(table), per_image


def _pick_captions(per_image, idx, g):
    """One random caption index per drawn image (drawn with ``g``)."""
    out = []
    r = torch.rand(len(idx), generator=g)
    for i, u in zip(idx.tolist(), r.tolist()):
        opts = per_image[i]
        out.append(opts[min(int(u * len(opts)), len(opts) - 1)])
    return torch.tensor(out, dtype=torch.long)


def draw_captions(per_image, idx, g, caption_dropout=0.0):
    """Caption indices for drawn images ``idx``: one of each image's captions at random, replaced
    with probability ``caption_dropout`` by index 0 (the empty caption "" in the UNet stage)."""
    cap = _pick_captions(per_image, idx, g)
    if caption_dropout:
        drop = torch.rand(len(idx), generator=g) < caption_dropout
        cap = torch.where(drop, torch.zeros_like(cap), cap)
    return cap


def _draw(n, batch_size, g, weights=None):
    if weights is None:
        return torch.randint(n, (batch_size,), generator=g)
    return torch.multinomial(weights, batch_size, replacement=True, generator=g)


def _rows(piece) -> slice:
    """Rows of the global batch this process computes (all rows without a piece)."""
    return slice(None) if piece is None else piece.rows


def _device_of(model):
    return next(model.parameters()).device


def _tokenize(tokenizer, texts, max_length):
    return tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt").input_ids
