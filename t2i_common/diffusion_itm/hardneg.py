"""HardNeg-DiffusionITM: LoRA fine-tuning of the UNet with hard negatives (Krojer et al. 2023, Sec. 4).

The original ``hard_neg_finetuning.py`` (diffusers' text-to-image LoRA script with extra negatives):

- LoRA of rank 4 on the UNet attention projections q, k, v, out (self- and cross-attention; the
  original ``LoRACrossAttnProcessor``: down ~ N(0, 1/r^2), up = 0, scale 1); VAE and text encoder
  frozen.  Here via peft (``LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian")``).
- per step: t ~ U{0..T-1}, eps ~ N(0, I),  L_pos = MSE(eps_theta(z_t, t, c_pos), eps);
  ``--mixed_neg``: ONE draw per step for the whole batch: with p = 0.5 a hard-negative image (its
  latent noised with the same eps and t, conditioned on the positive text), with p = 0.25 a
  hard-negative caption, with p = 0.25 a random caption;  L_neg = MSE(eps_theta(neg), eps);
      L = L_pos - min(L_neg, lambda * stopgrad(L_pos)),  lambda = ``--neg_loss_factor`` = 1.
- AdamW lr 1e-4, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, constant schedule, gradient
  clipping at 1.0, seed 0; periodic validation accuracy with S = 4 timesteps.

Deliberate differences: every random draw of step s comes from a CPU generator seeded with
(seed, s), so a resumed run continues exactly (the original relies on accelerate's RNG state);
the batch is drawn with replacement across steps instead of epoch-wise shuffling; the LoRA weights
are saved as safetensors with a small json config.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import formats, toyworld as tw
from ..cache import fingerprint
from ..distributed import LOCAL, make_accelerator
from ..formats import ImageRef, MatchItem, to_pil
from .metrics import retrieval_metrics
from .scoring import diffitm_scores

#: the attention projections the original's LoRACrossAttnProcessor adapts
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "hardneg"


# ------------------------------------------------------------------------------------------------
# LoRA adapters: add / save / load
# ------------------------------------------------------------------------------------------------
def has_lora(model) -> bool:
    return ADAPTER in (getattr(model.unet, "peft_config", None) or {})


def add_lora(model, rank: int = 4, seed: int = 0):
    """Add a rank-``rank`` LoRA adapter to every attention q/k/v/out projection of ``model.unet``
    (self- and cross-attention); only the adapter's weights require gradients.  A (down) is drawn
    from N(0, 1/rank^2) with a generator seeded by ``seed``; B (up) starts at 0, so the adapted
    model equals the base model until the first update."""
    from peft import LoraConfig

    if has_lora(model):
        raise ValueError("add_lora: the UNet already has a HardNeg LoRA adapter; load_lora replaces its weights")
    cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                     target_modules=list(LORA_TARGETS))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model.unet.add_adapter(cfg, adapter_name=ADAPTER)
    finally:
        torch.random.set_rng_state(state)
    model.unet.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model.unet.to(model.device)
    return model


def lora_parameters(model) -> list:
    return [p for n, p in model.unet.named_parameters() if "lora_" in n]


def lora_state_dict(model) -> dict:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in
            get_peft_model_state_dict(model.unet, adapter_name=ADAPTER).items()}


def save_lora(model, path) -> Path:
    """Write the adapter to ``path`` (a folder): ``lora.safetensors`` + ``lora_config.json``."""
    from safetensors.torch import save_file

    if not has_lora(model):
        raise ValueError("save_lora: the UNet has no HardNeg LoRA adapter (call add_lora first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.unet.peft_config[ADAPTER]
    save_file(lora_state_dict(model), str(path / "lora.safetensors"))
    (path / "lora_config.json").write_text(json.dumps(
        {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "targets": list(LORA_TARGETS)}, indent=1))
    return path


def load_lora(model, path):
    """Load an adapter written by :func:`save_lora` into ``model`` (adding the adapter if needed)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    f, c = path / "lora.safetensors", path / "lora_config.json"
    if not f.exists() or not c.exists():
        raise FileNotFoundError(f"load_lora: {path} must hold lora.safetensors and lora_config.json "
                                f"(written by t2i_common.diffusion_itm.hardneg.save_lora)")
    cfg = json.loads(c.read_text())
    if not has_lora(model):
        add_lora(model, rank=int(cfg["rank"]))
    elif int(model.unet.peft_config[ADAPTER].r) != int(cfg["rank"]):
        raise ValueError(f"load_lora: {c} has rank {cfg['rank']} but the model's adapter has rank "
                         f"{model.unet.peft_config[ADAPTER].r}")
    sd = load_file(str(f))
    res = set_peft_model_state_dict(model.unet, sd, adapter_name=ADAPTER)
    unexpected = getattr(res, "unexpected_keys", []) or []
    if unexpected:
        raise ValueError(f"load_lora: {f} has keys the UNet does not know, e.g. {unexpected[:3]}; "
                         f"was it saved from a different architecture?")
    model.unet.to(model.device)
    return model


