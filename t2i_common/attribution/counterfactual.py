"""The toy attribution world and the gold-standard counterfactual (leave-K-out retraining).

The paper can afford retraining from scratch only for a few queries (16 A100-hours per model on
MSCOCO).  Here a fixed, finite toy training set (``toyworld`` images with *rare concepts*: a
(colour, shape) pair seen in exactly k known images) trains a small UNet from scratch with the
package's training code (:func:`t2i_common.toyworld.training.train_unet`; frozen toy VAE and text encoder)
in about a minute of CPU, so:

* retraining without K images from the same initialisation, seed and schedule is the exact
  counterfactual (retraining with nothing removed reproduces the base model bit-exactly, tested);
* queries generated from prompts naming a rare concept have a known set of truly responsible
  training images (Recall@10 / mAP ground truth);
* the customised-model (AbC) benchmark fine-tunes the base model on a few exemplars of a concept
  absent from the pre-training set.

Retrained models are cached under ``CACHE/attribution-models/<fingerprint>`` where the
fingerprint covers the training configuration and the removed set.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import paths, toyworld as tw
from ..cache import ResultCache, fingerprint
from ..engine import NoiseBank, denoise_errors
from ..models import T2IModel, load_clip, load_t2i
from ..sdformat import build_scheduler, build_unet
from ..toyworld import training
from . import baselines as B, unlearning as A
from .unlearning import QuerySet, loss_timesteps, weights_fingerprint


@dataclass
class AttributionWorld:
    """Configuration of the toy attribution world (defaults: the notebooks' CPU budget).

    n_train images from ``toyworld.make_samples(n_train, seed)`` with every concept excluded, then
    each concept placed as a single-object image in k images (disjoint, drawn with ``seed``).
    ``rare``: what is rare.  "colour" (default): the concept's colour word and colour appear in
    its k images only (every other object of that colour is excluded), so the model can learn
    the colour from those k images alone and removing them is a real counterfactual;
    "combination": only the (colour, shape) pair is rare - the colour and the shape are common
    elsewhere and a model can compose them without the k images (the setting of the first
    version, where leave-K-out showed no effect even for the oracle).
    ``abc_concept``: absent from the pre-training set, used by the customised-model benchmark.
    """
    n_train: int = 160
    concepts: tuple = (("purple", "diamond"), ("yellow", "circle"))
    k: int = 6
    abc_concept: tuple = ("green", "triangle")
    seed: int = 0
    base: str = str(paths.DEFAULT_T2I)        # frozen VAE, text encoder, tokenizer, scheduler
    unet_channels: tuple = (32, 64)
    steps: int = 150
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 30
    caption_dropout: float = 0.1
    #: leave-K-out retraining: "masked" = the base run's exact minibatch, noise and timestep
    #: sequence with the removed images' terms dropped from every batch mean; "resample" = a fresh
    #: run on the kept images with the same seed (the paper's procedure; its batches differ from
    #: the base run's, which adds retraining noise to every Delta L)
    retrain: str = "masked"
    rare: str = "colour"
    #: where the trained models score, unlearn and generate ("cuda" on a GPU) and in which dtype
    #: ("float32"; "bfloat16"/"float16" opt in); training runs through Accelerate, which picks the
    #: device itself, in float32.  Neither enters the cache key.
    device: str = "cpu"
    dtype: str = "float32"

    def key(self) -> dict:
        d = dataclasses.asdict(self)
        d["base"] = Path(self.base).name      # the folder, not the machine path
        d.pop("device"), d.pop("dtype")
        return d

    def torch_dtype(self):
        dt = getattr(torch, str(self.dtype), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"AttributionWorld.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        return dt


def make_world(world: AttributionWorld):
    """(samples, {concept: sorted indices}) of the toy training set."""
    concepts = [tuple(c) for c in world.concepts]
    if world.rare == "colour":
        colours = sorted({c for c, _ in concepts})
        if len(colours) != len(concepts):
            raise ValueError(f"AttributionWorld(rare='colour'): concepts {concepts} must have distinct "
                             f"colours (each colour is rare to one concept)")
        if len(tw.COLOURS) - len(colours) < 3:
            raise ValueError(f"AttributionWorld(rare='colour'): {len(colours)} rare colours leave "
                             f"fewer than the 3 a triple scene needs; use at most "
                             f"{len(tw.COLOURS) - 3} concepts")
        excluded = [(c, s) for c in colours for s in tw.SHAPES]
    elif world.rare == "combination":
        excluded = list(concepts)
    else:
        raise ValueError(f"AttributionWorld.rare must be 'colour' or 'combination', got {world.rare!r}")
    excluded += [tuple(world.abc_concept)]
    if len(concepts) * world.k > world.n_train:
        raise ValueError(f"{len(concepts)} concepts x k={world.k} images exceed n_train={world.n_train}")
    samples = tw.make_samples(world.n_train, world.seed, exclude_combinations=excluded)
    rng = np.random.default_rng([int(world.seed), 17])
    chosen = rng.choice(world.n_train, len(concepts) * world.k, replace=False)
    where = {}
    for j, c in enumerate(concepts):
        idx = np.sort(chosen[j * world.k:(j + 1) * world.k])
        for i in idx:
            r = np.random.default_rng([int(world.seed), int(i), 2])
            samples[i] = tw.sample_from_scene(tw.random_scene(r, "single", colours=[c[0]],
                                                              shapes=[c[1]]), r)
        where[c] = idx
    return samples, where


def abc_exemplars(world: AttributionWorld, n: int = 4, seed: int = 100):
    """``n`` single-object images of ``world.abc_concept`` (the customised concept)."""
    c = tuple(world.abc_concept)
    out = []
    for i in range(n):
        r = np.random.default_rng([int(seed), i, 3])
        out.append(tw.sample_from_scene(tw.random_scene(r, "single", colours=[c[0]], shapes=[c[1]]), r))
    return out


def _components(base):
    return load_t2i(base)


def _cfg(world, base_model):
    cfg = training.toy_config()
    return dataclasses.replace(cfg, unet_channels=tuple(world.unet_channels),
                               text_hidden=int(base_model.unet.config.cross_attention_dim))


def train_world_model(world: AttributionWorld, samples, exclude=(), *, init=None, tag: str = "base",
                      steps: int | None = None, cache_root=None, progress: bool = True):
    """A T2IModel whose UNet is trained on ``samples`` minus the indices ``exclude`` (from scratch,
    or fine-tuned from ``init``, a UNet) with the world's seed and schedule.  Cached by a
    fingerprint of (world, tag, sorted excluded indices, init weights); training checkpoints in the
    same folder make a killed run resume.  Returns (model, info)."""
    from diffusers import UNet2DConditionModel

    base = _components(world.base)
    exclude = sorted(int(i) for i in exclude)
    keep = [i for i in range(len(samples)) if i not in set(exclude)]
    steps = world.steps if steps is None else int(steps)
    key = dict(world=world.key(), tag=tag, exclude=exclude, n=len(samples), steps=steps,
               data=fingerprint([s.captions for s in samples]),
               init=None if init is None else weights_fingerprint(init))
    folder = Path(cache_root or paths.CACHE) / "attribution-models" / fingerprint(key)
    info_f = folder / "info.json"
    if info_f.exists():
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        info = json.loads(info_f.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "key.json").write_text(json.dumps(key, indent=1))
        cfg = _cfg(world, base)
        common = dict(caption_dropout=world.caption_dropout, batch_size=world.batch_size,
                      lr=world.lr, seed=world.seed, out_dir=folder,
                      ckpt_every=max(50, steps // 4), warmup=min(world.warmup, max(1, steps // 2)),
                      scheduler=base.scheduler, progress=progress)
        if world.retrain == "masked" and init is None:
            removed = np.zeros(len(samples), bool)
            removed[exclude] = True
            unet, info = train_unet_masked(training.toy_training_pairs(samples), removed,
                                           base.text_encoder, base.vae, base.tokenizer, cfg, steps,
                                           **common)
        elif world.retrain in ("masked", "resample"):
            pairs = training.toy_training_pairs([samples[i] for i in keep])
            unet, info = training.train_unet(
                pairs, base.text_encoder, base.vae, base.tokenizer, cfg, steps, resume=True,
                init=copy.deepcopy(init).float() if init is not None else None, ema_decay=None, **common)
        else:
            raise ValueError(f"AttributionWorld.retrain must be 'masked' or 'resample', got "
                             f"{world.retrain!r}")
        info = dict(wall_s=info["wall_s"], final_loss=info["final_loss"], n_train=len(keep),
                    removed=len(exclude), steps=steps)
        unet.save_pretrained(folder / "unet")
        info_f.write_text(json.dumps(info))
        ck = folder / "unet.ckpt"
        if ck.exists():
            ck.unlink()
    model = T2IModel(base.tokenizer, base.text_encoder, base.vae, unet.eval(), base.scheduler,
                     name=f"attribution-{tag}-{fingerprint(key)}", device=world.device,
                     dtype=world.torch_dtype())
    return model, info


def train_unet_masked(pairs, removed, text_encoder, vae, tokenizer, cfg, steps: int, *,
                      caption_dropout: float = 0.1, batch_size: int = 32, lr: float = 1e-3,
                      seed: int = 0, out_dir=None, ckpt_every: int = 200, warmup: int = 100,
                      scheduler=None, progress: bool = True):
    """:func:`training.train_unet`'s eps-prediction training from scratch (same initialisation,
    generator and draws: images, caption, caption dropout, posterior sample, t, eps), except that
    the images flagged in ``removed`` contribute nothing: each batch's loss is the mean over its
    kept images.  With nothing removed this is the base run; with K removed it is the same run
    that never saw those K images - the leave-K-out counterfactual without the retraining noise
    of a re-sampled batch sequence.  Resumable through ``out_dir``."""
    import torch.nn.functional as F

    data = training.as_pairs(pairs)
    removed = torch.as_tensor(np.asarray(removed, bool))
    if len(removed) != len(data):
        raise ValueError(f"removed mask has {len(removed)} entries for {len(data)} images")
    sched = scheduler or build_scheduler(cfg)
    abar = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float32)
    sf = float(vae.config.scaling_factor)
    captions, per_image = training._caption_table(data, extra=("",), tokenizer=tokenizer)
    emb = training.encode_texts(text_encoder, tokenizer, captions, cfg.max_length)
    mu, sd = training.encode_latent_posteriors(vae, data.images)
    torch.manual_seed(seed)
    unet = build_unet(cfg)

    def loss_fn(model, g):
        idx = training._draw(len(data), batch_size, g)
        cap = training.draw_captions(per_image, idx, g, caption_dropout)
        z0, t, eps = training.noised_latent_draw(mu, sd, idx, len(abar), g, sf)
        a = abar[t].view(-1, 1, 1, 1)
        pred = model(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=emb[cap]).sample
        keep = (~removed[idx]).float()
        per = F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))
        return (per * keep).sum() / keep.sum().clamp_min(1.0)

    hp = dict(stage="unet-masked", n=len(data), batch_size=batch_size,
              caption_dropout=caption_dropout, removed=np.flatnonzero(removed.numpy()).tolist(),
              scaling_factor=round(sf, 6))
    unet, _, info = training._fit("unet", unet, loss_fn, steps=steps, lr=lr, seed=seed,
                                  out_dir=out_dir, ckpt_every=ckpt_every, resume=True,
                                  warmup=warmup, progress=progress, hparams=hp, desc="UNet")
    return unet.eval(), info


# ------------------------------------------------------------------------------------------------
# queries and the counterfactual measures
# ------------------------------------------------------------------------------------------------
def generate_queries(model, prompts, *, seed: int = 0, num_steps: int = 50,
                     guidance_scale: float = 3.0):
    """Synthesized queries: images generated from ``prompts`` (seeded), their VAE latents
    (posterior mean of the generated image, as the original's AbC code encodes its synthesized
    images) and prompt embeddings.  Returns an :class:`attribution.QuerySet`."""
    prompts = list(prompts)
    images = model.generate(prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
    lat = model.encode_images(model.preprocess(list(images))).float().cpu().clone()
    emb = model.encode_prompts(prompts).float().cpu().clone()
    return QuerySet(lat, emb, images, prompts)


def query_loss(model, queries, *, time_samples: int = 20, n_noise: int = 5, seed: int = 0,
               batch_size: int = 256) -> np.ndarray:
    """L(z^, theta) per query: mean eps-MSE over the grid :func:`attribution.loss_timesteps` x
    ``n_noise`` noise draws; the noise depends only on (seed, query), so two models are compared
    with shared noise."""
    ts = loss_timesteps(time_samples, model.num_train_timesteps).repeat(n_noise)
    noise = torch.stack([NoiseBank(model.latent_shape, seed).draw(len(ts), stream=10 ** 6 + q)
                         for q in range(len(queries))])
    res = denoise_errors(model, queries.latents, queries.text_emb, torch.arange(len(queries))[:, None],
                         timesteps=ts, noise=noise, batch_size=batch_size)
    return res["mse"].double().mean(dim=(1, 2)).numpy()


def generation_change(model_a, model_b, prompts, clip=None, *, seed: int = 0, num_steps: int = 50,
                      guidance_scale: float = 3.0) -> dict:
    """Delta G between two models from the same noise and prompt: pixel MSE (images in [0, 1])
    and, with ``clip``, the CLIP image-embedding cosine (lower = more changed)."""
    a = model_a.generate(list(prompts), num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
    b = model_b.generate(list(prompts), num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) / 255.0) ** 2
    out = dict(mse=mse.reshape(len(a), -1).mean(1), images=b)
    if clip is not None:
        ea, eb = clip.encode_images(list(a)), clip.encode_images(list(b))
        out["clip"] = (ea * eb).sum(1).double().numpy()
    return out


def leave_k_out(world: AttributionWorld, samples, base_model, queries, rankings: dict, ks, *,
                clip=None, time_samples: int = 20, n_noise: int = 5, seed: int = 0,
                gen_steps: int = 50, cache_root=None, progress: bool = True):
    """The counterfactual evaluation: for each method, query q and K in ``ks``, retrain without
    the top-K images of the method's ranking of q and measure Delta L (query loss rise, shared
    noise), Delta G (pixel MSE) and CLIP similarity against the base model.

    rankings: {method: [Q, N] ranked training indices}.  Identical removed sets share one
    retraining (cache).  Returns a long pandas DataFrame (method, K, query, dL, mse, clip,
    train_s) and the dict of retraining wall times.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    base_loss = query_loss(base_model, queries, time_samples=time_samples, n_noise=n_noise, seed=seed)
    rows = []
    jobs = [(m, K, q) for m in rankings for K in ks for q in range(len(queries))]
    for m, K, q in tqdm(jobs, disable=not progress, desc="leave-K-out retraining"):
        removed = np.asarray(rankings[m][q])[:K]
        model, info = train_world_model(world, samples, removed, tag="base", cache_root=cache_root,
                                        progress=False)
        dl = _query_loss_at(model, queries, q, time_samples, n_noise, seed)
        g = generation_change(base_model, model, [queries.prompts[q]], clip, seed=seed + q,
                              num_steps=gen_steps)
        rows.append(dict(method=m, K=int(K), query=q, dL=float(dl[0] - base_loss[q]),
                         mse=float(g["mse"][0]),
                         clip=float(g["clip"][0]) if "clip" in g else float("nan"),
                         train_s=info["wall_s"]))
    return pd.DataFrame(rows)


