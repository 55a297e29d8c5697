"""Attribution by unlearning on the original's MSCOCO files, and its command line.

``python -m t2i_common.attribution`` (= :func:`main`) runs :func:`attribute_from_files`: every
argument, file and existing result is checked before the model loads, and a bad one is a single
line on stderr that names it (``--debug`` shows the traceback).  Files the user supplies are never
overwritten: ``--fisher_path`` / ``--pretrain_loss_path`` are read when they exist (and must fit:
kind, parameters, weight subset, shapes, finite values) and written only when they do not; every
written artefact has a ``<file>.meta.json`` record of the parameters it was made with, and an
existing one whose record names other parameters is refused.  A Fisher or pre-training loss
without a record (the original code's files) is used as given after its shape and values are
checked, with a warning; an influence file without a record in ``--result_dir`` is refused.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from . import unlearning as A
from .. import validate as V
from ..models import check_prediction_type, eps_from_output, load_t2i


class UNetModel:
    """The minimum of :class:`~t2i_common.models.T2IModel` the attribution code needs, around a
    bare diffusers ``UNet2DConditionModel`` (the original's MSCOCO model: a UNet trained on
    precomputed latents and text embeddings, ``DDPMScheduler(num_train_timesteps=1000)``)."""

    def __init__(self, unet, scheduler, device="cpu", dtype=torch.float32):
        self.unet = unet.to(device, dtype).eval().requires_grad_(False)
        self.scheduler, self.device, self.dtype = scheduler, torch.device(device), dtype
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.prediction_type = check_prediction_type(scheduler.config, "unet")
        s = int(unet.config.sample_size)
        self.latent_shape = (int(unet.config.in_channels), s, s)
        self.name = "unet"

    def eps(self, z_t, t, emb):
        """eps_theta (a v- or sample-prediction output converted, as :meth:`T2IModel.eps`)."""
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        out = self.unet(z_t.to(self.device, self.dtype), t,
                        encoder_hidden_states=emb.to(self.device, self.dtype)).sample
        return eps_from_output(out, z_t.to(out.device, out.dtype), self.alphas_cumprod, t,
                               self.prediction_type)


def _json(path, name):
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise V.BadInput(f"{name}: {path} is not valid JSON ({type(err).__name__}); restore it from "
                         f"the model's release") from None


_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def check_model_folder(path, name: str = "--model") -> str:
    """What ``path`` is: "sd" (a Stable-Diffusion folder) or "unet" (a bare diffusers UNet
    folder).  Anything else - a file, a VAE or other model's folder, a folder without weights - is
    an error that says what was found and what is expected; nothing is loaded."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{name}: {p} not found; pass a diffusers UNet folder or a "
                                f"Stable-Diffusion folder")
    if not p.is_dir():
        raise V.BadInput(f"{name}: {p} is a file; pass a diffusers UNet folder (config.json + "
                         f"weights) or a Stable-Diffusion folder (model_index.json)")
    if (p / "model_index.json").exists():
        index = _json(p / "model_index.json", name)
        if "unet" not in index or not (p / "unet").is_dir():
            raise V.BadInput(f"{name}: {p} is a {index.get('_class_name', 'pipeline')} folder without "
                             f"a unet/ component; the attribution needs a text-conditioned UNet")
        check_model_folder(p / "unet", name)
        return "sd"
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} is neither a Stable-Diffusion folder (model_index.json) nor a "
                                f"diffusers UNet folder (config.json); save the UNet with "
                                f"UNet2DConditionModel.save_pretrained(folder)")
    cfg = _json(p / "config.json", name)
    cls = cfg.get("_class_name") or cfg.get("architectures", ["an unknown model"])[0]
    if cls != "UNet2DConditionModel" or "cross_attention_dim" not in cfg:
        raise V.BadInput(f"{name}: {p} holds a {cls} (config.json), expected a text-conditioned "
                         f"UNet2DConditionModel folder or a Stable-Diffusion folder; point at the "
                         f"model's unet/ folder")
    if not any((p / w).exists() for w in _WEIGHTS):
        raise V.BadInput(f"{name}: {p} has a UNet config.json but no weights ({' or '.join(_WEIGHTS)}); "
                         f"save the UNet with save_pretrained")
    return "unet"


