"""Model loading: Stable-Diffusion-format T2I checkpoints and CLIP embedders.

``load_t2i`` takes a hub id (SD 1.x / 2.x), a local folder, or an alias (``toy``, ``sd2.1-base``,
``sd1.5``) and returns a :class:`T2IModel` exposing what the methods need: prompt embeddings
(each distinct prompt encoded once), VAE encode/decode, eps prediction, the training schedule
(``alphas_cumprod``) and the maps between discrete timesteps and logSNR.  The toy checkpoint in
``data/toy-sd`` is loaded by exactly this code.

Nothing touches the network unless a hub id is asked for; a name that cannot be resolved offline
raises :class:`WeightsNotAvailable` saying how to point at a local folder.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import paths
from .imageio import to_pil

T2I_ALIASES = {
    "toy": str(paths.DEFAULT_T2I),
    "sd2.1-base": "stabilityai/stable-diffusion-2-1-base",
    "sd2.1": "stabilityai/stable-diffusion-2-1",
    "sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
CLIP_ALIASES = {
    "toy-clip": (str(paths.DEFAULT_CLIP), None),
    "clip-vit-b-32": ("ViT-B-32", "openai"),
    "openclip-vit-h-14": ("ViT-H-14", "laion2b_s32b_b79k"),
}


class WeightsNotAvailable(FileNotFoundError):
    """Raised when a model name cannot be resolved to weights on this machine."""


class ModelFolderError(ValueError):
    """A local model folder exists but one of its components is damaged or inconsistent."""


def as_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype or its name ("float32", "float16", "bfloat16"), as the
    notebooks' ``dtype`` parameter gives it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype must be float32, float16 or bfloat16 (or a torch dtype), got {dtype!r}")
    return dt


def _download_enabled(allow_download):
    if allow_download is not None:
        return bool(allow_download)
    from huggingface_hub import constants
    return not (constants.is_offline_mode()
                or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"))


def _offline_error(name, kind, err=None, reason="not available offline"):
    """The error for weights that are not on this machine, with the fix for their kind.

    kind: "t2i" (an SD hub id), "clip-hf" (a Hugging Face CLIP id) or "clip-open" (an open_clip
    ``ARCH/TAG``)."""
    why = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    if kind == "clip-open":
        arch, tag = name.split("/", 1)
        fix = (f"open_clip looks for them in the Hugging Face cache (HF_HOME, default "
               f"~/.cache/huggingface). Either fill that cache on a machine with internet "
               f"(`python -c \"import open_clip; open_clip.create_model_and_transforms('{arch}', "
               f"pretrained='{tag}')\"`) and copy it here, or pass a local open_clip checkpoint "
               f"file as the tag: load_clip('{arch}', pretrained='/path/to/{arch}.safetensors') "
               f"(notebook parameter clip: {arch}//path/to/{arch}.safetensors), or a local "
               f"transformers CLIPModel folder: load_clip('/path/to/clip-folder').")
    elif kind == "clip-hf":
        fix = (f"Download the folder on a machine with internet (`huggingface-cli download {name} "
               f"--local-dir /path/to/clip-folder`), copy it here and pass it: "
               f"load_clip('/path/to/clip-folder') (notebook parameter clip: /path/to/clip-folder).")
    else:
        fix = (f"Download the folder on a machine with internet (`huggingface-cli download {name} "
               f"--local-dir /path/to/sd-folder`), copy it here and pass it: "
               f"load_t2i('/path/to/sd-folder') (notebook parameter model: /path/to/sd-folder).")
    what = "Stable Diffusion" if kind == "t2i" else "CLIP"
    return WeightsNotAvailable(f"{what} weights for {name!r} are {reason}{why}. {fix}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (HF_ENDPOINT) answers a TCP connection within
    ``timeout`` seconds.  Name resolution runs in a thread, because a resolver without network
    can block for minutes; huggingface_hub would retry for 76-340 s before failing."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub in offline mode for the block (cache only, no request); open_clip's own
    "Failed to download" log lines of this cache-only attempt are dropped (the caller raises a
    clearer error if the weights are not cached)."""
    import logging

    from huggingface_hub import constants
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    drop = logging.Filter()
    drop.filter = lambda rec: "Failed to download" not in rec.getMessage()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old
        root.removeFilter(drop)


