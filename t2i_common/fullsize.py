"""Full-size reference folders with random weights, built from the published configurations.

No weights can be downloaded on every machine, but the real architectures can be built: a model
with random weights created from the published configuration loads through the same code
(``models.load_t2i`` / ``models.load_clip`` / ``unclip.load_unclip`` /
``attribution_baselines.self_supervised_features``) and exercises every shape, dtype, scheduler
and memory path the real one does.  Numbers computed with these folders are meaningless.

``python -m t2i_common.fullsize write NAME [--out DIR] [--dtype float16]`` writes one folder
(default ``~/.cache/t2i-repro/fullsize/NAME``, or ``$T2I_FULLSIZE/NAME``; never inside the
repository); ``list`` names them; ``path NAME`` prints where a folder goes.

Sources of the configurations (the values are written out below; the tests re-derive the UNet and
VAE fields from the original inference configs with diffusers' own conversion helpers and the text
and image towers from open_clip's shipped ``model_configs/*.json``):

* ``sd1.5`` - ``configs/stable-diffusion/v1-inference.yaml`` of CompVis/stable-diffusion (the
  inference config of SD 1.x, used unchanged for runwayml's SD 1.5); text encoder OpenAI CLIP
  ViT-L/14 (open_clip ``ViT-L-14.json``, quick_gelu), last layer.
* ``sd2.1-base`` - ``configs/stable-diffusion/v2-inference.yaml`` of Stability-AI/stablediffusion
  (epsilon, 512 px); text encoder OpenCLIP ViT-H/14 (``ViT-H-14.json``) cut at the penultimate
  layer (``FrozenOpenCLIPEmbedder(layer="penultimate")``: 23 of 24 blocks), pad token "!".
* ``sd2.1`` - ``configs/stable-diffusion/v2-inference-v.yaml`` (v-prediction, 768 px), same
  text encoder.
* ``sd2.1-unclip-small`` - ``configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml``:
  the decoder UNet with ``num_classes: sequential``, ``adm_in_channels: 1536`` (diffusers:
  ``class_embed_type="projection"``), noise augmentation ``CLIPEmbeddingNoiseAugmentation``
  (squaredcos_cap_v2, 1000 steps, ``timestep_dim`` 768 -> ``StableUnCLIPImageNormalizer(768)``),
  image encoder OpenAI CLIP ViT-L/14 vision tower with projection; an image-variation folder
  (no prior), as ``stabilityai/stable-diffusion-2-1-unclip-small``.
* ``karlo-prior`` - ``kakaobrain/karlo-v1-alpha``'s prior parts in its own layout: ``prior/``
  (``PriorTransformer``: 20 layers, 32 heads x 64, embedding 768, 77 tokens + 4 - the values of
  its ``prior/config.json``, which are also diffusers' defaults), ``prior_scheduler/``
  (``UnCLIPScheduler``, the published config printed in diffusers' examples/community/README.md:
  fixed_small_log, clip_sample, clip_sample_range 5.0, prediction_type sample, 1000 steps, no
  beta_schedule entry), ``text_encoder/`` (CLIP ViT-L/14 text tower with projection),
  ``tokenizer/``.
* ``clip-vit-b-32``, ``openclip-vit-h-14`` - the scorers, open_clip ``ViT-B-32`` / ``ViT-H-14``
  from the shipped model configs, written in open_clip's hub layout (``open_clip_config.json`` +
  ``open_clip_model.safetensors``), loaded by ``load_clip(folder)``.
* ``dino-vitb16`` - ``facebook/dino-vitb16``'s ``config.json`` (transformers ``ViTModel``: 12
  layers, 12 heads, width 768, patch 16, 224 px, qkv bias) and its ImageNet-normalising
  ``ViTImageProcessor``.

Tokenizers are real: the CLIP BPE vocabulary that open_clip ships (``bpe_simple_vocab_16e6.txt.gz``)
written as transformers ``vocab.json`` / ``merges.txt``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

NAMES = ("sd1.5", "sd2.1-base", "sd2.1", "sd2.1-unclip-small", "karlo-prior", "clip-vit-b-32",
         "openclip-vit-h-14", "dino-vitb16")
MARKER = "fullsize.json"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

# ------------------------------------------------------------------------------------------------
# the original inference configurations (the fields the conversion reads)
# ------------------------------------------------------------------------------------------------
_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                 ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
_UNET_V1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
                legacy=False)
_UNET_V2 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                transformer_depth=1, context_dim=1024, legacy=False)


def _ldm(unet, image_size, parameterization="eps", **extra):
    params = dict(linear_start=0.00085, linear_end=0.0120, timesteps=1000, image_size=image_size // 8,
                  channels=4, scale_factor=0.18215, parameterization=parameterization,
                  unet_config=dict(params=unet),
                  first_stage_config=dict(params=dict(embed_dim=4, ddconfig=_DDCONFIG)))
    params.update(extra)
    return {"model": {"params": params}}


#: name -> (original inference config, pixel resolution, source file)
LDM_CONFIGS = {
    "sd1.5": (_ldm(_UNET_V1, 512), 512, "CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml"),
    "sd2.1-base": (_ldm(_UNET_V2, 512), 512,
                   "Stability-AI/stablediffusion configs/stable-diffusion/v2-inference.yaml"),
    "sd2.1": (_ldm(_UNET_V2, 768, "v"), 768,
              "Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml"),
    "sd2.1-unclip-small": (
        _ldm(dict(_UNET_V2, num_classes="sequential", adm_in_channels=1536), 768, "v",
             noise_aug_config=dict(params=dict(timestep_dim=768, noise_schedule_config=dict(
                 timesteps=1000, beta_schedule="squaredcos_cap_v2")))),
        768, "Stability-AI/stablediffusion configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml"),
}

#: kakaobrain/karlo-v1-alpha prior_scheduler/scheduler_config.json as published
KARLO_PRIOR_SCHEDULER = {"_class_name": "UnCLIPScheduler", "clip_sample": True, "clip_sample_range": 5.0,
                         "num_train_timesteps": 1000, "prediction_type": "sample",
                         "variance_type": "fixed_small_log"}
#: kakaobrain/karlo-v1-alpha prior/config.json
KARLO_PRIOR = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                   num_embeddings=77, additional_embeddings=4, dropout=0.0)
#: facebook/dino-vitb16 config.json (architecture fields)
DINO_VITB16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   initializer_range=0.02, layer_norm_eps=1e-12, image_size=224, patch_size=16,
                   num_channels=3, qkv_bias=True)
#: open_clip architecture of the CLIP towers each model uses
TEXT_TOWER = {"sd1.5": ("ViT-L-14", "last"), "sd2.1-base": ("ViT-H-14", "penultimate"),
              "sd2.1": ("ViT-H-14", "penultimate"), "sd2.1-unclip-small": ("ViT-H-14", "penultimate"),
              "karlo-prior": ("ViT-L-14", "last")}
SCORERS = {"clip-vit-b-32": "ViT-B-32", "openclip-vit-h-14": "ViT-H-14"}
SOURCES = {**{k: v[2] for k, v in LDM_CONFIGS.items()},
           "karlo-prior": "kakaobrain/karlo-v1-alpha prior/config.json, prior_scheduler/scheduler_config.json",
           "clip-vit-b-32": "open_clip model_configs/ViT-B-32.json",
           "openclip-vit-h-14": "open_clip model_configs/ViT-H-14.json",
           "dino-vitb16": "facebook/dino-vitb16 config.json, preprocessor_config.json"}


def default_root() -> Path:
    env = os.environ.get("T2I_FULLSIZE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "t2i-repro" / "fullsize"


def folder(name: str, root=None) -> Path:
    _check_name(name)
    return Path(root).expanduser() / name if root else default_root() / name


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"unknown full-size model {name!r}; choose one of {', '.join(NAMES)}")


def open_clip_config(arch: str) -> dict:
    """open_clip's shipped ``model_configs/{arch}.json``."""
    import open_clip
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"open_clip ships no model config {arch!r}")
    return cfg