def _query_loss_at(model, queries, q, time_samples, n_noise, seed):
    """query_loss of query q alone with the noise stream it has in the full set."""
    ts = loss_timesteps(time_samples, model.num_train_timesteps).repeat(n_noise)
    noise = NoiseBank(model.latent_shape, seed).draw(len(ts), stream=10 ** 6 + q)[None]
    res = denoise_errors(model, queries.latents[q:q + 1], queries.text_emb[q:q + 1],
                         torch.zeros(1, 1, dtype=torch.long), timesteps=ts, noise=noise)
    return res["mse"].double().mean(dim=(1, 2)).numpy()


# ------------------------------------------------------------------------------------------------
# one call per notebook step
# ------------------------------------------------------------------------------------------------
@dataclass
class AttributionSetup:
    """Everything the attribution notebooks share: the world, its base model, the training set in
    latent space, the queries with their ground truth, the Fisher and the pre-training loss."""
    world: AttributionWorld
    samples: list
    where: dict
    base: object
    data: object
    queries: object
    truth: list
    fisher: dict
    pretrain_loss: np.ndarray
    settings: dict = field(default_factory=dict)
    train_info: dict = field(default_factory=dict)


def prepare(world: AttributionWorld, *, queries_per_concept: int = 2, time_samples: int = 5,
            max_captions: int = 1, fisher_epochs: int = 1, fisher_batch: int = 64, seed: int = 0,
            gen_steps: int = 50, guidance_scale: float = 3.0, cache_root=None,
            progress: bool = True) -> AttributionSetup:
    """Train (or load) the base model, encode the training set (``max_captions`` captions per
    image), generate ``queries_per_concept`` queries "a {colour} {shape}" per rare concept (ground
    truth: that concept's k images), and compute the diagonal Fisher (all weights) and the
    pre-training loss (both cached)."""
    samples, where = make_world(world)
    base, info = train_world_model(world, samples, cache_root=cache_root, progress=progress)
    caps = [list(s.captions)[:max_captions] if max_captions else list(s.captions) for s in samples]
    data = A.TrainingSet.from_images(base, np.stack([s.image for s in samples]), caps)
    concepts = [tuple(c) for c in world.concepts]
    prompts = [f"a {c} {s}" for c, s in concepts for _ in range(queries_per_concept)]
    queries = generate_queries(base, prompts, seed=seed, num_steps=gen_steps,
                               guidance_scale=guidance_scale)
    truth = [where[c] for c in concepts for _ in range(queries_per_concept)]
    fcache = ResultCache("attribution-fisher", dict(w=A.weights_fingerprint(base.unet),
                                                    lat=data.latents, txt=data.text_emb,
                                                    epochs=fisher_epochs, batch=fisher_batch,
                                                    seed=seed), root=cache_root)
    fisher = A.fisher_diagonal(base, data, "all", epochs=fisher_epochs, batch_size=fisher_batch,
                               seed=seed, path=fcache.dir / "fisher_info.pt", progress=progress)
    lc = A.loss_cache(base, data, time_samples, seed, 256, root=cache_root)
    loss = A.training_loss(base, data, time_samples=time_samples, seed=seed, cache=lc,
                           progress=progress)
    return AttributionSetup(world, samples, where, base, data, queries, truth, fisher, loss,
                            dict(time_samples=time_samples, max_captions=max_captions,
                                 fisher_epochs=fisher_epochs, seed=seed), info)