#: SD-format components: subfolder -> (class role, files it needs: each tuple is "one of")
SD_COMPONENTS = {
    "tokenizer": [("tokenizer.json", "vocab.json")],
    "text_encoder": [("config.json",), ("*.safetensors", "*.bin")],
    "vae": [("config.json",), ("*.safetensors", "*.bin")],
    "unet": [("config.json",), ("*.safetensors", "*.bin")],
    "scheduler": [("scheduler_config.json",)],
}


def check_sd_folder(root) -> None:
    """Raise FileNotFoundError naming every missing or empty component of an SD-format folder."""
    root = Path(root)
    problems = []
    for sub, needs in SD_COMPONENTS.items():
        d = root / sub
        if not d.is_dir():
            problems.append(f"{sub}/ is missing")
            continue
        if not any(d.iterdir()):
            problems.append(f"{sub}/ is empty")
            continue
        for alternatives in needs:
            if not any(any(d.glob(a)) for a in alternatives):
                problems.append(f"{sub}/ has no {' or '.join(alternatives)}")
    if (root / "tokenizer" / "vocab.json").exists() and not (root / "tokenizer" / "merges.txt").exists() \
            and not (root / "tokenizer" / "tokenizer.json").exists():
        problems.append("tokenizer/ has vocab.json but no merges.txt")
    if problems:
        raise FileNotFoundError(
            f"the SD-format folder {root} is incomplete: {'; '.join(problems)}. Copy the missing "
            f"component folder(s) from the original checkpoint (as written by "
            f"StableDiffusionPipeline.save_pretrained: tokenizer/, text_encoder/, vae/, unet/, "
            f"scheduler/, each with its config and weights).")


def _weights_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*") if p.suffix in (".safetensors", ".bin"))


def _component_error(root, sub, err) -> ModelFolderError:
    """A loading failure of one local component, naming the file when it is a weights or
    config file that cannot be read."""
    return _load_error(Path(root) / sub, f"component {sub}/ of {root}", err,
                       f"check {sub}/config.json and the weights beside it against the original "
                       f"checkpoint")


def _load_error(d: Path, what: str, err, fallback: str) -> ModelFolderError:
    text = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    bad_json = []
    for f in sorted(d.glob("*.json")):
        try:
            json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            bad_json.append(str(f))
    if bad_json:
        return ModelFolderError(f"{what}: {', '.join(bad_json)} is not valid "
                                f"JSON ({text}); restore the file from the original checkpoint")
    weights = _weights_files(d)
    broken = []
    for w in weights:
        if w.suffix == ".safetensors":
            try:
                from safetensors import safe_open
                with safe_open(str(w), "pt") as fh:
                    for k in fh.keys():
                        fh.get_slice(k)
            except Exception:
                broken.append(w)
    if not broken and any(k in text.lower() for k in ("safetensor", "deserializ", "unpickl",
                                                       "checkpoint file", "eof", "truncat")):
        broken = weights
    if broken:
        return ModelFolderError(f"{what}: the weights file "
                                f"{', '.join(str(w) for w in broken)} could not be read ({text}); it "
                                f"is damaged or incomplete (an interrupted copy or download): copy it "
                                f"again from the original checkpoint")
    return ModelFolderError(f"{what} could not be loaded ({text}); {fallback}")


