"""Scale-out of the per-example loops: shards, the deterministic split by id, map and reduce.

A heavy loop (scoring a benchmark, MI passes, embedding a dataset) runs as N processes, each
computing its share of the examples and writing every finished example to the shared
per-example cache (:class:`t2i_common.cache.ResultCache`, one atomic file per example, so
processes never write the same file and a killed process loses only the example in flight).
The final result is then *reduced from the cache*: it is the same whatever N was, and a rerun
after a lost shard recomputes only the examples that are missing.

Where the process's share comes from (:func:`resolve_shard`, first match wins):

1. an explicit ``shard=(i, n)`` argument (a cluster array job: task i of n, each an independent
   process; see ``scripts/slurm_shards.sbatch``);
2. the environment variable ``T2I_SHARD="i/n"`` (set by ``python -m t2i_common.runner --shard
   i/n`` for the notebook kernel, so a notebook runs its heavy part per shard unchanged);
3. ``accelerate.PartialState()`` when the process was started by ``accelerate launch
   --num_processes N`` (rank = process index, all N processes alive together).

Both can combine: an array job whose tasks each run ``accelerate launch`` with w processes is
shard ``(i * w + r, n * w)``.

The split (:func:`shard_ids`): the caller's id list (dataset order, the same in every
process) is cut into consecutive chunks of ``chunk`` ids (one UNet batch) and chunk k belongs to
shard ``k mod n``.  Each example belongs to exactly one shard, the shares differ by at most one
chunk, and - because a chunk is the same batch whatever N is - every example is computed in the
same batch as in a one-process run, so results are byte-identical to it (on CPU, where a batch
composition can change the last bits of a convolution, this matters).  Noise never depends on the
process: loops draw it from the seed alone (DiffusionITM's bank ``NoiseBank(shape, seed).draw(K)``,
shared by all examples) or from generators keyed by the example (``NoiseBank.draw(K,
stream=example)``, ``info_decomp.information.draw_samples(..., stream=example)``, the attribution rows).

After its share, a process started by ``accelerate launch`` waits for the others
(``wait_for_everyone``) and every process reduces the complete result from the cache.  An
array-job shard cannot wait (the other tasks may not even have started): it returns the result
with the other shards' examples as NaN placeholders (:func:`placeholder`) and says so in a
warning; the figures of such a run are meaningless and the runner keeps them apart; the plain
run afterwards (no shard) finds every example in the cache and makes the tables without
computing anything.

Data-parallel training (second half of the module): :class:`Piece` (this process's rows of a
global batch), :class:`LossModule` (the loss inside DDP's ``forward``) and
:func:`make_accelerator`, used by :func:`t2i_common.trainloop._fit`; HardNeg LoRA
(:func:`t2i_common.diffusion_itm.hardneg.train_step`) spreads its micro-batches over the processes instead.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

#: environment variable read by :func:`resolve_shard` (the runner sets it for a notebook kernel)
SHARD_ENV = "T2I_SHARD"


class ShardError(ValueError):
    """Bad ``shard`` value or a sharded loop without a cache."""


@dataclass(frozen=True)
class Shard:
    """This process's place: ``rank`` of ``world`` shards.  ``live``: all ranks run at the same
    time in one process group (``accelerate launch``), so they can wait for each other."""

    rank: int = 0
    world: int = 1
    live: bool = False
    source: str = "single"

    @property
    def single(self) -> bool:
        return self.world == 1

    def __str__(self):
        return f"shard {self.rank}/{self.world} ({self.source})"


#: "this process computes everything, whatever launched it" (e.g. a validation pass inside a
#: data-parallel training run, where every rank needs the whole result and there is no cache)
LOCAL = Shard(0, 1, False, "local")


def parse_shard(value, name: str = "shard"):
    """``(i, n)`` from ``(i, n)``, ``[i, n]``, ``"i/n"``, ``"i,n"`` or ``"[i, n]"``; None stays None.

    Raises :class:`ShardError` naming ``name`` for anything else: i and n integers, n >= 1,
    0 <= i < n."""
    if value is None:
        return None
    v = value
    if isinstance(v, str):
        s = v.strip().strip("[]()")
        parts = [p for p in s.replace("/", ",").split(",") if p.strip()]
        try:
            v = [int(p) for p in parts]
        except ValueError:
            v = None
    ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v)
    if not ok:
        raise ShardError(f"{name} must be a pair (i, n) of integers - shard i of n, counted from "
                         f"0 - e.g. {name}=(0, 4), -p {name} '[0, 4]' or {SHARD_ENV}=0/4; "
                         f"got {value!r}")
    i, n = int(v[0]), int(v[1])
    if n < 1 or not 0 <= i < n:
        raise ShardError(f"{name}=({i}, {n}) is out of range: need n >= 1 and 0 <= i < n "
                         f"(shards are numbered 0 .. n-1; a Slurm array 0-{max(n, 1) - 1} gives "
                         f"i=$SLURM_ARRAY_TASK_ID)")
    return i, n


def accelerate_cpu() -> bool:
    """Whether ``accelerate`` should run on CPU processes (gloo): ``ACCELERATE_USE_CPU`` (set by
    ``accelerate launch --cpu``) or no CUDA device.  Every PartialState / Accelerator of the
    package is made with this flag, so they agree (accelerate's state is a singleton)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def launched_world() -> int:
    """Number of processes started together by ``accelerate launch`` / torchrun (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _accelerate_state():
    """(rank, world) of ``accelerate launch``; (0, 1) in a plain process (no process group made)."""
    if launched_world() <= 1:
        return 0, 1
    from accelerate import PartialState

    st = PartialState(cpu=accelerate_cpu())
    return st.process_index, st.num_processes


def resolve_shard(shard=None) -> Shard:
    """This process's :class:`Shard` from ``shard``, ``$T2I_SHARD`` and ``accelerate launch``
    (module docstring); without any of them the single shard (0, 1).  A :class:`Shard` (e.g.
    :data:`LOCAL`) is taken as it is."""
    if isinstance(shard, Shard):
        return shard
    r, w = _accelerate_state()
    explicit, source = parse_shard(shard), "shard"
    if explicit is None and os.environ.get(SHARD_ENV):
        explicit, source = parse_shard(os.environ[SHARD_ENV], name=SHARD_ENV), SHARD_ENV
    if explicit is None:
        return Shard(r, w, live=w > 1, source="accelerate" if w > 1 else "single")
    i, n = explicit
    if w > 1:
        return Shard(i * w + r, n * w, live=n == 1, source=f"{source}+accelerate")
    return Shard(i, n, live=n == 1, source=source)


def chunks_of(ids, chunk: int = 1) -> list:
    """Consecutive groups of ``chunk`` ids in the given order (the batches of a one-process run)."""
    ids = list(ids)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [ids[s:s + int(chunk)] for s in range(0, len(ids), int(chunk))]


def shard_ids(ids, shard=None, chunk: int = 1) -> list:
    """The ids of ``ids`` that belong to ``shard`` (a :class:`Shard`, ``(i, n)`` or None)."""
    sh = resolve_shard(shard)
    parts = chunks_of(ids, chunk)
    return [i for k, part in enumerate(parts) if k % sh.world == sh.rank for i in part]


def placeholder(value):
    """A NaN copy of a result (floats and float arrays/tensors -> NaN; ints, bools, strings kept),
    standing in for an example another shard computes."""
    if isinstance(value, dict):
        return {k: placeholder(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(placeholder(v) for v in value)
    if isinstance(value, torch.Tensor):
        return torch.full_like(value, float("nan")) if value.is_floating_point() else value.clone()
    if isinstance(value, np.ndarray):
        return np.full_like(value, np.nan) if np.issubdtype(value.dtype, np.floating) else value.copy()
    if isinstance(value, (float, np.floating)):
        return float("nan")
    return value


@dataclass
class MapStats:
    """What one :func:`sharded_map` call did in this process."""
    shard: Shard
    total: int = 0          # ids of the whole loop
    mine: int = 0           # ids of this shard
    computed: int = 0       # ids computed by this call
    reused: int = 0         # ids of this shard found in the cache
    missing: int = 0        # ids still absent after this call (other shards' work)


#: stats of the last :func:`sharded_map` call of this process (tests count recomputation here)
last_stats: MapStats | None = None


def _compute(fn, part, chunk):
    vals = fn(part) if chunk > 1 else [fn(part[0])]
    if len(vals) != len(part):
        raise RuntimeError(f"sharded_map: fn returned {len(vals)} results for {len(part)} ids")
    return vals


def sharded_map(fn, ids, cache, shard=None, *, desc: str = "examples", progress: bool = True,
                chunk: int = 1, blank=None) -> dict:
    """``{id: fn(id)}`` over ``ids``, this process computing only its shard's uncached ids.

    ``fn`` takes one id (``chunk=1``) or a list of up to ``chunk`` ids and returns as many results.
    ``cache``: a :class:`~t2i_common.cache.ResultCache` (required with more than one shard: it is
    how the shards meet).  ``shard``: see :func:`resolve_shard`.  With one shard this is
    :func:`t2i_common.cache.map_cached` (the same batches on a cold cache).  With ``accelerate
    launch`` all ranks return the complete result (reduced from the cache after a barrier);
    with an array-job shard the other shards' examples are placeholders (``blank(id)``, default a
    NaN copy of a computed result, :func:`placeholder`) unless already in the cache.
    """
    sh, all_ids = share(ids, cache, shard, desc)
    chunk = int(chunk)
    stats = MapStats(sh, total=len(all_ids))
    out, pending_parts = {}, []
    for k, part in enumerate(chunks_of(all_ids, chunk)):
        if k % sh.world != sh.rank:
            continue
        stats.mine += len(part)
        pend = []
        for i in part:
            if cache is not None and cache.has(i):
                out[i] = cache.load(i)
                stats.reused += 1
            else:
                pend.append(i)
        if pend:
            pending_parts.append(pend)
    label = desc if sh.single else f"{desc} [{sh.rank}/{sh.world}]"
    with tqdm(total=stats.mine, initial=stats.reused, desc=label, disable=not progress) as bar:
        for part in pending_parts:
            vals = _compute(fn, part, chunk)
            for i, v in zip(part, vals):
                if cache is not None:
                    cache.save(i, v)
                out[i] = v
                stats.computed += 1
            bar.update(len(part))
    return complete(all_ids, cache, out, sh, stats, desc=desc, blank=blank,
                    compute=lambda i: _compute(fn, [i], chunk)[0])


def share(ids, cache, shard=None, desc: str = "examples"):
    """(:class:`Shard`, ids as a list) for a sharded loop, after the checks: unique ids, and a
    cache whenever there is more than one shard (a :class:`ShardError` naming ``cache=``)."""
    sh = resolve_shard(shard)
    ids = list(ids)
    if len(set(map(str, ids))) != len(ids):
        raise ValueError(f"{desc}: ids must be unique (as strings); got {len(ids)} ids of which "
                         f"{len(set(map(str, ids)))} distinct")
    enabled = cache is not None and getattr(cache, "enabled", True)
    if not sh.single and not enabled:
        raise ShardError(f"{desc}: running as {sh} needs a result cache (the shards exchange "
                         f"results through it): pass cache=... (a folder) or run without shard")
    return sh, ids


def complete(ids, cache, have: dict, sh: Shard, stats: MapStats | None = None, *,
             desc: str = "examples", blank=None, compute=None) -> dict:
    """After a shard computed its share ``have``: the result over all ``ids``.  One shard: ``have``.
    ``accelerate launch``: wait for every rank, then read the rest from the cache.  Array-job
    shard: the rest from the cache where present, placeholders otherwise (``blank(id)``, or NaN
    copies of a result), with a warning.  Records ``stats`` as :data:`last_stats`."""
    global last_stats
    stats = stats or MapStats(sh, total=len(ids))
    out = dict(have)
    if not sh.single:
        if sh.live:
            from accelerate import PartialState
            PartialState(cpu=accelerate_cpu()).wait_for_everyone()
        out = reduce_cached(ids, cache, have=out, allow_missing=not sh.live, compute=compute,
                            blank=blank, desc=desc)
        stats.missing = sum(1 for i in ids if not cache.has(i))
        if stats.missing:
            warnings.warn(f"{desc}: {sh} computed its {stats.mine} examples; {stats.missing} of "
                          f"{len(ids)} belong to other shards and are NaN placeholders here. Run "
                          f"every shard, then the same call without shard to reduce.", stacklevel=3)
    last_stats = stats
    return {i: out[i] for i in ids}


def reduce_cached(ids, cache, *, have=None, allow_missing: bool = False, compute=None, blank=None,
                  desc: str = "examples") -> dict:
    """The complete ``{id: result}`` of ``ids`` from the cache (``have``: results already in
    memory).  Missing ids raise a ValueError naming how many and how to fill them, unless
    ``allow_missing``: then they are ``blank(id)``, or :func:`placeholder` copies of a result
    (with nothing cached at all, ``compute(id)`` computes the first missing id for the shape)."""
    ids = list(ids)
    out = dict(have or {})
    missing = []
    for i in ids:
        if i in out:
            continue
        if cache is not None and cache.has(i):
            out[i] = cache.load(i)
        else:
            missing.append(i)
    if missing and not allow_missing:
        where = getattr(cache, "dir", "the cache")
        raise ValueError(f"{desc}: {len(missing)} of {len(ids)} examples are not in {where} "
                         f"(first missing: {missing[:5]}); rerun the missing shards (or the call "
                         f"without shard, which computes only them)")
    if missing and blank is not None:
        out.update({i: blank(i) for i in missing})
    elif missing:
        if not out:
            first = missing.pop(0)
            if compute is None:
                raise ValueError(f"{desc}: no example is cached yet; pass compute= to make one")
            out[first] = compute(first)
            cache.save(first, out[first])
        tmpl = next(iter(out.values()))
        for i in missing:
            out[i] = placeholder(tmpl)
    return out


# ------------------------------------------------------------------------------------------------
# data-parallel training (Accelerate)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Rows of one training step's global batch that this process computes in one micro-step.

    Every process draws the *whole* global batch from the same seeded generator (identical on all
    ranks) and keeps ``rows``; with P = processes x micro-steps equal pieces, the mean of the
    pieces' mean losses is the global batch's mean loss, and DDP's gradient average over the
    processes (plus the 1/micro-steps scaling) is its gradient.  ``gather``: a differentiable
    all-gather over the processes for losses that couple the whole batch (contrastive), None
    with one process."""

    rows: slice
    batch: int
    n_pieces: int = 1
    gather: object = None


