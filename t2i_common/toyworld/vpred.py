"""The UNet stage of the v3 toy recipe: zero terminal SNR, v-prediction, the text encoder trained jointly.

Why: under SD's scaled-linear schedule abar_T = 0.0047, so on 8x8x4 latents
the layout of the clean image is still readable from z_T; a UNet trained with eps-prediction then
never needs the relation words ("left of", "above"), and it ignores them (denoising-error gap
true vs relation-flipped caption 0.0000 at every t).  Lin et al. 2023 ("Common Diffusion Noise
Schedules and Sample Steps are Flawed"), Sec. 3: rescale the betas so that abar_T = 0 exactly
(their Algorithm 1, diffusers' ``rescale_betas_zero_snr=True``), predict
``v = sqrt(abar) eps - sqrt(1 - abar) z0`` (Salimans & Ho 2022, Sec. 4; eps-prediction is
undefined at SNR = 0) and sample from t = T - 1 ("trailing" spacing).

What this module adds to :func:`t2i_common.toyworld.training.train_unet`:

* :func:`diffusion_target` / :func:`v_target`: the regression target of each parameterization;
* :func:`loss_weight`: Min-SNR-gamma (Hang et al. 2023) for eps *and* v (Eq. 9 / its v form
  min(SNR, gamma) / (SNR + 1)); for v under zero terminal SNR it is 0 at t = T - 1, so the v3
  recipe uses the plain (unweighted) v loss, as Lin et al. do;
* :func:`draw_timesteps`: t ~ U{0..T-1}, optionally with a fraction of the batch drawn from the
  high-noise window t >= ``HIGH_T_FROM`` x T, where the layout (and so the relation) is decided;
* :func:`kind_weights`: per-image sampling weights that give pair scenes (the relational
  captions) a chosen share of the batch;
* :func:`train_unet_joint`: the UNet and its text encoder (initialised from the toy CLIP's text
  tower) trained together on the denoising loss, so that the hidden states of the caption encode
  which object the relation puts where (a frozen contrastive text tower is close to a bag of
  words).  The toy CLIP scorer (``clip/``) stays the contrastive one; only ``text_encoder/``
  differs from its text tower.  We differ from SD here deliberately (SD freezes its text encoder).
"""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from .. import sdformat
from . import training

#: the high-noise window of :func:`draw_timesteps` starts at this fraction of the T steps
HIGH_T_FROM = 0.6
PREDICTION_TYPES = ("epsilon", "v_prediction")


def v_target(z0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) z0 (Salimans & Ho 2022, Sec. 4; diffusers'
    ``get_velocity``); ``abar`` broadcast over the batch rows."""
    abar = abar.reshape(-1, *([1] * (z0.ndim - 1))).to(z0.dtype)
    return abar.sqrt() * eps - (1 - abar).sqrt() * z0


def diffusion_target(z0, eps, abar, prediction_type: str) -> torch.Tensor:
    """What the UNet regresses on: eps (``"epsilon"``) or v (``"v_prediction"``)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return v_target(z0, eps, abar)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def loss_weight(abar: torch.Tensor, prediction_type: str, snr_gamma: float | None) -> torch.Tensor:
    """Per-row weight of the MSE: 1 without ``snr_gamma``; Min-SNR-gamma otherwise, which is
    min(SNR, gamma) / SNR on the eps loss and min(SNR, gamma) / (SNR + 1) on the v loss (the same
    weight on the x0 error in both; Hang et al. 2023, Eq. 9 and Sec. 3.4)."""
    if not snr_gamma:
        return torch.ones_like(abar)
    snr = abar / (1 - abar)
    if prediction_type == "v_prediction":
        return snr.clamp(max=snr_gamma) / (snr + 1)
    return snr.clamp(max=snr_gamma) / snr