def _check_consistent(root, tok, te, vae, unet) -> None:
    """Cross-component checks that would otherwise fail late inside torch."""
    te_len = int(te.config.max_position_embeddings)
    if tok.model_max_length > te_len:
        raise ModelFolderError(
            f"{root}: tokenizer/ pads prompts to model_max_length={tok.model_max_length} but "
            f"text_encoder/ has only {te_len} positions; set \"model_max_length\": {te_len} in "
            f"tokenizer/tokenizer_config.json (or use the tokenizer of this text encoder)")
    if len(tok) > int(te.config.vocab_size):
        raise ModelFolderError(
            f"{root}: tokenizer/ has {len(tok)} tokens but text_encoder/ embeds only "
            f"{te.config.vocab_size} (config.json vocab_size): they come from different "
            f"checkpoints; use the tokenizer saved with this text encoder")
    width = int(te.config.hidden_size)
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if int(cross) != width:
        raise ModelFolderError(
            f"{root}: unet/config.json cross_attention_dim={cross} but text_encoder/ produces "
            f"{width}-wide embeddings (hidden_size): the UNet and the text encoder come from "
            f"different checkpoints (SD 1.x: 768, SD 2.x: 1024)")
    if int(unet.config.in_channels) != int(vae.config.latent_channels):
        raise ModelFolderError(
            f"{root}: unet/config.json in_channels={unet.config.in_channels} but vae/ has "
            f"latent_channels={vae.config.latent_channels}; only text-to-image UNets whose input "
            f"is the VAE latent are supported (not inpainting/depth variants)")


