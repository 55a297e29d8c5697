"""unCLIP's embedding geometry (Ramesh et al. 2022, Sec. 3): spherical interpolation of raw CLIP
embeddings (directions slerped, norms interpolated linearly), the text-diff direction
z_d = normalize(z_t - z_t0), the prior's best-of-n candidate selection by dot product with z_t, and
the typical image-embedding norm of a decoder's normaliser.  :class:`t2i_common.unclip.model.UnCLIPModel`
uses them; ``unclip.model`` re-exports them."""
from __future__ import annotations

import torch

from .. import validate as V


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def check_theta(theta, name: str = "theta"):
    """theta must lie in [0, 1] (slerp's range); returns it as a float tensor."""
    if isinstance(theta, (str, bytes)) or (isinstance(theta, (list, tuple)) and
                                           any(isinstance(x, (str, bytes)) for x in theta)):
        raise V.BadInput(f"{name} must be a number or a list of numbers in [0, 1], got the string "
                         f"{theta!r}")
    t = torch.as_tensor(theta, dtype=torch.float32)
    if t.numel() == 0:
        raise V.BadInput(f"{name} is empty; pass at least one value in [0, 1]")
    if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        raise V.BadInput(f"{name} must lie in [0, 1] (0 = first embedding, 1 = second), got "
                         f"{theta!r}; the paper's text diffs use theta in [0, 0.5]")
    return t


def slerp(a: torch.Tensor, b: torch.Tensor, theta) -> torch.Tensor:
    """Spherical interpolation z = sin((1-theta) w) / sin w * a^ + sin(theta w) / sin w * b^,
    w = arccos(a^ . b^), rescaled to the linearly interpolated norm (1-theta)|a| + theta|b|.

    On unit vectors this is the paper's slerp (Sec. 3.2); for raw CLIP embeddings it keeps the norm
    statistics the decoder was trained on.  ``a``, ``b``: [D] or [B, D] (broadcast); ``theta``: a
    scalar or [B] in [0, 1].  Endpoints are exact (theta 0 -> a, theta 1 -> b); (anti)parallel
    inputs fall back to normalised linear interpolation.
    """
    t = check_theta(theta)
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"slerp: embeddings have different widths {a.shape[-1]} and {b.shape[-1]}")
    a2, b2 = torch.broadcast_tensors(a, b)
    if t.ndim == 1 and a2.ndim == 1:
        a2, b2 = a2.expand(len(t), -1), b2.expand(len(t), -1)
    t = t.reshape(-1, 1) if t.ndim else t
    na, nb = a2.norm(dim=-1, keepdim=True), b2.norm(dim=-1, keepdim=True)
    ua, ub = _unit(a2), _unit(b2)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    w = torch.arccos(cos)
    sw = torch.sin(w)
    small = sw.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(sw), sw)
    ca = torch.where(small, 1 - t * torch.ones_like(sw), torch.sin((1 - t) * w) / safe)
    cb = torch.where(small, t * torch.ones_like(sw), torch.sin(t * w) / safe)
    direction = _unit(ca * ua + cb * ub)
    out = direction * ((1 - t) * na + t * nb)
    # exact endpoints (no float round trip through the unit sphere)
    out = torch.where(t == 0, a2, out)
    out = torch.where(t == 1, b2, out)
    return out


def text_diff_direction(z_t: torch.Tensor, z_t0: torch.Tensor) -> torch.Tensor:
    """z_d = normalize(z_t - z_t0) of the L2-normalised CLIP text embeddings of the target caption
    (z_t) and of a caption of the current image (z_t0) (paper Sec. 3.3)."""
    z_t, z_t0 = torch.as_tensor(z_t).float(), torch.as_tensor(z_t0).float()
    if z_t.shape[-1] != z_t0.shape[-1]:
        raise ValueError(f"text_diff_direction: widths differ ({z_t.shape[-1]} vs {z_t0.shape[-1]})")
    return _unit(_unit(z_t) - _unit(z_t0))


def select_by_dot_product(candidates: torch.Tensor, text_embeds: torch.Tensor):
    """The paper's prior trick: of ``candidates`` [B, K, D] keep, per row, the one with the larger
    dot product of the L2-normalised embeddings with the text embedding [B, D].

    Returns (chosen [B, D], scores [B, K], index [B])."""
    if candidates.ndim != 3 or text_embeds.ndim != 2 or candidates.shape[0] != text_embeds.shape[0]:
        raise ValueError(f"select_by_dot_product: candidates [B, K, D] and text [B, D] expected, got "
                         f"{tuple(candidates.shape)} and {tuple(text_embeds.shape)}")
    scores = (_unit(candidates.float()) * _unit(text_embeds.float())[:, None]).sum(-1)
    idx = scores.argmax(1)
    return candidates[torch.arange(len(idx)), idx], scores, idx


def typical_norm(image_normalizer) -> float:
    """sqrt(E|z_i|^2) of the image embeddings the normaliser's statistics were taken from:
    |mean|^2 + sum(std^2).  Used to feed a (unit) text embedding to the decoder at an image
    embedding's scale in the no-prior ablation."""
    m, s = image_normalizer.mean.detach().float(), image_normalizer.std.detach().float()
    return float(((m ** 2).sum() + (s ** 2).sum()).sqrt())
