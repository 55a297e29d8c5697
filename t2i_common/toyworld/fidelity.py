"""Held-out fidelity measures of a toy checkpoint: CLIP zero-shot accuracy on single-object toy
images, the held-out prompts of each kind, and generation fidelity scored by the pixel checker
(:func:`t2i_common.toyworld.checker.check_prompt`).  :func:`t2i_common.toyworld.training.evaluate_toy_checkpoint`
combines them for a whole checkpoint folder."""
from __future__ import annotations

import numpy as np
import torch

from .. import toyworld as tw
from .checker import check_prompt


@torch.no_grad()
def clip_zero_shot_accuracy(clip_embedder, samples) -> dict:
    """Zero-shot shape and colour classification of single-object toy samples.

    Prompts: shape ``"a photo of a {shape}"`` (``toyworld.class_prompts``) and ``"a {shape}"``;
    colour ``"a photo of a {colour} object"`` and ``"a {colour} object"``; plus an ensemble that
    uses only full captions: score(colour) = mean over shapes of sim(image, "a {colour} {shape}")
    (and vice versa), CLIP's prompt-ensembling (Radford et al. 2021, Sec. 3.1.4).
    Returns accuracies in [0, 1] and n.
    """
    samples = [s for s in samples]
    if not samples or any(len(s.scene.objects) != 1 for s in samples):
        raise ValueError("clip_zero_shot_accuracy needs single-object toy samples "
                         "(toyworld.make_samples(n, seed, kinds=('single',)))")
    shapes, colours = list(tw.SHAPES), list(tw.COLOURS)
    y_shape = torch.tensor([shapes.index(s.scene.objects[0].shape) for s in samples])
    y_col = torch.tensor([colours.index(s.scene.objects[0].colour) for s in samples])
    img = clip_embedder.encode_images([s.image for s in samples])

    def acc(texts, y):
        return float(((img @ clip_embedder.encode_texts(texts).t()).argmax(1) == y).float().mean())

    full = clip_embedder.encode_texts([f"a {c} {s}" for c in colours for s in shapes])
    sim = (img @ full.t()).view(len(samples), len(colours), len(shapes))
    return dict(
        n=len(samples),
        shape_acc=acc(tw.class_prompts("shape"), y_shape),
        shape_acc_plain=acc([f"a {s}" for s in shapes], y_shape),
        colour_acc=acc(tw.class_prompts("colour"), y_col),
        colour_acc_plain=acc([f"a {c} object" for c in colours], y_col),
        shape_acc_ensemble=float((sim.mean(1).argmax(1) == y_shape).float().mean()),
        colour_acc_ensemble=float((sim.mean(2).argmax(1) == y_col).float().mean()),
        joint_acc_full_caption=float(((sim.flatten(1).argmax(1)) ==
                                      (y_col * len(shapes) + y_shape)).float().mean()),
    )


def fidelity_prompts(kind: str, n: int, seed: int) -> list[str]:
    """Held-out prompts for :func:`generation_fidelity`.

    single: "a {colour} {shape}" cycling over all 20 combinations; two: "a {c0} {s0} and a {c1}
    {s1}"; relational: "a {c0} {s0} {rel} a {c1} {s1}" - both from toy pair scenes of stream
    ``seed`` (canonical mention order)."""
    if kind == "single":
        combos = [f"a {c} {s}" for c in tw.COLOURS for s in tw.SHAPES]
        return [combos[i % len(combos)] for i in range(n)]
    if kind in ("two", "relational"):
        scenes = [s.scene for s in tw.make_samples(n, seed, kinds=("pair",))]
        tpl = "a {c0} {s0} and a {c1} {s1}" if kind == "two" else "a {c0} {s0} {rel} a {c1} {s1}"
        return [tw.caption_for(sc, tpl) for sc in scenes]
    raise ValueError(f"fidelity_prompts: kind must be 'single', 'two' or 'relational', got {kind!r}")


def generation_fidelity(model, prompts, checker=None, *, num_steps: int = 50,
                        guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 64,
                        progress: bool = False) -> dict:
    """Generate one image per prompt (``T2IModel.generate``) and score it with ``checker(image,
    prompt) -> dict of bools`` (default ``toyworld.check_prompt``).

    Returns the rate of every boolean the checker reports, ``match`` (= ``both``: colour and shape
    bound to the same objects; for relational prompts also ``relation_ok``), n, and per-prompt rows.
    """
    if checker is None:
        checker = check_prompt
    prompts = list(prompts)
    images = model.generate(prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                            batch_size=batch_size, progress=progress)
    rows = []
    for im, p in zip(images, prompts):
        r = dict(checker(im, p))
        r["match"] = bool(r.get("both", False) and r.get("relation_ok", True))
        rows.append(dict(prompt=p, **r))
    keys = [k for k in rows[0] if k != "prompt"]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out.update(n=len(rows), rows=rows, num_steps=num_steps, guidance_scale=guidance_scale)
    return out, images
