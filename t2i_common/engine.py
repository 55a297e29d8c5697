"""The shared denoising engine: batched eps-prediction errors for four of the five papers.

For images x (as latents z0), a set of conditions and noise levels (discrete timesteps or logSNR
values), it returns per-evaluation squared error / L2 norm / per-pixel maps and eps differences
between pairs of conditions.  All conditions of one (image, noise level) share the same noised
latent z = sqrt(sigmoid(a)) z0 + sqrt(sigmoid(-a)) eps (a = logSNR; for a discrete t this is the
DDPM z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps) and run in the same UNet batch.

Noise comes from :class:`NoiseBank` (CPU generator, then moved), so numbers are identical across
devices and runs, and the same eps is shared by all candidate conditions (variance reduction).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

OUTPUTS = ("mse", "sq", "l2", "map", "pred")


class NoiseBank:
    """Seeded standard-normal noise of one latent shape.

    ``draw(n, stream)`` returns the same [n, *shape] float32 CPU tensor for the same (seed, stream),
    whatever else was drawn before: DiffusionITM's bank is ``draw(K)`` (bank[k] for the k-th grid
    point, shared by every candidate and example); per-example noise is ``draw(K, stream=i)``.
    """

    def __init__(self, shape, seed: int = 0):
        self.shape, self.seed = tuple(int(s) for s in shape), int(seed)

    def generator(self, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 2654435761 + int(stream) * 97531 + 12345)
                                             % (2 ** 63 - 1))

    def draw(self, n: int, stream: int = 0) -> torch.Tensor:
        return torch.randn((int(n),) + self.shape, generator=self.generator(stream))


def grid_timesteps(S: int) -> torch.Tensor:
    """DiffusionITM's fixed grid ``range(10, 990, int(1000 / S))`` (S=10 -> 10, 110, ..., 910)."""
    try:
        ok = not isinstance(S, (bool, str)) and S >= 1 and int(S) == S
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"grid_timesteps: S (sampling_steps) must be a positive integer, got {S!r}; "
                         f"pass a whole number such as S=10")
    return torch.arange(10, 990, int(1000 / S), dtype=torch.long)


def auto_batch_size(model, n_cond: int = 1) -> int:
    """UNet evaluations per batch: 64 on CPU; on CUDA, from free memory with a per-evaluation cost
    that scales with the latent area and the number of channels of the first UNet level
    (about 0.35 GB per fp32 SD-2.1 evaluation at 64x64; capped at 512)."""
    if model.device.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(model.device)
    c, h, w = model.latent_shape
    ch0 = model.unet.config.block_out_channels[0]
    per = 0.35e9 * (h * w / 4096) * (ch0 / 320) * (torch.finfo(model.dtype).bits / 32)
    return int(max(n_cond, min(512, 0.7 * free / max(per, 1.0))))


def _check_timesteps(model, t: torch.Tensor, given) -> torch.Tensor:
    """Discrete timesteps must be integers in [0, T) of the model's training schedule."""
    g = torch.as_tensor(given)
    if g.is_floating_point() and not torch.equal(g, g.round()):
        raise ValueError(f"denoise_errors: timesteps must be integers, got {g.flatten()[:5].tolist()}"
                         f"; round them or pass logsnr for continuous noise levels")
    T = int(getattr(model, "num_train_timesteps", len(model.alphas_cumprod)))
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
        bad = sorted({int(v) for v in t.flatten() if not 0 <= int(v) < T})[:5]
        raise ValueError(f"denoise_errors: timesteps {bad} are outside [0, {T}) of the model's "
                         f"training schedule; use t in 0..{T - 1}")
    return t


def _check_model_shapes(model, latents, cond_emb) -> None:
    """Latent channels and embedding width against the UNet, before any UNet call."""
    cfg = getattr(getattr(model, "unet", None), "config", None)
    if cfg is None:
        return
    C = int(cfg.in_channels)
    if latents.shape[1] != C:
        raise ValueError(f"denoise_errors: latents {tuple(latents.shape)} have {latents.shape[1]} "
                         f"channels but the UNet expects {C} (model.latent_shape "
                         f"{tuple(getattr(model, 'latent_shape', ()))}); pass VAE latents from "
                         f"model.encode_images, not images")
    if cond_emb.ndim != 3:
        raise ValueError(f"denoise_errors: cond_emb must be [U, L, D] prompt embeddings (from "
                         f"model.encode_prompts), got {tuple(cond_emb.shape)}")
    D = cfg.cross_attention_dim
    D = int(D[0] if isinstance(D, (list, tuple)) else D)
    if cond_emb.shape[-1] != D:
        raise ValueError(f"denoise_errors: cond_emb {tuple(cond_emb.shape)} has width "
                         f"{cond_emb.shape[-1]} but the UNet's cross-attention expects {D}; encode "
                         f"the prompts with the same model (model.encode_prompts)")