def load_attribution_model(path, device="cpu", dtype=torch.float32):
    """A Stable-Diffusion folder (``model_index.json``: :func:`models.load_t2i`) or a bare diffusers
    UNet folder (``config.json`` + weights) with the original's ``DDPMScheduler(1000)``."""
    kind = check_model_folder(path, "model")
    p = Path(path)
    if kind == "sd":
        return load_t2i(p, device=device, dtype=dtype)
    from diffusers import DDPMScheduler, UNet2DConditionModel
    try:
        unet = UNet2DConditionModel.from_pretrained(p)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise V.BadInput(f"model: the UNet in {p} could not be loaded (weights missing, truncated or "
                         f"not matching config.json: {first})") from None
    return UNetModel(unet, DDPMScheduler(num_train_timesteps=1000), device, dtype)


def _device(device) -> str:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise V.BadInput(f"--device: {device!r} is not a torch device; pass cpu or cuda") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise V.BadInput(f"--device: {device} asked for but no CUDA GPU is visible; pass --device cpu")
    return str(device)


def _loss_record(model, data, time_samples, seed, batch_size=256) -> dict:
    return dict(kind="pretrain_loss", weights=A.weights_fingerprint(model.unet),
                data=V.digest(data.latents, data.text_emb), time_samples=int(time_samples),
                seed=int(seed), batch_size=int(batch_size))


def _check_results(out_dir, indices, settings: dict) -> None:
    """Existing ``influence_{idx}.pkl`` in ``out_dir`` must carry a record whose settings equal
    ``settings`` (they are never overwritten); checked before any work."""
    for idx in indices:
        p = Path(out_dir) / f"influence_{idx}.pkl"
        if not p.exists():
            continue
        if p.is_dir():
            raise V.BadInput(f"--result_dir: {p} is a folder; move it away")
        diff = V.record_differences(p, settings)
        if diff is None:
            raise V.BadInput(f"--result_dir: {p} exists but has no record of the settings it was made "
                             f"with (an older run's or the original code's); it is not reused or "
                             f"overwritten: pass another --result_dir or move it away")
        diff = [d for d in diff if d[0] in settings]
        if diff:
            shown = ", ".join(f"{k}={a!r} (now {b!r})" for k, a, b in diff[:4])
            raise V.BadInput(f"--result_dir: {p} was made with other settings: {shown}; results "
                             f"are never overwritten: pass another --result_dir")