def unlearning_scores(setup: AttributionSetup, *, cache_root=None, progress: bool = True,
                      **kw) -> np.ndarray:
    """Influence [Q, N] of attribution by unlearning (keyword arguments of
    :func:`attribution.attribute_by_unlearning`: subset, lr, n_batches, batch_size, use_fisher,
    damping); each query's ``influence_{idx}.pkl`` is cached under
    ``CACHE/attribution-influence/<fingerprint>``."""
    kw = dict(kw)
    key = dict(w=A.weights_fingerprint(setup.base.unet), q=setup.queries.latents,
               lat=setup.data.latents, settings=setup.settings, kw=kw)
    out = Path(cache_root or paths.CACHE) / "attribution-influence" / fingerprint(key)
    kw.setdefault("n_train", setup.settings.get("n_train"))
    res = A.attribute_by_unlearning(setup.base, setup.data, setup.queries, setup.fisher,
                                    setup.pretrain_loss, out_dir=out,
                                    time_samples=setup.settings["time_samples"],
                                    seed=setup.settings["seed"], progress=progress,
                                    reuse_unrecorded=True, **kw)
    return np.stack([res[i]["influence"] for i in range(len(setup.queries))])


def method_scores(setup: AttributionSetup, methods, *, clip=None, unlearn: dict | None = None,
                  trak: dict | None = None, cache_root=None, progress: bool = True) -> dict:
    """Scores [Q, N] of each method name: random, pixel, clip-image, clip-text, ssl-feature (the
    DINO stand-in), trak, d-trak, unlearning."""
    clip = clip or load_clip()
    d, q = setup.data, setup.queries
    trak = dict(dict(proj_dim=256, n_draws=2, subset="cross-attn", lambda_reg=0.0), **(trak or {}))
    fns = {
        "random": lambda: B.random_scores(len(q), d.n, setup.settings["seed"]),
        "pixel": lambda: B.pixel_cosine_scores(q.images, d.images),
        "clip-image": lambda: B.clip_image_scores(clip, q.images, d.images),
        "clip-text": lambda: B.clip_text_scores(clip, q.prompts, d.captions),
        "ssl-feature": lambda: B.feature_scores(q.images, d.images, clip),
        "trak": lambda: B.trak_scores(setup.base, d, q, target="loss", **trak),
        "d-trak": lambda: B.trak_scores(setup.base, d, q, target="sq_norm", **trak),
        "unlearning": lambda: unlearning_scores(setup, cache_root=cache_root, progress=progress,
                                                **(unlearn or {})),
    }
    bad = [m for m in methods if m not in fns]
    if bad:
        raise ValueError(f"unknown attribution method(s) {bad}; choose from {list(fns)}")
    return {m: fns[m]() for m in methods}