# ------------------------------------------------------------------------------------------------
# diffusers / transformers configurations
# ------------------------------------------------------------------------------------------------
def unet_config(name: str) -> dict:
    """UNet2DConditionModel config of ``name``, converted from its inference config by diffusers'
    ``create_unet_diffusers_config_from_ldm``."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    ldm, res, _ = LDM_CONFIGS[name]
    with warnings.catch_warnings():  # image_size: deprecated there, needed for the 768 px models
        warnings.simplefilter("ignore", FutureWarning)
        cfg = create_unet_diffusers_config_from_ldm(ldm, {}, image_size=res)
    return {k: v for k, v in cfg.items() if v is not None or k == "class_embed_type"}


def vae_config(name: str) -> dict:
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm
    ldm, res, _ = LDM_CONFIGS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return create_vae_diffusers_config_from_ldm(ldm, {}, image_size=res)


def scheduler_config(name: str) -> dict:
    """DDPMScheduler of the training schedule: LDM's "linear" schedule (linear in sqrt(beta)) is
    diffusers' scaled_linear; parameterization v -> v_prediction."""
    p = LDM_CONFIGS[name][0]["model"]["params"]
    return dict(num_train_timesteps=p["timesteps"], beta_start=p["linear_start"], beta_end=p["linear_end"],
                beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                prediction_type="v_prediction" if p["parameterization"] == "v" else "epsilon")


