"""Benchmark: DiffusionITM scoring, ours vs the original's loop structure, and adaptive evaluation.

Part 1 (throughput).  ``itm.diffitm_distances`` (each image VAE-encoded once, each prompt encoded
once, every (caption x timestep) evaluation of a noised latent batched) against
``itm.original_loop_scores`` (the original's Python double loop over (text, image), a pipeline call
per pair that re-encodes the prompts, and per timestep re-encodes the images with the VAE and calls
the UNet once, ``--batchsize`` 4 examples per call).  Both compute the same scores
(tests/test_itm.py checks them to 1e-5); printed: UNet evaluations/s, examples/s and the ratio, and
the bare UNet forward's best throughput on this machine with the speed-up it bounds (no exact grid
scorer evaluates the UNet faster than a bare forward pass, so that ratio is the ceiling), on

- the toy checkpoint ``data/toy-sd`` (or, until it exists, a random model of its architecture),
- a random-weight model with SD 2.1-base's architecture (UNet from
  ``sdformat.sd21_base_unet_config()``, SD's VAE, an OpenCLIP-H-sized text encoder; no download),
  512 px, a handful of evaluations (about 15 s per UNet evaluation on one CPU thread).

Part 2 (adaptive evaluation).  On a toy two-caption task (CLEVR pair_binding_size analogue, where
the score needs many timesteps): accuracy of the S=250 grid and of smaller grids, and successive
elimination (``itm.AdaptivePolicy``) replayed on the S=250 distances (exactly what the live version
computes; checked at the end).  Printed: the UNet evaluations of the default policy, of the policy
calibrated on a separate split of the task (cheapest reaching the grid accuracy there), and of the
cheapest policy picked on the test items themselves (optimistic), as fractions of the S=250 grid's
evaluations (target <= 1/10).

    python bench/bench_itm.py                      # everything
    python bench/bench_itm.py --skip-sd21          # toy parts only
    python bench/bench_itm.py --sd21-res 256       # a cheaper SD 2.1 run (same architecture)
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from t2i_common import diffusion_itm as itm, engine, paths
from t2i_common.toyworld import export as toyexport
from t2i_common.formats import MatchItem, read_aro_vg
from t2i_common.models import T2IModel, load_t2i
from t2i_common.sdformat import (TinySDConfig, build_random_sd, build_scheduler, build_tokenizer,
                                 sd21_base_unet_config)


def toy_model():
    if (paths.DEFAULT_T2I / "model_index.json").exists():
        return load_t2i(paths.DEFAULT_T2I), "toy checkpoint data/toy-sd"
    from t2i_common.toyworld import VOCAB
    p = build_random_sd(TinySDConfig(), VOCAB, seed=0)
    return (T2IModel(p["tokenizer"], p["text_encoder"], p["vae"], p["unet"], p["scheduler"],
                     name="random-toy-arch"), "random model with the toy architecture (no data/toy-sd yet)")


def sd21_model(resolution: int = 512):
    """Random weights, SD 2.1-base architecture: UNet (865M), VAE (f=8), 23-layer 1024-wide text
    encoder (OpenCLIP-H's text tower as SD 2 uses it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = build_tokenizer("a photo of red blue green circle square to the left right".split(),
                          max_length=77)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=23, num_attention_heads=16,
                                      max_position_embeddings=77, hidden_act="gelu",
                                      projection_dim=1024, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        norm_num_groups=32, sample_size=resolution)
    cfg = sd21_base_unet_config()
    cfg["sample_size"] = resolution // 8
    unet = UNet2DConditionModel(**cfg)
    return T2IModel(tok, te, vae, unet, build_scheduler(), name=f"random-sd21-base-{resolution}")