# ------------------------------------------------------------------------------------------------
# data: positives with hard negatives (the NegCLIP tsv)
# ------------------------------------------------------------------------------------------------
@dataclass
class HardNegData:
    """Training rows: image (PIL / array / path), caption, hard-negative captions, and row indices of
    hard-negative images (NegCLIP's ``title, filepath, neg_caption, neg_image``)."""

    images: list
    captions: list
    neg_captions: list
    neg_images: list

    def __post_init__(self):
        n = len(self.images)
        if n < 2 or not (len(self.captions) == len(self.neg_captions) == len(self.neg_images) == n):
            raise ValueError(f"HardNegData: need >= 2 rows and equal lengths, got {n} images, "
                             f"{len(self.captions)} captions, {len(self.neg_captions)} neg caption lists, "
                             f"{len(self.neg_images)} neg image lists")
        for i in range(n):
            if not self.neg_captions[i] or not self.neg_images[i]:
                raise ValueError(f"HardNegData: row {i} has no hard-negative caption or image; "
                                 f"every row needs at least one of each for mixed negatives")
            if any(not 0 <= j < n or j == i for j in self.neg_images[i]):
                raise ValueError(f"HardNegData: row {i} neg_images {self.neg_images[i]} must be other "
                                 f"row indices in 0..{n - 1}")

    def __len__(self):
        return len(self.images)


def hardneg_data_from_negclip(rows, root=None) -> HardNegData:
    """Rows of :func:`t2i_common.formats.read_negclip_tsv`; image paths relative to ``root``."""
    root = Path(root) if root is not None else None

    def ref(p):
        p = Path(p)
        return ImageRef(p if p.is_absolute() or root is None else root / p, source="NegCLIP tsv")

    return HardNegData([ref(r.filepath) for r in rows], [r.title for r in rows],
                       [list(r.neg_captions) for r in rows], [list(r.neg_images) for r in rows])


def export_toy_negclip(root, n: int, seed: int = 0, families=("colour", "relation")) -> Path:
    """Toy hard negatives in the NegCLIP tsv format: ``n`` Winoground-style pairs of
    :func:`t2i_common.toyworld.winoground_quadruples` (colours swapped, or the two objects trading
    places), two rows each: the row's hard-negative caption is its partner's caption and its
    hard-negative image the partner row.  Same layout as ``toyexport.export_negclip``, which writes
    the colour family only; the relation family is the one the toy model does not already solve."""
    root = Path(root)
    rows = []
    for k, (i0, i1, c0, c1) in enumerate(tw.winoground_quadruples(n, seed + 80, families=families)):
        for j, (img, cap, neg) in enumerate(((i0, c0, c1), (i1, c1, c0))):
            rel = f"images/negclip_{k:05d}_{j}.png"
            formats.save_image(img, root / rel)
            rows.append({"title": cap, "filepath": rel, "neg_captions": [neg],
                         "neg_images": [2 * k + 1 - j]})
    return formats.write_negclip_tsv(rows, root / "negclip_toy.tsv")


def negclip_val_items(data: HardNegData) -> list:
    """Validation MatchItems from held-out rows, the original's two validation sets: text
    (image vs [positive, first hard-negative caption]) and image ([image, first hard-negative
    image] vs the positive caption); gold 0."""
    text = [MatchItem([data.images[i]], [data.captions[i], data.neg_captions[i][0]], 0, 0,
                      {"val": "text", "row": i}) for i in range(len(data))]
    image = [MatchItem([data.images[i], data.images[data.neg_images[i][0]]], [data.captions[i]], 0, 0,
                       {"val": "image", "row": i}) for i in range(len(data))]
    return text + image


