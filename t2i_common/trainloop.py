"""The generic training loop of the package: seeded, resumable bit-exactly, data parallel.

:func:`_fit` runs a fixed number of AdamW steps of a ``loss_fn`` (warm-up + cosine learning rate,
gradient clipping, optional EMA) through an ``accelerate.Accelerator``: one process by default,
data parallel over the same global batch under ``accelerate launch --num_processes N``, with
gradient accumulation and mixed precision as flags; an atomic single-file checkpoint every
``ckpt_every`` steps lets a killed run continue with bit-identical weights.  The toy
checkpoint's stages (:mod:`t2i_common.toyworld.training`) are its users.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .distributed import LossModule, batch_pieces, make_accelerator
from . import validate as V


# ------------------------------------------------------------------------------------------------
# the generic resumable loop
# ------------------------------------------------------------------------------------------------
def _fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_torch_save(obj, path):
    """torch.save to ``path.tmp`` then rename: a kill mid-write never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(ck) -> dict:
    """A training checkpoint written by :func:`_fit`; a truncated, corrupt or foreign file is a
    ValueError that names it and says how to start the stage over."""
    import pickle
    import zipfile
    ck = Path(ck)
    fix = (f"delete {ck} (or pass --no-resume / resume=False) to start this stage over, or point "
           f"--work-dir at another folder")
    if ck.is_dir():
        raise ValueError(f"training checkpoint {ck} is a folder, not a checkpoint file; {fix}")
    try:
        st = torch.load(ck, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, ImportError, TypeError) as err:
        raise ValueError(f"training checkpoint {ck} is not readable (truncated or corrupt: "
                         f"{type(err).__name__}); {fix}") from None
    need = {"model", "optimizer", "step", "generator", "torch_rng", "losses", "wall_s", "fingerprint"}
    if not isinstance(st, dict) or not need <= set(st):
        raise ValueError(f"training checkpoint {ck} is not a checkpoint of this training loop "
                         f"(it holds {type(st).__name__}); {fix}")
    return st


class Interrupted(RuntimeError):
    """Raised by the loop when ``stop_after`` steps were run in this call (simulated kill)."""


def lr_at(step, steps, lr, warmup):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _fit(name, model, loss_fn, *, steps, lr, seed, out_dir=None, ckpt_every=500, resume=True,
         warmup=100, weight_decay=0.0, grad_clip=1.0, ema_decay=None, progress=True,
         hparams=None, stop_after=None, desc=None, batch_size=None, grad_accum=1,
         mixed_precision=None):
    """Run ``steps`` optimisation steps of ``loss_fn(model, g, piece) -> scalar``; returns
    (model, ema, info).

    ``g`` is the single CPU generator all sampling must use: ``loss_fn`` draws the whole global
    batch of ``batch_size`` rows from it, then computes the mean loss over ``piece.rows``
    (:class:`t2i_common.distributed.Piece`).  The loop runs through an ``accelerate.Accelerator``:
    started by ``accelerate launch --num_processes N`` it is data parallel (rank r computes its
    B/N rows; DDP averages the gradients, so the step is that of the global batch), with
    ``grad_accum`` micro-batches per process and step, and ``mixed_precision`` ("no", "fp16",
    "bf16"; None: ``accelerate launch --mixed_precision``, else "no").  One process with
    ``grad_accum=1`` in full precision computes exactly what it did before Accelerate
    (bit-identical).  A ``loss_fn(model, g)`` of two arguments is accepted for one piece.

    A checkpoint ``out_dir/name.ckpt`` (written atomically by the main process; the unwrapped
    model, optimizer, generator and RNG states) holds everything needed to continue bit-exactly,
    with any number of processes; with ``resume`` it is picked up (its ``hparams`` fingerprint must
    match, otherwise a ValueError names the file).  ``stop_after`` ends this call after that many
    steps *without* writing a checkpoint (a simulated kill).
    """
    from tqdm.auto import tqdm

    steps = V.count(steps, f"{name}: steps", low=0)
    ckpt_every = V.count(ckpt_every, f"{name}: ckpt_every")
    V.real(lr, f"{name}: lr", low=0, low_open=True)
    if batch_size is not None:
        V.count(batch_size, f"{name}: batch_size")
    V.count(grad_accum, f"{name}: grad_accum")
    acc = make_accelerator(mixed_precision)
    W, rank = acc.num_processes, acc.process_index
    three = len(inspect.signature(loss_fn).parameters) >= 3
    if batch_size is None or not three:
        if W * int(grad_accum) > 1:
            raise ValueError(f"{name}: {W} processes x grad_accum={grad_accum} need a loss_fn(model, "
                             f"g, piece) and the global batch_size passed to _fit")
        pieces = [None]
    else:
        pieces = batch_pieces(batch_size, W, grad_accum, rank)
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            betas=(0.9, 0.999), weight_decay=weight_decay)
    fn = loss_fn if three else (lambda m, gen, piece: loss_fn(m, gen))
    wrapped, opt = acc.prepare(LossModule(model, fn), opt)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    fp = _fingerprint(dict(hparams or {}, name=name, steps=steps, lr=lr, seed=seed, warmup=warmup,
                           weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay))
    ck = Path(out_dir) / f"{name}.ckpt" if out_dir is not None else None
    start, losses, wall = 0, [], 0.0
    if resume and ck is not None and ck.exists():
        st = read_checkpoint(ck)
        if st["fingerprint"] != fp:
            raise ValueError(f"{ck} was written with other hyper-parameters ({st['hparams']}); "
                             f"delete it or use another out_dir to start afresh")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        g.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        start, losses, wall = st["step"], st["losses"], st["wall_s"]

    def save(step):
        if ck is not None and acc.is_main_process:
            atomic_torch_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                                   generator=g.get_state(), torch_rng=torch.get_rng_state(),
                                   ema=ema.state_dict() if ema is not None else None,
                                   losses=losses, wall_s=wall, fingerprint=fp,
                                   hparams=dict(hparams or {}, lr=lr, steps=steps, seed=seed)), ck)
        acc.wait_for_everyone()

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc or name,
               disable=not progress or not acc.is_local_main_process, mininterval=5.0)
    done_here = 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        g_state, loss_sum = g.get_state(), 0.0
        for m, piece in enumerate(pieces):
            if m:  # every micro-step draws the same global batch and keeps its own rows
                g.set_state(g_state)
            last = m == len(pieces) - 1
            with (contextlib.nullcontext() if last else acc.no_sync(wrapped)):
                loss = wrapped(g, piece)
                acc.backward(loss / len(pieces) if len(pieces) > 1 else loss)
            loss_sum += float(loss.detach())
        loss_val = loss_sum / len(pieces)
        if W > 1:
            loss_val = float(acc.reduce(torch.tensor([loss_val], device=acc.device), "mean"))
        if grad_clip:
            acc.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if ema is not None:
            d = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm.detach(), 1 - d)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
        losses.append(loss_val)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            raise Interrupted(f"{name}: stopped after {done_here} steps (step {step + 1}/{steps})")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            wall += time.perf_counter() - t0
            t0 = time.perf_counter()
            save(step + 1)
    bar.close()
    model = acc.unwrap_model(wrapped, keep_fp32_wrapper=False).model
    model.eval()
    info = dict(steps=steps, resumed_from=start, wall_s=round(wall, 2), losses=losses,
                world_size=W, grad_accum=int(grad_accum), mixed_precision=acc.mixed_precision,
                final_loss=float(np.mean(losses[-max(1, min(100, len(losses) // 10)):]))
                if losses else None)
    return model, ema, info
