"""Data attribution by unlearning synthesized images (Wang et al., NeurIPS '24).

Which training images made the model generate z^?  Unlearn z^ (raise its loss with one Newton
step preconditioned by the Fisher information, so the weights move as little as possible for the
rest of the data) and rank the training images by how much their loss rises:

    theta_-  = theta_0 + (lr / N) F^-1 grad_theta L(z^, theta_0)          (Newton step, Eq. 5)
    tau(z^, z_i) = L(z_i, theta_-) - L(z_i, theta_0)                        (influence, Eq. 6)

The pieces, as the original code (PeterWang512/AttributeByUnlearning, ``mscoco/``) computes them:

* :class:`TrainingSet` - latents of every training image and of its horizontal flip (2N rows,
  unflipped first) and the text embeddings of its captions [N, P, L, D]; read from the original's
  ``coco17_train_latents.npy`` / ``coco17_train_text_embeddings.npy`` or encoded from images.
* :func:`training_loss` - per row the mean eps-MSE over the timesteps {0, 50, ..., 950} (20; a
  parameter) and every caption, through :func:`t2i_common.engine.denoise_errors`; cached per chunk
  of rows, resumable, shardable.
* :func:`fisher_diagonal` - mean of squared per-sample gradients (``torch.func`` vmap of grad),
  random t and fresh noise per sample, ``epochs`` passes (5 in the original); saved as the
  original's ``{param_name: tensor}`` ``.pt``.
* :func:`unlearn_delta` / :func:`unlearned` - the Newton step in float64, gradient averaged over
  ``n_batches`` x ``batch_size`` (noise, distinct timestep) draws of the query (original 625 x 80),
  lr 0.01, only the parameters of a weight subset (default cross-attention K/V); the model is
  restored bit-exactly afterwards.
* :func:`influence_from_losses` / :func:`save_influence` - loss after - loss before, max over the
  two flips, rank = argsort(-influence), the original's ``influence_{idx}.pkl``.

Deliberate differences (each keeps the method, removes a fragility):

* Noise of the loss pass depends only on (seed, row, timestep): row r draws its [K, C, h, w] noise
  from ``NoiseBank(seed).draw(K, stream=r)``.  The original seeds the noise per *batch* (seed 0 +
  batch index), so the pre- and post-unlearning passes had to use identical batch sizes; here any
  batch size, chunking or shard layout gives the same noise.  As everywhere in the engine, the
  captions of one row share the noise (the original draws one per caption): common random numbers
  across captions, which lowers the variance of the mean.  For bit-identical losses before and
  after unlearning keep ``batch_size`` fixed (CPU matmuls may round differently per batch shape).
* The Fisher pass draws its timesteps, noise and caption from a seeded generator outside the vmap
  (the original calls ``torch.randn`` / ``np.random`` inside it), so it is reproducible and equal
  to a loop of single-sample gradients (tested).
* ``damping`` (default 0, the original's choice) can be added to F before dividing.
"""
from __future__ import annotations

import numbers
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import validate as V
from ..cache import ResultCache
from ..distributed import LOCAL, ShardError, accelerate_cpu, resolve_shard
from ..engine import NoiseBank, denoise_errors
from ..keys import weights_fingerprint

#: parameter-name patterns per weight subset: every group must match (any substring of a group)
WEIGHT_SUBSETS = {
    "cross-attn-kv": (("attn2",), ("to_k", "to_v")),
    "cross-attn": (("attn2",),),
    "attn": (("attn",),),
    "all": (),
}


def select_parameters(unet, subset: str = "cross-attn-kv") -> list[str]:
    """Names of the UNet parameters a weight subset updates (the original's ``check_substrings``:
    a name is selected when, for every pattern group, it contains one of the group's strings)."""
    if subset not in WEIGHT_SUBSETS:
        raise ValueError(f"unknown weight subset {subset!r}; choose one of {list(WEIGHT_SUBSETS)}")
    groups = WEIGHT_SUBSETS[subset]
    names = [n for n, _ in unet.named_parameters()
             if all(any(s in n for s in g) for g in groups)]
    if not names:
        raise ValueError(f"weight subset {subset!r} selects no parameter of this UNet; its "
                         f"parameter names look like {[n for n, _ in unet.named_parameters()][:3]}")
    return names


