"""unCLIP (Ramesh et al. 2022): a diffusion prior and a CLIP-image-embedding decoder, with
variations, interpolations and text diffs, in the layout of diffusers' Stable unCLIP.

Layout (``stabilityai/stable-diffusion-2-1-unclip`` + the Karlo prior, as loaded by
``diffusers.StableUnCLIPPipeline`` / ``StableUnCLIPImg2ImgPipeline``):

* **decoder** - a latent-diffusion ``UNet2DConditionModel`` with ``class_embed_type="projection"``.
  The CLIP image embedding z_i is noise-augmented at a level ``noise_level``
  (``StableUnCLIPImageNormalizer.scale`` -> ``image_noising_scheduler.add_noise`` -> ``unscale``),
  concatenated with the sinusoidal embedding of that level, and enters as ``class_labels`` (a
  projection added to the timestep embedding); the caption, if any, enters through cross-attention.
  Guidance: null = (empty caption, all-zero ``class_labels``), guided prediction
  null + s (cond - null), as in the diffusers pipelines.  One deliberate difference: at
  ``noise_level`` 0 the package adds no noise, while the pipelines still draw N(0, 1) and add it
  times sqrt(1 - alpha-bar_0) = 0.0064 (squaredcos_cap_v2) in normalised units; on the toy
  decoder (4 images, 25 DDIM steps, same latents) that moves pixels by at most 2/255.
* **prior** - ``diffusers.PriorTransformer`` over [caption tokens, CLIP text embedding z_t,
  timestep, noised image embedding, query token] predicting the clean (normalised) image embedding
  (x0 objective); outputs are unnormalised with ``prior.clip_mean`` / ``clip_std``
  (``post_process_latents``).  :meth:`UnCLIPModel.sample_prior` draws ``n_candidates`` (paper: 2)
  per caption and keeps the one with the larger dot product with z_t (cosine, i.e. the dot product
  of the L2-normalised CLIP embeddings as in the paper).
* **image encoder** - ``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor``; the embedding
  fed to the decoder is its raw ``image_embeds`` (as in ``StableUnCLIPImg2ImgPipeline``).

Not built: the paper's own decoder also projects z_i to 4 extra context tokens appended to the
caption tokens.  The UNet can hold that projection (``encoder_hid_dim_type="text_image_proj"``,
Kandinsky 2.1's ``TextImageProjection``), but it then needs ``added_cond_kwargs["image_embeds"]``,
which diffusers' Stable unCLIP pipelines never pass, so such a checkpoint would not run in the
plain pipelines the issue requires; the embedding enters through ``class_labels`` only, as in
Stable unCLIP.

Manipulations (paper Sec. 3): :func:`slerp` (interpolation, decoder noise fixed),
:func:`text_diff_direction` z_d = normalize(z_t - z_t0) and :meth:`UnCLIPModel.text_diff`
(decode slerp(z_i, z_d, theta) from the DDIM inversion x_T of the source image).  Raw CLIP
embeddings are not unit vectors and the decoder was trained on raw ones, so slerp here runs on the
directions and interpolates the norms linearly (:func:`slerp`); on unit vectors it is the paper's
slerp exactly.

Deterministic samplers (DDIM, eta = 0) are used for both stages so that a sample depends only on
its own seed (not on the batch it is in); tests check them against the diffusers pipelines given
the same initial noise.  The folders' own schedulers are DDPM-family (``DDPMScheduler`` in the
Stable unCLIP folders, ``UnCLIPScheduler`` in Karlo's prior): the package keeps their training
noise schedules and prediction types but samples with ``DDIMScheduler`` built on them, so its
samples are the pipelines' samples only when the pipelines are given the same DDIM scheduler.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .. import paths
from .. import validate as V
from ..models import as_dtype
from ..imageio import to_pil
from . import checks as UC
from .geometry import (_unit, check_theta, select_by_dot_product, slerp,  # noqa: F401
                       text_diff_direction, typical_norm)

DEFAULT_UNCLIP = paths.DATA / "toy-unclip"
UNCLIP_ALIASES = {
    "toy-unclip": str(DEFAULT_UNCLIP),
    "sd2.1-unclip": "stabilityai/stable-diffusion-2-1-unclip",
    "sd2.1-unclip-small": "stabilityai/stable-diffusion-2-1-unclip-small",
    "karlo": "kakaobrain/karlo-v1-alpha",
}
#: sub-folders of a full (text-to-image) Stable unCLIP folder
PRIOR_PARTS = ("prior_tokenizer", "prior_text_encoder", "prior", "prior_scheduler")
DECODER_PARTS = ("image_normalizer", "image_noising_scheduler", "tokenizer", "text_encoder",
                 "unet", "scheduler", "vae")
ENCODER_PARTS = ("feature_extractor", "image_encoder")



# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
#: noise slot of a decode's embedding augmentation under ``seeds[i]`` (decoder noise: slot 0,
#: prior candidate k: slot 1 + k)
_AUG_SLOT = 7919


def _seeded_noise(shape, seed: int, index: int) -> torch.Tensor:
    """Noise of item ``index`` under ``seed`` (independent of the batch the item is in)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) * 100003 + int(index)))


def _step_noise(shape, item_key: int, step: int) -> torch.Tensor:
    """The DDIM (eta > 0) noise of step ``step`` of the item keyed ``item_key``."""
    state = np.random.SeedSequence([int(item_key) % 2**63, int(step), 0xE7A]).generate_state(1)[0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state)))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _to_device_dtype(module, device, dtype):
    """Move ``module`` to ``device``; cast it only if a floating-point weight has another dtype.

    ``load_unclip`` already loads every part in ``dtype`` (``torch_dtype`` of ``from_pretrained``),
    so the usual call is a move only.  (diffusers' ``ModelMixin.to`` warns "modules ... should be
    kept in float32: [] ... Casting directly with `to()`" whenever a dtype is passed, even an
    unchanged one with no such module.)"""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module.to(device)