def draw_timesteps(n: int, T: int, g: torch.Generator, high_t_fraction: float = 0.0) -> torch.Tensor:
    """t ~ U{0..T-1}; with ``high_t_fraction`` > 0 each row is, with that probability, redrawn
    uniformly from {ceil(HIGH_T_FROM T)..T-1}.  Draws from ``g``: n timesteps, then (only with a
    fraction) n coin flips and n high timesteps."""
    t = torch.randint(T, (n,), generator=g)
    if high_t_fraction > 0:
        lo = int(-(-HIGH_T_FROM * T // 1))
        hi = torch.randint(lo, T, (n,), generator=g)
        t = torch.where(torch.rand(n, generator=g) < high_t_fraction, hi, t)
    return t


def kind_weights(samples, pair_weight: float) -> torch.Tensor | None:
    """Per-image sampling weights [N] (float64) under which pair scenes (the ones with relational
    captions) make up ``pair_weight`` of the draws and the other scenes the rest, each group in
    proportion to its count; None for ``pair_weight`` 0 (the data's own mix)."""
    if not pair_weight:
        return None
    if not 0 < pair_weight < 1:
        raise ValueError(f"pair_weight must be in [0, 1), got {pair_weight}")
    is_pair = torch.tensor([s.scene.kind == "pair" for s in samples])
    n_pair, n_rest = int(is_pair.sum()), int((~is_pair).sum())
    if n_pair == 0 or n_rest == 0:
        raise ValueError(f"pair_weight={pair_weight} needs pair and non-pair scenes, got {n_pair} "
                         f"pair and {n_rest} other samples")
    return torch.where(is_pair, pair_weight / n_pair, (1 - pair_weight) / n_rest).double()


class Denoiser(torch.nn.Module):
    """The UNet with its text encoder as one module (one optimizer, one EMA, one checkpoint):
    ``forward(z_t, t, input_ids)`` runs the text encoder (SD's pipeline: last hidden state, padded
    ids, no attention mask) and the UNet."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, z_t, t, input_ids):
        emb = self.text_encoder(input_ids)[0]
        return self.unet(z_t, t, encoder_hidden_states=emb).sample


def build_zero_snr_scheduler(cfg: sdformat.TinySDConfig | None = None,
                             prediction_type: str = "v_prediction"):
    """SD's schedule rescaled to zero terminal SNR, trailing timesteps (see the module docstring)."""
    return sdformat.build_scheduler(cfg, prediction_type=prediction_type, zero_snr=True)


def train_unet_joint(pairs, text_encoder, vae, tokenizer, cfg: sdformat.TinySDConfig, steps: int, *,
                     scheduler, train_text_encoder: bool = True, caption_dropout: float = 0.1,
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0, out_dir=None,
                     ckpt_every: int = 200, resume: bool = True, init=None,
                     ema_decay: float | None = 0.999, weights=None, progress: bool = True,
                     stop_after=None, warmup: int = 100, snr_gamma: float | None = None,
                     high_t_fraction: float = 0.0, ckpt_name: str = "unet_joint",
                     grad_accum: int = 1, mixed_precision: str | None = None):
    """Train ``sdformat.build_unet(cfg)`` (or ``init``) in the parameterization of ``scheduler``
    (``prediction_type`` epsilon or v_prediction, its ``alphas_cumprod``), with the text encoder
    trained jointly (``train_text_encoder``) or frozen.

    Loss: weight(t) x || target - UNet(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, E(c)) ||^2 with
    target eps or v (:func:`diffusion_target`), weight from :func:`loss_weight`, t from
    :func:`draw_timesteps`, c one of the image's captions ("" with probability
    ``caption_dropout``).  The VAE is frozen (posteriors computed once); the text encoder runs on
    each batch.  ``text_encoder`` is trained in place.  Each step's draws from the stage's
    generator: images, captions, latent sample, t (:func:`draw_timesteps`), eps.
    Returns ``(unet, text_encoder, info)`` (EMA weights of both when ``ema_decay`` is set).
    Resumable bit-exactly (``out_dir/ckpt_name.ckpt``), data parallel: see ``trainloop._fit``.
    """
    T_ = training   # imported at the top; training imports this module too (at its top)
    _caption_table, _device_of, _draw, _fit, _rows, _tokenize, as_pairs = (
        T_._caption_table, T_._device_of, T_._draw, T_._fit, T_._rows, T_._tokenize, T_.as_pairs)
    draw_captions, encode_latent_posteriors = T_.draw_captions, T_.encode_latent_posteriors

    data = as_pairs(pairs)
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    if not 0.0 <= high_t_fraction <= 1.0:
        raise ValueError(f"high_t_fraction must be in [0, 1], got {high_t_fraction}")
    ptype = scheduler.config.prediction_type
    if ptype not in PREDICTION_TYPES:
        raise ValueError(f"train_unet_joint: scheduler prediction_type {ptype!r} not in {PREDICTION_TYPES}")
    abar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
    if ptype == "epsilon" and float(abar[-1]) == 0.0:
        raise ValueError("train_unet_joint: eps-prediction is undefined at zero terminal SNR "
                         "(abar_T = 0: z_T holds no eps information to subtract); use "
                         "prediction_type='v_prediction' with a zero-SNR schedule")
    T = len(abar)
    sf = float(vae.config.scaling_factor)
    captions, per_image = _caption_table(data, extra=("",), tokenizer=tokenizer)
    ids = _tokenize(tokenizer, captions, cfg.max_length)
    mu, sd = encode_latent_posteriors(vae, data.images)
    torch.manual_seed(seed)
    unet = init.requires_grad_(True) if init is not None else sdformat.build_unet(cfg)
    text_encoder.requires_grad_(bool(train_text_encoder))
    model = Denoiser(unet, text_encoder)
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    gamma = snr_gamma if snr_gamma else None

    def loss_fn(m, g, piece=None):
        idx = _draw(len(data), batch_size, g, w)
        cap = draw_captions(per_image, idx, g, caption_dropout)
        z0 = (mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=g)) * sf
        t = draw_timesteps(len(idx), T, g, high_t_fraction)
        eps = torch.randn(z0.shape, generator=g)
        r, dev = _rows(piece), _device_of(m)
        cap, z0, t, eps = cap[r], z0[r].to(dev), t[r], eps[r].to(dev)
        a = abar[t].to(dev)
        zt = a.sqrt().view(-1, 1, 1, 1) * z0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
        pred = m(zt, t.to(dev), ids[cap].to(dev))
        err = ((pred - diffusion_target(z0, eps, a, ptype)) ** 2).mean(dim=(1, 2, 3))
        return (loss_weight(a, ptype, gamma) * err).mean()

    hp = dict(stage="unet_joint", n=len(data), batch_size=batch_size, caption_dropout=caption_dropout,
              snr_gamma=gamma, prediction_type=ptype, zero_snr=float(abar[-1]) == 0.0,
              train_text_encoder=bool(train_text_encoder), high_t_fraction=high_t_fraction,
              cfg=asdict(cfg), fine_tune=init is not None, weighted=weights is not None,
              scaling_factor=round(sf, 6))
    model, ema, info = _fit(ckpt_name, model, loss_fn, steps=steps, lr=lr, seed=seed, out_dir=out_dir,
                            ckpt_every=ckpt_every, resume=resume, warmup=warmup, ema_decay=ema_decay,
                            progress=progress, hparams=hp, stop_after=stop_after, desc="UNet+text",
                            batch_size=batch_size, grad_accum=grad_accum,
                            mixed_precision=mixed_precision)
    out = (ema if ema is not None else model).eval()
    info["dropout_fraction_expected"] = caption_dropout
    return out.unet, out.text_encoder, info


def with_and_repeats(pairs, samples, repeats: int):
    """``pairs`` (PairData of ``samples``) with each pair scene's "and" caption (template
    ``TEMPLATES["pair"][2]``) listed ``repeats`` times, so it is drawn with probability
    repeats / (2 + repeats) instead of 1/3; unchanged for ``repeats`` 1."""
    if repeats == 1:
        return pairs
    caps = []
    for s, c in zip(samples, pairs.captions):
        if s.scene.kind == "pair":
            c = [x for x in c if " and " not in x] + [x for x in c if " and " in x] * int(repeats)
        caps.append(c)
    return type(pairs)(pairs.images, caps)


def train_v3_unet_stages(log, samples, te, vae, tok, cfg, budget, common, accum):
    """The UNet stage(s) of :func:`.training.build_toy_checkpoint` for a budget with v3 levers
    (``budget.joint``): :func:`train_unet_joint` on the toy samples, then the optional
    continuation; stage summaries go into ``log``.  Returns (text encoder, UNet, scheduler)."""
    import time

    _stage_log, toy_training_pairs = training._stage_log, training.toy_training_pairs
    scheduler = sdformat.build_scheduler(cfg, prediction_type=budget.prediction_type,
                                         zero_snr=budget.zero_snr)
    kw = dict(scheduler=scheduler, train_text_encoder=budget.train_text_encoder,
              caption_dropout=budget.caption_dropout, batch_size=budget.unet_batch,
              ema_decay=budget.ema_decay, weights=kind_weights(samples, budget.pair_weight),
              snr_gamma=budget.snr_gamma or None, high_t_fraction=budget.high_t_fraction,
              **common, **accum)
    pairs = with_and_repeats(toy_training_pairs(samples), samples, budget.pair_and_repeats)
    t = time.perf_counter()
    unet, te, info = train_unet_joint(pairs, te, vae, tok, cfg, budget.unet_steps,
                                      lr=budget.unet_lr, **kw)
    log["stages"]["unet"] = _stage_log(info, t)
    if budget.unet_extra_steps > 0:
        t = time.perf_counter()
        unet, te, info = train_unet_joint(pairs, te, vae, tok, cfg, budget.unet_extra_steps,
                                          lr=budget.unet_extra_lr, init=unet,
                                          ckpt_name="unet_joint_extra", **kw)
        log["stages"]["unet_extra"] = _stage_log(info, t)
    return te.eval(), unet.eval(), scheduler