def throughput(model, items, S, batch_items=(4, 1), label="", extra=None):
    """Time ours and the original loop (at each ``--batchsize`` in ``batch_items``) on the same
    items; ``extra``: {name: model} scored with our scorer too (e.g. an opt-in bf16 copy)."""
    evals = itm.grid_evaluations(items, S)
    print(f"\n== {label}: {len(items)} examples x {len(items[0].captions)} captions, S={S} "
          f"({evals} UNet evaluations each)")
    t0 = time.perf_counter()
    ours = itm.diffitm_distances(model, items, S=S, progress=False)
    t_ours = time.perf_counter() - t0
    r = {"ours_evals_per_s": evals / t_ours, "ours_examples_per_s": len(items) / t_ours}
    print(f"  ours                        : {t_ours:8.2f} s  {evals / t_ours:8.2f} UNet evals/s  "
          f"{len(items) / t_ours:7.3f} examples/s")
    for b in batch_items:
        t0 = time.perf_counter()
        ref = itm.original_loop_scores(model, items, S=S, batch_items=b)
        t = time.perf_counter() - t0
        diff = max(float((x - y).abs().max()) for x, y in zip(ours.scores(), ref))
        r[f"ratio_b{b}"] = t / t_ours
        print(f"  original loop, batchsize {b:2d} : {t:8.2f} s  {evals / t:8.2f} UNet evals/s  "
              f"{len(items) / t:7.3f} examples/s  -> ours is {t / t_ours:.2f}x faster "
              f"(max |score diff| {diff:.1e})")
    peak, best_b = unet_peak(model, (16, 64, 256) if model.resolution <= 64 else (1,))
    r["unet_peak_evals_per_s"] = peak
    print(f"  bare UNet forward, batch {best_b:3d}  :           {peak:8.2f} UNet evals/s  (ours reaches "
          f"{evals / t_ours / peak:.0%} of it) -> ceiling of any exact grid scorer: "
          + ", ".join(f"{r[f'ratio_b{b}'] * t_ours * peak / evals:.2f}x vs batchsize {b}"
                      for b in batch_items))
    for name, m in (extra or {}).items():
        t0 = time.perf_counter()
        e = itm.diffitm_distances(m, items, S=S, progress=False)
        t = time.perf_counter() - t0
        diff = max(float((x - y).abs().max()) for x, y in zip(ours.scores(), e.scores()))
        print(f"  ours, {name:22s}: {t:8.2f} s  {evals / t:8.2f} UNet evals/s  "
              f"{len(items) / t:7.3f} examples/s  (max |score diff| to fp32 {diff:.1e})")
    return r