def resolve_t2i(name_or_path) -> tuple[str, bool]:
    """Map an alias / path / hub id to (location, is_local). Unknown plain names are errors."""
    s = str(name_or_path)
    s = T2I_ALIASES.get(s, s)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "model_index.json").exists():
            raise FileNotFoundError(
                f"{p} is not a Stable-Diffusion-format folder: it has no model_index.json. "
                f"Point at the folder written by `StableDiffusionPipeline.save_pretrained` (it holds "
                f"model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
        return str(p), True
    if p == paths.DEFAULT_T2I:
        raise WeightsNotAvailable(f"the toy checkpoint {p} is missing; restore data/toy-sd from git "
                                  f"(`git checkout -- data/toy-sd`) or rebuild it with notebook "
                                  f"01_toy_world (retrain=True)")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")) and not s.endswith("/"):
        return s, False  # a hub id
    if s.startswith((".", "/", "~")) or os.sep in s:
        raise FileNotFoundError(f"model folder {p} does not exist; check the path (relative paths "
                                f"are relative to the current folder; notebooks run in notebooks/)")
    raise WeightsNotAvailable(
        f"unknown model {name_or_path!r}: not a local folder, not a hub id (owner/name), not an "
        f"alias ({', '.join(sorted(T2I_ALIASES))}). Pass the path of a local Stable-Diffusion-format "
        f"folder (with model_index.json).")


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(scheduler_config, name="model") -> str:
    """The scheduler's ``prediction_type`` (diffusers' default ``epsilon`` when absent); anything
    else is an error naming the model, raised at load time."""
    p = getattr(scheduler_config, "prediction_type", None) or "epsilon"
    if p not in PREDICTION_TYPES:
        raise ValueError(f"{name}: scheduler prediction_type {p!r} is not one of {PREDICTION_TYPES}; "
                         f"fix scheduler/scheduler_config.json")
    return p


def eps_from_output(out: torch.Tensor, z_t: torch.Tensor, alphas_cumprod: torch.Tensor, t,
                    prediction_type: str) -> torch.Tensor:
    """eps implied by a UNet output in ``prediction_type`` at noised latents z_t = a z0 + s eps
    (a = sqrt(abar_t), s = sqrt(1 - abar_t)).

    v = a eps - s z0 gives eps = a v + s z_t; a predicted z0 gives eps = (z_t - a z0) / s.  At a
    zero-terminal-SNR step (abar = 0) the v form stays exact (eps = z_t).  ``t``: scalar or [B]."""
    if prediction_type == "epsilon":
        return out
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()[
        torch.as_tensor(t, dtype=torch.long).cpu()].reshape(-1)
    ab = ab.expand(out.shape[0]) if ab.numel() == 1 else ab
    a = ab.sqrt().to(out.device, out.dtype).view(-1, *([1] * (out.ndim - 1)))
    s = (1 - ab).sqrt().to(out.device, out.dtype).view(-1, *([1] * (out.ndim - 1)))
    if prediction_type == "v_prediction":
        return a * out + s * z_t
    if prediction_type == "sample":
        return (z_t - a * out) / s
    raise ValueError(f"eps_from_output: prediction_type {prediction_type!r} not in {PREDICTION_TYPES}")


class T2IModel:
    """A loaded SD-format text-to-image model (components + schedule), no hidden global state.

    Attributes: tokenizer, text_encoder, vae, unet, scheduler, device, dtype, name, resolution
    (image side in pixels), latent_shape (C, h, w), alphas_cumprod (float64, CPU), logsnr_table
    (logit(alphas_cumprod), float64).
    """

    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, *, name="model",
                 device="cpu", dtype=torch.float32):
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.scheduler, self.name = scheduler, str(name)
        self.device, self.dtype = torch.device(device), dtype
        for m in (text_encoder, vae, unet):
            m.to(self.device)
            if m.dtype != dtype:
                m.to(dtype=dtype)
            m.eval().requires_grad_(False)
        try:
            from diffusers.models.attention_processor import AttnProcessor2_0
            unet.set_attn_processor(AttnProcessor2_0())  # SDPA attention
        except Exception:  # pragma: no cover - older diffusers without SDPA processor
            pass
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.resolution = int(unet.config.sample_size) * self.vae_scale_factor
        self.latent_shape = (int(unet.config.in_channels), int(unet.config.sample_size),
                             int(unet.config.sample_size))
        ac = scheduler.alphas_cumprod
        self.alphas_cumprod = torch.as_tensor(ac, dtype=torch.float64).cpu()
        self.logsnr_table = torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.prediction_type = check_prediction_type(scheduler.config, self.name)
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # ---- schedule -----------------------------------------------------------------------------
    def t_to_logsnr(self, t) -> torch.Tensor:
        """logSNR(t) = log(abar_t / (1 - abar_t)) of the discrete training schedule (float64)."""
        return self.logsnr_table[torch.as_tensor(t, dtype=torch.long).cpu()]

    def logsnr_to_t(self, a) -> torch.Tensor:
        """Nearest discrete timestep: argmin_t |a - logSNR(t)|; values outside the trained range
        clamp to the first/last timestep (SD 2.1: logSNR in about [-5.36, 7.07])."""
        a = torch.as_tensor(a, dtype=torch.float64).cpu()
        table = self.logsnr_table  # decreasing in t
        return (a.reshape(-1, 1) - table.reshape(1, -1)).abs().argmin(dim=1).reshape(a.shape)

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """Finite ends of the trained logSNR range: a zero-terminal-SNR schedule (abar_T = 0,
        logSNR -inf at t = T - 1) ends at its last step with abar > 0."""
        fin = self.logsnr_table[torch.isfinite(self.logsnr_table)]
        return float(fin.min()), float(fin.max())

    # ---- text ---------------------------------------------------------------------------------
    def tokenize(self, prompts):
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length, return_tensors="pt")

    @torch.inference_mode()
    def encode_prompts(self, prompts, batch_size: int = 256) -> torch.Tensor:
        """Text-encoder hidden states [N, L, D] for ``prompts``; each distinct prompt (the empty
        prompt included) is encoded once per model and cached."""
        prompts = [str(p) for p in prompts]
        pending = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        for i in range(0, len(pending), batch_size):
            chunk = pending[i:i + batch_size]
            ids = self.tokenize(chunk).input_ids.to(self.device)
            hid = self.text_encoder(ids)[0]
            for p, h in zip(chunk, hid):
                self._prompt_cache[p] = h
        if not prompts:
            raise ValueError("encode_prompts: no prompts given")
        return torch.stack([self._prompt_cache[p] for p in prompts])

    # ---- images -------------------------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """PIL images / uint8 arrays / paths -> [B, 3, R, R] in [-1, 1] (bicubic resize to the model
        resolution, aspect not kept, as in DiffusionITM's preprocessing)."""
        out = []
        for im in images:
            pil = to_pil(im).convert("RGB")
            if pil.size != (self.resolution, self.resolution):
                from PIL import Image
                pil = pil.resize((self.resolution, self.resolution), Image.BICUBIC)
            arr = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
            out.append(torch.from_numpy(arr).permute(2, 0, 1))
        if not out:
            raise ValueError("preprocess: no images given")
        return torch.stack(out)

    @torch.inference_mode()
    def encode_images(self, x: torch.Tensor, mode: str = "mean", generator=None,
                      batch_size: int = 64) -> torch.Tensor:
        """VAE latents (times the scaling factor) of images in [-1, 1].

        mode="mean" uses the posterior mean (deterministic, this package's default);
        mode="sample" draws from the posterior with ``generator`` (parity with the originals).
        """
        if mode not in ("mean", "sample"):
            raise ValueError(f"encode_images: mode must be 'mean' or 'sample', got {mode!r}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode_images: expected images [B, 3, H, W], got {tuple(x.shape)}")
        outs = []
        for i in range(0, len(x), batch_size):
            post = self.vae.encode(x[i:i + batch_size].to(self.device, self.dtype)).latent_dist
            if mode == "mean":
                z = post.mean
            else:
                noise = torch.randn(post.mean.shape, generator=generator, dtype=torch.float32)
                z = post.mean + post.std * noise.to(post.mean.device, post.mean.dtype)
            outs.append(z * self.scaling_factor)
        return torch.cat(outs)

    @torch.inference_mode()
    def decode_latents(self, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [-1, 1] from latents (undoing the scaling factor)."""
        outs = [self.vae.decode(z[i:i + batch_size].to(self.device, self.dtype)
                                / self.scaling_factor).sample for i in range(0, len(z), batch_size)]
        return torch.cat(outs).clamp(-1, 1)

    # ---- denoiser -----------------------------------------------------------------------------
    def model_output(self, z_t: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output for a batch, in the checkpoint's own parameterization
        (``prediction_type``: eps for SD 1.x / 2.x-base, v for SD 2.x at 768 px)."""
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        return self.unet(z_t.to(self.device, self.dtype), t,
                         encoder_hidden_states=emb.to(self.device, self.dtype)).sample

    def eps(self, z_t: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        """eps_theta(z_t, t, c) for a batch (t a scalar or [B] tensor; emb [B, L, D]), whatever the
        checkpoint predicts: a v-prediction output is converted (:func:`eps_from_output`), so every
        denoising-error score is an eps error on SD 2.x-v as on SD 2.x-base."""
        out = self.model_output(z_t, t, emb)
        if self.prediction_type == "epsilon":
            return out
        return eps_from_output(out, z_t.to(out.device, out.dtype), self.alphas_cumprod, t,
                               self.prediction_type)

    @torch.inference_mode()
    def generate(self, prompts, num_steps: int = 50, guidance_scale: float = 3.0, seed: int = 0,
                 batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Sample images with DDIM and classifier-free guidance (null = empty prompt).

        Returns uint8 [B, R, R, 3].  Noise for prompt i comes from a CPU generator seeded with
        (seed, i), so a prompt's sample does not depend on the batch it is in.
        """
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        sched = DDIMScheduler.from_config(self.scheduler.config, clip_sample=False,
                                          set_alpha_to_one=False)
        sched.set_timesteps(num_steps)
        prompts = list(prompts)
        out = []
        null = self.encode_prompts([""])
        for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate"):
            chunk = prompts[i:i + batch_size]
            z = torch.stack([torch.randn(self.latent_shape,
                                         generator=torch.Generator().manual_seed(seed * 100003 + i + j))
                             for j in range(len(chunk))]).to(self.device, self.dtype)
            cond = self.encode_prompts(chunk)
            emb = torch.cat([null.expand(len(chunk), -1, -1), cond])
            for t in sched.timesteps:   # guidance on the raw output: the same as on eps (affine map)
                e = self.model_output(torch.cat([z, z]), t, emb)
                e_null, e_cond = e.chunk(2)
                e = e_null + guidance_scale * (e_cond - e_null)
                z = sched.step(e, t, z).prev_sample
            img = self.decode_latents(z)
            out.append(((img.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte()
                       .permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)


def load_t2i(name_or_path=None, device="cpu", dtype=torch.float32,
             allow_download: bool | None = None) -> T2IModel:
    """Load a Stable-Diffusion-format checkpoint (local folder, hub id or alias; default: the toy).

    Components are loaded one by one (tokenizer, text_encoder, vae, unet, scheduler), so SD 1.x/2.x
    and the toy checkpoint take the same path.  fp32 is the default; pass torch.float16/bfloat16
    to opt in to half precision.  For a hub id the local HF cache is tried first; a download is
    attempted only if ``allow_download`` (default: unless HF_HUB_OFFLINE is set).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = as_dtype(dtype)
    loc, local = resolve_t2i(name_or_path or paths.DEFAULT_T2I)
    allow_download = _download_enabled(allow_download)
    loaders = [("tokenizer", lambda kw: CLIPTokenizer.from_pretrained(loc, subfolder="tokenizer", **kw)),
               ("text_encoder", lambda kw: CLIPTextModel.from_pretrained(
                   loc, subfolder="text_encoder", torch_dtype=dtype, **kw)),
               ("vae", lambda kw: AutoencoderKL.from_pretrained(loc, subfolder="vae",
                                                                torch_dtype=dtype, **kw)),
               ("unet", lambda kw: UNet2DConditionModel.from_pretrained(
                   loc, subfolder="unet", torch_dtype=dtype, **kw)),
               ("scheduler", lambda kw: DDPMScheduler.from_pretrained(loc, subfolder="scheduler", **kw))]

    if local:
        check_sd_folder(loc)
        parts = []
        for sub, fn in loaders:
            try:
                parts.append(fn(dict(local_files_only=True)))
            except Exception as err:
                raise _component_error(loc, sub, err) from err
    else:
        def _load(local_only):
            return [fn(dict(local_files_only=local_only)) for _, fn in loaders]
        try:
            with _hub_offline():
                parts = _load(True)  # the local HF cache
        except Exception as err:
            if not allow_download:
                raise _offline_error(loc, "t2i", err) from err
            if not hub_reachable():
                raise _offline_error(loc, "t2i", reason="neither in the local Hugging Face cache nor "
                                     "downloadable: the hub cannot be reached from this machine") from err
            try:
                parts = _load(False)
            except Exception as err2:
                raise _offline_error(loc, "t2i", err2, reason="not downloadable") from err2
    _check_consistent(loc, *parts[:4])
    return T2IModel(*parts, name=loc, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------
class CLIPEmbedder:
    """Batched, L2-normalised CLIP image and text embeddings behind one interface.

    ``backend`` is "open_clip" or "hf"; ``preprocess`` maps a PIL image to a [3, S, S] tensor;
    ``tokenize`` maps a list of strings to model inputs (truncated to the context length, 77 for
    OpenAI CLIP).
    """

    def __init__(self, model, preprocess, tokenize, backend, name, device="cpu",
                 dtype=torch.float32):
        self.model, self.preprocess, self.tokenize = model, preprocess, tokenize
        self.backend, self.name, self.device, self.dtype = backend, name, torch.device(device), dtype
        self.model.to(self.device, dtype=dtype).eval().requires_grad_(False)

    @torch.inference_mode()
    def encode_images(self, images, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm

        images = list(images)
        if not images:
            raise ValueError("encode_images: no images given")
        outs = []
        for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="CLIP images"):
            x = torch.stack([self.preprocess(to_pil(im).convert("RGB"))
                             for im in images[i:i + batch_size]]).to(self.device, self.dtype)
            if self.backend == "open_clip":
                f = self.model.encode_image(x)
            else:
                f = self.model.get_image_features(pixel_values=x)
                f = getattr(f, "pooler_output", f)
            outs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
        return torch.cat(outs)

    @torch.inference_mode()
    def encode_texts(self, texts, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm
        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("encode_texts: no texts given")
        outs = []
        for i in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="CLIP texts"):
            tok = self.tokenize(texts[i:i + batch_size])
            if self.backend == "open_clip":
                f = self.model.encode_text(tok.to(self.device))
            else:
                f = self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()})
                f = getattr(f, "pooler_output", f)
            outs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
        return torch.cat(outs)


def _hf_clip(loc, device, dtype, local_only):
    from transformers import CLIPModel, CLIPTokenizer
    from torchvision import transforms as T

    model = CLIPModel.from_pretrained(loc, torch_dtype=dtype, local_files_only=local_only)
    tok = CLIPTokenizer.from_pretrained(loc, local_files_only=local_only)
    size = model.config.vision_config.image_size
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    cfg = Path(loc) / "preprocessor_config.json"
    if cfg.exists():
        import json
        c = json.loads(cfg.read_text())
        mean, std = c.get("image_mean", mean), c.get("image_std", std)
    pre = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                     T.ToTensor(), T.Normalize(mean, std)])
    maxlen = min(tok.model_max_length, model.config.text_config.max_position_embeddings)

    def tokenize(texts):
        return tok(texts, padding="max_length", truncation=True, max_length=maxlen,
                   return_tensors="pt")
    return CLIPEmbedder(model, pre, tokenize, "hf", str(loc), device, dtype)