def _as_2d(x, B, name, dtype):
    x = torch.as_tensor(x, dtype=dtype).cpu()
    if x.ndim == 1:
        x = x.unsqueeze(0).expand(B, -1)
    if x.ndim != 2 or x.shape[0] != B:
        raise ValueError(f"denoise_errors: {name} must be [K] or [B={B}, K], got {tuple(x.shape)}")
    return x


@torch.inference_mode()
def denoise_errors(model, latents, cond_emb, cond_idx, *, timesteps=None, logsnr=None, noise=None,
                   outputs=("mse",), diff_pairs=(), batch_size=None, progress=False,
                   desc="denoise") -> dict:
    """Batched denoising errors over (image x noise level x condition).

    Args:
        model: a :class:`~t2i_common.models.T2IModel` (needs ``.eps``, ``.alphas_cumprod``,
            ``.logsnr_to_t``).
        latents: [B, C, h, w] clean latents z0 (already scaled).
        cond_emb: [U, L, D] prompt-embedding table.
        cond_idx: [P] (same conditions for every image) or [B, P] rows of ``cond_emb``.
        timesteps: [K] or [B, K] discrete t; the noised latent uses abar_t exactly.
        logsnr: [K] or [B, K] logSNR values a; the UNet gets the nearest discrete t
            (``model.logsnr_to_t``) and the latent is noised with sigmoid(+-a) (info-decomp).
            If both are given, ``timesteps`` is fed to the UNet and ``logsnr`` noises the latent.
        noise: [K, C, h, w] (one bank shared by all images: DiffusionITM) or [B, K, C, h, w].
        outputs: any of "mse" (mean over latent dims), "sq" (sum), "l2" (norm), "map" (squared
            error summed over channels, [h, w]), "pred" (the eps predictions themselves).
        diff_pairs: pairs (p, q) of condition positions; adds "diff_sq" [B, n, K] = ||eps_p -
            eps_q||^2 and, if "map" is requested, "diff_map" [B, n, K, h, w].
        batch_size: UNet evaluations per call (rounded to whole (image, noise level) groups of P
            conditions); default :func:`auto_batch_size`.

    Returns: dict of float32 CPU tensors, shape [B, P, K] (+ [h, w] for maps, + [C, h, w] for pred).
    """
    bad = set(outputs) - set(OUTPUTS)
    if bad:
        raise ValueError(f"denoise_errors: unknown outputs {sorted(bad)}; choose from {OUTPUTS}")
    latents = torch.as_tensor(latents)
    if latents.ndim != 4:
        raise ValueError(f"denoise_errors: latents must be [B, C, h, w], got {tuple(latents.shape)}")
    B = latents.shape[0]
    if B == 0:
        raise ValueError("denoise_errors: no latents given (latents has B=0 images)")
    _check_model_shapes(model, latents, cond_emb)
    cond_idx = torch.as_tensor(cond_idx, dtype=torch.long).cpu()
    if cond_idx.ndim == 1:
        cond_idx = cond_idx.unsqueeze(0).expand(B, -1)
    if cond_idx.ndim != 2 or cond_idx.shape[0] != B:
        raise ValueError(f"denoise_errors: cond_idx must be [P] or [B={B}, P], got {tuple(cond_idx.shape)}")
    if cond_idx.shape[1] == 0:
        raise ValueError("denoise_errors: the condition list is empty (cond_idx has P=0 entries); "
                         "give at least one row of cond_emb per image")
    if int(cond_idx.max()) >= cond_emb.shape[0] or int(cond_idx.min()) < 0:
        bad = int(cond_idx.max()) if int(cond_idx.max()) >= cond_emb.shape[0] else int(cond_idx.min())
        raise ValueError(f"denoise_errors: cond_idx refers to row {bad} but cond_emb "
                         f"has {cond_emb.shape[0]} rows (valid: 0..{cond_emb.shape[0] - 1})")
    P = cond_idx.shape[1]
    if timesteps is None and logsnr is None:
        raise ValueError("denoise_errors: give timesteps or logsnr")
    if timesteps is not None:
        t = _check_timesteps(model, _as_2d(timesteps, B, "timesteps", torch.long), timesteps)
        if logsnr is None:
            abar = model.alphas_cumprod[t]
        else:
            abar = torch.sigmoid(_as_2d(logsnr, B, "logsnr", torch.float64))
    else:
        a = _as_2d(logsnr, B, "logsnr", torch.float64)
        if not torch.isfinite(a).all():
            raise ValueError("denoise_errors: logsnr holds NaN or infinite values; give finite "
                             "log signal-to-noise ratios")
        t = model.logsnr_to_t(a)
        abar = torch.sigmoid(a)
    K = t.shape[1]
    if K == 0:
        raise ValueError("denoise_errors: no noise levels given (timesteps/logsnr has K=0 entries)")
    if noise is None:
        raise ValueError("denoise_errors: noise is required (draw it from a NoiseBank)")
    noise = torch.as_tensor(noise)
    shared_noise = noise.ndim == 4
    if tuple(noise.shape[-3:]) != tuple(latents.shape[1:]) or (
            noise.shape[0] != K if shared_noise else tuple(noise.shape[:2]) != (B, K)):
        raise ValueError(f"denoise_errors: noise must be [K={K}, C, h, w] or [B={B}, K, C, h, w] "
                         f"matching latents {tuple(latents.shape[1:])}, got {tuple(noise.shape)}")
    pairs = [(int(p), int(q)) for p, q in diff_pairs]
    for p, q in pairs:
        if not (0 <= p < P and 0 <= q < P):
            raise ValueError(f"denoise_errors: diff pair {(p, q)} outside the {P} conditions")

    C, h, w = latents.shape[1:]
    res = {}
    for o in outputs:
        if o in ("mse", "sq", "l2"):
            res[o] = torch.empty(B, P, K)
        elif o == "map":
            res[o] = torch.empty(B, P, K, h, w)
        elif o == "pred":
            res[o] = torch.empty(B, P, K, C, h, w)
    if pairs:
        res["diff_sq"] = torch.empty(B, len(pairs), K)
        if "map" in outputs:
            res["diff_map"] = torch.empty(B, len(pairs), K, h, w)

    bs = batch_size or auto_batch_size(model, P)
    groups_per_batch = max(1, bs // P)
    groups = [(b, k) for b in range(B) for k in range(K)]
    sqrt_a, sqrt_s = abar.sqrt(), (1 - abar).sqrt()
    dev, dt = model.device, model.dtype
    for g0 in tqdm(range(0, len(groups), groups_per_batch), disable=not progress, desc=desc):
        gs = groups[g0:g0 + groups_per_batch]
        bi = torch.tensor([b for b, _ in gs])
        ki = torch.tensor([k for _, k in gs])
        eps = (noise[ki] if shared_noise else noise[bi, ki]).to(dev, torch.float32)
        z0 = latents[bi].to(dev, torch.float32)
        za = sqrt_a[bi, ki].view(-1, 1, 1, 1).to(dev, torch.float32)
        zs = sqrt_s[bi, ki].view(-1, 1, 1, 1).to(dev, torch.float32)
        zt = za * z0 + zs * eps
        G = len(gs)
        zt = zt.to(dt).repeat_interleave(P, dim=0)            # [G*P, C, h, w]
        tt = t[bi, ki].repeat_interleave(P).to(dev)
        emb = cond_emb[cond_idx[bi].reshape(-1).to(cond_emb.device)].to(dev, dt)
        pred = model.eps(zt, tt, emb).float().view(G, P, C, h, w)
        err = eps.unsqueeze(1) - pred   # [G, P, C, h, w]
        sq_map = err.pow(2).sum(2)                                  # [G, P, h, w]
        sq = sq_map.flatten(2).sum(-1)
        if "sq" in res:
            res["sq"][bi, :, ki] = sq.cpu()
        if "mse" in res:
            res["mse"][bi, :, ki] = (sq / (C * h * w)).cpu()
        if "l2" in res:
            res["l2"][bi, :, ki] = sq.sqrt().cpu()
        if "map" in res:
            res["map"][bi, :, ki] = sq_map.cpu()
        if "pred" in res:
            res["pred"][bi, :, ki] = pred.cpu()
        if pairs:
            pi = torch.tensor([p for p, _ in pairs], device=pred.device)
            qi = torch.tensor([q for _, q in pairs], device=pred.device)
            dmap = (pred[:, pi] - pred[:, qi]).pow(2).sum(2)         # [G, n, h, w]
            res["diff_sq"][bi, :, ki] = dmap.flatten(2).sum(-1).cpu()
            if "diff_map" in res:
                res["diff_map"][bi, :, ki] = dmap.cpu()
    return res


def count_evaluations(B: int, P: int, K: int) -> int:
    """UNet evaluations spent by one :func:`denoise_errors` call."""
    return int(B) * int(P) * int(K)

