"""Attribution baselines and retrieval metrics, all in one interface: a score matrix [Q, N]
(higher = more responsible) per method, ranked by :func:`rank_scores`.

Baselines of the paper (Wang et al. '24, Sec. 5): random; pixel cosine; CLIP image and CLIP text
cosine; a self-supervised image feature (DINO / DINOv2 on real data - on the toy world the toy
CLIP vision tower's *pre-projection* features stand in for it, as no self-supervised toy model
exists); TRAK / JourneyTRAK (gradient of the training loss) and D-TRAK (gradient of the mean
squared eps-prediction norm), with TRAK's own random projector and kernel solver from the
``traker`` library (``BasicProjector``, ``BasicScoreComputer``; both run on CPU).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..imageio import to_pil
from ..models import CLIPEmbedder, load_clip
from . import unlearning as A


def rank_scores(scores) -> np.ndarray:
    """[Q, N] scores -> [Q, N] training indices, most responsible first (stable argsort)."""
    s = np.asarray(scores, np.float64)
    return np.argsort(-s, axis=1, kind="stable")


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def recall_at_k(rank, relevant, k: int = 10) -> float:
    """Fraction of the ground-truth images found in the top ``k`` (AbC's Recall@K)."""
    rel = set(int(i) for i in relevant)
    if not rel:
        raise ValueError("recall_at_k: the ground-truth set is empty")
    return len(rel & set(int(i) for i in np.asarray(rank)[:k])) / len(rel)


def average_precision(rank, relevant) -> float:
    """Average precision of a full ranking: mean over ground-truth images of precision at their
    rank (AbC's mAP averages this over queries)."""
    rel = set(int(i) for i in relevant)
    if not rel:
        raise ValueError("average_precision: the ground-truth set is empty")
    hits, total = 0, 0.0
    for pos, i in enumerate(np.asarray(rank), 1):
        if int(i) in rel:
            hits += 1
            total += hits / pos
            if hits == len(rel):
                break
    return total / len(rel)


def retrieval_table(rankings: dict, relevant: list, k: int = 10):
    """Per method: Recall@k, mAP (means over queries) and the number of ground-truth images found
    in the top k (summed over queries), as a pandas DataFrame."""
    import pandas as pd

    rows = []
    for m, R in rankings.items():
        rec = [recall_at_k(r, g, k) for r, g in zip(R, relevant)]
        ap = [average_precision(r, g) for r, g in zip(R, relevant)]
        found = sum(len(set(np.asarray(r)[:k].tolist()) & set(np.asarray(g).tolist()))
                    for r, g in zip(R, relevant))
        rows.append(dict(method=m, **{f"recall@{k}": float(np.mean(rec))}, mAP=float(np.mean(ap)),
                         found=int(found), of=int(sum(min(k, len(g)) for g in relevant))))
    return pd.DataFrame(rows).set_index("method")


# ------------------------------------------------------------------------------------------------
# feature baselines
# ------------------------------------------------------------------------------------------------
def random_scores(n_queries: int, n_train: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n_queries, n_train))