def attribute_from_files(model_path, train_latents, train_text, query_latents, query_text, out_dir,
                         *, indices=None, query_images=None, fisher_path=None,
                         pretrain_loss_path=None, subset: str = "cross-attn-kv", lr: float = 0.01,
                         n_batches: int = 625, batch_size: int = 80, time_samples: int = 20,
                         fisher_epochs: int = 5, n_train: int | None = None, seed: int = 0,
                         device="cpu", progress: bool = True,
                         fisher_chunk: int | None = None) -> dict:
    """The original's ``compute_influence.py`` pipeline on its file formats.  Every setting, file,
    query index and existing result is checked before the model is loaded or any work starts.  A
    missing ``fisher_path`` / ``pretrain_loss_path`` file is computed and written there
    (``fisher_info.pt``, ``pretrain_loss.npy``, each with its ``.meta.json`` record); an existing
    one is read, never replaced (see the module docstring)."""
    A.check_unlearn_settings(lr=lr, n_batches=n_batches, batch_size=batch_size, n_train=n_train,
                             time_samples=time_samples)
    fisher_epochs, seed = V.count(fisher_epochs, "fisher_epochs"), V.count(seed, "seed", low=0)
    if fisher_chunk is not None:
        fisher_chunk = V.count(fisher_chunk, "fisher_chunk")
    if subset not in A.WEIGHT_SUBSETS:
        raise V.BadInput(f"weight subset {subset!r} unknown; choose one of {list(A.WEIGHT_SUBSETS)}")
    device = _device(device)
    check_model_folder(model_path)
    data = A.TrainingSet.from_npy(train_latents, train_text)
    queries = A.QuerySet.from_npy(query_latents, query_text, query_images)
    indices = list(range(len(queries))) if indices is None else [queries.check_index(i) for i in indices]
    if not indices:
        raise V.BadInput("--sample_idx is empty; give query indices or leave it out for all")
    V.out_dir(out_dir, "--result_dir")
    fisher_file = None
    if fisher_path is not None:
        V.out_file(fisher_path, "--fisher_path")
        if Path(fisher_path).exists():
            fisher_file = A.read_fisher(fisher_path)
            for n, v in fisher_file.items():
                V.finite_array(v, f"--fisher_path {fisher_path} entry {n!r}")
    loss = None
    if pretrain_loss_path is not None:
        V.out_file(pretrain_loss_path, "--pretrain_loss_path")
        if Path(pretrain_loss_path).exists():
            loss = np.array(V.load_npy(pretrain_loss_path, "--pretrain_loss_path"), np.float64)
            if loss.shape != (len(data.latents),):
                raise ValueError(f"{pretrain_loss_path} has shape {loss.shape}, the training set "
                                 f"{len(data.latents)} rows; pass a new --pretrain_loss_path to "
                                 f"compute it there")
            V.finite_array(loss, f"--pretrain_loss_path {pretrain_loss_path}")
    model = load_attribution_model(model_path, device=device)
    A.check_compatible(model, data)
    if tuple(queries.latents.shape[1:]) != tuple(model.latent_shape):
        raise ValueError(f"{query_latents}: query latents {tuple(queries.latents.shape[1:])} do not "
                         f"match the model's {tuple(model.latent_shape)}")
    if queries.text_emb.shape[-1] != data.text_emb.shape[-1]:
        raise ValueError(f"{query_text}: query text embeddings are {queries.text_emb.shape[-1]}-d, "
                         f"the training ones {data.text_emb.shape[-1]}-d")
    A.check_unlearn_settings(lr=lr, n_batches=n_batches, batch_size=batch_size,
                             T=model.num_train_timesteps, time_samples=time_samples)
    names = A.select_parameters(model.unet, subset)
    weights = A.weights_fingerprint(model.unet)
    if fisher_file is not None:
        A.check_fisher(fisher_file, model.unet, names, fisher_path)
        if not V.check_record(fisher_path, A.fisher_record(model, data, fisher_epochs, 32, seed),
                              "fisher", "pass a new --fisher_path to compute one there"):
            warnings.warn(f"--fisher_path {fisher_path} has no record of how it was made (e.g. the "
                          f"original's compute_fisher.py); used as given", stacklevel=2)
    lrec = _loss_record(model, data, time_samples, seed)
    if loss is not None and not V.check_record(pretrain_loss_path, lrec, "--pretrain_loss_path",
                                               "pass a new --pretrain_loss_path to compute it there"):
        warnings.warn(f"--pretrain_loss_path {pretrain_loss_path} has no record of how it was made; "
                      f"used as given (it must come from the same model, data, time samples and "
                      f"seed)", stacklevel=2)
    _check_results(out_dir, indices, dict(
        kind="influence", weights=weights, data=V.digest(data.latents, data.text_emb),
        subset=subset, lr=float(lr), n_batches=int(n_batches), batch_size=int(batch_size),
        time_samples=int(time_samples), seed=int(seed), n_train=int(n_train or data.n)))
    # ---- the work ----
    if fisher_file is not None:
        fisher = {n: fisher_file[n] for n in names}
    else:
        fisher = A.fisher_diagonal(model, data, "all" if fisher_path is not None else subset,
                                   epochs=fisher_epochs, seed=seed, path=fisher_path,
                                   progress=progress, chunk=fisher_chunk)
    if loss is None:
        loss = A.training_loss(model, data, time_samples=time_samples, seed=seed, progress=progress)
        V.finite_array(loss, "pre-training loss")
        if pretrain_loss_path is not None:
            tmp = Path(str(pretrain_loss_path) + ".tmp.npy")
            np.save(tmp, loss)
            V.write_record(pretrain_loss_path, lrec)
            tmp.replace(pretrain_loss_path)
    return A.attribute_by_unlearning(model, data, queries, fisher, loss, indices=indices,
                                     out_dir=out_dir, subset=subset, lr=lr, n_batches=n_batches,
                                     batch_size=batch_size, time_samples=time_samples, seed=seed,
                                     n_train=n_train, progress=progress)


