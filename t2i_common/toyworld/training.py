"""Training the toy checkpoint: toy CLIP (contrastive), VAE, UNet (eps-prediction), resumable.

Three stages, each a plain step loop over random mini-batches of an in-memory dataset:

* :func:`train_clip` - text + vision towers trained together with the symmetric InfoNCE loss and a
  learnable logit scale (Radford et al. 2021, Fig. 3 pseudo-code).  We differ in one place: a batch
  of toy captions contains duplicates ("a red circle" many times), so every pair whose captions are
  identical counts as a positive (multi-positive targets) instead of a false negative.
* :func:`train_vae` - an ``AutoencoderKL`` trained with reconstruction (MSE + L1) and a small KL
  term (the LDM first stage, Rombach et al. 2022, without the perceptual/GAN terms, which are
  pointless on flat-coloured 32 px shapes); afterwards ``scaling_factor = 1 / std(latents)`` as in
  LDM Sec. 3.3 / SD's 0.18215.
* :func:`train_unet` - a ``UNet2DConditionModel`` trained with the DDPM eps-prediction loss
  ``|| eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c) ||^2`` with t ~ U{0..T-1}
  (Ho et al. 2020, Eq. 14; SD's scaled-linear schedule) and caption dropout (the caption replaced
  by "" with probability 0.1) so classifier-free guidance works (Ho & Salimans 2022).  VAE latent
  posteriors and text-encoder hidden states are computed once for the whole training set; the loop
  then only runs the UNet.  Optional EMA of the weights.

Every stage runs through :func:`t2i_common.trainloop._fit` (Accelerate: one process by default,
data parallel under ``accelerate launch``), is seeded (one CPU ``torch.Generator`` drives all
sampling, identical on every process), shows a tqdm bar, and writes an atomic checkpoint
(weights, optimizer, step, generator state, EMA, loss history) every ``ckpt_every`` steps, so an
interrupted run resumes and ends with bit-identical weights.  The same
functions fine-tune an existing model (``init=``), e.g. on poisoned data for the implosion study.

:func:`build_toy_checkpoint` runs the whole recipe on toy-world data and writes ``data/toy-sd``;
``python -m t2i_common.toyworld.training --out data/toy-sd`` is its command line (``accelerate launch
--num_processes N -m t2i_common.toyworld.training ...`` for data-parallel training).
``--recipe v3`` swaps the UNet stage for :func:`.vpred.train_unet_joint`: zero terminal
SNR with v-prediction, the text encoder trained jointly, relational captions up-weighted; the
CLIP and VAE stages are the same (their checkpoints are shared with a v2 build of the same seed).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import sdformat, toyworld as tw
from ..distributed import accelerate_cpu, launched_world
from ..models import load_clip, load_t2i
from ..sdformat import build_scheduler, build_unet, build_vae
# the generic loop lives in trainloop; its names stay importable from here
from ..trainloop import Interrupted, _fit, atomic_torch_save, lr_at  # noqa: F401
from ..validate import cli
from .fidelity import clip_zero_shot_accuracy, fidelity_prompts, generation_fidelity
from . import vpred   # vpred imports this module too; each uses the other only at call time
from .. import validate as V

# the stages' data and batch draws (names stay importable from here)
from .trainingdata import (  # noqa: F401
    CLIP_MEAN, CLIP_STD, PairData, _as_image_tensor, as_pairs, to_unit, to_clip_pixels,
    _caption_table, _pick_captions, draw_captions, _draw, _rows, _device_of, _tokenize)

# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------
def clip_features(clip, pixel_values=None, input_ids=None):
    """Projected (not yet normalised) image / text features of a transformers ``CLIPModel``."""
    out = []
    if pixel_values is not None:
        out.append(clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output))
    if input_ids is not None:
        out.append(clip.text_projection(clip.text_model(input_ids=input_ids).pooler_output))
    return out[0] if len(out) == 1 else tuple(out)


def clip_contrastive_loss(img_f, txt_f, logit_scale, caption_ids=None):
    """Symmetric InfoNCE.  With ``caption_ids``, pairs with identical captions are all positives
    (target rows spread uniformly over them); without, the diagonal is the target (CLIP)."""
    img_f = F.normalize(img_f, dim=-1)
    txt_f = F.normalize(txt_f, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * img_f @ txt_f.t()
    if caption_ids is None:
        target = torch.eye(len(img_f))
    else:
        target = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    li = -(target * logits.log_softmax(1)).sum(1).mean()
    lt = -(target.t() * logits.t().log_softmax(1)).sum(1).mean()
    return (li + lt) / 2


def train_clip(pairs, cfg: sdformat.TinySDConfig, tokenizer, steps: int, *, batch_size: int = 256,
               lr: float = 1e-3, seed: int = 0, out_dir=None, ckpt_every: int = 200,
               resume: bool = True, init=None, weights=None, progress: bool = True,
               stop_after=None, warmup: int = 100, grad_accum: int = 1,
               mixed_precision: str | None = None):
    """Train a toy CLIP (``transformers.CLIPModel`` from ``sdformat.clip_config``) contrastively.

    ``pairs``: see :func:`as_pairs`; images must be ``cfg.image_size`` square.  ``init``: a CLIPModel
    to fine-tune instead of a fresh one.  ``weights``: optional per-image sampling weights
    (e.g. colour-balanced batches).  Returns ``(clip, info)``; ``info`` has losses and wall time.
    Weight decay 0.1 on all weights, AdamW, cosine schedule; CLIP's own recipe uses 0.2 and a
    32k batch - we are 100x smaller on both.
    Data parallel under ``accelerate launch`` (see :func:`_fit`): each process embeds its rows
    and the features are all-gathered (with gradients) so the loss is the global batch's; the
    contrastive loss couples the whole batch, so ``grad_accum`` must stay 1.
    """
    from transformers import CLIPModel

    data = as_pairs(pairs)
    if data.images.shape[1] != cfg.image_size or data.images.shape[2] != cfg.image_size:
        raise ValueError(f"train_clip: images are {tuple(data.images.shape[1:3])} but cfg.image_size "
                         f"is {cfg.image_size}; resize the data or change the config")
    captions, per_image = _caption_table(data, extra=(), tokenizer=tokenizer)
    ids = _tokenize(tokenizer, captions, cfg.max_length)
    torch.manual_seed(seed)
    clip = init.requires_grad_(True) if init is not None else CLIPModel(sdformat.clip_config(cfg, tokenizer))
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    if int(grad_accum) != 1:
        raise ValueError(f"train_clip: grad_accum must be 1 (the contrastive loss couples the whole "
                         f"batch), got {grad_accum}; use more processes or a smaller batch_size")

    def loss_fn(model, g, piece=None):
        idx = _draw(len(data), batch_size, g, w)
        cap = _pick_captions(per_image, idx, g)
        r, dev = _rows(piece), _device_of(model)
        img_f, txt_f = clip_features(model, to_clip_pixels(data.images[idx[r]]).to(dev),
                                     ids[cap[r]].to(dev))
        if piece is not None and piece.gather is not None:  # features of the whole global batch
            img_f, txt_f = piece.gather(img_f), piece.gather(txt_f)
        return clip_contrastive_loss(img_f, txt_f, model.logit_scale, cap.to(dev))

    hp = dict(stage="clip", n=len(data), batch_size=batch_size, cfg=asdict(cfg),
              fine_tune=init is not None, weighted=weights is not None)
    clip, _, info = _fit("clip", clip, loss_fn, steps=steps, lr=lr, seed=seed, out_dir=out_dir,
                         ckpt_every=ckpt_every, resume=resume, warmup=warmup, weight_decay=0.1,
                         progress=progress, hparams=hp, stop_after=stop_after, desc="toy CLIP",
                         batch_size=batch_size, mixed_precision=mixed_precision)
    info["logit_scale"] = float(clip.logit_scale.detach().exp())
    return clip, info


# ------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------
def train_vae(images, cfg: sdformat.TinySDConfig, steps: int, *, batch_size: int = 64,
              lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0, out_dir=None,
              ckpt_every: int = 200, resume: bool = True, init=None, progress: bool = True,
              stop_after=None, warmup: int = 100, scale_images: int = 2048,
              grad_accum: int = 1, mixed_precision: str | None = None, decoder_only: bool = False,
              name: str = "vae"):
    """Train ``sdformat.build_vae(cfg)`` (or fine-tune ``init``) on uint8 [N, H, W, 3] images.

    Loss: MSE + L1 of the reconstruction from a posterior sample, plus ``kl_weight`` x KL to N(0, I)
    (LDM's KL-regularised first stage uses ~1e-6 with perceptual + GAN terms that we drop).  After
    training, ``scaling_factor = 1 / std`` of posterior samples of up to ``scale_images`` training
    images is written into the config (SD 1.x's 0.18215 was found the same way).
    Returns ``(vae, info)`` with ``info["scaling_factor"]`` and ``info["recon_mse"]`` (train set).
    Data parallel / ``grad_accum`` / ``mixed_precision``: see :func:`_fit`.

    ``decoder_only`` (needs ``init``): fine-tune only the decoder (``post_quant_conv`` + decoder) on
    the frozen encoder's posterior samples, as Stability's ``sd-vae-ft-mse`` decoder was fine-tuned
    for SD: encoder, latent space and ``scaling_factor`` stay exactly those of ``init``, so every
    UNet trained on its latents stays valid (the KL term, an encoder term, is dropped).
    ``name``: checkpoint stem in ``out_dir``.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        images = _as_image_tensor(images if not isinstance(images, PairData) else images.images)
    if images.ndim != 4 or images.shape[1] != cfg.image_size:
        raise ValueError(f"train_vae: images must be uint8 [N, {cfg.image_size}, {cfg.image_size}, 3], "
                         f"got {tuple(images.shape)}")
    if decoder_only and init is None:
        raise ValueError("train_vae: decoder_only=True fine-tunes the decoder of an existing VAE; "
                         "pass it as init=")
    torch.manual_seed(seed)
    vae = init.requires_grad_(True) if init is not None else build_vae(cfg)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
        sf_init = float(vae.config.scaling_factor)

    def loss_fn(model, g, piece=None):
        idx = _draw(len(images), batch_size, g)
        r = _rows(piece)
        x = to_unit(images[idx[r]]).to(_device_of(model))
        with torch.set_grad_enabled(not decoder_only and torch.is_grad_enabled()):
            post = model.encode(x).latent_dist
        # the posterior noise of the whole global batch, then this process's rows
        noise = torch.randn((len(idx),) + tuple(post.mean.shape[1:]), generator=g)[r]
        z = post.mean + post.std * noise.to(x.device)
        rec = model.decode(z).sample
        loss = F.mse_loss(rec, x) + (rec - x).abs().mean()
        if decoder_only:
            return loss
        kl = 0.5 * (post.mean ** 2 + post.var - 1.0 - post.logvar).sum(dim=(1, 2, 3)).mean()
        return loss + kl_weight * kl

    hp = dict(stage="vae", n=len(images), batch_size=batch_size, kl_weight=kl_weight,
              cfg=asdict(cfg), fine_tune=init is not None)
    if decoder_only:
        hp.update(decoder_only=True)
    vae, _, info = _fit(name, vae, loss_fn, steps=steps, lr=lr, seed=seed, out_dir=out_dir,
                        ckpt_every=ckpt_every, resume=resume, warmup=warmup, progress=progress,
                        hparams=hp, stop_after=stop_after, desc="VAE decoder" if decoder_only else "VAE",
                        batch_size=batch_size, grad_accum=grad_accum, mixed_precision=mixed_precision)
    g = torch.Generator().manual_seed(seed + 1)
    sub = images[torch.randperm(len(images), generator=g)[:scale_images]]
    with torch.no_grad():
        zs, mse = [], []
        for i in range(0, len(sub), 256):
            x = to_unit(sub[i:i + 256])
            post = vae.encode(x).latent_dist
            zs.append(post.mean + post.std * torch.randn(post.mean.shape, generator=g))
            mse.append(F.mse_loss(vae.decode(post.mean).sample.clamp(-1, 1), x,
                                  reduction="none").mean(dim=(1, 2, 3)))
        std = float(torch.cat(zs).std())
    if not decoder_only:  # a frozen encoder keeps the latent scale the UNets were trained with
        vae.register_to_config(scaling_factor=1.0 / std)
    info.update(scaling_factor=sf_init if decoder_only else 1.0 / std, latent_std=std,
                recon_mse=float(torch.cat(mse).mean()))
    return vae, info


@torch.no_grad()
def vae_reconstruction_mse(vae, images, batch_size: int = 256) -> float:
    """Mean squared error (images in [-1, 1]) of decode(posterior mean) on uint8 images."""
    images = _as_image_tensor(images)
    vae.eval()
    err = []
    for i in range(0, len(images), batch_size):
        x = to_unit(images[i:i + batch_size])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err.append(((rec - x) ** 2).mean(dim=(1, 2, 3)))
    return float(torch.cat(err).mean())


# ------------------------------------------------------------------------------------------------
# UNet
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_texts(text_encoder, tokenizer, texts, max_length, batch_size: int = 256):
    """Last hidden states [N, L, D] of the (frozen) text encoder, as SD's pipeline computes them
    (padded to max_length, no attention mask)."""
    text_encoder.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids = _tokenize(tokenizer, texts[i:i + batch_size], max_length)
        out.append(text_encoder(ids)[0].float())
    return torch.cat(out)


@torch.no_grad()
def encode_latent_posteriors(vae, images, batch_size: int = 256):
    """Posterior mean and std [N, C, h, w] of uint8 images (no scaling factor applied)."""
    vae.eval()
    mu, sd = [], []
    for i in range(0, len(images), batch_size):
        post = vae.encode(to_unit(images[i:i + batch_size])).latent_dist
        mu.append(post.mean)
        sd.append(post.std)
    return torch.cat(mu), torch.cat(sd)


def noised_latent_draw(mu, sd, idx, n_timesteps: int, g, scaling_factor: float):
    """The random draws of one UNet training batch, in this order from ``g``: a VAE posterior sample
    of the rows ``idx`` (scaled by ``scaling_factor``), timesteps uniform on [0, n_timesteps), and the
    noise eps.  Shared by every UNet training loop so their batches stay draw-for-draw comparable
    (attribution's masked retraining replays the base run's draws)."""
    z0 = (mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=g)) * scaling_factor
    t = torch.randint(n_timesteps, (len(idx),), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    return z0, t, eps


def train_unet(pairs, text_encoder, vae, tokenizer, cfg: sdformat.TinySDConfig, steps: int, *,
               caption_dropout: float = 0.1, batch_size: int = 128, lr: float = 1e-3,
               seed: int = 0, out_dir=None, ckpt_every: int = 200, resume: bool = True,
               init=None, ema_decay: float | None = 0.999, weights=None, progress: bool = True,
               stop_after=None, warmup: int = 100, scheduler=None,
               snr_gamma: float | None = None, ckpt_name: str = "unet", grad_accum: int = 1,
               mixed_precision: str | None = None):
    """Train ``sdformat.build_unet(cfg)`` (or fine-tune ``init``) with the eps-prediction loss
    (the v loss of :mod:`.vpred` when ``scheduler`` is a v-prediction one, e.g. a v3 base's).

    ``text_encoder`` and ``vae`` are frozen; their outputs for the whole training set are computed
    once.  Each step draws images (optionally with ``weights``), one of each image's captions, a
    latent from the VAE posterior, t ~ U{0..T-1} and eps ~ N(0, I), all from the stage's seeded
    generator; with probability ``caption_dropout`` the caption is "" (SD/CFG).  Returns
    ``(unet, info)`` - the EMA weights when ``ema_decay`` is set (SD ships EMA weights).
    With ``init`` (e.g. ``load_t2i(...).unet``, frozen by the loader) all its parameters are
    trained again, in place.
    ``snr_gamma``: optional Min-SNR-gamma loss weight min(SNR_t, gamma) / SNR_t (Hang et al. 2023,
    Eq. 9 for eps-prediction); None = SD's unweighted loss.  It down-weights the low-noise steps,
    which speeds up learning of layout/colour/shape on a small compute budget.
    ``ckpt_name``: checkpoint file stem in ``out_dir`` (a continuation stage needs its own).
    ``accelerate launch --num_processes N`` makes it data parallel over the same global
    ``batch_size``; ``grad_accum`` micro-batches per process, ``mixed_precision``: see :func:`_fit`.
    """
    data = as_pairs(pairs)
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    sched = scheduler or build_scheduler(cfg)
    abar = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float32)
    ptype = getattr(sched.config, "prediction_type", "epsilon")
    if ptype not in ("epsilon", "v_prediction") or (ptype == "epsilon" and float(abar[-1]) == 0):
        raise ValueError(f"train_unet: scheduler prediction_type {ptype!r} with abar_T = "
                         f"{float(abar[-1]):.4g} is not trainable here; use epsilon on SD's "
                         f"schedule or v_prediction")
    T = len(abar)
    sf = float(vae.config.scaling_factor)
    captions, per_image = _caption_table(data, extra=("",), tokenizer=tokenizer)
    emb = encode_texts(text_encoder, tokenizer, captions, cfg.max_length)
    mu, sd = encode_latent_posteriors(vae, data.images)
    torch.manual_seed(seed)
    unet = init.requires_grad_(True) if init is not None else build_unet(cfg)
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def loss_fn(model, g, piece=None):
        idx = _draw(len(data), batch_size, g, w)
        cap = draw_captions(per_image, idx, g, caption_dropout)
        z0, t, eps = noised_latent_draw(mu, sd, idx, T, g, sf)
        r, dev = _rows(piece), _device_of(model)   # this process's rows of the global batch
        cap, z0, t, eps = cap[r], z0[r].to(dev), t[r], eps[r].to(dev)
        a = abar[t].view(-1, 1, 1, 1).to(dev)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = model(zt, t.to(dev), encoder_hidden_states=emb[cap].to(dev)).sample
        if ptype != "epsilon":          # the scheduler's own parameterization (a v3 base's v)
            err = ((pred - vpred.diffusion_target(z0, eps, a.view(-1), ptype)) ** 2).mean(dim=(1, 2, 3))
            return (vpred.loss_weight(a.view(-1), ptype, snr_gamma) * err).mean()
        if snr_gamma is None:
            return F.mse_loss(pred, eps)
        snr = (abar[t] / (1 - abar[t])).to(dev)
        lw = snr.clamp(max=snr_gamma) / snr
        return (lw * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()

    hp = dict(stage="unet", n=len(data), batch_size=batch_size, caption_dropout=caption_dropout,
              snr_gamma=snr_gamma, **({} if ptype == "epsilon" else dict(prediction_type=ptype)),
              cfg=asdict(cfg), fine_tune=init is not None, weighted=weights is not None,
              scaling_factor=round(sf, 6))
    unet, ema, info = _fit(ckpt_name, unet, loss_fn, steps=steps, lr=lr, seed=seed, out_dir=out_dir,
                           ckpt_every=ckpt_every, resume=resume, warmup=warmup,
                           ema_decay=ema_decay, progress=progress, hparams=hp,
                           stop_after=stop_after, desc="UNet", batch_size=batch_size,
                           grad_accum=grad_accum, mixed_precision=mixed_precision)
    info["dropout_fraction_expected"] = caption_dropout
    return (ema if ema is not None else unet).eval(), info


# ------------------------------------------------------------------------------------------------
# CLIP training captions (the held-out measures are in toyworld.fidelity)
# ------------------------------------------------------------------------------------------------
def clip_extra_captions(sample) -> list[str]:
    """Partial captions added to a single-object toy image for CLIP training ("a circle",
    "a photo of a circle", "a red object", "a photo of a red object").  Deliberate: the web
    alt-text CLIP learned from contains such phrasings; without them the zero-shot class prompts
    ("a photo of a {shape}") would hold the never-seen word "photo".  Multi-object images get
    none (a partial caption would be ambiguous)."""
    objs = sample.scene.objects
    if len(objs) != 1:
        return []
    s, c = objs[0].shape, objs[0].colour
    return [f"a {s}", f"a photo of a {s}", f"a {c} object", f"a photo of a {c} object"]


# ------------------------------------------------------------------------------------------------
# the toy checkpoint
# ------------------------------------------------------------------------------------------------
def toy_config() -> sdformat.TinySDConfig:
    """Architecture of the shipped toy checkpoint: ``TinySDConfig`` at 32 px with 8x8x4 latents,
    narrowed so that the whole recipe trains in well under an hour on a shared 2-core CPU: a
    training step of the default 64/128-channel UNet with 128-d text costs 40 GFLOP at batch 64,
    this one 10 GFLOP (0.24 s on one core here).  Text width 64 (also the UNet's cross-attention
    width), 16 tokens (the longest toy caption has 14), 2-layer text and vision towers, VAE
    16/32/32, UNet 32/64.  Deliberately smaller than the feasibility probe's 64/128 UNet."""
    return sdformat.TinySDConfig(
        image_size=32, text_hidden=64, text_layers=2, text_heads=4, projection_dim=64,
        max_length=16, vision_patch=4, vision_hidden=64, vision_layers=2,
        vae_channels=(16, 32, 32), vae_layers=1, vae_groups=8, latent_channels=4,
        unet_channels=(32, 64), unet_layers=1, unet_heads=2, unet_groups=8)


@dataclass
class ToyBudget:
    """Data sizes, steps, batch sizes and learning rates of :func:`build_toy_checkpoint`."""
    n_train: int = 20000
    clip_steps: int = 1200
    clip_batch: int = 256
    clip_lr: float = 1e-3
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 2e-3
    unet_steps: int = 3600
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    snr_gamma: float = 5.0
    #: optional continuation of the UNet from its (EMA) weights, fresh optimizer and schedule
    unet_extra_steps: int = 2400
    unet_extra_lr: float = 3e-4
    ckpt_every: int = 50
    #: micro-batches per process and step of the VAE and UNet stages (same global batch)
    grad_accum: int = 1
    n_eval: int = 400
    n_generate: int = 100
    eval_steps: int = 50
    eval_guidance: float = 3.0
    #: v3 levers (:mod:`.vpred`): UNet parameterization, SD's schedule rescaled to zero
    #: terminal SNR (trailing timesteps), the text encoder trained jointly with the UNet, the
    #: share of pair scenes (relational captions) in the UNet batches (0: the data's own mix),
    #: the share of timesteps redrawn from t >= 0.6 T
    prediction_type: str = "epsilon"
    zero_snr: bool = False
    train_text_encoder: bool = False
    pair_weight: float = 0.0
    high_t_fraction: float = 0.0
    #: how often a pair scene's "and" caption is listed beside its two relational ones (1: once,
    #: so 1/3 of its draws; 2: 1/2), the template of the held-out two-object (binding) prompts
    pair_and_repeats: int = 1
    #: the UNet's own architecture, overriding toy_config() (0 / "": keep it): attention heads,
    #: block channels ("48,96"); the CLIP and VAE stages keep toy_config() either way
    unet_heads: int = 0
    unet_channels: str = ""

    @property
    def joint(self) -> bool:
        """Whether the UNet stage is :func:`.vpred.train_unet_joint` (any v3 lever set)."""
        return (self.prediction_type != "epsilon" or self.zero_snr or self.train_text_encoder
                or self.high_t_fraction > 0)


#: named budgets: v2 = the shipped data/toy-sd; v3 = zero-SNR v-prediction, joint text encoder,
#: relational captions up-weighted
RECIPES = {
    "v2": ToyBudget(),
    "v3": ToyBudget(prediction_type="v_prediction", zero_snr=True, train_text_encoder=True,
                    pair_weight=0.7, snr_gamma=0.0, unet_steps=8000, unet_extra_steps=0,
                    unet_lr=1e-3, unet_heads=4, eval_steps=25),
}


def unet_config(cfg: sdformat.TinySDConfig, budget: ToyBudget) -> sdformat.TinySDConfig:
    """``cfg`` with the budget's UNet overrides (``unet_heads``, ``unet_channels``)."""
    import dataclasses
    kw = {}
    if budget.unet_heads:
        kw["unet_heads"] = int(budget.unet_heads)
    if budget.unet_channels:
        kw["unet_channels"] = tuple(int(c) for c in str(budget.unet_channels).split(","))
    return dataclasses.replace(cfg, **kw)


def toy_training_pairs(samples, for_clip: bool = False) -> PairData:
    """PairData of toy samples (all templates' captions; with ``for_clip`` plus
    :func:`clip_extra_captions`)."""
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    caps = [list(s.captions) + (clip_extra_captions(s) if for_clip else []) for s in samples]
    return PairData(images, caps)


def check_budget(budget, optional_steps=()) -> None:
    """Every number of a training budget (:class:`ToyBudget`, ``UnCLIPBudget``) before any work:
    step counts whole numbers >= 1 (those in ``optional_steps`` may be 0: the stage is skipped),
    sizes and counts >= 1, learning rates finite and > 0, dropouts / fractions / decays in
    [0, 1), ``snr_gamma`` >= 0.  A zero step count of a required stage would write an untrained
    component, so it is an error."""

    for k, v in asdict(budget).items():
        opt = "--" + k.replace("_", "-")
        if k == "prediction_type":
            if v not in ("epsilon", "v_prediction"):
                raise V.BadInput(f"{opt} must be epsilon or v_prediction, got {v!r}")
        elif k in ("zero_snr", "train_text_encoder"):
            if not isinstance(v, bool):
                raise V.BadInput(f"{opt} must be true or false, got {v!r}")
        elif k == "unet_channels":
            if v and not all(c.strip().isdigit() and int(c) > 0 for c in str(v).split(",")):
                raise V.BadInput(f"{opt} must be comma-separated positive channel counts "
                                 f"(e.g. 32,64) or empty, got {v!r}")
        elif k == "unet_heads":
            V.count(v, opt, low=0)
        elif k in ("pair_weight", "eval_guidance"):
            V.real(v, opt, low=0, high=1 if k == "pair_weight" else None,
                   high_open=k == "pair_weight")
        elif k in optional_steps:
            V.count(v, opt, low=0)
        elif k.endswith("_lr"):
            V.real(v, opt, low=0, low_open=True)
        elif "dropout" in k or "fraction" in k or k.endswith("decay"):
            V.real(v, opt, low=0, high=1, high_open=True)
        elif k == "snr_gamma":
            V.real(v, opt, low=0)
        else:
            V.count(v, opt)
    if getattr(budget, "zero_snr", False) and budget.prediction_type == "epsilon":
        raise V.BadInput("--zero-snr needs --prediction-type v_prediction (eps-prediction is "
                         "undefined at zero terminal SNR, Lin et al. 2023)")
    if getattr(budget, "zero_snr", False) and budget.snr_gamma > 0:
        raise V.BadInput("--zero-snr with --snr-gamma > 0: the Min-SNR weight of the v loss is 0 at "
                         "t = T - 1 (SNR 0), so the step that fixes the layout would not be "
                         "learned; pass --snr-gamma 0")


def check_run_paths(out_dir, work_dir, kind: str = "toy SD") -> None:
    """The output and work folders of a build, before any work: neither is (under) a file, and an
    existing non-empty ``out_dir`` must be a previous build of this kind (it holds
    ``training_log.json``); a folder of the user's is never written into."""

    out_dir = V.out_dir(out_dir, "--out")
    V.out_dir(work_dir, "--work-dir")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "training_log.json").exists():
        raise V.BadInput(f"--out: {out_dir} exists and holds other files (it is not a {kind} "
                         f"checkpoint this command wrote: no training_log.json); pass a new or "
                         f"empty folder")


def default_work_dir(out_dir) -> Path:
    """Where the stage checkpoints of a toy-SD build go unless ``work_dir`` is given:
    ``<out_dir>/../train_runs`` (``data/train_runs`` for ``data/toy-sd``, ignored by git)."""
    return Path(out_dir).parent / "train_runs"


def _subsample(xs, every=10):
    return [round(float(x), 5) for x in xs[::every]]


def build_toy_checkpoint(out_dir, budget: ToyBudget | None = None, seed: int = 0,
                         resume: bool = True, work_dir=None, cfg: sdformat.TinySDConfig | None = None,
                         evaluate: bool = True, progress: bool = True,
                         mixed_precision: str | None = None) -> dict:
    """Train the toy checkpoint from scratch and write it to ``out_dir`` (SD format + ``clip/``).

    Data: ``toyworld.make_samples(budget.n_train, seed)``; tokenizer from ``toyworld.VOCAB``;
    stages CLIP -> VAE -> UNet (text encoder = the toy CLIP's text tower, frozen).  Checkpoints
    go to ``work_dir`` (default ``out_dir/../train_runs``); with ``resume`` an interrupted build
    continues where it stopped (finished stages are reloaded, not retrained).  Held-out
    evaluation uses sample stream ``seed + 1``.  Writes ``out_dir/training_log.json`` and returns it.
    Under ``accelerate launch --num_processes N`` every stage is data parallel over the same
    global batches (``budget.grad_accum`` micro-batches per process for the VAE and UNet;
    ``mixed_precision`` or the launcher's flag); only the main process writes and evaluates.
    """
    budget = budget or ToyBudget()
    check_budget(budget, optional_steps=("unet_extra_steps",))
    cfg = cfg or toy_config()
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(out_dir)
    check_run_paths(out_dir, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    log = dict(seed=seed, budget=asdict(budget), cfg=asdict(cfg), stages={})
    t_all = time.perf_counter()

    t = time.perf_counter()
    samples = tw.make_samples(budget.n_train, seed, progress=progress)
    tok = sdformat.build_tokenizer(tw.VOCAB, max_length=cfg.max_length)
    log["stages"]["data"] = dict(wall_s=round(time.perf_counter() - t, 2), n=len(samples))

    is_main = True
    if launched_world() > 1:
        from accelerate import PartialState
        is_main = PartialState(cpu=accelerate_cpu()).is_main_process
    common = dict(seed=seed, out_dir=work_dir, ckpt_every=budget.ckpt_every, resume=resume,
                  progress=progress, mixed_precision=mixed_precision)
    accum = dict(grad_accum=budget.grad_accum)
    t = time.perf_counter()
    clip, info = train_clip(toy_training_pairs(samples, for_clip=True), cfg, tok, budget.clip_steps,
                            batch_size=budget.clip_batch, lr=budget.clip_lr, **common)
    log["stages"]["clip"] = _stage_log(info, t)

    t = time.perf_counter()
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    vae, info = train_vae(images, cfg, budget.vae_steps, batch_size=budget.vae_batch,
                          lr=budget.vae_lr, **common, **accum)
    log["stages"]["vae"] = _stage_log(info, t)

    t = time.perf_counter()
    te = sdformat.text_encoder_from_clip(clip).eval()
    ucfg = unet_config(cfg, budget)
    log["cfg"] = asdict(ucfg)
    if budget.joint:
        te, unet, scheduler = vpred.train_v3_unet_stages(log, samples, te, vae, tok, ucfg, budget,
                                                   common, accum)
    else:
        unet, te, scheduler = _train_unet_v2(log, samples, te, vae, tok, ucfg, budget, common,
                                             accum, t), te, sdformat.build_scheduler(ucfg)
    log["train_wall_s"] = round(sum(s["wall_s"] for s in log["stages"].values()), 2)
    if not is_main:     # the other processes of a data-parallel run: same weights, nothing to write
        return log
    sdformat.save_sd_folder(out_dir, tok, te, vae, unet, scheduler, clip=clip, cfg=ucfg)
    if evaluate:
        t = time.perf_counter()
        log["eval"] = evaluate_toy_checkpoint(out_dir, seed=seed + 1, n_eval=budget.n_eval,
                                              n_generate=budget.n_generate,
                                              num_steps=budget.eval_steps,
                                              guidance_scale=budget.eval_guidance,
                                              progress=progress)
        log["eval_wall_s"] = round(time.perf_counter() - t, 2)
    log["total_wall_s_this_call"] = round(time.perf_counter() - t_all, 2)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def _train_unet_v2(log, samples, te, vae, tok, cfg, budget, common, accum, t):
    """The v2 UNet stage(s): eps-prediction on SD's schedule, text encoder frozen."""
    unet, info = train_unet(toy_training_pairs(samples), te, vae, tok, cfg, budget.unet_steps,
                            caption_dropout=budget.caption_dropout, batch_size=budget.unet_batch,
                            lr=budget.unet_lr, ema_decay=budget.ema_decay,
                            snr_gamma=budget.snr_gamma if budget.snr_gamma > 0 else None,
                            **common, **accum)
    log["stages"]["unet"] = _stage_log(info, t)
    if budget.unet_extra_steps > 0:
        t = time.perf_counter()
        unet, info = train_unet(toy_training_pairs(samples), te, vae, tok, cfg,
                                budget.unet_extra_steps, caption_dropout=budget.caption_dropout,
                                batch_size=budget.unet_batch, lr=budget.unet_extra_lr,
                                ema_decay=budget.ema_decay, init=unet, ckpt_name="unet_extra",
                                snr_gamma=budget.snr_gamma if budget.snr_gamma > 0 else None,
                                **common, **accum)
        log["stages"]["unet_extra"] = _stage_log(info, t)
    return unet


def _stage_log(info, t0):
    """Stage summary: train-loop wall time summed over all (resumed) sessions, this call's wall
    time (incl. precomputation), final loss and a 1-in-10 loss curve."""
    d = {k: v for k, v in info.items() if k != "losses"}
    d["wall_s_this_call"] = round(time.perf_counter() - t0, 2)
    d["loss_curve_every10"] = _subsample(info["losses"])
    return d


def evaluate_toy_checkpoint(folder, seed: int = 1, n_eval: int = 400, n_generate: int = 100,
                            num_steps: int = 50, guidance_scale: float = 3.0,
                            progress: bool = False) -> dict:
    """Held-out quality of a toy checkpoint folder: CLIP zero-shot accuracy, VAE reconstruction
    MSE, and generation fidelity (checker ``toyworld.check_prompt``) for single-object, two-object
    and relational prompts."""
    folder = Path(folder)
    singles = tw.make_samples(n_eval, seed, kinds=("single",))
    out = dict(clip=clip_zero_shot_accuracy(load_clip(folder / "clip"), singles))
    model = load_t2i(folder)
    held = tw.make_samples(n_eval, seed)
    out["vae_recon_mse"] = vae_reconstruction_mse(model.vae, np.stack([s.image for s in held]))
    out["generation"] = {}
    for kind in ("single", "two", "relational"):
        prompts = fidelity_prompts(kind, n_generate, seed)
        res, _ = generation_fidelity(model, prompts, num_steps=num_steps,
                                     guidance_scale=guidance_scale, seed=seed, progress=progress)
        res.pop("rows")
        out["generation"][kind] = res
    return out


def _flag_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _run(argv):
    p = argparse.ArgumentParser(prog="python -m t2i_common.toyworld.training",
                                description="Train the toy SD checkpoint from scratch (resumable; "
                                            "--debug shows tracebacks).")
    p.add_argument("--out", default="data/toy-sd", help="output SD-format folder (new, empty, or "
                                                        "an earlier build of this command)")
    p.add_argument("--work-dir", default=None, help="stage checkpoints (default: <out>/../train_runs, "
                                                    "printed at the start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; on a shared CPU 1 is faster than 2 (OpenMP threads "
                        "stall when another process holds a core)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision (default: accelerate launch's --mixed_precision, else no)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="v2",
                   help="named budget the other flags override (v2: data/toy-sd; v3: zero-SNR "
                        "v-prediction, joint text encoder, relational captions up-weighted)")
    for f in ToyBudget.__dataclass_fields__.values():
        kind = _flag_bool if isinstance(f.default, bool) else type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                       help=f"default: the recipe's (v2: {f.default})")
    a = p.parse_args(argv)
    V.count(a.seed, "--seed", low=0)
    if a.threads is not None:
        V.count(a.threads, "--threads")
        torch.set_num_threads(a.threads)
    import dataclasses
    budget = dataclasses.replace(RECIPES[a.recipe], **{k: getattr(a, k) for k in
                                                       ToyBudget.__dataclass_fields__
                                                       if getattr(a, k) is not None})
    check_budget(budget, optional_steps=("unet_extra_steps",))
    work = Path(a.work_dir) if a.work_dir is not None else default_work_dir(a.out)
    check_run_paths(a.out, work)
    print(f"toy SD -> {a.out}; stage checkpoints (resume) in {work}", flush=True)
    log = build_toy_checkpoint(a.out, budget, seed=a.seed, resume=not a.no_resume,
                               work_dir=work, evaluate=not a.no_eval,
                               mixed_precision=a.mixed_precision)
    summary = {k: v for k, v in log.items() if k != "stages"}
    summary["stages"] = {k: {kk: vv for kk, vv in v.items() if kk != "loss_curve_every10"}
                         for k, v in log["stages"].items()}
    print(json.dumps(summary, indent=1))


def main(argv=None) -> int:
    """``python -m t2i_common.toyworld.training``: a bad argument or file is one line on stderr (exit 2)."""
    return cli(_run, "python -m t2i_common.toyworld.training", argv)


if __name__ == "__main__":
    raise SystemExit(main())