# ------------------------------------------------------------------------------------------------
# the loss and one step
# ------------------------------------------------------------------------------------------------
@dataclass
class HardNegConfig:
    """Original defaults (``hard_neg_finetuning.py --mixed_neg``), except where the notebook's CPU
    budget overrides them."""

    rank: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 4
    steps: int = 1000            # optimizer steps
    neg_loss_factor: float = 1.0  # lambda
    p_neg_image: float = 0.5
    p_hard_caption: float = 0.25  # the rest (0.25): a random caption
    val_every: int = 100
    val_S: int = 4
    seed: int = 0
    ckpt_every: int = 100
    latent_mode: str = "sample"   # the original samples the VAE posterior at every step

    def __post_init__(self):
        if not (0 <= self.p_neg_image and 0 <= self.p_hard_caption and
                self.p_neg_image + self.p_hard_caption <= 1):
            raise ValueError(f"HardNegConfig: p_neg_image={self.p_neg_image} and p_hard_caption="
                             f"{self.p_hard_caption} must be >= 0 and sum to <= 1")
        if self.latent_mode not in ("mean", "sample"):
            raise ValueError(f"HardNegConfig: latent_mode must be 'mean' or 'sample', got {self.latent_mode!r}")


def noised(model, z0, t, eps):
    """DDPM forward process z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps."""
    abar = model.alphas_cumprod[t.cpu()].to(z0.device, torch.float32).view(-1, 1, 1, 1)
    return abar.sqrt() * z0 + (1 - abar).sqrt() * eps


def hardneg_loss(model, z_pos, emb_pos, t, eps, kind: str, z_neg=None, emb_neg=None,
                 neg_loss_factor: float = 1.0):
    """L = L_pos - min(L_neg, lambda * stopgrad(L_pos)) for one batch; returns (L, L_pos, L_neg).

    kind "image": the negative is ``z_neg`` (same eps and t) with the positive text;
    kind "caption" / "random": the positive latent with ``emb_neg``; kind "none": L = L_pos.
    """
    zt = noised(model, z_pos, t, eps)
    l_pos = F.mse_loss(model.eps(zt, t, emb_pos).float(), eps.float())
    if kind == "none":
        return l_pos, l_pos, torch.zeros(())
    if kind == "image":
        pred_neg = model.eps(noised(model, z_neg, t, eps), t, emb_pos)
    elif kind in ("caption", "random"):
        pred_neg = model.eps(zt, t, emb_neg)
    else:
        raise ValueError(f"hardneg_loss: kind must be 'image', 'caption', 'random' or 'none', got {kind!r}")
    l_neg = F.mse_loss(pred_neg.float(), eps.float())
    loss = l_pos - torch.minimum(l_neg, neg_loss_factor * l_pos.detach())
    return loss, l_pos, l_neg


def _generator(seed, step, micro=0):
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + micro * 104729 + 17)
                                         % (2 ** 63 - 1))


def draw_batch(data: HardNegData, cfg: HardNegConfig, step: int, micro: int = 0, T: int = 1000) -> dict:
    """All random choices of one micro-batch, from a generator seeded by (seed, step, micro):
    rows, the negative kind (one draw for the whole batch), the negative of each row, t and eps
    (drawn later with the same generator, see :func:`micro_batch`)."""
    g = _generator(cfg.seed, step, micro)
    n = len(data)
    idx = torch.randint(0, n, (cfg.batch_size,), generator=g).tolist()
    u = float(torch.rand((), generator=g))
    kind = ("image" if u < cfg.p_neg_image else
            "caption" if u < cfg.p_neg_image + cfg.p_hard_caption else "random")
    neg = []
    for i in idx:
        if kind == "image":
            c = data.neg_images[i]
        elif kind == "caption":
            c = data.neg_captions[i]
        else:   # a random other row's caption (redrawn while it equals the positive, up to 10 times)
            for _ in range(10):
                j = int(torch.randint(0, n, (), generator=g))
                if data.captions[j] != data.captions[i]:
                    break
            neg.append(data.captions[j])
            continue
        neg.append(c[int(torch.randint(0, len(c), (), generator=g))])
    t = torch.randint(0, T, (cfg.batch_size,), generator=g)
    return {"idx": idx, "kind": kind, "neg": neg, "t": t, "g": g}


@torch.no_grad()
def _latents(model, images, mode, g):
    x = model.preprocess(images).to(model.device, model.dtype)
    post = model.vae.encode(x).latent_dist
    z = post.mean
    if mode == "sample":
        z = z + post.std * torch.randn(z.shape, generator=g).to(z.device, z.dtype)
    return (z * model.scaling_factor).float()


@torch.no_grad()
def _embed(model, prompts):
    ids = model.tokenize(list(prompts)).input_ids.to(model.device)
    return model.text_encoder(ids)[0]


