"""Training the toy unCLIP checkpoint: decoder (image-embedding-conditioned UNet) and diffusion prior.

Both are plain resumable step loops (``training._fit``: seeded CPU generator, atomic checkpoints,
bit-exact resume) over an in-memory toy-world training set whose CLIP embeddings, VAE posteriors
and caption encodings are computed once.

* :func:`train_decoder` - Stable unCLIP's decoder: the toy SD UNet with a projection class
  embedding (input 2 x the CLIP embedding width), initialised from the toy SD UNet (every matching
  weight copied; the new projection's last layer zero-initialised, so training starts from the toy
  SD exactly, as Stable unCLIP started from SD 2.1).  Loss: eps-prediction MSE (Min-SNR-5
  weighted as the toy SD).  Conditioning per example: the image embedding noise-augmented at a
  level drawn from {0 with probability ``zero_noise_fraction``, else U{0..max_noise_level-1}}
  (Stable unCLIP's augmentation; the paper's decoder has none), replaced by zeros (the pipelines'
  null) with probability 0.1, and the caption replaced by "" with probability 0.5 (paper Sec. 2.1).
  The toy recipe adds a continuation stage with 80 % clean embeddings: the embedding enters only
  through the time-embedding path (Stable unCLIP's design), which learns slowly on a CPU budget.
* :func:`train_prior` - ``PriorTransformer`` predicting the clean normalised image embedding
  (x - clip_mean) / clip_std from [caption tokens, text embedding, timestep, noised embedding,
  query] (x0 objective, MSE; paper Sec. 2.1), the caption replaced by "" with probability 0.1.

* a last stage fine-tunes only the decoder of the toy SD's VAE (``training.train_vae`` with
  ``decoder_only``; encoder, latent space and scaling factor unchanged, as Stability fine-tuned
  SD's decoder into ``sd-vae-ft-mse``).  The toy SD's VAE (800 joint steps) decodes small (8 px)
  diamonds as round blobs - the checker reads 21 of 22 held-out round trips as circles - which
  capped every shape measurement of the unCLIP decoder; the stage runs after the prior and the
  UNet, which only ever see the (unchanged) encoder, so they do not depend on it.

:func:`build_toy_unclip` runs the stages and writes ``data/toy-unclip`` (reusing the toy SD's
VAE encoder, tokenizer and text encoder, and the toy CLIP's towers as prior text encoder and image
encoder); ``python -m t2i_common.unclip.training`` is its command line.
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

from .. import paths, toyworld as tw
from ..distributed import accelerate_cpu, launched_world
from ..sdformat import TinySDConfig, read_toy_config
from ..toyworld import training
from ..validate import cli
from .model import save_unclip_folder
from .. import validate as V


# ------------------------------------------------------------------------------------------------
# components
# ------------------------------------------------------------------------------------------------
def prior_scheduler_config(num_train_timesteps: int = 1000) -> dict:
    """The Karlo prior's schedule (as StableUnCLIPPipeline is documented with): squared-cosine
    betas, x0 ("sample") prediction, samples clipped to [-5, 5] in normalised units."""
    return dict(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                prediction_type="sample", variance_type="fixed_small_log", clip_sample=True,
                clip_sample_range=5.0)


def build_prior(embedding_dim: int, num_embeddings: int, num_layers: int = 4, heads: int = 4,
                head_dim: int = 16):
    """A small ``PriorTransformer`` (Karlo's architecture, narrowed): width heads x head_dim,
    ``num_embeddings`` caption tokens + 4 extra tokens (text embedding, timestep, noised image
    embedding, query)."""
    from diffusers import PriorTransformer

    return PriorTransformer(num_attention_heads=heads, attention_head_dim=head_dim,
                            num_layers=num_layers, embedding_dim=embedding_dim,
                            num_embeddings=num_embeddings, additional_embeddings=4)


def decoder_unet_from(base_unet, embedding_dim: int):
    """A UNet with ``class_embed_type="projection"`` (input 2 x ``embedding_dim``: noised embedding
    + noise-level embedding) and otherwise ``base_unet``'s architecture; every weight of the base
    copied, the projection's output layer zero-initialised (so it starts as the base model)."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in dict(base_unet.config).items() if not k.startswith("_")}
    cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=2 * embedding_dim)
    unet = UNet2DConditionModel(**cfg)
    missing, unexpected = unet.load_state_dict(base_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise RuntimeError(f"decoder_unet_from: weights do not match (missing {missing}, "
                           f"unexpected {unexpected})")
    with torch.no_grad():
        unet.class_embedding.linear_2.weight.zero_()
        unet.class_embedding.linear_2.bias.zero_()
    return unet


def unclip_components_from_sd(sd_folder, unet=None, prior=None, embed_mean=None, embed_std=None,
                              prior_layers: int = 4, seed: int = 0):
    """Stable-unCLIP components around an SD-format folder that has a ``clip/`` CLIPModel (the toy
    SD): tokenizer / text_encoder / vae / scheduler reused, prior text encoder and image encoder
    the CLIP towers with their projections, feature extractor the CLIP image processor, and the
    decoder UNet / prior given (or built from ``seed``: decoder initialised from the folder's UNet)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import \
        StableUnCLIPImageNormalizer
    from transformers import (CLIPImageProcessor, CLIPModel, CLIPTextModel,
                              CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection)

    sd_folder = Path(sd_folder)
    if not (sd_folder / "clip" / "config.json").exists():
        raise FileNotFoundError(f"{sd_folder} has no clip/ CLIPModel folder; the toy unCLIP needs the "
                                f"toy CLIP (data/toy-sd/clip) for its prior text encoder and image encoder")
    clip = CLIPModel.from_pretrained(sd_folder / "clip")
    D = int(clip.config.projection_dim)
    pte = CLIPTextModelWithProjection(clip.config.text_config)
    pte.text_model.load_state_dict(clip.text_model.state_dict())
    pte.text_projection.load_state_dict(clip.text_projection.state_dict())
    enc = CLIPVisionModelWithProjection(clip.config.vision_config)
    enc.vision_model.load_state_dict(clip.vision_model.state_dict())
    enc.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    tok = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    norm = StableUnCLIPImageNormalizer(embedding_dim=D)
    if embed_mean is not None:
        with torch.no_grad():
            norm.mean.copy_(torch.as_tensor(embed_mean).view(1, D))
            norm.std.copy_(torch.as_tensor(embed_std).view(1, D))
    torch.manual_seed(seed)  # the new weights (prior, decoder class embedding) are seeded
    if unet is None:
        unet = decoder_unet_from(UNet2DConditionModel.from_pretrained(sd_folder / "unet"), D)
    if prior is None:
        prior = build_prior(D, tok.model_max_length, num_layers=prior_layers)
    if embed_mean is not None:
        with torch.no_grad():
            prior.clip_mean.copy_(torch.as_tensor(embed_mean).view(1, D))
            prior.clip_std.copy_(torch.as_tensor(embed_std).view(1, D))
    return dict(
        prior_tokenizer=tok, prior_text_encoder=pte, prior=prior,
        prior_scheduler=DDPMScheduler(**prior_scheduler_config()),
        image_normalizer=norm, image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tok, text_encoder=CLIPTextModel.from_pretrained(sd_folder / "text_encoder"),
        unet=unet, scheduler=DDPMScheduler.from_pretrained(sd_folder / "scheduler"),
        vae=AutoencoderKL.from_pretrained(sd_folder / "vae"),
        feature_extractor=CLIPImageProcessor.from_pretrained(sd_folder / "clip"), image_encoder=enc)


# ------------------------------------------------------------------------------------------------
# precomputation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def image_embeddings(image_encoder, images_u8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Raw CLIP ``image_embeds`` of uint8 [N, H, W, 3] images at the encoder's resolution, with
    the CLIP normalisation the feature extractor applies (``training.to_clip_pixels``)."""
    image_encoder.eval()
    return torch.cat([image_encoder(training.to_clip_pixels(images_u8[i:i + batch_size])).image_embeds
                      for i in range(0, len(images_u8), batch_size)]).float()


@torch.no_grad()
def prior_text_encodings(prior_text_encoder, tokenizer, texts, batch_size: int = 256):
    """(text_embeds, last_hidden_state, attention mask) as StableUnCLIPPipeline computes them."""
    prior_text_encoder.eval()
    e, h, m = [], [], []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(list(texts[i:i + batch_size]), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt")
        out = prior_text_encoder(tok.input_ids)
        e.append(out.text_embeds.float())
        h.append(out.last_hidden_state.float())
        m.append(tok.attention_mask.bool())
    return torch.cat(e), torch.cat(h), torch.cat(m)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def noised_class_labels(z, levels, noise, mean, std, noising_abar):
    """Stable unCLIP's decoder conditioning, batched with per-example levels: normalise, noise with
    the image-noising schedule, unnormalise, append the sinusoidal level embedding."""
    from diffusers.models.embeddings import get_timestep_embedding

    a = noising_abar[levels].view(-1, 1)
    x = (z - mean) / std
    x = a.sqrt() * x + (1 - a).sqrt() * noise
    x = x * std + mean
    lv = get_timestep_embedding(levels, embedding_dim=z.shape[-1], flip_sin_to_cos=True,
                                downscale_freq_shift=0)
    return torch.cat([x, lv.to(x.dtype)], 1)


def train_decoder(pairs, unet, text_encoder, vae, tokenizer, image_embeds, image_normalizer,
                  image_noising_scheduler, scheduler, steps: int, *, batch_size: int = 64,
                  lr: float = 5e-4, embedding_dropout: float = 0.1, caption_dropout: float = 0.5,
                  zero_noise_fraction: float = 0.5, max_noise_level: int = 1000, seed: int = 0,
                  out_dir=None, ckpt_every: int = 50, resume: bool = True,
                  ema_decay: float | None = 0.998, snr_gamma: float | None = 5.0,
                  progress: bool = True, stop_after=None, warmup: int = 50,
                  ckpt_name: str = "decoder", grad_accum: int = 1,
                  mixed_precision: str | None = None):
    """Fine-tune ``unet`` (a projection-class-embedding UNet, e.g. :func:`decoder_unet_from`) as the
    unCLIP decoder on ``pairs`` (``training.as_pairs``) with per-image CLIP ``image_embeds``.
    ``ckpt_name``: checkpoint file stem in ``out_dir`` (a continuation stage needs its own).
    Data parallel under ``accelerate launch`` (every draw is made for the global batch, each
    process computes its rows), ``grad_accum`` / ``mixed_precision``: see ``training._fit``.
    Returns (unet or its EMA, info)."""
    for name, p in (("embedding_dropout", embedding_dropout), ("caption_dropout", caption_dropout),
                    ("zero_noise_fraction", zero_noise_fraction)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"train_decoder: {name} must be in [0, 1], got {p}")
    data = training.as_pairs(pairs)
    if len(image_embeds) != len(data):
        raise ValueError(f"train_decoder: {len(data)} images but {len(image_embeds)} image embeddings")
    T = int(image_noising_scheduler.config.num_train_timesteps)
    if not 1 <= max_noise_level <= T:
        raise ValueError(f"train_decoder: max_noise_level must be in [1, {T}], got {max_noise_level}")
    abar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
    nabar = torch.as_tensor(image_noising_scheduler.alphas_cumprod, dtype=torch.float32)
    mean = image_normalizer.mean.detach().float().clone()
    std = image_normalizer.std.detach().float().clone()
    sf = float(vae.config.scaling_factor)
    captions, per_image = training._caption_table(data, extra=("",), tokenizer=tokenizer)
    cap_emb = training.encode_texts(text_encoder, tokenizer, captions, tokenizer.model_max_length)
    mu, sd = training.encode_latent_posteriors(vae, data.images)
    zi = torch.as_tensor(image_embeds).float()
    D = zi.shape[1]
    unet.requires_grad_(True)

    def loss_fn(model, g, piece=None):
        idx = training._draw(len(data), batch_size, g)
        cap = training.draw_captions(per_image, idx, g, caption_dropout)
        z0, t, eps = training.noised_latent_draw(mu, sd, idx, len(abar), g, sf)
        lv = torch.randint(max_noise_level, (len(idx),), generator=g)
        lv = torch.where(torch.rand(len(idx), generator=g) < zero_noise_fraction, 0, lv)
        aug = torch.randn(len(idx), D, generator=g)
        keep = (torch.rand(len(idx), generator=g) >= embedding_dropout).float().view(-1, 1)
        r, dev = training._rows(piece), training._device_of(model)  # this process's rows
        z0, t, eps, cap, keep = z0[r], t[r], eps[r], cap[r], keep[r]
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        labels = noised_class_labels(zi[idx[r]], lv[r], aug[r], mean, std, nabar)
        pred = model(zt.to(dev), t.to(dev), encoder_hidden_states=cap_emb[cap].to(dev),
                     class_labels=(labels * keep).to(dev)).sample
        eps = eps.to(dev)
        if snr_gamma is None:
            return F.mse_loss(pred, eps)
        snr = (abar[t] / (1 - abar[t])).to(dev)
        return ((snr.clamp(max=snr_gamma) / snr) * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()

    hp = dict(stage="decoder", n=len(data), batch_size=batch_size, embedding_dropout=embedding_dropout,
              caption_dropout=caption_dropout, zero_noise_fraction=zero_noise_fraction,
              max_noise_level=max_noise_level, snr_gamma=snr_gamma, D=D, scaling_factor=round(sf, 6))
    unet, ema, info = training._fit(ckpt_name, unet, loss_fn, steps=steps, lr=lr, seed=seed,
                                    out_dir=out_dir, ckpt_every=ckpt_every, resume=resume,
                                    warmup=warmup, ema_decay=ema_decay, progress=progress, hparams=hp,
                                    stop_after=stop_after, desc="unCLIP decoder",
                                    batch_size=batch_size, grad_accum=grad_accum,
                                    mixed_precision=mixed_precision)
    return (ema if ema is not None else unet).eval(), info


def train_prior(pairs, prior, prior_text_encoder, tokenizer, image_embeds, prior_scheduler,
                steps: int, *, batch_size: int = 256, lr: float = 1e-3, caption_dropout: float = 0.1,
                seed: int = 0, out_dir=None, ckpt_every: int = 100, resume: bool = True,
                ema_decay: float | None = 0.999, progress: bool = True, stop_after=None,
                warmup: int = 100, grad_accum: int = 1, mixed_precision: str | None = None):
    """Train the diffusion prior: x0 = (z_i - clip_mean) / clip_std (the prior's own statistics),
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on the prior scheduler's schedule,
    loss || prior(x_t, t, z_t, caption tokens) - x0 ||^2, caption -> "" with ``caption_dropout``.
    Data parallel / ``grad_accum`` / ``mixed_precision`` as :func:`train_decoder`.
    Returns (prior or its EMA, info)."""
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"train_prior: caption_dropout must be in [0, 1), got {caption_dropout}")
    if prior_scheduler.config.prediction_type != "sample":
        raise ValueError("train_prior: the prior scheduler must have prediction_type='sample' "
                         "(x0 objective); build it with prior_scheduler_config()")
    data = training.as_pairs(pairs)
    zi = torch.as_tensor(image_embeds).float()
    if len(zi) != len(data):
        raise ValueError(f"train_prior: {len(data)} images but {len(zi)} image embeddings")
    if float(prior.clip_std.detach().abs().min()) == 0.0:
        raise ValueError("train_prior: prior.clip_std is zero; set clip_mean/clip_std to the image "
                         "embedding statistics first (unclip_components_from_sd does)")
    mean, std = prior.clip_mean.detach().clone(), prior.clip_std.detach().clone()
    x0_all = (zi - mean) / std
    captions, per_image = training._caption_table(data, extra=("",), tokenizer=tokenizer)
    emb, hid, mask = prior_text_encodings(prior_text_encoder, tokenizer, captions)
    abar = torch.as_tensor(prior_scheduler.alphas_cumprod, dtype=torch.float32)
    prior.requires_grad_(True)
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)

    def loss_fn(model, g, piece=None):
        idx = training._draw(len(data), batch_size, g)
        cap = training.draw_captions(per_image, idx, g, caption_dropout)
        x0 = x0_all[idx]
        t = torch.randint(len(abar), (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        r, dev = training._rows(piece), training._device_of(model)  # this process's rows
        x0, t, eps, cap = x0[r], t[r], eps[r], cap[r]
        a = abar[t].view(-1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = model(xt.to(dev), t.to(dev), proj_embedding=emb[cap].to(dev),
                     encoder_hidden_states=hid[cap].to(dev),
                     attention_mask=mask[cap].to(dev)).predicted_image_embedding
        return F.mse_loss(pred, x0.to(dev))

    hp = dict(stage="prior", n=len(data), batch_size=batch_size, caption_dropout=caption_dropout,
              layers=prior.config.num_layers, D=zi.shape[1])
    prior, ema, info = training._fit("prior", prior, loss_fn, steps=steps, lr=lr, seed=seed,
                                     out_dir=out_dir, ckpt_every=ckpt_every, resume=resume,
                                     warmup=warmup, ema_decay=ema_decay, progress=progress,
                                     hparams=hp, stop_after=stop_after, desc="unCLIP prior",
                                     batch_size=batch_size, grad_accum=grad_accum,
                                     mixed_precision=mixed_precision)
    return (ema if ema is not None else prior).eval(), info


# ------------------------------------------------------------------------------------------------
# the toy checkpoint
# ------------------------------------------------------------------------------------------------
@dataclass
class UnCLIPBudget:
    """Data size, steps, batch sizes and learning rates of :func:`build_toy_unclip`."""
    n_train: int = 20000
    decoder_steps: int = 1200
    decoder_batch: int = 64
    decoder_lr: float = 5e-4
    embedding_dropout: float = 0.1
    caption_dropout: float = 0.5
    zero_noise_fraction: float = 0.5
    max_noise_level: int = 1000
    prior_steps: int = 2500
    prior_batch: int = 128
    prior_lr: float = 1e-3
    prior_caption_dropout: float = 0.1
    prior_layers: int = 4
    #: continuation of the decoder from its EMA weights (fresh optimizer and schedule) with more
    #: clean (un-augmented) embeddings, which strengthens the image-embedding pathway
    decoder_extra_steps: int = 2400
    decoder_extra_lr: float = 5e-4
    decoder_extra_zero_noise_fraction: float = 0.8
    #: decoder-only fine-tune of the toy SD's VAE (encoder and latent space unchanged, as SD's
    #: ft-MSE decoder): the toy SD's 800-step VAE renders small (8 px) diamonds as round blobs
    vae_decoder_steps: int = 800
    vae_decoder_batch: int = 32
    vae_decoder_lr: float = 1e-3
    #: micro-batches per process and step (the global batches stay the same)
    grad_accum: int = 1
    ckpt_every: int = 50


#: stages of :class:`UnCLIPBudget` that 0 steps skip
OPTIONAL_STAGES = ("decoder_extra_steps", "vae_decoder_steps")


def default_work_dir(out_dir) -> Path:
    """Stage checkpoints of a toy-unCLIP build unless ``work_dir`` is given:
    ``<out_dir>/../train_runs/<out name>`` (``data/train_runs/toy-unclip``, ignored by git)."""
    return Path(out_dir).parent / "train_runs" / Path(out_dir).name


def check_sd_folder(sd_folder) -> Path:
    """The toy-SD folder the unCLIP is built around: a folder with the SD components it reuses and
    the toy CLIP (``clip/``); errors name the folder and the missing part."""

    p = Path(sd_folder)
    if not p.exists():
        raise FileNotFoundError(f"--sd-folder: {p} not found; pass the toy SD folder (data/toy-sd)")
    if not p.is_dir():
        raise V.BadInput(f"--sd-folder: {p} is a file; pass the toy SD folder (data/toy-sd)")
    need = {"clip": "config.json", "tokenizer": None, "text_encoder": "config.json",
            "unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
    for sub, f in need.items():
        if not (p / sub).is_dir() or (f and not (p / sub / f).is_file()):
            what = f"{sub}/{f}" if f and (p / sub).is_dir() else f"{sub}/"
            raise V.BadInput(f"--sd-folder: {p} has no {what}; the toy unCLIP is built around a toy "
                             f"SD folder with clip/ (the toy CLIP), tokenizer/, text_encoder/, unet/, "
                             f"vae/ and scheduler/ (python -m t2i_common.toyworld.training writes one)")
    return p


def build_toy_unclip(out_dir=None, budget: UnCLIPBudget | None = None, seed: int = 0,
                     sd_folder=None, resume: bool = True, work_dir=None,
                     progress: bool = True, mixed_precision: str | None = None) -> dict:
    """Train the toy unCLIP (prior, decoder, VAE decoder) on ``toyworld.make_samples(n_train,
    seed)`` (the toy SD's training stream) around the toy SD folder and write it to ``out_dir``
    (default ``data/toy-unclip``).  Checkpoints in ``work_dir`` (default
    ``<out_dir>/../train_runs/<name>``) make an interrupted build resume.  Under ``accelerate
    launch --num_processes N`` every stage is data parallel over the same global batches
    (``budget.grad_accum`` micro-batches per process; ``mixed_precision`` or the launcher's flag)
    and only the main process writes.  Writes and returns ``training_log.json``."""
    budget = budget or UnCLIPBudget()
    training.check_budget(budget, optional_steps=OPTIONAL_STAGES)
    sd_folder = check_sd_folder(sd_folder or paths.DEFAULT_T2I)
    out_dir = Path(out_dir or paths.DATA / "toy-unclip")
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(out_dir)
    training.check_run_paths(out_dir, work_dir, "toy unCLIP")
    work_dir.mkdir(parents=True, exist_ok=True)
    log = dict(seed=seed, budget=asdict(budget), sd_folder=sd_folder.name, stages={})
    t0 = time.perf_counter()
    samples = tw.make_samples(budget.n_train, seed, progress=progress)
    pairs = training.toy_training_pairs(samples)
    parts = unclip_components_from_sd(sd_folder, prior_layers=budget.prior_layers)
    zi = image_embeddings(parts["image_encoder"], pairs.images)
    mean, std = zi.mean(0), zi.std(0)
    parts = unclip_components_from_sd(sd_folder, embed_mean=mean, embed_std=std,
                                      prior_layers=budget.prior_layers, seed=seed)
    log["stages"]["data"] = dict(wall_s=round(time.perf_counter() - t0, 2), n=len(samples),
                                 embedding_norm_mean=float(zi.norm(dim=1).mean()))
    common = dict(seed=seed, out_dir=work_dir, ckpt_every=budget.ckpt_every, resume=resume,
                  progress=progress, grad_accum=budget.grad_accum, mixed_precision=mixed_precision)
    t = time.perf_counter()
    prior, info = train_prior(pairs, parts["prior"], parts["prior_text_encoder"],
                              parts["prior_tokenizer"], zi, parts["prior_scheduler"],
                              budget.prior_steps, batch_size=budget.prior_batch, lr=budget.prior_lr,
                              caption_dropout=budget.prior_caption_dropout, **common)
    log["stages"]["prior"] = training._stage_log(info, t)
    parts["prior"] = prior
    t = time.perf_counter()
    unet, info = train_decoder(pairs, parts["unet"], parts["text_encoder"], parts["vae"],
                               parts["tokenizer"], zi, parts["image_normalizer"],
                               parts["image_noising_scheduler"], parts["scheduler"],
                               budget.decoder_steps, batch_size=budget.decoder_batch,
                               lr=budget.decoder_lr, embedding_dropout=budget.embedding_dropout,
                               caption_dropout=budget.caption_dropout,
                               zero_noise_fraction=budget.zero_noise_fraction,
                               max_noise_level=budget.max_noise_level, **common)
    log["stages"]["decoder"] = training._stage_log(info, t)
    if budget.decoder_extra_steps > 0:
        t = time.perf_counter()
        unet, info = train_decoder(pairs, unet, parts["text_encoder"], parts["vae"], parts["tokenizer"],
                                   zi, parts["image_normalizer"], parts["image_noising_scheduler"],
                                   parts["scheduler"], budget.decoder_extra_steps,
                                   batch_size=budget.decoder_batch, lr=budget.decoder_extra_lr,
                                   embedding_dropout=budget.embedding_dropout,
                                   caption_dropout=budget.caption_dropout,
                                   zero_noise_fraction=budget.decoder_extra_zero_noise_fraction,
                                   max_noise_level=budget.max_noise_level, ckpt_name="decoder_extra",
                                   **common)
        log["stages"]["decoder_extra"] = training._stage_log(info, t)
    parts["unet"] = unet
    if budget.vae_decoder_steps > 0:
        t = time.perf_counter()
        cfg = read_toy_config(sd_folder) or TinySDConfig(image_size=int(pairs.images.shape[1]))
        vae, info = training.train_vae(pairs.images, cfg, budget.vae_decoder_steps,
                                       batch_size=budget.vae_decoder_batch, lr=budget.vae_decoder_lr,
                                       init=parts["vae"], decoder_only=True, name="vae_decoder",
                                       **common)
        log["stages"]["vae_decoder"] = training._stage_log(info, t)
        parts["vae"] = vae.eval()
    log["train_wall_s"] = round(sum(s["wall_s"] for s in log["stages"].values()), 2)
    log["s_per_step"] = {k: round(log["stages"][k]["wall_s"] / max(1, log["stages"][k]["steps"]), 4)
                         for k in log["stages"] if k != "data"}
    log["total_wall_s_this_call"] = round(time.perf_counter() - t0, 2)
    if launched_world() > 1:
        from accelerate import PartialState
        if not PartialState(cpu=accelerate_cpu()).is_main_process:
            return log  # the other processes of a data-parallel run: same weights, nothing to write
    save_unclip_folder(out_dir, parts, extra={"training_log.json": log})
    return log


def _run(argv):
    p = argparse.ArgumentParser(prog="python -m t2i_common.unclip.training",
                                description="Train the toy unCLIP checkpoint (resumable; --debug "
                                            "shows tracebacks).")
    p.add_argument("--out", default=str(paths.DATA / "toy-unclip"),
                   help="output folder (new, empty, or an earlier build of this command)")
    p.add_argument("--sd-folder", default=str(paths.DEFAULT_T2I))
    p.add_argument("--work-dir", default=None, help="stage checkpoints (default: "
                                                    "<out>/../train_runs/<out name>, printed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision (default: accelerate launch's --mixed_precision, else no)")
    for f in UnCLIPBudget.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    V.count(a.seed, "--seed", low=0)
    if a.threads is not None:
        V.count(a.threads, "--threads")
        torch.set_num_threads(a.threads)
    budget = UnCLIPBudget(**{k: getattr(a, k) for k in UnCLIPBudget.__dataclass_fields__})
    training.check_budget(budget, optional_steps=OPTIONAL_STAGES)
    check_sd_folder(a.sd_folder)
    work = Path(a.work_dir) if a.work_dir is not None else default_work_dir(a.out)
    training.check_run_paths(a.out, work, "toy unCLIP")
    print(f"toy unCLIP -> {a.out}; stage checkpoints (resume) in {work}", flush=True)
    log = build_toy_unclip(a.out, budget, seed=a.seed, sd_folder=a.sd_folder,
                           resume=not a.no_resume, work_dir=work,
                           mixed_precision=a.mixed_precision)
    print(json.dumps({k: v for k, v in log.items() if k != "stages"}, indent=1))


def main(argv=None) -> int:
    """``python -m t2i_common.unclip.training``: a bad argument or file is one line on stderr."""
    return cli(_run, "python -m t2i_common.unclip.training", argv)


if __name__ == "__main__":
    raise SystemExit(main())