def _run(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m t2i_common.attribution",
                                 description="Attribution by unlearning on the original's MSCOCO "
                                             "files (--debug: show tracebacks).")
    ap.add_argument("--model", required=True, help="diffusers UNet folder or SD folder")
    ap.add_argument("--dataroot", required=True, help="folder with coco17_train_latents.npy and "
                                                      "coco17_train_text_embeddings.npy")
    ap.add_argument("--sample_dir", required=True, help="folder with latents.npy, "
                                                        "text_embeddings.npy, images/")
    ap.add_argument("--result_dir", required=True, help="influence_{idx}.pkl go here (never "
                                                        "overwritten)")
    ap.add_argument("--sample_idx", type=int, nargs="*", default=None)
    ap.add_argument("--fisher_path", default=None, help="read if it exists, else computed there")
    ap.add_argument("--pretrain_loss_path", default=None, help="read if it exists, else computed there")
    ap.add_argument("--weight_selection", default="cross-attn-kv", choices=list(A.WEIGHT_SUBSETS))
    ap.add_argument("--unlearn_lr", type=float, default=0.01)
    ap.add_argument("--unlearn_batch_size", type=int, default=80)
    ap.add_argument("--unlearn_grad_accum_steps", type=int, default=625)
    ap.add_argument("--loss_time_samples", type=int, default=20)
    ap.add_argument("--fisher_epochs", type=int, default=5)
    ap.add_argument("--fisher_chunk", type=int, default=None,
                    help="rows whose per-sample gradients are held at once (full-size SD: 1 or 2; "
                         "default: the Fisher batch of 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    d, s = Path(a.dataroot), Path(a.sample_dir)
    for opt, folder in (("--dataroot", d), ("--sample_dir", s)):
        if not folder.exists():
            raise FileNotFoundError(f"{opt}: {folder} not found")
        if not folder.is_dir():
            raise V.BadInput(f"{opt}: {folder} is a file; pass the folder that holds the .npy files")
    images = s / "images" if (s / "images").exists() else None
    if images is not None and not images.is_dir():
        raise V.BadInput(f"--sample_dir: {images} is a file; it must be the folder of {{i}}.png")
    attribute_from_files(a.model, d / "coco17_train_latents.npy", d / "coco17_train_text_embeddings.npy",
                         s / "latents.npy", s / "text_embeddings.npy", a.result_dir,
                         indices=a.sample_idx, query_images=images, fisher_path=a.fisher_path,
                         pretrain_loss_path=a.pretrain_loss_path, subset=a.weight_selection,
                         lr=a.unlearn_lr, n_batches=a.unlearn_grad_accum_steps,
                         batch_size=a.unlearn_batch_size, time_samples=a.loss_time_samples,
                         fisher_epochs=a.fisher_epochs, fisher_chunk=a.fisher_chunk, seed=a.seed,
                         device=a.device)
    print(f"influences written to {a.result_dir}")


def main(argv=None) -> int:
    """Command line of :func:`attribute_from_files` with the paper's MSCOCO defaults; a bad input
    is one line on stderr (exit 2), ``--debug`` shows the traceback."""
    return V.cli(_run, "python -m t2i_common.attribution", argv)