def prepare_abc(setup: AttributionSetup, *, n_exemplars: int = 4, steps: int = 60,
                n_queries: int = 2, seed: int = 100, gen_steps: int = 50,
                guidance_scale: float = 3.0, cache_root=None,
                progress: bool = True) -> AttributionSetup:
    """The customised-model (AbC) setting on the toy world: fine-tune the base UNet on
    ``n_exemplars`` images of ``world.abc_concept`` (absent from the pretraining set), generate
    ``n_queries`` queries of it, and attribute over exemplars + pretraining set (exemplars first,
    as the original concatenates them; ground truth = indices 0..n_exemplars-1).  The Fisher is
    the base model's (the original uses SD's); N in lr / N is the pretraining-set size."""
    world = setup.world
    ex = abc_exemplars(world, n_exemplars, seed)
    tuned, info = train_world_model(world, ex, init=setup.base.unet, tag="abc", steps=steps,
                                    cache_root=cache_root, progress=progress)
    allsamples = ex + list(setup.samples)
    mc = setup.settings["max_captions"]
    caps = [list(s.captions)[:mc] if mc else list(s.captions) for s in allsamples]
    data = A.TrainingSet.from_images(tuned, np.stack([s.image for s in allsamples]), caps)
    c, s = world.abc_concept
    queries = generate_queries(tuned, [f"a {c} {s}"] * n_queries, seed=setup.settings["seed"] + 1,
                               num_steps=gen_steps, guidance_scale=guidance_scale)
    # distinct seeds per query: generate() seeds prompt i with (seed, i), so equal prompts differ
    ts = setup.settings["time_samples"]
    lc = A.loss_cache(tuned, data, ts, setup.settings["seed"], 256, root=cache_root, tag="abc")
    loss = A.training_loss(tuned, data, time_samples=ts, seed=setup.settings["seed"], cache=lc,
                           progress=progress)
    truth = [np.arange(n_exemplars)] * n_queries
    return AttributionSetup(world, allsamples, {tuple(world.abc_concept): np.arange(n_exemplars)},
                            tuned, data, queries, truth, setup.fisher, loss,
                            dict(setup.settings, n_train=len(setup.samples)), info)


def oracle_ranking(truth, n: int) -> np.ndarray:
    """[Q, n] rankings that put each query's ground-truth images first (in index order), then the
    rest: the leave-K-out reference of removing exactly the truly responsible images."""
    out = []
    for t in truth:
        t = np.asarray(t, dtype=np.int64)
        out.append(np.concatenate([t, np.setdiff1d(np.arange(n), t)]))
    return np.stack(out)
