"""Stable-Diffusion-format folders built from configs: tokenizer, tiny/toy architectures, saving.

The toy checkpoint and the tiny test models are ordinary diffusers/transformers modules saved with
``StableDiffusionPipeline.save_pretrained``, so they load through exactly the same code path as
SD 1.x / 2.x (``models.load_t2i``).  Nothing here downloads anything.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def build_tokenizer(words, folder=None, max_length: int = 32):
    """A CLIP BPE tokenizer whose vocabulary holds every word of ``words`` as one token.

    The merges are learned with the ``tokenizers`` BPE trainer (end-of-word suffix ``</w>``, the
    byte-level alphabet as base symbols), so the vocabulary/merges pair is self-consistent and any
    other text still tokenizes (unknown pieces map to ``<|endoftext|>`` like CLIP's unk).
    Saved as ``tokenizer.json`` plus ``vocab.json``/``merges.txt`` for older loaders.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words if w.strip()})
    if not words:
        raise ValueError("build_tokenizer: the word list is empty; pass the vocabulary of the captions")
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=SPECIALS[1]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=1, special_tokens=list(SPECIALS),
        end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    bpe.train_from_iterator([" ".join(words)] * 2, trainer)
    model = json.loads(bpe.to_str())["model"]
    # the trainer's ids depend on hash order (PYTHONHASHSEED): renumber deterministically
    # (specials first, then by token), so a rebuilt tokenizer is identical across processes
    toks = sorted(model["vocab"], key=lambda t: (t not in SPECIALS, SPECIALS.index(t) if t in SPECIALS else 0, t))
    vocab = {t: i for i, t in enumerate(toks)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"build_tokenizer: word {w!r} did not become a single token ({ids})")
    if folder is not None:
        folder = Path(folder)
        tok.save_pretrained(folder)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return tok


@dataclass
class TinySDConfig:
    """Architecture of a small SD-format model (the toy checkpoint's defaults).

    image_size 32 with a 3-level VAE (f = 4) gives 8x8x4 latents, as in the toy-world feasibility
    probe; the UNet has cross-attention at both of its levels so word attention maps exist at 8x8.
    """
    image_size: int = 32
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    projection_dim: int = 128
    max_length: int = 32
    vision_patch: int = 4
    vision_hidden: int = 128
    vision_layers: int = 3
    vae_channels: tuple = (32, 64, 64)
    vae_layers: int = 1
    vae_groups: int = 16
    latent_channels: int = 4
    unet_channels: tuple = (64, 128)
    unet_layers: int = 1
    unet_heads: int = 4
    unet_groups: int = 16
    train_timesteps: int = 1000

    @classmethod
    def tiny(cls):
        """Minute random-weight model for unit tests (16 px images, 8x8x4 latents)."""
        return cls(image_size=16, text_hidden=32, text_layers=2, text_heads=2, projection_dim=32,
                   max_length=16, vision_patch=4, vision_hidden=32, vision_layers=1,
                   vae_channels=(16, 16), vae_groups=8, unet_channels=(32, 32), unet_heads=2,
                   unet_groups=8)


def clip_config(cfg: TinySDConfig, tokenizer):
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden,
                intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_length,
                projection_dim=cfg.projection_dim, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=cfg.image_size, patch_size=cfg.vision_patch,
                  hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.text_heads,
                  projection_dim=cfg.projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def build_vae(cfg: TinySDConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=tuple(cfg.vae_channels), layers_per_block=cfg.vae_layers,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_groups,
                         sample_size=cfg.image_size)


def build_unet(cfg: TinySDConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    f = 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // f, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        layers_per_block=cfg.unet_layers, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads, norm_num_groups=cfg.unet_groups)


def build_scheduler(cfg: TinySDConfig | None = None, prediction_type: str = "epsilon",
                    zero_snr: bool = False):
    """SD's training schedule: DDPM, scaled_linear betas 0.00085..0.012, 1000 steps, eps-prediction.

    ``zero_snr``: the betas rescaled so that abar_T = 0 exactly and timesteps spaced "trailing"
    (sampling starts at t = T - 1), Lin et al. 2023, Algorithm 1 and Sec. 3.3 (diffusers'
    ``rescale_betas_zero_snr=True``, ``timestep_spacing="trailing"``); it needs
    ``prediction_type="v_prediction"`` (eps is not identifiable from z_T when abar_T = 0).
    Both land in ``scheduler_config.json``, so every sampler built ``from_config`` uses them."""
    from diffusers import DDPMScheduler

    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"build_scheduler: prediction_type must be epsilon, v_prediction or sample, "
                         f"got {prediction_type!r}")
    if zero_snr and prediction_type == "epsilon":
        raise ValueError("build_scheduler: zero_snr=True needs prediction_type='v_prediction' "
                         "(Lin et al. 2023, Sec. 3.2: eps-prediction is undefined at SNR 0)")
    extra = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if zero_snr else {}
    return DDPMScheduler(num_train_timesteps=(cfg or TinySDConfig()).train_timesteps,
                         beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type, clip_sample=False, steps_offset=1,
                         **extra)


def text_encoder_from_clip(clip_model):
    """SD's text encoder is a ``CLIPTextModel``: copy the text tower of a ``CLIPModel`` into one."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip_model.config.text_config)
    getattr(te, "text_model", te).load_state_dict(clip_model.text_model.state_dict())
    return te


def build_random_sd(cfg: TinySDConfig, words, seed: int = 0):
    """Random-weight components of an SD-format model (tokenizer, CLIP, VAE, UNet, scheduler)."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    tok = build_tokenizer(words, max_length=cfg.max_length)
    clip = CLIPModel(clip_config(cfg, tok))
    return dict(tokenizer=tok, clip=clip, text_encoder=text_encoder_from_clip(clip),
                vae=build_vae(cfg), unet=build_unet(cfg), scheduler=build_scheduler(cfg))


def save_sd_folder(folder, tokenizer, text_encoder, vae, unet, scheduler, clip=None,
                   cfg: TinySDConfig | None = None):
    """Write a folder that ``StableDiffusionPipeline.from_pretrained(folder)`` loads.

    The CLIP model (text + vision towers with projections), when given, goes to ``folder/clip``
    in transformers' CLIPModel format together with the tokenizer and an image-processor config,
    so ``models.load_clip(folder / "clip")`` finds it.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    if clip is not None:
        clip.save_pretrained(folder / "clip", safe_serialization=True)
        tokenizer.save_pretrained(folder / "clip")
        size = clip.config.vision_config.image_size
        (folder / "clip" / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
            "do_center_crop": True, "do_normalize": True, "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}, indent=1))
    if cfg is not None:
        (folder / "toy_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return folder


def read_toy_config(folder) -> TinySDConfig | None:
    """The :class:`TinySDConfig` a toy-format folder was built with (``toy_config.json``; unknown
    keys ignored, lists as tuples), or None for a folder without one (a real SD checkpoint)."""
    from dataclasses import fields

    f = Path(folder) / "toy_config.json"
    if not f.exists():
        return None
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); rebuild the folder or delete the file") from None
    names = {x.name for x in fields(TinySDConfig)}
    return TinySDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names})


def sd21_base_unet_config() -> dict:
    """UNet architecture of stabilityai/stable-diffusion-2-1-base (865M parameters), for benchmarks
    with random weights (no download)."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "CrossAttnUpBlock2D"),
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, norm_num_groups=32)