class UnCLIPModel:
    """Loaded Stable-unCLIP components (prior parts may be None for an image-variation folder).

    Attributes are the diffusers component names: prior_tokenizer, prior_text_encoder, prior,
    prior_scheduler, image_normalizer, image_noising_scheduler, tokenizer, text_encoder, unet,
    scheduler, vae, feature_extractor, image_encoder; plus name, device, dtype, resolution,
    latent_shape, embedding_dim.
    """

    def __init__(self, components: dict, *, name="unclip", device="cpu", dtype=torch.float32):
        for k in PRIOR_PARTS + DECODER_PARTS + ENCODER_PARTS:
            setattr(self, k, components.get(k))
        missing = [k for k in DECODER_PARTS if getattr(self, k) is None]
        if missing:
            raise ValueError(f"UnCLIPModel {name}: decoder components missing: {missing}")
        self.name, self.device, self.dtype = str(name), torch.device(device), dtype
        for k in ("prior_text_encoder", "prior", "text_encoder", "unet", "vae", "image_encoder",
                  "image_normalizer"):
            m = getattr(self, k)
            if m is not None:
                _to_device_dtype(m, self.device, dtype).eval().requires_grad_(False)
        cfg = self.unet.config
        if cfg.class_embed_type != "projection":
            raise ValueError(f"{name}: unet/config.json has class_embed_type={cfg.class_embed_type!r}; "
                             f"a Stable unCLIP decoder needs 'projection' (the image embedding enters "
                             f"as class_labels)")
        self.embedding_dim = int(self.image_normalizer.config.embedding_dim)
        if int(cfg.projection_class_embeddings_input_dim) != 2 * self.embedding_dim:
            raise ValueError(f"{name}: unet projection_class_embeddings_input_dim="
                             f"{cfg.projection_class_embeddings_input_dim} but image_normalizer "
                             f"embedding_dim={self.embedding_dim}; it must be 2 x embedding_dim")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.resolution = int(cfg.sample_size) * self.vae_scale_factor
        self.latent_shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def has_prior(self) -> bool:
        return all(getattr(self, k) is not None for k in PRIOR_PARTS)

    def _need_prior(self, what):
        if not self.has_prior:
            missing = [k for k in PRIOR_PARTS if getattr(self, k) is None]
            raise ValueError(f"{what} needs the diffusion prior, but {self.name} has no {missing}. "
                             f"Use a text-to-image Stable unCLIP folder (with prior/, prior_text_encoder/, "
                             f"prior_tokenizer/, prior_scheduler/) or pass prior='kakaobrain/karlo-v1-alpha' "
                             f"(or a local copy) to load_unclip")

    def check_embeddings(self, z: torch.Tensor, what: str = "image_embeds") -> torch.Tensor:
        z = torch.as_tensor(z)
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or z.shape[-1] != self.embedding_dim:
            raise ValueError(f"{what}: expected CLIP embeddings [B, {self.embedding_dim}] (the width of "
                             f"{self.name}'s image_normalizer / image encoder), got {tuple(z.shape)}; "
                             f"embed with this model's CLIP (encode_images / encode_prior_texts)")
        V.non_empty(len(z), what, "embeddings")
        V.finite_array(z, what)
        return z.to(self.device, self.dtype)

    # ---- CLIP side ----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images, batch_size: int = 256) -> torch.Tensor:
        """Raw CLIP image embeddings ``image_encoder(feature_extractor(images)).image_embeds``
        [B, D] of PIL images / uint8 arrays (what StableUnCLIPImg2ImgPipeline feeds the decoder)."""
        if self.image_encoder is None or self.feature_extractor is None:
            raise ValueError(f"{self.name} has no image_encoder/feature_extractor; use a folder in the "
                             f"StableUnCLIPImg2ImgPipeline layout")
        if isinstance(images, (str, Path)) or (hasattr(images, "ndim") and images.ndim == 3):
            raise V.BadInput("encode_images: images must be a list of images (PIL, uint8 arrays or "
                             "paths), got a single one; wrap it in a list")
        images = [to_pil(im).convert("RGB") for im in images]
        if not images:
            raise ValueError("encode_images: no images given")
        out = []
        for i in range(0, len(images), batch_size):
            px = self.feature_extractor(images=images[i:i + batch_size], return_tensors="pt").pixel_values
            out.append(self.image_encoder(px.to(self.device, self.dtype)).image_embeds.float())
        return torch.cat(out)

    @torch.inference_mode()
    def encode_prior_texts(self, prompts):
        """(text_embeds [B, D], last_hidden_state [B, L, D], attention mask [B, L] bool) of the
        prior's CLIP text encoder, tokenised as in StableUnCLIPPipeline._encode_prior_prompt."""
        self._need_prior("encode_prior_texts")
        prompts = UC.prompts_arg(prompts)
        V.known_words(self.prior_tokenizer, prompts)
        tok = self.prior_tokenizer(list(prompts), padding="max_length", truncation=True,
                                   max_length=self.prior_tokenizer.model_max_length, return_tensors="pt")
        out = self.prior_text_encoder(tok.input_ids.to(self.device))
        return out.text_embeds.float(), out.last_hidden_state, tok.attention_mask.bool().to(self.device)

    @torch.inference_mode()
    def encode_captions(self, prompts) -> torch.Tensor:
        """Decoder caption hidden states [B, L, D] (each distinct prompt encoded once)."""
        prompts = [str(p) for p in prompts]
        pending = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if pending:
            V.known_words(self.tokenizer, pending)
            ids = self.tokenizer(pending, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            for p, h in zip(pending, self.text_encoder(ids.to(self.device))[0]):
                self._text_cache[p] = h
        return torch.stack([self._text_cache[p] for p in prompts])

    # ---- decoder ------------------------------------------------------------------------------
    def noise_image_embeddings(self, image_embeds, noise_level: int, noise=None) -> torch.Tensor:
        """``class_labels`` of the decoder: normalise, noise to ``noise_level`` with the image-noising
        scheduler, unnormalise, concatenate the sinusoidal embedding of the level
        (StableUnCLIPPipeline.noise_image_embeddings)."""
        from diffusers.models.embeddings import get_timestep_embedding

        z = self.check_embeddings(image_embeds)
        if not isinstance(noise_level, torch.Tensor):
            V.count(noise_level, "noise_level", low=0)
        T = int(self.image_noising_scheduler.config.num_train_timesteps)
        lv = torch.as_tensor(noise_level, dtype=torch.long)
        if (lv < 0).any() or (lv >= T).any():
            raise ValueError(f"noise_level must be in [0, {T - 1}], got {noise_level!r}")
        lv = lv.expand(len(z)) if lv.ndim == 0 else lv
        if noise is None:
            noise = torch.zeros_like(z)
        x = self.image_normalizer.scale(z)
        x = self.image_noising_scheduler.add_noise(x, noise=noise.to(x), timesteps=lv.to(self.device))
        x = self.image_normalizer.unscale(x)
        emb = get_timestep_embedding(lv.to(self.device), embedding_dim=z.shape[-1], flip_sin_to_cos=True,
                                     downscale_freq_shift=0).to(x.dtype)
        return torch.cat([x, emb], 1)

    def _ddim(self, num_steps):
        from diffusers import DDIMScheduler
        s = DDIMScheduler.from_config(self.scheduler.config, clip_sample=False, set_alpha_to_one=False)
        s.set_timesteps(num_steps)
        return s

    def _guided(self, x, t, labels, caps, null_caps, guidance_scale):
        """Guided model output: null (empty caption, zero class_labels) + s (cond - null)."""
        if guidance_scale == 1.0:
            return self.unet(x, t, encoder_hidden_states=caps, class_labels=labels).sample
        out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([null_caps, caps]),
                        class_labels=torch.cat([torch.zeros_like(labels), labels])).sample
        u, c = out.chunk(2)
        return u + guidance_scale * (c - u)

    def _decoder_inputs(self, image_embeds, prompts, noise_level, seed, seeds=None):
        """class_labels, caption states and null caption states of a decode.  The augmentation noise
        of item i (``noise_level`` > 0) is drawn from ``seeds[i]`` alone when given (slot
        ``_AUG_SLOT``, apart from the decoder noise (seeds[i], 0) and the prior candidates
        (seeds[i], 1 + k)), otherwise from (seed + 7919, i)."""
        z = self.check_embeddings(image_embeds, "image_embeds")
        B = len(z)
        prompts = [""] * B if prompts is None else ([prompts] * B if isinstance(prompts, str) else list(prompts))
        if len(prompts) != B:
            raise ValueError(f"decode: {B} embeddings but {len(prompts)} prompts")
        if seeds is not None and len(seeds) != B:
            raise ValueError(f"decode: {B} embeddings but {len(seeds)} seeds")
        aug = None
        if noise_level:
            D = (self.embedding_dim,)
            aug = torch.stack([_seeded_noise(D, s, _AUG_SLOT) for s in seeds] if seeds is not None
                              else [_seeded_noise(D, seed + 7919, i) for i in range(B)])
        labels = self.noise_image_embeddings(z, noise_level, aug)
        return labels, self.encode_captions(prompts), self.encode_captions([""] * B)

    @torch.inference_mode()
    def decode(self, image_embeds, prompts=None, *, num_steps: int = 25, guidance_scale: float = 3.0,
               noise_level: int = 0, seed: int = 0, seeds=None, latents=None, batch_size: int = 64,
               output: str = "uint8", progress: bool = False, eta: float = 0.0):
        """Decode CLIP image embeddings [B, D] (optionally with captions) into images with DDIM.
        Item i starts from noise seeded by (seed, i) - or by ``seeds[i]`` alone, so that
        it does not depend on the batch - unless ``latents`` [B, C, h, w] (e.g. a DDIM inversion)
        are given.  ``eta`` in [0, 1]: DDIM's stochasticity (0: deterministic; 1: DDPM-like); the
        noise added at step k of item i is seeded by (``seeds[i]`` or (seed, i), k).  With
        ``noise_level`` > 0 the embedding's augmentation noise, too, comes from ``seeds[i]`` when
        given (else from (seed, i)); ``noise_level`` 0 adds no noise at all (see the module
        docstring for how that differs from the pipelines).
        ``output``: "uint8" (numpy [B, R, R, 3]), "tensor" ([-1, 1]) or "latents"."""
        from tqdm.auto import tqdm

        UC.sampler_args(num_steps=num_steps, guidance_scale=guidance_scale, noise_level=noise_level,
                        seed=seed, batch_size=batch_size)
        if output not in ("uint8", "tensor", "latents"):
            raise V.BadInput(f"decode: output must be 'uint8', 'tensor' or 'latents', got {output!r}")
        if seeds is not None:
            seeds = UC.seeds_arg(seeds, len(list(seeds)))
        if latents is not None:
            V.finite_array(torch.as_tensor(latents), "latents")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"decode: eta must be in [0, 1] (0: deterministic DDIM), got {eta!r}")
        labels, caps, null = self._decoder_inputs(image_embeds, prompts, noise_level, seed, seeds)
        B = len(labels)
        item_keys = list(seeds) if seeds is not None else [int(seed) * 100003 + i for i in range(B)]
        if len(item_keys) != B:
            raise ValueError(f"decode: {B} embeddings but {len(item_keys)} seeds")
        if latents is None and seeds is not None:
            latents = torch.stack([_seeded_noise(self.latent_shape, s, 0) for s in seeds])
        elif latents is None:
            latents = torch.stack([_seeded_noise(self.latent_shape, seed, i) for i in range(B)])
        elif tuple(latents.shape) != (B,) + self.latent_shape:
            raise ValueError(f"decode: latents must be [{B}, {', '.join(map(str, self.latent_shape))}], "
                             f"got {tuple(latents.shape)}")
        outs = []
        for i in tqdm(range(0, B, batch_size), disable=not progress, desc="decode"):
            sl = slice(i, i + batch_size)
            sched = self._ddim(num_steps)
            x = latents[sl].to(self.device, self.dtype) * sched.init_noise_sigma
            for k, t in enumerate(sched.timesteps):
                e = self._guided(sched.scale_model_input(x, t), t, labels[sl], caps[sl], null[sl],
                                 guidance_scale)
                if eta > 0:
                    vn = torch.stack([_step_noise(self.latent_shape, key, k) for key in item_keys[sl]])
                    x = sched.step(e, t, x, eta=float(eta), variance_noise=vn.to(x)).prev_sample
                else:
                    x = sched.step(e, t, x).prev_sample
            outs.append(x)
        z0 = torch.cat(outs)
        if output == "latents":
            return z0
        img = torch.cat([self.vae.decode(z0[i:i + batch_size] / self.scaling_factor).sample
                         for i in range(0, B, batch_size)]).clamp(-1, 1)
        if output == "tensor":
            return img
        if output != "uint8":
            raise ValueError(f"decode: output must be 'uint8', 'tensor' or 'latents', got {output!r}")
        return _to_uint8(img)

    @torch.inference_mode()
    def encode_latents(self, images) -> torch.Tensor:
        """VAE posterior-mean latents (times the scaling factor) of uint8 images / PIL."""
        arr = []
        for im in images:
            pil = to_pil(im).convert("RGB")
            if pil.size != (self.resolution, self.resolution):
                from PIL import Image
                pil = pil.resize((self.resolution, self.resolution), Image.BICUBIC)
            arr.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        x = torch.stack(arr).to(self.device, self.dtype)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    @torch.inference_mode()
    def invert(self, latents, image_embeds, prompts=None, *, num_steps: int = 25,
               guidance_scale: float = 1.0, noise_level: int = 0) -> torch.Tensor:
        """Deterministic DDIM inversion x_0 -> x_T under the decoder conditioned on
        ``image_embeds`` (the paper fixes the decoder noise of a text diff this way, Sec. 3.3).

        Walks the sampling grid of :meth:`decode` backwards, approximating eps(x_t, t) by the model
        output at the previous (less noisy) latent - the standard DDIM inversion."""
        UC.sampler_args(num_steps=num_steps, guidance_scale=guidance_scale, noise_level=noise_level)
        V.finite_array(torch.as_tensor(latents), "latents")
        labels, caps, null = self._decoder_inputs(image_embeds, prompts, noise_level, 0)
        sched = self._ddim(num_steps)
        ac = sched.alphas_cumprod.to(self.device, torch.float32)
        step = sched.config.num_train_timesteps // num_steps
        x = latents.to(self.device, self.dtype)
        pred_type = sched.config.prediction_type
        for t in sched.timesteps.flip(0):
            prev = int(t) - step
            a_prev = ac[prev] if prev >= 0 else sched.final_alpha_cumprod.to(ac)
            a_t = ac[int(t)]
            out = self._guided(x, t, labels, caps, null, guidance_scale)
            if pred_type == "epsilon":
                eps = out
            elif pred_type == "v_prediction":
                eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
            else:
                raise ValueError(f"invert: prediction_type {pred_type!r} not supported "
                                 f"(epsilon or v_prediction)")
            x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        return x

    # ---- prior --------------------------------------------------------------------------------
    def _prior_ddim(self, num_steps):
        """DDIM (eta 0) on the prior scheduler's own noise schedule.  The betas are taken from the
        loaded scheduler itself, not re-derived from its config: Karlo's ``UnCLIPScheduler`` config
        (``kakaobrain/karlo-v1-alpha/prior_scheduler``) has no ``beta_schedule`` entry - the class
        knows only squaredcos_cap_v2 - and ``DDIMScheduler.from_config`` would fall back to its
        linear default (alpha-bar at t = 500: 0.078 instead of 0.492).  ``prediction_type``
        ("sample"), ``clip_sample`` and ``clip_sample_range`` (5.0 for Karlo) come from the config."""
        from diffusers import DDIMScheduler
        betas = getattr(self.prior_scheduler, "betas", None)
        if betas is None:
            raise ValueError(f"prior_scheduler {type(self.prior_scheduler).__name__} has no betas: "
                             f"the prior needs a DDPM-family scheduler (DDPMScheduler, UnCLIPScheduler)")
        s = DDIMScheduler.from_config(self.prior_scheduler.config,
                                      trained_betas=betas.detach().float().cpu().tolist())
        s.set_timesteps(num_steps)
        return s

    @torch.inference_mode()
    def prior_embeddings(self, prompts, *, num_steps: int = 25, guidance_scale: float = 4.0,
                         seeds=None, latents=None) -> torch.Tensor:
        """One prior sample per prompt: CLIP image embeddings [B, D] (unnormalised with
        clip_mean/clip_std).  DDIM (eta 0) on the prior scheduler's schedule; guidance on the
        caption (null = the empty caption, as the pipeline); item i starts from ``seeds[i]``'s
        noise unless ``latents`` are given."""
        self._need_prior("prior sampling")
        prompts = UC.prompts_arg(prompts)
        UC.sampler_args(num_steps=num_steps, guidance_scale=guidance_scale)
        seeds = UC.seeds_arg(seeds, len(prompts))
        if latents is not None:
            V.finite_array(torch.as_tensor(latents), "latents")
        B = len(prompts)
        emb, hid, mask = self.encode_prior_texts(prompts)
        nemb, nhid, nmask = self.encode_prior_texts([""] * B)
        D = int(self.prior.config.embedding_dim)
        if latents is None:
            seeds = list(range(B)) if seeds is None else list(seeds)
            latents = torch.stack([_seeded_noise((D,), s, 0) for s in seeds])
        sched = self._prior_ddim(num_steps)
        x = latents.to(self.device, self.dtype) * sched.init_noise_sigma
        use_cfg = guidance_scale > 1.0
        for t in sched.timesteps:
            if use_cfg:
                out = self.prior(torch.cat([x, x]), timestep=t, proj_embedding=torch.cat([nemb, emb]),
                                 encoder_hidden_states=torch.cat([nhid, hid]),
                                 attention_mask=torch.cat([nmask, mask])).predicted_image_embedding
                u, c = out.chunk(2)
                out = u + guidance_scale * (c - u)
            else:
                out = self.prior(x, timestep=t, proj_embedding=emb, encoder_hidden_states=hid,
                                 attention_mask=mask).predicted_image_embedding
            x = sched.step(out, t, x).prev_sample
        return self.prior.post_process_latents(x).float()

    @torch.inference_mode()
    def sample_prior(self, prompts, *, n_candidates: int = 2, num_steps: int = 25,
                     guidance_scale: float = 4.0, seed: int = 0, seeds=None,
                     batch_size: int = 256) -> dict:
        """Draw ``n_candidates`` prior samples per prompt and keep the one with the larger dot
        product with the CLIP text embedding (paper Sec. 2.1: 2 samples).  Candidate k of prompt i
        starts from noise seeded by (seeds[i], 1 + k) (default seeds[i] = seed * 100003 + i), so it
        does not depend on the batch.  Returns dict(chosen [B, D], candidates [B, K, D],
        scores [B, K], index [B], text_embeds [B, D])."""
        self._need_prior("prior sampling")
        UC.sampler_args(n_candidates=n_candidates, num_steps=num_steps, guidance_scale=guidance_scale,
                        seed=seed, batch_size=batch_size)
        prompts = UC.prompts_arg(prompts)
        B, K = len(prompts), int(n_candidates)
        seeds = [seed * 100003 + i for i in range(B)] if seeds is None else list(seeds)
        if len(seeds) != B:
            raise ValueError(f"sample_prior: {B} prompts but {len(seeds)} seeds")
        D = int(self.prior.config.embedding_dim)
        cands = []
        for i in range(0, B * K, batch_size):
            ids = range(i, min(i + batch_size, B * K))
            lat = torch.stack([_seeded_noise((D,), seeds[j // K], 1 + j % K) for j in ids])
            cands.append(self.prior_embeddings([prompts[j // K] for j in ids], num_steps=num_steps,
                                               guidance_scale=guidance_scale, latents=lat))
        cands = torch.cat(cands).view(B, K, -1).cpu()
        text = self.encode_prior_texts(prompts)[0].cpu()
        chosen, scores, idx = select_by_dot_product(cands, text)
        return dict(chosen=chosen, candidates=cands, scores=scores, index=idx, text_embeds=text)

    def text_embeddings_as_image_embeddings(self, prompts) -> torch.Tensor:
        """The no-prior ablation's input: the CLIP text embedding direction scaled to the typical
        image-embedding norm (:func:`typical_norm`), fed to the decoder as if it were z_i."""
        z = self.encode_prior_texts(list(prompts))[0].cpu()
        return _unit(z) * typical_norm(self.image_normalizer)

    def generate(self, prompts, *, mode: str = "prior", caption: bool = True,
                 n_candidates: int = 2, prior_steps: int = 25, prior_guidance: float = 4.0,
                 num_steps: int = 25, guidance_scale: float = 3.0, seed: int = 0, seeds=None,
                 progress: bool = False) -> np.ndarray:
        """Text-to-image.  ``mode``: "prior" (prior -> decoder, the paper's unCLIP), "text" (the
        text embedding fed to the decoder directly, no prior), or "caption" (zero image embedding,
        caption only).  ``caption``: also give the caption to the decoder's cross-attention.
        Prompt i draws everything from ``seeds[i]`` (default seed * 100003 + i): decoder noise
        (seeds[i], 0), prior candidates (seeds[i], 1 + k).  ``mode="caption"`` needs
        ``caption=True`` (the caption is its only conditioning)."""
        prompts = UC.prompts_arg(prompts)
        if mode not in ("prior", "text", "caption"):
            raise V.BadInput(f"generate: mode must be 'prior', 'text' or 'caption', got {mode!r}")
        if not isinstance(caption, bool):
            raise V.BadInput(f"generate: caption must be True or False, got {caption!r}")
        if mode == "caption" and not caption:
            raise V.BadInput("generate: mode='caption' decodes from the caption alone, so "
                             "caption=False would leave no conditioning; use caption=True, or "
                             "mode='prior'/'text' with caption=False")
        UC.sampler_args(n_candidates=n_candidates, prior_steps=prior_steps,
                        prior_guidance=prior_guidance, num_steps=num_steps,
                        guidance_scale=guidance_scale, seed=seed)
        seeds = UC.seeds_arg(seeds, len(prompts))
        seeds = [seed * 100003 + i for i in range(len(prompts))] if seeds is None else list(seeds)
        if mode == "prior":
            z = self.sample_prior(prompts, n_candidates=n_candidates, num_steps=prior_steps,
                                  guidance_scale=prior_guidance, seeds=seeds)["chosen"]
        elif mode == "text":
            z = self.text_embeddings_as_image_embeddings(prompts)
        elif mode == "caption":
            z = torch.zeros(len(prompts), self.embedding_dim)
        else:
            raise ValueError(f"generate: mode must be 'prior', 'text' or 'caption', got {mode!r}")
        if mode == "caption":
            return self._decode_caption_only(prompts, num_steps, guidance_scale, seeds)
        return self.decode(z, prompts if caption else None, num_steps=num_steps,
                           guidance_scale=guidance_scale, seeds=seeds, progress=progress)

    @torch.inference_mode()
    def _decode_caption_only(self, prompts, num_steps, guidance_scale, seeds):
        """Caption-only decoding: class_labels all zero (the decoder's null embedding) in both
        branches, guidance on the caption alone."""
        B = len(prompts)
        caps, null = self.encode_captions(prompts), self.encode_captions([""] * B)
        labels = torch.zeros(B, 2 * self.embedding_dim, device=self.device, dtype=self.dtype)
        sched = self._ddim(num_steps)
        x = torch.stack([_seeded_noise(self.latent_shape, s, 0) for s in seeds]).to(self.device)
        for t in sched.timesteps:
            out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([null, caps]),
                            class_labels=torch.cat([labels, labels])).sample
            u, c = out.chunk(2)
            x = sched.step(u + guidance_scale * (c - u), t, x).prev_sample
        return _to_uint8(self.vae.decode(x / self.scaling_factor).sample.clamp(-1, 1))

    # ---- manipulations ------------------------------------------------------------------------
    def variations(self, images, n: int = 4, *, seed: int = 0, method: str = "fresh_noise",
                   eta: float | None = None, invert_guidance: float | None = None,
                   **decode_kw) -> np.ndarray:
        """``n`` variations of each image, decoded from its CLIP embedding z_i.

        * ``method="fresh_noise"`` (Karlo's and Stable unCLIP's image variations): each variation
          starts from new decoder noise (seeded by (seed, index)); ``eta`` defaults to 0.
        * ``method="ddim_inversion"`` (the paper's Sec. 3.1): the image is DDIM-inverted under z_i
          to x_T (:meth:`invert`, as for text diffs), and x_T is decoded ``n`` times with DDIM
          ``eta`` > 0 (default 1.0), each with its own step noise; eta = 0 gives ``n`` copies of
          the DDIM reconstruction.  ``invert_guidance``: the inversion's guidance scale (default:
          the decoder's, so that eta = 0 reproduces the image as closely as the sampler allows).

        Returns uint8 [len(images), n, R, R, 3]."""
        if method not in ("fresh_noise", "ddim_inversion"):
            raise ValueError(f"variations: method must be 'fresh_noise' or 'ddim_inversion' "
                             f"(the paper's), got {method!r}")
        UC.sampler_args(n=n, seed=seed)
        images = list(images)
        z = self.encode_images(images)
        zz = z.repeat_interleave(n, 0)
        if method == "fresh_noise":
            out = self.decode(zz, seed=seed, eta=0.0 if eta is None else eta, **decode_kw)
            return out.reshape(len(z), n, *out.shape[1:])
        eta = 1.0 if eta is None else eta
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"variations: eta must be in [0, 1] (the paper decodes with eta > 0), "
                             f"got {eta!r}")
        num_steps = decode_kw.get("num_steps", 25)
        guidance = decode_kw.get("guidance_scale", 3.0)
        x_T = self.invert(self.encode_latents(images), z, num_steps=num_steps,
                          guidance_scale=guidance if invert_guidance is None else invert_guidance)
        keys = [int(seed) * 100003 + i * n + j for i in range(len(images)) for j in range(n)]
        out = self.decode(zz, latents=x_T.repeat_interleave(n, 0).cpu(), seeds=keys, eta=eta,
                          **decode_kw)
        return out.reshape(len(z), n, *out.shape[1:])

    def interpolate(self, image_a, image_b, thetas, *, seed: int = 0, **decode_kw) -> np.ndarray:
        """slerp(z_a, z_b, theta) for each theta, all decoded from the same decoder noise
        (paper Fig. 4).  Returns uint8 [len(thetas), R, R, 3]."""
        thetas = check_theta(thetas if isinstance(thetas, (str, bytes)) else list(thetas), "thetas")
        z = self.encode_images([image_a, image_b])
        zs = slerp(z[0], z[1], thetas)
        lat = _seeded_noise(self.latent_shape, seed, 0).expand(len(thetas), -1, -1, -1)
        return self.decode(zs, latents=lat, **decode_kw)

    def text_diff(self, image, source_caption: str, target_caption: str, thetas, *,
                  num_steps: int = 25, guidance_scale: float = 3.0, invert_guidance=None,
                  return_inversion: bool = False):
        """Text diff (paper Sec. 3.3, Fig. 5): z_d = normalize(z_t - z_t0) from the target and source
        captions, decode slerp(z_i, z_d, theta) for each theta, the decoder noise fixed to the DDIM
        inversion x_T of the source image under z_i.  theta = 0 is the DDIM reconstruction.

        ``invert_guidance``: guidance scale of the inversion (default: ``guidance_scale``, so that
        theta = 0 reproduces the source as closely as the sampler allows).
        Source and target captions with the same CLIP text embedding give no edit direction: every
        theta then returns the reconstruction (theta = 0).
        Returns uint8 [len(thetas), R, R, 3] (and x_T with ``return_inversion``)."""
        for nm, c in (("source_caption", source_caption), ("target_caption", target_caption)):
            if not isinstance(c, str):
                raise V.BadInput(f"text_diff: {nm} must be one caption string, got {c!r}")
        if isinstance(thetas, (int, float)):
            thetas = [thetas]
        thetas = check_theta(list(thetas), "thetas")
        UC.sampler_args(num_steps=num_steps, guidance_scale=guidance_scale,
                        invert_guidance=invert_guidance)
        self._need_prior("text diffs (the CLIP text encoder lives in prior_text_encoder)")
        z_i = self.encode_images([image])
        zt = self.encode_prior_texts([target_caption, source_caption])[0].cpu()
        same = torch.equal(_unit(zt[0]), _unit(zt[1]))   # no direction: the edit is the identity
        z_d = text_diff_direction(zt[0], zt[1])
        z_d = z_d * z_i.norm()  # slerp interpolates the norms; keep the source's
        x_T = self.invert(self.encode_latents([image]), z_i, num_steps=num_steps,
                          guidance_scale=guidance_scale if invert_guidance is None else invert_guidance)
        if same:   # every theta is the reconstruction, decoded once
            out = self.decode(z_i, latents=x_T.cpu(), num_steps=num_steps,
                              guidance_scale=guidance_scale).repeat(len(thetas), 0)
            return (out, x_T) if return_inversion else out
        zs = slerp(z_i[0].cpu(), z_d, thetas)
        out = self.decode(zs, latents=x_T.expand(len(thetas), -1, -1, -1).cpu(), num_steps=num_steps,
                          guidance_scale=guidance_scale)
        return (out, x_T) if return_inversion else out


# ------------------------------------------------------------------------------------------------
# loading / saving
# ------------------------------------------------------------------------------------------------
def resolve_unclip(name_or_path) -> tuple[str, bool]:
    s = str(name_or_path)
    s = UNCLIP_ALIASES.get(s, s)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise V.BadInput(f"{p} is a file, not a Stable unCLIP folder; point at the folder that "
                             f"holds model_index.json")
        if not (p / "model_index.json").exists():
            raise FileNotFoundError(f"{p} is not a Stable unCLIP folder: it has no model_index.json. "
                                    f"Point at a folder written by save_unclip_folder / "
                                    f"StableUnCLIPPipeline.save_pretrained")
        return str(p), True
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return s, False
    raise FileNotFoundError(f"unknown unCLIP model {name_or_path!r}: not a local folder, not a hub id, "
                            f"not an alias ({', '.join(sorted(UNCLIP_ALIASES))})")


def _component_loaders():
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, PriorTransformer,
                           UNet2DConditionModel)
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import \
        StableUnCLIPImageNormalizer
    from transformers import (CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer, CLIPVisionModelWithProjection)
    sched = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
    return dict(tokenizer=CLIPTokenizer, prior_tokenizer=CLIPTokenizer, text_encoder=CLIPTextModel,
                prior_text_encoder=CLIPTextModelWithProjection, prior=PriorTransformer,
                image_normalizer=StableUnCLIPImageNormalizer, unet=UNet2DConditionModel,
                vae=AutoencoderKL, image_encoder=CLIPVisionModelWithProjection,
                feature_extractor=CLIPImageProcessor, _sched=sched)


def _load_part(loc, sub, kind, local_only, dtype, loaders):
    if kind in ("scheduler", "prior_scheduler", "image_noising_scheduler"):
        from diffusers import SchedulerMixin  # noqa: F401
        cfg_file = None
        if Path(loc).exists():
            cfg_file = Path(loc) / sub / "scheduler_config.json"
            cls_name = json.loads(cfg_file.read_text()).get("_class_name", "DDPMScheduler")
        else:
            from huggingface_hub import hf_hub_download
            cls_name = json.loads(Path(hf_hub_download(loc, "scheduler_config.json", subfolder=sub,
                                                       local_files_only=local_only)).read_text())["_class_name"]
        import diffusers
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise ValueError(f"{loc}/{sub}: unknown scheduler class {cls_name}")
        return cls.from_pretrained(loc, subfolder=sub, local_files_only=local_only)
    cls = loaders[kind]
    kw = dict(subfolder=sub, local_files_only=local_only)
    if kind not in ("tokenizer", "prior_tokenizer", "feature_extractor"):
        kw["torch_dtype"] = dtype
    return cls.from_pretrained(loc, **kw)


def load_unclip(name_or_path=None, *, prior=None, prior_text_model=None, device="cpu",
                dtype=torch.float32, need_prior: bool = True,
                allow_download: bool | None = None) -> UnCLIPModel:
    """Load a Stable unCLIP checkpoint (local folder, hub id or alias; default ``data/toy-unclip``).

    A text-to-image folder (the toy one, or one saved from StableUnCLIPPipeline) holds the prior
    parts itself.  The image-variation release ``stabilityai/stable-diffusion-2-1-unclip`` does
    not; pass ``prior="kakaobrain/karlo-v1-alpha"`` (sub-folders prior/, prior_scheduler/,
    text_encoder/, tokenizer/) - or any folder with prior_*/ sub-folders.  With ``need_prior``
    (default) a missing prior is an error raised before anything heavy is loaded.

    Sampling: the folders ship DDPM-family schedulers (``scheduler``, ``image_noising_scheduler``,
    ``prior_scheduler``: ``DDPMScheduler``; Karlo's prior: ``UnCLIPScheduler``); the model keeps
    them as loaded, and :meth:`UnCLIPModel.decode` / :meth:`UnCLIPModel.prior_embeddings` sample
    with DDIM (eta 0) on their noise schedules - not the pipelines' default ancestral sampling.
    """
    dtype = as_dtype(dtype)
    loc, local = resolve_unclip(name_or_path or DEFAULT_UNCLIP)
    if allow_download is None:
        allow_download = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false")
    index = None
    if local:
        try:
            index = json.loads((Path(loc) / "model_index.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise V.BadInput(f"{Path(loc) / 'model_index.json'} is not valid JSON; restore it from "
                             f"the checkpoint's release") from None
        if not isinstance(index, dict):
            raise V.BadInput(f"{Path(loc) / 'model_index.json'} holds a {type(index).__name__}, "
                             f"expected a JSON object of components")
        UC.check_folder(loc, index, DECODER_PARTS)
        UC.check_folder(loc, index, [k for k in ENCODER_PARTS if index.get(k) or (Path(loc) / k).is_dir()])
        if prior is None and (need_prior or any(index.get(k) for k in PRIOR_PARTS)):
            has = [k for k in PRIOR_PARTS if (index.get(k) and index[k][0]) or (Path(loc) / k).is_dir()]
            if has:   # a folder with (part of) a prior: every prior part must be sound
                UC.check_folder(loc, index, PRIOR_PARTS)
        if need_prior and prior is None and not all(index.get(k) and index[k][0] for k in PRIOR_PARTS):
            raise FileNotFoundError(
                f"{loc} has no diffusion prior (model_index.json lacks "
                f"{[k for k in PRIOR_PARTS if not (index.get(k) and index[k][0])]}). Pass "
                f"prior='kakaobrain/karlo-v1-alpha' (or a local folder with prior/ and prior_scheduler/), "
                f"or need_prior=False to load only the image-embedding decoder")
    loaders = _component_loaders()

    def load_all(local_only):
        parts = {}
        for k in DECODER_PARTS + ENCODER_PARTS:
            if index is not None and not (index.get(k) and index[k][0]):
                continue
            try:
                parts[k] = _load_part(loc, k, k, local_only, dtype, loaders)
            except (OSError, EnvironmentError) as err:
                if k in ENCODER_PARTS:
                    continue
                raise FileNotFoundError(f"could not load {k}/ of {loc}: {err}") from err
        src = loc if prior is None else resolve_unclip(prior)[0]
        if prior is None and index is not None and all(index.get(k) and index[k][0] for k in PRIOR_PARTS):
            for k in PRIOR_PARTS:
                parts[k] = _load_part(loc, k, k, local_only, dtype, loaders)
        elif prior is not None:
            names = {k: k for k in PRIOR_PARTS}
            if not (Path(src).exists() and (Path(src) / "prior_text_encoder").exists()):
                names.update(prior_text_encoder="text_encoder", prior_tokenizer="tokenizer")  # Karlo
            if Path(src).exists():
                for k in PRIOR_PARTS:
                    if not (k in ("prior_text_encoder", "prior_tokenizer") and prior_text_model):
                        UC.check_component(src, k, names[k])
            for k in PRIOR_PARTS:
                if k in ("prior_text_encoder", "prior_tokenizer") and prior_text_model is not None:
                    cls = loaders[k]
                    kw = dict(local_files_only=local_only)
                    if k == "prior_text_encoder":
                        kw["torch_dtype"] = dtype
                    parts[k] = cls.from_pretrained(prior_text_model, **kw)
                else:
                    parts[k] = _load_part(src, names[k], k, local_only, dtype, loaders)
        return parts

    try:
        parts = load_all(True)
    except (FileNotFoundError, V.BadInput):
        raise
    except Exception as err:
        if local:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise V.BadInput(f"could not load the Stable unCLIP folder {loc}: {first}") from err
        if not allow_download:
            raise FileNotFoundError(f"could not load the Stable unCLIP checkpoint {loc} offline: {err}. "
                                    f"Download it (huggingface-cli download {loc} --local-dir DIR) and "
                                    f"pass DIR") from err
        parts = load_all(False)
    m = UnCLIPModel(parts, name=loc, device=device, dtype=dtype)
    if need_prior:
        m._need_prior("load_unclip(need_prior=True)")
    return m


def save_unclip_folder(folder, components: dict, extra: dict | None = None) -> Path:
    """Write a folder that both ``StableUnCLIPPipeline.from_pretrained`` and
    ``StableUnCLIPImg2ImgPipeline.from_pretrained`` load: every component in its sub-folder and
    one ``model_index.json`` listing all of them (_class_name StableUnCLIPPipeline; the img2img
    pipeline ignores the prior entries, the text-to-image one the image-encoder entries)."""
    import diffusers
    from diffusers import StableUnCLIPPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t2i = StableUnCLIPPipeline(**{k: components[k] for k in PRIOR_PARTS + DECODER_PARTS})
    t2i.save_pretrained(folder, safe_serialization=True)
    components["image_encoder"].save_pretrained(folder / "image_encoder", safe_serialization=True)
    components["feature_extractor"].save_pretrained(folder / "feature_extractor")
    idx = json.loads((folder / "model_index.json").read_text())
    idx["image_encoder"] = ["transformers", type(components["image_encoder"]).__name__]
    idx["feature_extractor"] = ["transformers", type(components["feature_extractor"]).__name__]
    idx["_diffusers_version"] = diffusers.__version__
    (folder / "model_index.json").write_text(json.dumps(idx, indent=2, sort_keys=True) + "\n")
    # components loaded from a folder remember where ("_name_or_path"): a machine path that has
    # no place in a shipped checkpoint
    for cfg in folder.glob("*/config.json"):
        c = json.loads(cfg.read_text())
        if c.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    if extra:
        for name, obj in extra.items():
            (folder / name).write_text(json.dumps(obj, indent=1) + "\n")
    return folder