def loss_timesteps(time_samples: int = 20, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The original's loss grid ``arange(0, T, T // time_samples)`` (20 -> 0, 50, ..., 950)."""
    time_samples = V.count(time_samples, "time_samples")
    if num_train_timesteps % time_samples:
        raise V.BadInput(f"time_samples must divide the {num_train_timesteps} training timesteps, "
                         f"got {time_samples}")
    return torch.arange(0, num_train_timesteps, num_train_timesteps // time_samples)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainingSet:
    """A training set in latent space, the original's layout.

    latents: [2N, C, h, w] float32 - N images then their N horizontal flips (row N + i is the flip
    of row i); text_emb: [N, P, L, D] - P caption embeddings per image (the original: 5 COCO
    captions).  ``images`` (uint8 [N, H, W, 3]) and ``captions`` are optional, for baselines and
    figures.
    """
    latents: torch.Tensor
    text_emb: torch.Tensor
    images: np.ndarray | None = None
    captions: list | None = None

    def __post_init__(self):
        self.latents, self.text_emb = _out_of_inference_mode(self.latents, self.text_emb)
        check_training_set(self.latents.shape, self.text_emb.shape, "latents", "text_emb")
        V.finite_array(self.latents, "training latents")
        V.finite_array(self.text_emb, "training text embeddings")
        if self.images is not None and len(self.images) != self.n:
            raise ValueError(f"TrainingSet: {len(self.images)} images for {self.n} training rows; "
                             f"give one image per unflipped latent")

    @property
    def n(self) -> int:
        return int(self.text_emb.shape[0])

    @classmethod
    def from_npy(cls, latents_path, text_path, images=None, captions=None) -> "TrainingSet":
        """The original's files: ``coco17_train_latents.npy`` [2N, C, h, w] (unflipped rows first)
        and ``coco17_train_text_embeddings.npy`` [N, P, L, D]; shapes are checked before any work."""
        lat, txt = _load_npy(latents_path, "training latents"), _load_npy(text_path, "training text embeddings")
        check_training_set(lat.shape, txt.shape, latents_path, text_path)
        V.finite_array(lat, f"training latents {latents_path}")
        V.finite_array(txt, f"training text embeddings {text_path}")
        return cls(torch.from_numpy(np.array(lat, dtype=np.float32)),
                   torch.from_numpy(np.array(txt, dtype=np.float32)), images, captions)

    @classmethod
    def from_images(cls, model, images, captions, batch_size: int = 64) -> "TrainingSet":
        """Encode uint8 [N, H, W, 3] images and their flips with the model's VAE (posterior mean)
        and each image's captions with its text encoder.  Images with fewer captions than the most
        captioned one repeat theirs cyclically, so every image has P embeddings."""
        images = np.asarray(images)
        if isinstance(captions, str):
            raise V.BadInput(f"captions must hold one caption (or list of captions) per image, got the "
                             f"string {captions!r}; wrap it: [{captions!r}]")
        caps = [[c] if isinstance(c, str) else list(c) for c in captions]
        if len(caps) != len(images) or any(not c for c in caps):
            raise ValueError(f"TrainingSet.from_images: {len(images)} images need as many non-empty "
                             f"caption lists, got {len(caps)}")
        x = model.preprocess(list(images))
        lat = torch.cat([model.encode_images(x, batch_size=batch_size),
                         model.encode_images(x.flip(-1), batch_size=batch_size)]).float().cpu().clone()
        P = max(len(c) for c in caps)
        flat = [c[j % len(c)] for c in caps for j in range(P)]
        if getattr(model, "tokenizer", None) is not None:
            V.known_words(model.tokenizer, flat, "captions")
        emb = model.encode_prompts(flat).float().cpu().clone()   # clone: out of inference mode
        return cls(lat, emb.view(len(images), P, *emb.shape[1:]), images, caps)

    def save_npy(self, folder, prefix: str = "coco17_train") -> tuple[Path, Path]:
        """Write ``{prefix}_latents.npy`` and ``{prefix}_text_embeddings.npy`` (original names)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        a, b = folder / f"{prefix}_latents.npy", folder / f"{prefix}_text_embeddings.npy"
        np.save(a, self.latents.numpy())
        np.save(b, self.text_emb.numpy())
        return a, b


def _out_of_inference_mode(*xs):
    """float32 tensors usable by autograd: outputs of ``encode_images`` / ``encode_prompts`` (made
    in inference mode, which the unlearning gradient cannot backpropagate through) are copied."""
    out = []
    for x in xs:
        x = torch.as_tensor(x, dtype=torch.float32)
        out.append(x.clone() if x.is_inference() else x)
    return out


def _load_npy(path, name="array"):
    return V.load_npy(path, name, "point at the .npy file written by the preprocessing (e.g. the "
                                  "original's download_mscoco.sh)")


def check_training_set(lat_shape, txt_shape, lat_name="latents", txt_name="text_emb") -> None:
    """Clear errors for malformed training-set arrays (raised before any model work)."""
    if len(lat_shape) != 4:
        raise ValueError(f"{lat_name}: latents must be [2N, C, h, w] (images then their flips), got "
                         f"shape {tuple(lat_shape)}")
    if len(txt_shape) != 4:
        raise ValueError(f"{txt_name}: text embeddings must be [N, P, L, D] (P captions per image), "
                         f"got shape {tuple(txt_shape)}; a [N, L, D] array needs [:, None]")
    if lat_shape[0] == 0 or txt_shape[0] == 0:
        raise V.BadInput(f"{lat_name if lat_shape[0] == 0 else txt_name}: the training set is empty "
                         f"(shape {tuple(lat_shape if lat_shape[0] == 0 else txt_shape)}); it needs "
                         f"at least one image")
    if txt_shape[1] == 0:
        raise V.BadInput(f"{txt_name}: 0 captions per image (shape {tuple(txt_shape)}); each image "
                         f"needs at least one caption embedding")
    if lat_shape[0] != 2 * txt_shape[0]:
        raise ValueError(f"{lat_name} has {lat_shape[0]} rows but {txt_name} has {txt_shape[0]} "
                         f"images: the latents must hold 2N rows (N unflipped, then N flipped); "
                         f"regenerate one of the files so the counts match")


@dataclass
class QuerySet:
    """Synthesized queries z^: latents [Q, C, h, w], prompt embeddings [Q, L, D], optional images
    (uint8 [Q, H, W, 3]) and prompts."""
    latents: torch.Tensor
    text_emb: torch.Tensor
    images: np.ndarray | None = None
    prompts: list | None = None

    def __post_init__(self):
        self.latents, self.text_emb = _out_of_inference_mode(self.latents, self.text_emb)
        if self.latents.ndim != 4 or self.text_emb.ndim != 3 or len(self.latents) != len(self.text_emb):
            raise ValueError(f"QuerySet: latents [Q, C, h, w] and text_emb [Q, L, D] with the same Q "
                             f"needed, got {tuple(self.latents.shape)} and {tuple(self.text_emb.shape)}")
        V.non_empty(len(self.latents), "query latents", "queries")
        V.finite_array(self.latents, "query latents")
        V.finite_array(self.text_emb, "query text embeddings")

    def __len__(self):
        return len(self.latents)

    def check_index(self, idx: int) -> int:
        idx = V.count(idx, "query index", low=0) if not (isinstance(idx, numbers.Integral)
                                                          and not isinstance(idx, bool)) else idx
        if not 0 <= int(idx) < len(self):
            raise IndexError(f"query index {idx} is out of range: the query set has {len(self)} "
                             f"queries (0..{len(self) - 1}); pass an index below {len(self)}")
        return int(idx)

    @classmethod
    def from_npy(cls, latents_path, text_path, image_dir=None) -> "QuerySet":
        """The original's ``latents.npy`` [Q, C, h, w], ``text_embeddings.npy`` [Q, 1, L, D] (the
        first caption is used, as ``np.load(...)[[idx], 0]``) and optional ``images/{i}.png``."""
        lat, txt = _load_npy(latents_path, "query latents"), _load_npy(text_path, "query text embeddings")
        V.finite_array(lat, f"query latents {latents_path}")
        V.finite_array(txt, f"query text embeddings {text_path}")
        if txt.ndim == 4:
            txt = txt[:, 0]
        if lat.ndim != 4 or txt.ndim != 3:
            raise ValueError(f"{latents_path}: query latents must be [Q, C, h, w] (got "
                             f"{lat.shape}) and {text_path} [Q, 1, L, D] or [Q, L, D] (got {txt.shape})")
        if len(lat) != len(txt):
            raise ValueError(f"{latents_path} holds {len(lat)} queries but {text_path} holds "
                             f"{len(txt)}; both must come from the same generate_samples run")
        V.non_empty(len(lat), f"query latents {latents_path}", "queries")
        images = None
        if image_dir is not None:
            from PIL import Image
            files = [Path(image_dir) / f"{i}.png" for i in range(len(lat))]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(f"query images missing in {image_dir}: {missing[:3]}; "
                                        f"expected one {{i}}.png per query")
            images = np.stack([_read_image(f) for f in files])
        return cls(torch.from_numpy(np.array(lat, dtype=np.float32)),
                   torch.from_numpy(np.array(txt, dtype=np.float32)), images)


def _read_image(f) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    if Path(f).is_dir():
        raise V.BadInput(f"query image {f} is a folder, expected a PNG file")
    try:
        with Image.open(f) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise V.BadInput(f"query image {f} is not a readable image ({type(err).__name__}); replace "
                         f"it with the PNG of that query") from None


def check_compatible(model, data: TrainingSet) -> None:
    """The training latents / embeddings must fit the model (latent shape, text width)."""
    if tuple(data.latents.shape[1:]) != tuple(model.latent_shape):
        raise ValueError(f"training latents have shape {tuple(data.latents.shape[1:])} per row but "
                         f"the model expects {tuple(model.latent_shape)}; encode the images with "
                         f"this model's VAE at its resolution")
    width = model.unet.config.cross_attention_dim
    if data.text_emb.shape[-1] != width:
        raise ValueError(f"text embeddings are {data.text_emb.shape[-1]}-d but the UNet's "
                         f"cross-attention expects {width}; encode captions with its text encoder")


# ------------------------------------------------------------------------------------------------
# training-set loss pass
# ------------------------------------------------------------------------------------------------
def row_noise(shape, seed: int, row: int, K: int) -> torch.Tensor:
    """Noise [K, C, h, w] of training row ``row``: a function of (seed, row, timestep) only."""
    return NoiseBank(shape, seed).draw(K, stream=int(row))


def training_loss(model, data: TrainingSet, *, time_samples: int = 20, seed: int = 0,
                  rows=None, shard=None, chunk: int = 64, batch_size: int = 256,
                  cache: ResultCache | None = None, progress: bool = True) -> np.ndarray:
    """L(z_i, theta) per training row: mean over captions and the timesteps
    :func:`loss_timesteps` of ||eps - eps_theta(z_t, t, c)||^2 / dim (the original's
    ``collect_loss`` with avg_timesteps and avg_captions).

    rows: row indices (default all 2N); returned float64 [len(rows)].  Rows are processed in chunks
    of ``chunk``; with ``shard=(i, n)`` only chunks c with c % n == i are computed (others NaN) -
    run every shard against the same ``cache`` and a final call without shard reads them all
    back.  With a ``cache`` and no ``shard``, the shard comes from ``accelerate launch`` (every
    process then returns all rows, read back from the cache after a barrier) or the runner's
    ``--shard`` (:func:`t2i_common.distributed.resolve_shard`); without a cache every process
    computes everything.  ``cache``: per-chunk results (key it by the model weights, e.g.
    :func:`weights_fingerprint`), so a killed run resumes.
    """
    check_compatible(model, data)
    chunk, batch_size = V.count(chunk, "chunk"), V.count(batch_size, "batch_size")
    sh = resolve_shard(shard) if shard is not None or cache is not None else LOCAL
    if sh.live and cache is None:
        raise ShardError(f"training_loss: running as {sh} needs cache=... (the processes exchange "
                         f"chunks through it)")
    i_shard, n_shard = sh.rank, sh.world
    rows = np.arange(len(data.latents)) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(data.latents)):
        raise IndexError(f"training_loss: rows must lie in 0..{len(data.latents) - 1}")
    ts = loss_timesteps(time_samples, model.num_train_timesteps)
    K, P = len(ts), data.text_emb.shape[1]
    N = data.n
    out = np.full(len(rows), np.nan)
    chunks = [(c, rows[s:s + chunk]) for c, s in enumerate(range(0, len(rows), chunk))]
    mine = [(c, r) for c, r in chunks if c % n_shard == i_shard]
    for c, r in tqdm(mine, disable=not progress, desc="training loss"):
        cid = f"rows{int(r[0])}-{int(r[-1])}-{len(r)}"
        if cache is not None and cache.has(cid):
            vals = cache.load(cid)
        else:
            img = torch.as_tensor(r % N)
            emb = data.text_emb[img].reshape(-1, *data.text_emb.shape[2:])
            cond_idx = torch.arange(len(r) * P).view(len(r), P)
            noise = torch.stack([row_noise(model.latent_shape, seed, int(i), K) for i in r])
            res = denoise_errors(model, data.latents[torch.as_tensor(r)], emb, cond_idx,
                                 timesteps=ts, noise=noise, batch_size=batch_size)
            vals = res["mse"].double().mean(dim=(1, 2)).numpy()
            if cache is not None:
                cache.save(cid, vals)
        pos = c * chunk
        out[pos:pos + len(r)] = vals
    if sh.live:  # accelerate launch: the other processes' chunks, from the shared cache
        from accelerate import PartialState

        PartialState(cpu=accelerate_cpu()).wait_for_everyone()
        for c, r in chunks:
            if c % n_shard != i_shard:
                cid = f"rows{int(r[0])}-{int(r[-1])}-{len(r)}"
                out[c * chunk:c * chunk + len(r)] = cache.load(cid)
    return out


def loss_cache(model, data: TrainingSet, time_samples: int, seed: int, batch_size: int,
               root=None, tag: str = "") -> ResultCache:
    """The per-chunk cache of :func:`training_loss` for these weights, data and settings."""
    key = dict(weights=weights_fingerprint(model.unet), latents=data.latents,
               text=data.text_emb, time_samples=time_samples, seed=seed, batch_size=batch_size,
               tag=tag)
    return ResultCache("attribution-loss", key, root=root)


# ------------------------------------------------------------------------------------------------
# Fisher information
# ------------------------------------------------------------------------------------------------
def _eps_loss(unet, params, buffers, zt, t, emb, eps, target="loss", coef=None,
              prediction_type="epsilon"):
    pred = torch.func.functional_call(unet, (params, buffers), (zt, t),
                                      {"encoder_hidden_states": emb, "return_dict": False})[0]
    if prediction_type == "v_prediction":      # eps = sqrt(abar) v + sqrt(1 - abar) z_t
        pred = coef[..., 0:1, None, None] * pred + coef[..., 1:2, None, None] * zt
    elif prediction_type == "sample":          # eps = (z_t - sqrt(abar) z0) / sqrt(1 - abar)
        pred = (zt - coef[..., 0:1, None, None] * pred) / coef[..., 1:2, None, None]
    if target == "sq_norm":          # D-TRAK's output function: mean ||eps_theta||^2
        return pred.pow(2).mean()
    return F.mse_loss(pred, eps)


def per_sample_grads(unet, names, z0, t, emb, eps, abar, how: str = "vmap",
                     target: str = "loss", prediction_type: str = "epsilon") -> dict:
    """Gradients of the eps-MSE of each sample w.r.t. the parameters ``names``: dict of
    [B, *shape].  ``prediction_type``: the UNet's parameterization (a v- or sample-prediction
    output is converted to eps first, as :meth:`T2IModel.eps` does).  ``how="vmap"``: ``torch.func.vmap(grad)`` (the original's compute_fisher);
    ``how="loop"``: one backward per sample (the reference it must equal).  The UNet's attention
    runs through diffusers' plain ``AttnProcessor`` meanwhile (SDPA has no vmap batching rule on
    CPU, so functorch would fall back to a slow per-sample loop)."""
    if target not in ("loss", "sq_norm"):
        raise ValueError(f"per_sample_grads: target must be 'loss' or 'sq_norm', got {target!r}")
    with _plain_attention(unet):
        return _per_sample_grads(unet, names, z0, t, emb, eps, abar, how, target, prediction_type)


class _plain_attention:
    def __init__(self, unet):
        self.unet = unet

    def __enter__(self):
        self.saved = None
        if hasattr(self.unet, "attn_processors"):
            from diffusers.models.attention_processor import AttnProcessor
            self.saved = dict(self.unet.attn_processors)
            self.unet.set_attn_processor(AttnProcessor())
        return self.unet

    def __exit__(self, *exc):
        if self.saved is not None:
            self.unet.set_attn_processor(self.saved)
        return False


def _per_sample_grads(unet, names, z0, t, emb, eps, abar, how, target, prediction_type="epsilon"):
    all_p = {n: p.detach() for n, p in unet.named_parameters()}
    params = {n: all_p[n] for n in names}
    frozen = {n: p for n, p in all_p.items() if n not in params}
    buffers = {n: b.detach() for n, b in unet.named_buffers()}
    a = abar[t].view(-1, 1, 1, 1).to(z0.dtype)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    coef = torch.cat([a.sqrt(), (1 - a).sqrt()], dim=1).view(-1, 2)   # per sample [sqrt abar, sqrt 1-abar]

    def one(p, zt1, t1, emb1, eps1, c1):
        return _eps_loss(unet, {**frozen, **p}, buffers, zt1[None], t1[None], emb1[None], eps1[None],
                         target, c1[None], prediction_type)

    if how == "vmap":
        return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0, 0, 0))(
            params, zt, t, emb, eps, coef)
    if how == "loop":
        gs = [torch.func.grad(one)(params, zt[i], t[i], emb[i], eps[i], coef[i]) for i in range(len(zt))]
        return {n: torch.stack([g[n] for g in gs]) for n in names}
    raise ValueError(f"per_sample_grads: how must be 'vmap' or 'loop', got {how!r}")


def fisher_diagonal(model, data: TrainingSet, subset: str = "all", *, epochs: int = 5,
                    batch_size: int = 32, seed: int = 0, progress: bool = True,
                    path=None, chunk: int | None = None) -> dict:
    """Diagonal empirical Fisher F = E[(grad_theta L(z, theta))^2] over the 2N training rows.

    Per sample: a random timestep t ~ U{0..T-1}, fresh noise and one random caption, drawn from a
    generator seeded with (seed, epoch) (original: compute_fisher.py, batch 32, 5 epochs).  Batch
    means of squared per-sample gradients are averaged (float64), as in the original.  With
    ``path`` the result is saved as ``{param_name: tensor}`` (the original's ``fisher_info.pt``)
    plus ``<path>.meta.json`` (what it was made from: weights, data, epochs, batch_size, seed).
    An existing ``path`` is never overwritten: it is read back (:func:`read_fisher`) when it
    covers the parameters of ``subset`` and its record matches, and is an error otherwise; a file
    without a record (e.g. the original's compute_fisher.py) is used as given after its names,
    shapes and values are checked.
    ``chunk``: rows whose per-sample gradients are held at once (default: the whole batch).  At
    full size the per-sample gradients of all SD UNet weights take 3.4 GB per row in float32, so a
    batch of 32 needs ~110 GB: pass e.g. ``chunk=1``; the draws and the result do not change.
    """
    check_compatible(model, data)
    epochs, batch_size = V.count(epochs, "epochs"), V.count(batch_size, "batch_size")
    chunk = batch_size if chunk is None else V.count(chunk, "chunk")
    unet = model.unet
    names = select_parameters(unet, subset)
    record = fisher_record(model, data, epochs, batch_size, seed)
    if path is not None and Path(path).exists():
        V.check_record(path, record, "fisher", "pass another path (a new file is computed there) "
                                               "or the parameters it was made with")
        return check_fisher(read_fisher(path), unet, names, path)
    abar = model.alphas_cumprod.float()
    T, P = len(abar), data.text_emb.shape[1]
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in unet.named_parameters() if n in names}
    count = 0
    dev = model.device
    for ep in range(epochs):
        g = torch.Generator().manual_seed(int(seed) * 1000003 + ep)
        for s in tqdm(range(0, len(data.latents), batch_size), disable=not progress,
                      desc=f"Fisher epoch {ep + 1}/{epochs}"):
            r = torch.arange(s, min(s + batch_size, len(data.latents)))
            t = torch.randint(T, (len(r),), generator=g)
            eps = torch.randn((len(r),) + tuple(model.latent_shape), generator=g)
            cap = torch.randint(P, (len(r),), generator=g)
            emb = data.text_emb[r % data.n, cap]
            sq = {n: torch.zeros_like(acc[n]) for n in names}
            for c in range(0, len(r), chunk):
                cs = slice(c, c + chunk)
                gs = per_sample_grads(unet, names, data.latents[r[cs]].to(dev), t[cs].to(dev),
                                      emb[cs].to(dev), eps[cs].to(dev), abar.to(dev),
                                      prediction_type=getattr(model, "prediction_type", "epsilon"))
                for n in names:
                    sq[n] += gs[n].double().square().sum(0).cpu()
                del gs
            for n in names:
                acc[n] += sq[n] / len(r)
            count += 1
    fisher = {n: v / count for n, v in acc.items()}
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        torch.save(fisher, tmp)
        V.write_record(path, record)
        tmp.replace(path)
    return fisher


def fisher_record(model, data, epochs, batch_size, seed) -> dict:
    """What a Fisher file is made from (its ``.meta.json``)."""
    return dict(kind="fisher", weights=weights_fingerprint(model.unet),
                data=V.digest(data.latents, data.text_emb), epochs=int(epochs),
                batch_size=int(batch_size), seed=int(seed))


def read_fisher(path) -> dict:
    """A ``{param_name: tensor}`` Fisher file (the original's ``fisher_info.pt``); anything else
    (a bare tensor, a list, a corrupt file) is an error saying what the file holds."""
    f = V.load_torch(path, "fisher", "pass the fisher_info.pt written by compute_fisher / this "
                                     "package, or a new path to compute one there")
    if not isinstance(f, dict) or not f or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in f.items()):
        what = (f"a tensor of shape {tuple(f.shape)}" if isinstance(f, torch.Tensor)
                else "an empty dict" if isinstance(f, dict) and not f else f"a {type(f).__name__}")
        raise V.BadInput(f"fisher: {path} holds {what}, expected a {{parameter name: tensor}} dict "
                         f"(the original's fisher_info.pt); pass another path to compute one there")
    return f


def check_fisher(fisher: dict, unet, names, path="fisher") -> dict:
    """The entries ``names`` of a Fisher dict, checked against the UNet: present, same shapes,
    finite and >= 0."""
    params = dict(unet.named_parameters())
    missing = [n for n in names if n not in fisher]
    if missing:
        raise V.BadInput(f"fisher: {path} lacks {len(missing)} of the {len(names)} parameters of this "
                         f"weight subset (e.g. {missing[0]!r}; it holds {len(fisher)} entries such as "
                         f"{next(iter(fisher), None)!r}); it was made for another subset or model: "
                         f"pass another path to compute one there")
    for n in names:
        v = fisher[n]
        if tuple(v.shape) != tuple(params[n].shape):
            raise V.BadInput(f"fisher: {path} entry {n!r} has shape {tuple(v.shape)} but the UNet's "
                             f"parameter is {tuple(params[n].shape)}; it was made for another model")
        V.finite_array(v, f"fisher {path} entry {n!r}")
        if bool((v < 0).any()):
            raise V.BadInput(f"fisher: {path} entry {n!r} has negative values (a Fisher diagonal is a "
                             f"mean of squares); the file is not a Fisher information")
    return {n: fisher[n] for n in names}


# ------------------------------------------------------------------------------------------------
# unlearning
# ------------------------------------------------------------------------------------------------
def query_draws(seed: int, n_batches: int, batch_size: int, T: int, shape) -> tuple:
    """The (timestep, noise) draws of the query gradient: per batch ``batch_size`` *distinct*
    timesteps (a random permutation's head, as the original) and standard-normal noise, from one
    generator seeded with ``seed``.  Returns t [n_batches, B] and eps [n_batches, B, C, h, w]."""
    if batch_size > T:
        raise ValueError(f"batch_size {batch_size} > {T} timesteps: the draws of one batch must be "
                         f"distinct timesteps; use a batch size <= {T}")
    g = torch.Generator().manual_seed(int(seed))
    t = torch.stack([torch.randperm(T, generator=g)[:batch_size] for _ in range(n_batches)])
    eps = torch.randn((n_batches, batch_size) + tuple(shape), generator=g)
    return t, eps


def query_gradient(model, latent, emb, names, *, n_batches: int = 625, batch_size: int = 80,
                   seed: int = 0, progress: bool = False) -> dict:
    """grad_theta L(z^, theta): the eps-MSE of the query averaged over ``n_batches`` batches of
    ``batch_size`` (noise, distinct timestep) draws (the original's gradient accumulation over
    625 x 80, divided by 625).  Returns float64 tensors for the parameters ``names``."""
    unet = model.unet
    params = dict(unet.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"query_gradient: the UNet has no parameter(s) {missing[:3]}")
    abar = model.alphas_cumprod.float()
    ts, noise = query_draws(seed, n_batches, batch_size, len(abar), model.latent_shape)
    z0 = torch.as_tensor(latent, dtype=torch.float32).reshape(1, *model.latent_shape)
    e = torch.as_tensor(emb, dtype=torch.float32).reshape(1, *emb.shape[-2:])
    old = {n: p.requires_grad for n, p in params.items()}
    grad = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
            p.grad = None
        with torch.enable_grad():
            for b in tqdm(range(n_batches), disable=not progress, desc="query gradient"):
                t, eps = ts[b], noise[b]
                a = abar[t].view(-1, 1, 1, 1)
                zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
                loss = F.mse_loss(model.eps(zt, t.to(model.device),
                                            e.expand(len(t), -1, -1)).float(), eps.to(model.device))
                gs = torch.autograd.grad(loss, [params[n] for n in names])
                for n, gn in zip(names, gs):
                    grad[n] += gn.detach().double().cpu()
    finally:
        for n, p in params.items():
            p.requires_grad_(old[n])
    return {n: v / n_batches for n, v in grad.items()}


def newton_step(grad: dict, fisher: dict | None, lr: float, n_train: int,
                damping: float = 0.0) -> dict:
    """Delta theta = (lr / N) F^-1 grad (float64).  ``fisher=None`` is the SGD ablation without the
    Fisher preconditioner: Delta theta = (lr / N) grad."""
    lr = V.real(lr, "lr", low=0)
    n_train = V.count(n_train, "n_train")
    damping = V.real(damping, "damping", low=0)
    out = {}
    for n, gn in grad.items():
        gn = gn.double()
        V.finite_array(gn, f"query gradient of {n!r}")
        if fisher is None:
            out[n] = lr * gn / n_train
            continue
        if n not in fisher:
            raise KeyError(f"the Fisher information has no entry {n!r}; recompute it with a weight "
                           f"subset that covers this parameter (e.g. subset='all')")
        V.finite_array(fisher[n], f"Fisher entry {n!r}")
        f = fisher[n].double().cpu() + damping
        if (f <= 0).any():
            raise ValueError(f"Fisher entry {n!r} has {(f <= 0).sum().item()} non-positive values; "
                             f"pass damping > 0")
        out[n] = lr * gn / (f * n_train)
    return out


class unlearned:
    """Context manager: add ``delta`` (float64 update, cast to each parameter's dtype) to the UNet
    on entry and restore the saved original tensors bit-exactly on exit."""

    def __init__(self, unet, delta: dict):
        self.unet, self.delta = unet, delta

    def __enter__(self):
        params = dict(self.unet.named_parameters())
        self.saved = {n: params[n].detach().clone() for n in self.delta}
        with torch.no_grad():
            for n, d in self.delta.items():
                p = params[n]
                p.copy_((p.detach().double() + d.to(p.device)).to(p.dtype))
        return self.unet

    def __exit__(self, *exc):
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for n, v in self.saved.items():
                params[n].copy_(v)
        return False


def unlearn_delta(model, latent, emb, fisher, *, n_train: int, subset: str = "cross-attn-kv",
                  lr: float = 0.01, n_batches: int = 625, batch_size: int = 80, seed: int = 0,
                  damping: float = 0.0, use_fisher: bool = True) -> dict:
    """The Newton unlearning update of one query (see :func:`newton_step`).

    ``use_fisher=False`` is the paper's ablation "SGD without Fisher": the raw gradient step,
    rescaled to the Euclidean length of the Newton step (otherwise lr / N * grad is so short that
    float32 weights round it away; the ranking then compares directions only)."""
    check_unlearn_settings(lr=lr, n_batches=n_batches, batch_size=batch_size, damping=damping,
                           n_train=n_train, T=model.num_train_timesteps)
    V.finite_array(torch.as_tensor(latent), "query latent")
    V.finite_array(torch.as_tensor(emb), "query text embedding")
    names = select_parameters(model.unet, subset)
    g = query_gradient(model, latent, emb, names, n_batches=n_batches, batch_size=batch_size,
                       seed=seed)
    newton = newton_step(g, fisher, lr, n_train, damping)
    if use_fisher:
        return newton
    sgd = newton_step(g, None, lr, n_train)
    norm = lambda d: torch.sqrt(sum((v.double() ** 2).sum() for v in d.values()))  # noqa: E731
    scale = norm(newton) / norm(sgd).clamp_min(1e-300)
    return {n: v * scale for n, v in sgd.items()}


def check_unlearn_settings(*, lr, n_batches, batch_size, damping=0.0, n_train=None, T=1000,
                           time_samples=None) -> None:
    """The unlearning step's numbers, checked before any work (one-line errors)."""
    V.real(lr, "lr (unlearn_lr)", low=0)
    V.count(n_batches, "n_batches (unlearn_grad_accum_steps)")
    V.count(batch_size, "batch_size (unlearn_batch_size)", high=T)
    V.real(damping, "damping", low=0)
    if n_train is not None:
        V.count(n_train, "n_train")
    if time_samples is not None:
        loss_timesteps(time_samples, T)


# ------------------------------------------------------------------------------------------------
# influence
# ------------------------------------------------------------------------------------------------
def influence_from_losses(loss_after, loss_before) -> dict:
    """tau = loss after - loss before per row; max over each image's unflipped and flipped row;
    rank = argsort(-tau) (stable).  Returns the original's ``{'influence', 'rank'}``."""
    a, b = np.asarray(loss_after, np.float64), np.asarray(loss_before, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) % 2:
        raise ValueError(f"losses before/after must be equal [2N] arrays, got {a.shape} and {b.shape}"
                         f"; use the pre-training loss of the same training set and settings")
    tau = a - b
    n = len(tau) // 2
    infl = np.maximum(tau[:n], tau[n:])
    return {"influence": infl, "rank": np.argsort(-infl, kind="stable")}


def save_influence(result: dict, folder, idx: int, record: dict | None = None) -> Path:
    """Write ``folder/influence_{idx}.pkl`` holding ``{'influence', 'rank'}`` (original format);
    ``record``: the parameters it was made with, kept in ``influence_{idx}.pkl.meta.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"influence_{int(idx)}.pkl"
    tmp = p.with_suffix(".pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"influence": np.asarray(result["influence"]),
                     "rank": np.asarray(result["rank"])}, f)
    if record is not None:
        V.write_record(p, record)
    tmp.replace(p)
    return p


def load_influence(folder, idx: int) -> dict:
    p = Path(folder) / f"influence_{int(idx)}.pkl"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found; run attribute_by_unlearning for query {idx}")
    res = V.load_pickle(p, f"influence of query {idx}", "move it away to recompute it")
    if not isinstance(res, dict) or set(res) != {"influence", "rank"}:
        what = f"keys {sorted(map(str, res))}" if isinstance(res, dict) else f"a {type(res).__name__}"
        raise ValueError(f"{p} is not an influence file: it holds {what}, expected a dict with "
                         f"['influence', 'rank']; move it away to recompute it")
    V.finite_array(np.asarray(res["influence"], dtype=np.float64), f"{p} influence")
    return res


def attribute_by_unlearning(model, data: TrainingSet, queries: QuerySet, fisher, pretrain_loss, *,
                            indices=None, out_dir=None, subset: str = "cross-attn-kv",
                            lr: float = 0.01, n_batches: int = 625, batch_size: int = 80,
                            time_samples: int = 20, seed: int = 0, damping: float = 0.0,
                            use_fisher: bool = True, n_train: int | None = None,
                            loss_batch_size: int = 256, progress: bool = True,
                            reuse_unrecorded: bool = False) -> dict:
    """Influence of every training image on each query ``indices`` (default all).

    For each query: Newton-unlearn it, recompute the training loss (same noise as
    ``pretrain_loss``), restore the weights, write ``out_dir/influence_{idx}.pkl`` and its record
    ``influence_{idx}.pkl.meta.json`` (every setting, the weights, data, query and Fisher it was
    made from).  A query whose file exists is read back (resume) when its record matches; a file
    made with other settings is an error (it is never overwritten: use another ``out_dir``), and so
    is a file without a record (an older run's or the original code's), unless
    ``reuse_unrecorded`` (for folders keyed by the settings, such as the package's cache).
    ``n_train``: N in lr / N (default the training-set size; the original's AbC setting hard-codes
    400M for LAION).  Returns {idx: {'influence', 'rank'}}.
    """
    indices = list(range(len(queries))) if indices is None else [queries.check_index(i) for i in indices]
    if not indices:
        raise V.BadInput("indices is empty; pass at least one query index (or None for all)")
    pretrain_loss = np.asarray(pretrain_loss, np.float64)
    if pretrain_loss.shape != (len(data.latents),):
        raise ValueError(f"pretrain_loss has shape {pretrain_loss.shape} but the training set has "
                         f"{len(data.latents)} rows (2N); recompute it with training_loss on the "
                         f"same training set")
    V.finite_array(pretrain_loss, "pretrain_loss")
    check_compatible(model, data)
    check_unlearn_settings(lr=lr, n_batches=n_batches, batch_size=batch_size, damping=damping,
                           n_train=n_train, T=model.num_train_timesteps, time_samples=time_samples)
    V.count(loss_batch_size, "loss_batch_size")
    if use_fisher:
        if not isinstance(fisher, dict):
            raise V.BadInput(f"fisher must be a {{parameter name: tensor}} dict, got "
                             f"{type(fisher).__name__}")
        fisher = check_fisher(fisher, model.unet, select_parameters(model.unet, subset))
    base = None
    if out_dir is not None:
        V.out_dir(out_dir, "out_dir")
        base = dict(kind="influence", weights=weights_fingerprint(model.unet),
                    data=V.digest(data.latents, data.text_emb), pretrain_loss=V.digest(pretrain_loss),
                    fisher=V.digest(*[fisher[k] for k in sorted(fisher)]) if use_fisher else None,
                    subset=subset, lr=float(lr), n_batches=int(n_batches), batch_size=int(batch_size),
                    time_samples=int(time_samples), seed=int(seed), damping=float(damping),
                    use_fisher=bool(use_fisher), n_train=int(n_train or data.n))
    records = {}
    for idx in indices:   # every existing result is checked before any work
        if base is None:
            continue
        records[idx] = dict(base, query=idx, query_data=V.digest(queries.latents[idx],
                                                                  queries.text_emb[idx]))
        p = Path(out_dir) / f"influence_{idx}.pkl"
        if p.exists() and not V.check_record(
                p, records[idx], f"influence of query {idx}",
                "results are never overwritten: pass another result folder") and not reuse_unrecorded:
            raise V.BadInput(f"{p} exists but has no record of the settings it was made with (an "
                             f"older run's or the original code's); it is not reused or "
                             f"overwritten: pass another result folder or move it away")
    out = {}
    for idx in tqdm(indices, disable=not progress, desc="unlearning queries"):
        if out_dir is not None and (Path(out_dir) / f"influence_{idx}.pkl").exists():
            out[idx] = load_influence(out_dir, idx)
            if len(out[idx]["influence"]) != data.n:
                raise V.BadInput(f"{Path(out_dir) / f'influence_{idx}.pkl'} holds "
                                 f"{len(out[idx]['influence'])} influences, the training set has "
                                 f"{data.n} images; pass another result folder")
            continue
        delta = unlearn_delta(model, queries.latents[idx], queries.text_emb[idx], fisher,
                              n_train=n_train or data.n, subset=subset, lr=lr,
                              n_batches=n_batches, batch_size=batch_size, seed=seed,
                              damping=damping, use_fisher=use_fisher)
        with unlearned(model.unet, delta):
            after = training_loss(model, data, time_samples=time_samples, seed=seed,
                                  batch_size=loss_batch_size, progress=False)
        V.finite_array(after, f"training loss after unlearning query {idx}")
        out[idx] = influence_from_losses(after, pretrain_loss)
        if out_dir is not None:
            save_influence(out[idx], out_dir, idx, records[idx])
    return out