def text_config(name: str) -> dict:
    """CLIPTextConfig fields of the text tower of ``name`` from open_clip's model config."""
    arch, layer = TEXT_TOWER[name]
    oc = open_clip_config(arch)
    t = oc["text_cfg"]
    openai = arch in ("ViT-L-14", "ViT-B-32")  # OpenAI's towers use quick_gelu
    return dict(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
                num_hidden_layers=t["layers"] - (1 if layer == "penultimate" else 0),
                num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
                hidden_act="quick_gelu" if openai else "gelu", projection_dim=oc["embed_dim"],
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if openai else 0)


def vision_config(arch: str = "ViT-L-14") -> dict:
    oc = open_clip_config(arch)
    v = oc["vision_cfg"]
    return dict(hidden_size=v["width"], intermediate_size=4 * v["width"], num_hidden_layers=v["layers"],
                num_attention_heads=v["width"] // v.get("head_width", 64), image_size=v["image_size"],
                patch_size=v["patch_size"], projection_dim=oc["embed_dim"], hidden_act="quick_gelu")


def configs(name: str) -> dict:
    """Every component's configuration of ``name`` (plain dicts; nothing built)."""
    _check_name(name)
    if name in LDM_CONFIGS:
        out = dict(unet=unet_config(name), vae=vae_config(name), scheduler=scheduler_config(name),
                   text_encoder=text_config(name))
        if name == "sd2.1-unclip-small":
            aug = LDM_CONFIGS[name][0]["model"]["params"]["noise_aug_config"]["params"]
            out.update(image_encoder=vision_config("ViT-L-14"),
                       image_normalizer=dict(embedding_dim=aug["timestep_dim"]),
                       image_noising_scheduler=dict(
                           num_train_timesteps=aug["noise_schedule_config"]["timesteps"],
                           beta_schedule=aug["noise_schedule_config"]["beta_schedule"]))
        return out
    if name == "karlo-prior":
        return dict(prior=dict(KARLO_PRIOR), prior_scheduler=dict(KARLO_PRIOR_SCHEDULER),
                    text_encoder=text_config(name))
    if name in SCORERS:
        return dict(open_clip=open_clip_config(SCORERS[name]))
    return dict(vit=dict(DINO_VITB16))


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------
def clip_tokenizer(out_dir, pad_token: str = "<|endoftext|>"):
    """transformers ``CLIPTokenizer`` with OpenAI CLIP's BPE vocabulary (49408 tokens), written from
    the ``bpe_simple_vocab_16e6.txt.gz`` open_clip ships (as its ``SimpleTokenizer`` builds it)."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def _seeded(seed):
    torch.manual_seed(seed)


def _save(model, path, dtype):
    model.to(dtype).save_pretrained(path, safe_serialization=True)


def _strip_name_or_path(root: Path):
    for cfg in root.rglob("config.json"):
        c = json.loads(cfg.read_text())
        if c.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


def _write_sd(name, out: Path, dtype, seed):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = configs(name)
    tok = clip_tokenizer(out / "tokenizer", pad_token="!" if TEXT_TOWER[name][0] == "ViT-H-14" else "<|endoftext|>")
    tok.save_pretrained(out / "tokenizer")
    _seeded(seed)
    _save(CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), out / "text_encoder", dtype)
    _seeded(seed + 1)
    _save(AutoencoderKL(**cfg["vae"]), out / "vae", dtype)
    _seeded(seed + 2)
    unet = UNet2DConditionModel(**cfg["unet"])
    _save(unet, out / "unet", dtype)
    del unet
    DDPMScheduler(**cfg["scheduler"]).save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
             "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
             "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    if name == "sd2.1-unclip-small":
        _write_unclip_extras(cfg, out, dtype, seed, index)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_unclip_extras(cfg, out, dtype, seed, index):
    from diffusers import DDPMScheduler
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import \
        StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    _seeded(seed + 3)
    _save(CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"])), out / "image_encoder", dtype)
    size = cfg["image_encoder"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=OPENAI_MEAN, image_std=OPENAI_STD).save_pretrained(out / "feature_extractor")
    norm = StableUnCLIPImageNormalizer(**cfg["image_normalizer"])
    with torch.no_grad():  # plausible statistics instead of mean 0 / std 1
        g = torch.Generator().manual_seed(seed + 4)
        norm.mean.copy_(0.02 * torch.randn(norm.mean.shape, generator=g))
        norm.std.copy_(0.03 + 0.01 * torch.rand(norm.std.shape, generator=g))
    _save(norm, out / "image_normalizer", dtype)
    DDPMScheduler(**cfg["image_noising_scheduler"]).save_pretrained(out / "image_noising_scheduler")
    index.update({"_class_name": "StableUnCLIPImg2ImgPipeline",
                  "feature_extractor": ["transformers", "CLIPImageProcessor"],
                  "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                  "image_normalizer": ["stable_diffusion", "StableUnCLIPImageNormalizer"],
                  "image_noising_scheduler": ["diffusers", "DDPMScheduler"]})
    for k in ("safety_checker", "requires_safety_checker"):
        index.pop(k)


def _write_karlo(out: Path, dtype, seed):
    from diffusers import PriorTransformer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = configs("karlo-prior")
    clip_tokenizer(out / "tokenizer").save_pretrained(out / "tokenizer")
    _seeded(seed)
    _save(CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"])), out / "text_encoder", dtype)
    _seeded(seed + 1)
    prior = PriorTransformer(**cfg["prior"])
    _save(prior, out / "prior", dtype)
    del prior
    (out / "prior_scheduler").mkdir(parents=True, exist_ok=True)
    (out / "prior_scheduler" / "scheduler_config.json").write_text(json.dumps(KARLO_PRIOR_SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "UnCLIPPipeline", "_diffusers_version": _diffusers_version(),
        "prior": ["diffusers", "PriorTransformer"], "prior_scheduler": ["diffusers", "UnCLIPScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}, indent=2) + "\n")


def _write_open_clip(name, out: Path, dtype, seed):
    import open_clip
    from safetensors.torch import save_file

    arch = SCORERS[name]
    _seeded(seed)
    model = open_clip.create_model(arch, pretrained=None)
    pre = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": open_clip_config(arch),
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD, **{k: v for k, v in dict(pre).items()
                                                                      if k in ("interpolation", "resize_mode")}}},
        indent=2) + "\n")


def _write_dino(out: Path, dtype, seed):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    _seeded(seed)
    cfg = ViTConfig(**DINO_VITB16, architectures=["ViTModel"])
    _save(ViTModel(cfg, add_pooling_layer=False), out, dtype)
    ViTImageProcessor(do_resize=True, size={"height": 224, "width": 224}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)


def _diffusers_version():
    import diffusers
    return diffusers.__version__


def write(name: str, out=None, *, dtype=torch.float16, seed: int = 0, force: bool = False) -> Path:
    """Write the full-size folder ``name`` (random weights, seeded) and return its path.  A complete
    folder (its ``fullsize.json`` written last) is kept unless ``force``; an incomplete one is
    replaced."""
    _check_name(name)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    out = Path(out).expanduser() if out else folder(name)
    marker = out / MARKER
    if marker.exists() and not force:
        info = json.loads(marker.read_text())
        if info.get("name") == name and info.get("seed") == seed and info.get("dtype") == str(dtype):
            return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    with torch.no_grad():
        if name in LDM_CONFIGS:
            _write_sd(name, out, dtype, seed)
        elif name == "karlo-prior":
            _write_karlo(out, dtype, seed)
        elif name in SCORERS:
            _write_open_clip(name, out, dtype, seed)
        else:
            _write_dino(out, dtype, seed)
    _strip_name_or_path(out)
    marker.write_text(json.dumps({"name": name, "seed": seed, "dtype": str(dtype), "random_weights": True,
                                  "source": SOURCES[name], "seconds": round(time.time() - t0, 1),
                                  "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())},
                                 indent=1) + "\n")
    return out


def ensure(name: str, root=None, **kw) -> Path:
    """The folder of ``name`` under ``root`` (default :func:`default_root`), written if missing."""
    return write(name, folder(name, root), **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m t2i_common.fullsize", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write one (or 'all') full-size folder(s) with random weights")
    w.add_argument("name", choices=NAMES + ("all",))
    w.add_argument("--out", help="folder (one name) or root (all); default: " + str(default_root()))
    w.add_argument("--dtype", default="float16", choices=("float16", "float32", "bfloat16"),
                   help="dtype of the saved weights (loaders cast to the dtype they are asked for)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--force", action="store_true")
    sub.add_parser("list", help="names and their folders")
    p = sub.add_parser("path", help="print the folder of NAME")
    p.add_argument("name", choices=NAMES)
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for n in NAMES:
            f = folder(n)
            print(f"{n:20s} {f}  {'(written)' if (f / MARKER).exists() else ''}")
    elif a.cmd == "path":
        print(folder(a.name))
    else:
        names = NAMES if a.name == "all" else (a.name,)
        for n in names:
            out = (folder(n, a.out) if a.name == "all" else Path(a.out)) if a.out else folder(n)
            t0 = time.time()
            write(n, out, dtype=a.dtype, seed=a.seed, force=a.force)
            print(f"{n}: {out} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