def load_clip(name=None, pretrained: str | None = None, device="cpu", dtype=torch.float32,
              allow_download: bool | None = None) -> CLIPEmbedder:
    """Load CLIP: an open_clip architecture with a pretrained tag (``ViT-B-32``/``openai``,
    ``ViT-H-14``/``laion2b_s32b_b79k``, or a local checkpoint file as tag; also written as one
    string ``ARCH/TAG``), a Hugging Face CLIP id, a local folder in transformers' CLIPModel format
    (the toy CLIP), or an alias (toy-clip, clip-vit-b-32, openclip-vit-h-14).  Default: the toy
    CLIP.  Hub weights come from the local cache first; a download is tried only if
    ``allow_download`` (default: unless HF_HUB_OFFLINE is set) and the hub answers."""
    name = str(name or paths.DEFAULT_CLIP)
    dtype = as_dtype(dtype)
    if name in CLIP_ALIASES and pretrained is None:
        name, pretrained = CLIP_ALIASES[name]
    allow_download = _download_enabled(allow_download)
    p = Path(name).expanduser()
    if p.exists():
        if p.is_file():
            raise FileNotFoundError(
                f"{p} is a file; an open_clip checkpoint file is the pretrained tag of its "
                f"architecture: load_clip('ViT-B-32', pretrained='{p}') (or clip: ViT-B-32/{p}); "
                f"a transformers CLIP is given as its folder")
        if (p / "open_clip_config.json").exists():
            return _open_clip_dir(p, device, dtype)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is not a CLIP model folder: it has no config.json. Pass a "
                                    f"folder written by transformers' CLIPModel.save_pretrained or an "
                                    f"open_clip name with a pretrained tag.")
        try:
            return _hf_clip(str(p), device, dtype, True)
        except Exception as err:
            raise _load_error(p, f"CLIP folder {p}", err,
                              "check config.json, the tokenizer files and the weights against the "
                              "original folder") from err
    import open_clip
    arch, tag = name, pretrained
    if tag is None and "/" in name and name.split("/", 1)[0] in open_clip.list_models():
        arch, tag = name.split("/", 1)
    if arch in open_clip.list_models():
        return _open_clip(open_clip, arch, tag, device, dtype, allow_download)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            with _hub_offline():
                return _hf_clip(name, device, dtype, True)
        except Exception as err:
            if not allow_download:
                raise _offline_error(name, "clip-hf", err) from err
            if not hub_reachable():
                raise _offline_error(name, "clip-hf", reason="neither in the local Hugging Face "
                                     "cache nor downloadable: the hub cannot be reached from this "
                                     "machine") from err
            try:
                return _hf_clip(name, device, dtype, False)
            except Exception as err2:
                raise _offline_error(name, "clip-hf", err2, reason="not downloadable") from err2
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"CLIP folder {p} does not exist; check the path")
    raise WeightsNotAvailable(
        f"unknown CLIP model {name!r}: not a local folder, not an open_clip architecture, not a hub "
        f"id, not an alias ({', '.join(sorted(CLIP_ALIASES))}). Pass a local CLIPModel folder, or "
        f"an open_clip name with its tag such as ViT-B-32/openai.")