@torch.inference_mode()
def unet_peak(model, batches):
    """Best UNet evaluations/s of a bare forward pass over ``batches`` (random latents, one prompt):
    no VAE, no text encoder, no noising.  An exact grid scorer cannot beat it, so
    (original loop's time) / (evaluations / peak) bounds the speed-up that batching and
    encode-once can give on this machine."""
    emb = model.encode_prompts(["a photo of a red circle"])
    best = (0.0, None)
    for b in batches:
        z = torch.randn(b, *model.latent_shape, dtype=model.dtype)
        t = torch.full((b,), 500)
        e = emb.to(model.dtype).expand(b, -1, -1)
        model.unet(z, t, encoder_hidden_states=e)   # warm-up
        n = max(2, 512 // b) if model.resolution <= 64 else 1
        t0 = time.perf_counter()
        for _ in range(n):
            model.unet(z, t, encoder_hidden_states=e)
        best = max(best, (n * b / (time.perf_counter() - t0), b))
    return best


@torch.inference_mode()
def components(model, img, S_proj=250, P=2):
    """Seconds of one VAE encoding, one prompt encoding and one UNet evaluation, and the speed-up they
    imply for one image with P captions at S_proj: the original spends K (VAE + UNet) + 1 prompt
    encoding per pair, ours 1 VAE + P K UNet + P prompt encodings (batching not counted)."""
    x = model.preprocess([img])
    t0 = time.perf_counter()
    z = model.encode_images(x)
    t_vae = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = model.text_encoder(model.tokenize(["a photo of a red circle"]).input_ids)[0]
    t_te = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.unet(z, 500, encoder_hidden_states=emb)
    t_unet = time.perf_counter() - t0
    K = len(engine.grid_timesteps(S_proj))
    orig = P * (K * (t_vae + t_unet) + t_te)
    ours = t_vae + P * K * t_unet + P * t_te
    print(f"  components: VAE encode {t_vae:.1f} s, prompt encode {t_te:.2f} s, UNet evaluation "
          f"{t_unet:.1f} s -> projected speed-up at S={S_proj}, {P} captions: {orig / ours:.2f}x "
          f"(from not re-encoding alone; batching adds little on a CPU)")


def adaptive_study(model, test, calib, task, S_big=250, small_S=(1, 2, 5, 10, 25, 50)):
    """Grid accuracy against S, every swept policy replayed on the S_big distances of the test and
    of a calibration split, the summary (:func:`itm.budget_summary`) and a live check."""
    import pandas as pd

    print(f"\n== adaptive evaluation on the toy {task}: {len(test)} test + {len(calib)} calibration items")
    t0 = time.perf_counter()
    grid = itm.grid_curve(model, test, list(small_S) + [S_big], progress=False).assign(task=task)
    big = itm.diffitm_distances(model, test, S=S_big, progress=False).dists
    big_c = itm.diffitm_distances(model, calib, S=S_big, progress=False).dists
    print(f"  grid distances: {time.perf_counter() - t0:.1f} s")
    for _, r in grid.iterrows():
        print(f"  grid S={r.S:3d}: accuracy {r.accuracy:.3f} with {r.evals_per_example:5.0f} UNet evals/example")
    curve = itm.adaptive_curve(test, big, itm.policy_sweep()).assign(task=task)
    cal = itm.adaptive_curve(calib, big_c, itm.policy_sweep()).assign(task=task)
    r = itm.budget_summary(grid, curve, S_big, calibration=cal).loc[task]
    print(f"  default {itm.AdaptivePolicy()}: accuracy {r.default_accuracy:.3f} with "
          f"{r.default_evals:.1f} evals/example = {r.default_fraction:.3f} of the S={S_big} grid "
          f"(same pick as the grid on {r.default_agreement:.3f} of the items)")
    if "calibrated_policy" in r and isinstance(r.calibrated_policy, str):
        print(f"  calibrated on the other split ({r.calibrated_policy}): accuracy {r.calibrated_accuracy:.3f} "
              f"with {r.calibrated_evals:.1f} evals/example = {r.calibrated_fraction:.3f} of the grid "
              f"(same pick as the grid on {r.calibrated_agreement:.3f} of the items)")
    if isinstance(r.get("best_policy"), str):
        print(f"  cheapest policy reaching the S={S_big} accuracy, picked on the test items "
              f"({r.best_policy}): {r.best_evals:.1f} evals/example = {r.best_fraction:.3f} of the grid")
    live = itm.adaptive_scores(model, test, S=S_big, policy=itm.AdaptivePolicy(), progress=False)
    print(f"  live adaptive run equals the replay: {itm.live_vs_replay(test, live, big, itm.AdaptivePolicy())}")
    return pd.DataFrame([r])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="toy examples for the throughput part")
    ap.add_argument("--S", type=int, default=10)
    ap.add_argument("--adaptive-n", type=int, default=32, help="toy test (and calibration) items")
    ap.add_argument("--adaptive-task", default="CLEVR/pair_binding_size", help="GDBench toy task")
    ap.add_argument("--skip-sd21", action="store_true")
    ap.add_argument("--skip-adaptive", action="store_true")
    ap.add_argument("--sd21-res", type=int, default=512)
    ap.add_argument("--sd21-S", type=int, default=2, help="grid points for SD 2.1 (S=2: t=10, 510)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")

    model, what = toy_model()
    with tempfile.TemporaryDirectory() as tmp:
        items = read_aro_vg(toyexport.export_aro_vg(tmp, max(a.n, a.adaptive_n), 0, "attribution"),
                            "attribution")
        # materialise the images (the folder goes away)
        items = [MatchItem(list(it.images), it.captions, 0, it.gold_caption, it.meta) for it in items]
    throughput(model, items[:4], a.S, batch_items=(4,), label=f"warm-up, {what}")
    bf16 = copy.deepcopy(model)
    for part in (bf16.unet, bf16.vae, bf16.text_encoder):
        part.to(torch.bfloat16)
    bf16.dtype = torch.bfloat16
    throughput(model, items[:a.n], a.S, label=what, extra={"bf16 weights (opt-in)": bf16})
    if not a.skip_adaptive:
        with tempfile.TemporaryDirectory() as tmp:
            files = itm.export_toy_gdbench(tmp, 2 * a.adaptive_n, seed=0)
            its = itm.select_tasks(files, [a.adaptive_task])[a.adaptive_task]
            its = [MatchItem(list(it.images), it.captions, it.gold_image, it.gold_caption, it.meta)
                   for it in its]
        adaptive_study(model, its[:a.adaptive_n], its[a.adaptive_n:2 * a.adaptive_n], a.adaptive_task)
    if not a.skip_sd21:
        t0 = time.perf_counter()
        big = sd21_model(a.sd21_res)
        print(f"\nbuilt a random SD 2.1-base model at {a.sd21_res} px in {time.perf_counter() - t0:.0f} s")
        g = torch.Generator().manual_seed(0)
        img = (torch.rand(a.sd21_res, a.sd21_res, 3, generator=g) * 255).to(torch.uint8).numpy()
        sd_items = [MatchItem([img], ["a photo of a red circle", "a photo of a blue square"], 0, 0)]
        throughput(big, sd_items, a.sd21_S, batch_items=(1,), label=f"random SD 2.1-base, {a.sd21_res} px")
        components(big, img, S_proj=250)


if __name__ == "__main__":
    main()