def _cos(a, b) -> np.ndarray:
    a = torch.nn.functional.normalize(torch.as_tensor(a, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(b, dtype=torch.float64), dim=-1)
    return (a @ b.T).numpy()


def pixel_cosine_scores(query_images, train_images) -> np.ndarray:
    """Cosine similarity of raw pixels (images centred at mid-gray, flattened)."""
    q = np.asarray(query_images, np.float64).reshape(len(query_images), -1) - 127.5
    t = np.asarray(train_images, np.float64).reshape(len(train_images), -1) - 127.5
    if q.shape[1] != t.shape[1]:
        raise ValueError(f"pixel_cosine_scores: query images have {q.shape[1]} values, training "
                         f"images {t.shape[1]}; resize them to the same size first")
    return _cos(q, t)


def clip_image_scores(clip, query_images, train_images) -> np.ndarray:
    """Cosine of CLIP image embeddings (``models.load_clip``)."""
    return _cos(clip.encode_images(list(query_images)), clip.encode_images(list(train_images)))


def clip_text_scores(clip, query_prompts, train_captions) -> np.ndarray:
    """Cosine of the query prompt's CLIP text embedding with each training image's captions
    (mean of its normalised caption embeddings)."""
    caps = [[c] if isinstance(c, str) else list(c) for c in train_captions]
    flat = [c for cs in caps for c in cs]
    emb = clip.encode_texts(flat)
    per, s = [], 0
    for cs in caps:
        per.append(emb[s:s + len(cs)].mean(0))
        s += len(cs)
    return _cos(clip.encode_texts(list(query_prompts)), torch.stack(per))


@torch.no_grad()
def self_supervised_features(images, model="toy-clip-vision", batch_size: int = 128, *,
                             device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Image features standing for DINO.  ``model``: a ``models.CLIPEmbedder`` of the hf backend
    (the toy CLIP: its vision tower's pooled, *pre-projection* output - a stand-in, not DINO), the
    string "toy-clip-vision" (that, for the default toy CLIP), or a transformers hub id / folder of
    a self-supervised ViT (``facebook/dino-vitb16``, ``facebook/dinov2-base``: the CLS token),
    loaded on ``device`` in ``dtype`` (a CLIPEmbedder keeps its own)."""
    if isinstance(model, str) and model == "toy-clip-vision":
        model = load_clip(device=device, dtype=dtype)
    if isinstance(model, CLIPEmbedder):
        if model.backend != "hf":
            raise ValueError("self_supervised_features: an open_clip model has no exposed "
                             "pre-projection features; pass a DINO hub id or an hf CLIP folder")
        outs = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([model.preprocess(to_pil(im).convert("RGB"))
                             for im in images[i:i + batch_size]])
            outs.append(model.model.vision_model(pixel_values=x.to(model.device, model.dtype))
                        .pooler_output.float().cpu())
        return torch.cat(outs)
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(model)
    net = AutoModel.from_pretrained(model, torch_dtype=dtype).to(device).eval()
    outs = []
    for i in range(0, len(images), batch_size):
        x = proc(images=[to_pil(im).convert("RGB") for im in images[i:i + batch_size]],
                 return_tensors="pt")
        outs.append(net(pixel_values=x["pixel_values"].to(device, dtype)).last_hidden_state[:, 0].float().cpu())
    return torch.cat(outs)


def feature_scores(query_images, train_images, model="toy-clip-vision", **kw) -> np.ndarray:
    """Cosine of :func:`self_supervised_features` (``kw``: its device / dtype)."""
    return _cos(self_supervised_features(list(query_images), model, **kw),
                self_supervised_features(list(train_images), model, **kw))


# ------------------------------------------------------------------------------------------------
# TRAK / JourneyTRAK / D-TRAK
# ------------------------------------------------------------------------------------------------
def gradient_features(model, latents, embs, *, target: str = "loss", subset: str = "cross-attn",
                      n_draws: int = 4, seed: int = 0, batch_size: int = 32, progress: bool = False,
                      per_row_embs=None) -> torch.Tensor:
    """Per-example gradients (flattened over the parameters of ``subset``), averaged over
    ``n_draws`` (timestep, noise) draws.

    target="loss": grad of the eps-MSE (TRAK applied to diffusion, JourneyTRAK's training
    gradient); target="sq_norm": grad of mean ||eps_theta(z_t, t, c)||^2 (D-TRAK's best output
    function).  ``embs``: [B, L, D] (one prompt per example) or [B, P, L, D] (a random caption of
    the P per draw).  Draw d of example i depends only on (seed, i, d).
    """
    names = A.select_parameters(model.unet, subset)
    abar = model.alphas_cumprod.float()
    T = len(abar)
    embs = torch.as_tensor(embs, dtype=torch.float32)
    if embs.ndim == 3:
        embs = embs[:, None]
    out = []
    for s in tqdm(range(0, len(latents), batch_size), disable=not progress, desc=f"grads ({target})"):
        idx = list(range(s, min(s + batch_size, len(latents))))
        acc = None
        for d in range(n_draws):
            gens = [torch.Generator().manual_seed(int(seed) * 7919 + i * 104729 + d) for i in idx]
            t = torch.stack([torch.randint(T, (), generator=g) for g in gens])
            eps = torch.stack([torch.randn(tuple(model.latent_shape), generator=g) for g in gens])
            cap = torch.stack([torch.randint(embs.shape[1], (), generator=g) for g in gens])
            e = embs[torch.tensor(idx), cap]
            gs = A.per_sample_grads(model.unet, names, latents[idx], t, e, eps, abar,
                                    target=target,
                                    prediction_type=getattr(model, "prediction_type", "epsilon"))
            flat = torch.cat([gs[n].reshape(len(idx), -1) for n in names], 1)
            acc = flat if acc is None else acc + flat
        out.append(acc / n_draws)
    return torch.cat(out)


def trak_project(grads: torch.Tensor, proj_dim: int, seed: int = 0) -> torch.Tensor:
    """TRAK's random projection (``trak.projectors.BasicProjector``, Rademacher, on CPU)."""
    from trak.projectors import BasicProjector, ProjectionType

    proj = BasicProjector(grad_dim=grads.shape[1], proj_dim=int(proj_dim), seed=int(seed),
                          proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32,
                          block_size=min(int(proj_dim), 128))
    return proj.project(grads.float().contiguous(), model_id=0)


def trak_solve(train_feats: torch.Tensor, query_feats: torch.Tensor, lambda_reg: float = 0.0):
    """TRAK scores [Q, N] = phi_q (Phi^T Phi + lambda I)^-1 Phi^T with TRAK's own solver
    (``trak.score_computers.BasicScoreComputer``; it rescales (Phi^T Phi + lambda I)^-1 by its
    mean absolute value, which leaves every ranking unchanged)."""
    from trak.score_computers import BasicScoreComputer

    sc = BasicScoreComputer(dtype=torch.float32, device="cpu", lambda_reg=float(lambda_reg))
    xtx = sc.get_xtx(train_feats.float())
    feats = sc.get_x_xtx_inv(train_feats.float(), xtx)
    return (query_feats.float() @ feats.T).numpy()


def trak_scores(model, data: A.TrainingSet, queries: A.QuerySet, *, target: str = "loss",
                subset: str = "cross-attn", proj_dim: int = 256, lambda_reg: float = 0.0,
                n_draws: int = 4, seed: int = 0, progress: bool = False) -> np.ndarray:
    """TRAK (target="loss") or D-TRAK (target="sq_norm") scores of the N unflipped training images
    for every query: gradients of the chosen output, projected to ``proj_dim``, then the kernel
    solve (paper settings: TRAK 4096 / D-TRAK 32768 dimensions, D-TRAK lambda 500; all weights)."""
    tr = gradient_features(model, data.latents[:data.n], data.text_emb, target=target,
                           subset=subset, n_draws=n_draws, seed=seed, progress=progress)
    q = gradient_features(model, queries.latents, queries.text_emb, target=target, subset=subset,
                          n_draws=n_draws, seed=seed + 1, progress=False)
    return trak_solve(trak_project(tr, proj_dim, seed), trak_project(q, proj_dim, seed), lambda_reg)


def plot_top_k(query_image, train_images, rankings: dict, truth=(), k: int = 10, title: str = ""):
    """The paper's figure: the query, then per method (one row each) its top-``k`` training
    images, best first; ground-truth images (those that show the query's concept) are framed in
    red, which the legend under the grid says.  ``title``: the query's prompt.  Returns the
    matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    truth = set(int(i) for i in truth)
    n = len(rankings)
    fig, axes = plt.subplots(n, k + 1, figsize=(1.2 * (k + 1) + 1.0, 1.2 * n + 1.3), squeeze=False)
    for r, (m, rank) in enumerate(rankings.items()):
        ax = axes[r, 0]
        ax.imshow(query_image)
        ax.set_ylabel(m, rotation=0, ha="right", va="center", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        if r == 0:
            ax.set_title("query", fontsize=10)
        for j, i in enumerate(np.asarray(rank)[:k]):
            ax = axes[r, j + 1]
            ax.imshow(train_images[int(i)])
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"rank {j + 1}", fontsize=10)
            for sp in ax.spines.values():
                sp.set_color("red" if int(i) in truth else "white")
                sp.set_linewidth(3 if int(i) in truth else 0.5)
    fig.suptitle(f"Top-{k} training images per attribution method"
                 + (f" for the query \"{title}\"" if title else ""), fontsize=12)
    fig.legend(handles=[Patch(facecolor="none", edgecolor="red", linewidth=3,
                              label=f"ground truth: one of the {len(truth)} training images that "
                                    f"show the query's concept")],
               loc="lower center", ncol=1, fontsize=10, frameon=False)
    fig.subplots_adjust(wspace=0.05, hspace=0.08, bottom=0.6 / (1.2 * n + 1.3), top=1 - 0.75 / (1.2 * n + 1.3))
    return fig