def _open_clip_dir(p: Path, device, dtype) -> CLIPEmbedder:
    """A folder in open_clip's hub layout (``open_clip_config.json`` + weights, as the laion/*
    repositories and ``t2i_common.fullsize`` write it)."""
    import open_clip
    try:
        model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{p}")
        tok = open_clip.get_tokenizer(f"local-dir:{p}")
    except Exception as err:
        raise _load_error(p, f"open_clip folder {p}", err,
                          "check open_clip_config.json and the weights file against the original "
                          "folder") from err
    return CLIPEmbedder(model, pre, tok, "open_clip", str(p), device, dtype)


def _open_clip(open_clip, arch, tag, device, dtype, allow_download) -> CLIPEmbedder:
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is None:
        raise ValueError(f"load_clip: open_clip model {arch!r} needs a pretrained tag, one of "
                         f"{tags} or a checkpoint path (e.g. load_clip('{arch}', pretrained="
                         f"'{tags[0] if tags else 'openai'}') or clip: {arch}/{tags[0] if tags else 'openai'})")
    label = f"{arch}/{tag}"
    ckpt = Path(str(tag)).expanduser()
    if ckpt.is_file():
        try:
            model, _, pre = open_clip.create_model_and_transforms(arch, pretrained=str(ckpt))
        except Exception as err:
            raise ModelFolderError(
                f"open_clip checkpoint {ckpt} could not be loaded as {arch} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''}); check that the file is "
                f"complete and holds the weights of {arch} (not another architecture)") from err
    elif str(tag) not in tags:
        if str(tag).startswith((".", "/", "~")) or os.sep in str(tag):
            raise FileNotFoundError(f"open_clip checkpoint file {ckpt} (pretrained tag of {arch}) "
                                    f"does not exist; check the path")
        raise ValueError(f"load_clip: {tag!r} is not a pretrained tag of open_clip's {arch}; "
                         f"choose one of {tags} or give a checkpoint file path")
    else:
        def create():
            return open_clip.create_model_and_transforms(arch, pretrained=tag)
        try:
            with _hub_offline():
                model, _, pre = create()  # the local cache
        except Exception as err:
            if not allow_download:
                raise _offline_error(label, "clip-open", err) from err
            if not hub_reachable():
                raise _offline_error(label, "clip-open", reason="neither in the local cache nor "
                                     "downloadable: the hub cannot be reached from this machine") from err
            try:
                model, _, pre = create()
            except Exception as err2:
                raise _offline_error(label, "clip-open", err2, reason="not downloadable") from err2
    return CLIPEmbedder(model, pre, open_clip.get_tokenizer(arch), "open_clip", label, device, dtype)