def micro_batch(model, data: HardNegData, cfg: HardNegConfig, step: int, micro: int = 0) -> dict:
    """Tensors of one micro-batch: z_pos, emb_pos, t, eps, kind, z_neg / emb_neg."""
    d = draw_batch(data, cfg, step, micro, model.num_train_timesteps)
    g = d["g"]
    z = _latents(model, [_load(data.images[i]) for i in d["idx"]], cfg.latent_mode, g)
    eps = torch.randn(z.shape, generator=g).to(z.device)
    out = {"z_pos": z, "emb_pos": _embed(model, [data.captions[i] for i in d["idx"]]),
           "t": d["t"].to(model.device), "eps": eps, "kind": d["kind"], "z_neg": None, "emb_neg": None}
    if d["kind"] == "image":
        out["z_neg"] = _latents(model, [_load(data.images[j]) for j in d["neg"]], cfg.latent_mode, g)
    else:
        out["emb_neg"] = _embed(model, d["neg"])
    return out


def _load(im):
    return to_pil(im)


def make_optimizer(model, cfg: HardNegConfig):
    """AdamW over the LoRA weights only (betas 0.9/0.999, eps 1e-8, as the original)."""
    return torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, betas=(0.9, 0.999),
                             weight_decay=cfg.weight_decay, eps=1e-8)


def train_step(model, optimizer, data: HardNegData, cfg: HardNegConfig, step: int,
               accelerator=None) -> dict:
    """One optimizer step (``grad_accum`` micro-batches, clipping, AdamW); returns the mean losses,
    the fraction of micro-batches whose hinge was open (L_neg < lambda L_pos, so the negative term
    had a gradient) and the negative kinds used.

    Data parallel with an ``accelerate.Accelerator`` of N processes (``accelerate launch``):
    micro-batch m (drawn from (seed, step, m), whatever process draws it) runs on process m mod N,
    the LoRA gradients are summed over the processes and the losses gathered, so the step is the
    one-process step of the same ``grad_accum`` micro-batches (up to float summation order)."""
    import contextlib

    W, r = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    amp = accelerator is not None and accelerator.mixed_precision != "no"
    optimizer.zero_grad(set_to_none=True)
    rows = []
    for m in range(r, cfg.grad_accum, W):
        b = micro_batch(model, data, cfg, step, m)
        with accelerator.autocast() if amp else contextlib.nullcontext():
            loss, lp, ln = hardneg_loss(model, b["z_pos"], b["emb_pos"], b["t"], b["eps"],
                                        b["kind"], b["z_neg"], b["emb_neg"], cfg.neg_loss_factor)
        (loss / cfg.grad_accum).backward()
        rows.append((m, float(loss.detach()), float(lp.detach()), float(ln.detach()), b["kind"]))
    if W > 1:
        from accelerate.utils import gather_object

        rows = sorted(gather_object(rows))
        for p in lora_parameters(model):
            p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), "sum")
    tot = {"loss": 0.0, "l_pos": 0.0, "l_neg": 0.0, "hinge_open": 0.0}
    kinds = []
    for _, lo, lp, ln, kind in rows:
        tot["loss"] += lo / cfg.grad_accum
        tot["l_pos"] += lp / cfg.grad_accum
        tot["l_neg"] += ln / cfg.grad_accum
        # the negative term sends gradients only while L_neg < lambda * L_pos
        tot["hinge_open"] += float(ln < cfg.neg_loss_factor * lp) / cfg.grad_accum
        kinds.append(kind)
    torch.nn.utils.clip_grad_norm_(lora_parameters(model), cfg.max_grad_norm)
    optimizer.step()
    return {**tot, "kinds": ",".join(kinds)}


# ------------------------------------------------------------------------------------------------
# validation and the resumable loop
# ------------------------------------------------------------------------------------------------
def validation_accuracy(model, items, S: int = 4, seed: int = 0) -> dict:
    """Accuracy of DiffusionITM (S grid points) on hard-negative items: text items plainly, image
    items with the unconditional normalisation (``img_retrieval``); strict (ties are misses)."""
    out = {}
    for task, flag in (("text", False), ("image", True)):
        its = [it for it in items if it.task == task]
        if its:
            s = diffitm_scores(model, its, S=S, seed=seed, img_retrieval=flag, progress=False,
                               shard=LOCAL)  # every process validates on its own (no cache)
            out[f"val_{task}"] = retrieval_metrics(its, s)["accuracy"]
    if not out:
        raise ValueError("validation_accuracy: no text- or image-retrieval items given")
    out["val_acc"] = sum(out.values()) / len(out)
    return out


