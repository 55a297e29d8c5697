"""Content keys of images and model weights, shared by every paper's caches.

- :func:`image_key`: an image's content hash (file bytes and crop box of a file reference, or
  the pixels of an in-memory image), so an image shared by several items is encoded once and
  cached results follow the content, not the file name;
- :func:`model_fingerprint`: a cheap fingerprint of a text-to-image model's weights (UNet, VAE
  and text encoder), changed by any fine-tuning or adapter;
- :func:`weights_fingerprint`: the sha1 of every weight of one module (exact, bf16-safe).

Cache keys built from them must stay stable: changing a function here invalidates every cache
that uses it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .formats import ImageRef
from .imageio import to_pil


def image_key(im) -> str:
    """Content hash of an image: a file reference (:class:`~t2i_common.formats.ImageRef` or path)
    hashes the file's bytes and crop box without decoding; PIL images / arrays hash their pixels.
    Identical content -> identical key (so an image shared by several items is encoded once)."""
    if isinstance(im, (str, Path)):
        im = ImageRef(Path(im))
    if isinstance(im, ImageRef):
        p = Path(im.path)
        if not p.is_file():
            raise FileNotFoundError(f"image file not found: {p}"
                                    f"{' (referenced by ' + im.source + ')' if im.source else ''}")
        h = hashlib.sha1(p.read_bytes())
        h.update(repr(im.box).encode())
        return "f" + h.hexdigest()[:19]
    pil = to_pil(im).convert("RGB")
    h = hashlib.sha1(f"{pil.size}".encode())
    h.update(np.asarray(pil).tobytes())
    return h.hexdigest()[:20]


def model_fingerprint(model) -> str:
    """Cheap fingerprint of a T2I model's weights (name, shape, sum and first values of every
    parameter of the UNet, VAE and text encoder): a LoRA adapter or any weight update changes it,
    so cached scores of a fine-tuned model are never confused with the base model's."""
    h = hashlib.sha1(str(getattr(model, "name", "")).encode())
    with torch.no_grad():
        for part in ("unet", "vae", "text_encoder"):
            for name, p in getattr(model, part).named_parameters():
                v = p.detach().float().flatten()
                h.update(f"{part}.{name}{tuple(p.shape)}{float(v.double().sum()):.10e}".encode())
                h.update(v[:16].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(unet) -> str:
    """sha1 of all weights of a module (keys caches of per-model results such as the pre-training
    loss or unCLIP generations).  bf16 weights, which numpy cannot hold, are hashed as their raw
    16-bit patterns."""
    h = hashlib.sha1()
    for n, p in unet.state_dict().items():
        t = p.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(n.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