def batch_pieces(batch_size: int, world: int, grad_accum: int, rank: int) -> list:
    """This rank's ``grad_accum`` pieces of a global batch of ``batch_size`` rows (rank-major:
    rank r owns rows [r B / world, (r + 1) B / world)).  The global batch must split evenly."""
    B, W, A = int(batch_size), int(world), int(grad_accum)
    if A < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if B % (W * A):
        raise ValueError(f"batch_size={B} does not split into {W} processes x grad_accum={A} equal "
                         f"micro-batches: choose a batch_size that is a multiple of {W * A} (the "
                         f"global batch stays batch_size whatever the number of processes)")
    b = B // (W * A)
    gather = _all_gather_with_grad if W > 1 else None
    return [Piece(slice((rank * A + m) * b, (rank * A + m + 1) * b), B, W * A, gather)
            for m in range(A)]


def _all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of equally shaped tensors; gradients flow back to
    each rank's own part (summed over the ranks' losses, which DDP then averages)."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(t.contiguous()))


class LossModule(torch.nn.Module):
    """``loss_fn(model, g, piece)`` as a module, so that DDP (which synchronises gradients of what
    runs inside its ``forward``) and mixed-precision autocast see the whole loss computation,
    including calls such as ``vae.encode`` that are not the model's own ``forward``."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, g, piece):
        return self.loss_fn(self.model, g, piece)


def make_accelerator(mixed_precision: str | None = None):
    """An ``accelerate.Accelerator`` for the package's training loops: CPU processes when there is
    no GPU or ``ACCELERATE_USE_CPU`` is set (see :func:`accelerate_cpu`); data parallel when
    started by ``accelerate launch``.  ``mixed_precision``: "no", "fp16" or "bf16"; None takes
    ``accelerate launch --mixed_precision`` (else "no").  In a single plain process a loop may ask
    for another precision than the previous one (accelerate's state is reset for it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16', 'bf16' or None (accelerate "
                         f"launch's flag), got {mixed_precision!r}")
    want = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    st = AcceleratorState._shared_state
    if launched_world() <= 1 and st.get("_mixed_precision") not in (None, want):
        AcceleratorState._reset_state()
    return Accelerator(cpu=accelerate_cpu(), mixed_precision=mixed_precision)