def run_dir(root, cfg: HardNegConfig, **identity) -> Path:
    """``root/lora-<fingerprint>`` of the configuration and anything else that defines the run
    (model, training file, ...): a changed setting starts a new run instead of resuming an old one."""
    return Path(root) / f"lora-{fingerprint({**asdict(cfg), **{k: str(v) for k, v in identity.items()}})}"


def hinge_activity(history):
    """Per negative kind (exact when ``grad_accum`` = 1): steps, mean L_pos and L_neg, and the
    fraction of steps whose hinge was open (the negative term contributed a gradient)."""
    tr = history.dropna(subset=["loss"])
    g = tr.groupby("kinds")
    return g.agg(steps=("loss", "size"), l_pos=("l_pos", "mean"), l_neg=("l_neg", "mean"),
                 hinge_open=("hinge_open", "mean"))


def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finetune_hardneg(model, data: HardNegData, val_items=None, cfg: HardNegConfig | None = None,
                     out_dir=None, resume: bool = True, progress: bool = True, stop_after=None,
                     mixed_precision: str | None = None):
    """HardNeg-DiffusionITM fine-tuning (module docstring); returns the history as a DataFrame.

    Adds the LoRA adapter if the model has none.  Every ``val_every`` steps (and at steps 0 and
    ``steps``) the validation accuracy on ``val_items`` is recorded (S = ``cfg.val_S``).  With
    ``out_dir`` a checkpoint (adapter, optimizer, step, history) is written atomically every
    ``ckpt_every`` steps and the final adapter is saved there (:func:`save_lora`); a re-run with
    ``resume`` continues from the checkpoint and ends with the same weights as an uninterrupted
    run.  ``stop_after`` ends this call after that many steps (a simulated kill, for tests).
    Runs through an ``accelerate.Accelerator``: ``accelerate launch --num_processes N`` makes it
    data parallel over the ``grad_accum`` micro-batches (:func:`train_step`; load the model on
    ``accelerate.PartialState().device`` in each process); ``mixed_precision`` "no" / "fp16" /
    "bf16" (None: ``accelerate launch --mixed_precision``, else "no"); the main process writes
    the checkpoint and the adapter.
    """
    import pandas as pd

    from peft.utils import set_peft_model_state_dict

    cfg = cfg or HardNegConfig()
    acc = make_accelerator(mixed_precision)
    if acc.num_processes > 1 and acc.device.type != "cpu" and torch.device(model.device) != acc.device:
        raise ValueError(f"finetune_hardneg: process {acc.process_index} holds the model on "
                         f"{model.device} but accelerate gave it {acc.device}; load the model with "
                         f"device=accelerate.PartialState().device in each process")
    if not has_lora(model):
        add_lora(model, cfg.rank, cfg.seed)
    opt = make_optimizer(model, cfg)
    history, start = [], 0
    ckpt = Path(out_dir) / "hardneg_ckpt.pt" if out_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt.exists():
            st = torch.load(ckpt, weights_only=False)
            if st["cfg"] != asdict(cfg):
                raise ValueError(f"finetune_hardneg: checkpoint {ckpt} was written with another "
                                 f"configuration {st['cfg']}; delete it or pass resume=False")
            set_peft_model_state_dict(model.unet, st["lora"], adapter_name=ADAPTER)
            opt.load_state_dict(st["optimizer"])
            history, start = st["history"], st["step"]

    def validate(step):
        if val_items:
            history.append({"step": step, **validation_accuracy(model, val_items, cfg.val_S, cfg.seed)})

    if start == 0 and not history:
        validate(0)
    done = 0
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="HardNeg LoRA",
                     disable=not progress):
        history.append({"step": step + 1, **train_step(model, opt, data, cfg, step, acc)})
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            validate(step + 1)
        done += 1
        last = step + 1 == cfg.steps
        if ckpt is not None and ((step + 1) % cfg.ckpt_every == 0 or last or done == stop_after):
            if acc.is_main_process:
                _atomic_save({"cfg": asdict(cfg), "lora": lora_state_dict(model),
                              "optimizer": opt.state_dict(), "step": step + 1,
                              "history": history}, ckpt)
            acc.wait_for_everyone()
        if stop_after is not None and done >= stop_after and not last:
            break
    if out_dir is not None and start + done == cfg.steps and acc.is_main_process:
        save_lora(model, out_dir)
    return pd.DataFrame(history)
