"""Scale-out: shard parsing and the split by id, sharded loops reduced from the cache (results
independent of the number of shards, a lost shard recomputed alone), the data-parallel training
loop; and, marked ``distributed`` (deselect with ``-m "not distributed"``), real
``accelerate launch`` runs of 2 CPU processes (torchrun + gloo) against one process."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from t2i_common import distributed as D
from t2i_common.cache import ResultCache

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"


# ---------------------------------------------------------------- shards and the split
@pytest.mark.parametrize("value,expected", [((1, 4), (1, 4)), ([0, 2], (0, 2)), ("2/3", (2, 3)),
                                            ("[1, 2]", (1, 2)), (None, None)])
def test_parse_shard_forms(value, expected):
    assert D.parse_shard(value) == expected


@pytest.mark.parametrize("bad", [(2, 2), (-1, 3), (0, 0), (1,), "a/b", (1.0, 2), (True, 2), "3"])
def test_parse_shard_rejects_bad_values_naming_shard(bad):
    with pytest.raises(D.ShardError, match=r"shard"):
        D.parse_shard(bad)


def test_resolve_shard_explicit_env_and_default(monkeypatch):
    monkeypatch.delenv(D.SHARD_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.resolve_shard() == D.Shard(0, 1, False, "single")
    monkeypatch.setenv(D.SHARD_ENV, "1/3")
    assert (D.resolve_shard().rank, D.resolve_shard().world) == (1, 3)
    assert D.resolve_shard((0, 2)).world == 2          # the argument wins over the environment
    monkeypatch.setenv(D.SHARD_ENV, "5/3")
    with pytest.raises(D.ShardError, match=D.SHARD_ENV):
        D.resolve_shard()


@pytest.mark.parametrize("chunk", [1, 3])
def test_split_is_a_partition_of_whole_batches(chunk):
    ids = [f"ex{i}" for i in range(23)]
    batches = D.chunks_of(ids, chunk)                  # the batches of a one-process run
    for world in (1, 2, 3, 5):
        shares = [D.shard_ids(ids, (r, world), chunk) for r in range(world)]
        flat = [i for s in shares for i in s]
        assert sorted(flat) == sorted(ids) and len(flat) == len(ids)   # each id exactly once
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= chunk
        for b in batches:                              # a batch never straddles two shards
            assert sum(set(b) <= set(s) for s in shares) == 1


# ---------------------------------------------------------------- sharded loops (in process)
def _counting(calls):
    def fn(part):
        calls.extend(part)
        return [{"x": torch.tensor([float(i), i * 0.5]), "n": i} for i in part]
    return fn


def test_array_job_shards_then_plain_reduce(tmp_path):
    ids = list(range(10))
    ref = D.sharded_map(_counting([]), ids, None, chunk=2, progress=False)
    rc = ResultCache("t", {"k": 1}, root=tmp_path)
    calls = []
    with pytest.warns(UserWarning, match="NaN placeholders"):
        part = D.sharded_map(_counting(calls), ids, rc, (0, 3), chunk=2, progress=False)
    mine = D.shard_ids(ids, (0, 3), 2)
    assert calls == mine and D.last_stats.computed == len(mine)
    assert all(torch.isnan(part[i]["x"]).all() for i in ids if i not in mine)
    assert part[mine[0]]["n"] == mine[0]
    with pytest.warns(UserWarning, match="shard 1/3"):
        D.sharded_map(_counting(calls), ids, rc, (1, 3), chunk=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # the last shard finds the cache complete
        D.sharded_map(_counting(calls), ids, rc, (2, 3), chunk=2, progress=False)
    assert sorted(calls) == ids                        # every example computed exactly once
    calls.clear()
    out = D.sharded_map(_counting(calls), ids, rc, chunk=2, progress=False)   # the reduce
    assert calls == [] and D.last_stats.reused == len(ids)
    assert all(torch.equal(out[i]["x"], ref[i]["x"]) for i in ids)
    # a lost shard: its files gone, the plain run recomputes exactly those
    lost = D.shard_ids(ids, (1, 3), 2)
    for i in lost:
        rc.path(i).unlink()
    D.sharded_map(_counting(calls), ids, rc, chunk=2, progress=False)
    assert sorted(calls) == sorted(lost)


def test_sharded_map_needs_a_cache_and_unique_ids():
    with pytest.raises(D.ShardError, match="cache="):
        D.sharded_map(_counting([]), [1, 2], None, (0, 2), progress=False)
    with pytest.raises(ValueError, match="unique"):
        D.sharded_map(_counting([]), [1, "1"], None, progress=False)
    with pytest.raises(ValueError, match="not in"):
        D.reduce_cached([1, 2], ResultCache("t", {}, root=None, enabled=False))


def test_mi_scores_do_not_depend_on_the_number_of_shards(tiny_model, tiny_images, tmp_path):
    from t2i_common.info_decomp import information as it

    items = [{"image_options": [im], "caption_options": ["a red circle", "a circle red", "a"]}
             for im in tiny_images]
    kw = dict(n_samples=3, estimator="both", images_per_call=2, progress=False)
    one = it.aro_scores(tiny_model, items, **kw)
    rc = ResultCache("mi", {"k": 2}, root=tmp_path)
    with pytest.warns(UserWarning, match="shard 1/2"):
        part = it.aro_scores(tiny_model, items, cache=rc, shard=(1, 2), **kw)
    assert np.isnan(part["orthogonal"][:2]).all() and not np.isnan(part["orthogonal"][2:]).any()
    it.aro_scores(tiny_model, items, cache=rc, shard=(0, 2), **kw)
    both = it.aro_scores(tiny_model, items, cache=rc, **kw)
    assert D.last_stats.computed == 0
    for k in ("orthogonal", "standard"):
        assert both[k].tobytes() == one[k].tobytes()


# ---------------------------------------------------------------- the training loop (in process)
def test_batch_pieces():
    ps = D.batch_pieces(12, 2, 3, rank=1)
    assert [(p.rows.start, p.rows.stop) for p in ps] == [(6, 8), (8, 10), (10, 12)]
    assert all(p.n_pieces == 6 and p.batch == 12 and p.gather is not None for p in ps)
    assert D.batch_pieces(8, 1, 1, 0)[0].gather is None
    with pytest.raises(ValueError, match="batch_size=10 .* multiple of 4"):
        D.batch_pieces(10, 2, 2, 0)


def _tiny_unet(steps, **kw):
    from transformers import CLIPModel

    from t2i_common import sdformat
    from t2i_common.toyworld import training as T
    from tests.conftest import TINY_WORDS
    from tests.test_training import _pairs

    cfg = sdformat.TinySDConfig.tiny()
    tok = sdformat.build_tokenizer(TINY_WORDS, max_length=cfg.max_length)
    torch.manual_seed(0)
    clip = CLIPModel(sdformat.clip_config(cfg, tok))
    te, vae = sdformat.text_encoder_from_clip(clip), sdformat.build_vae(cfg)
    kw = dict(dict(batch_size=8, lr=2e-3, warmup=2, seed=1, progress=False, ema_decay=None), **kw)
    return T.train_unet(_pairs(), te, vae, tok, cfg, steps, **kw)


#: Tolerances of "same loss curve / weights" between splits of one global batch: the splits sum
#: the same float32 terms in another order (a mean of two 4-row means vs one 8-row mean), ~1e-7
#: relative in the loss and gradients.  Adam then divides each gradient by its running RMS, so a
#: gradient entry near zero can turn a last-bit difference into up to lr per step (2e-3 here);
#: measured: loss 1.6e-7 relative, weights 3.2e-5 absolute after 4 steps.  Bounds: 1e-5 relative
#: and 2e-4 absolute, 10x under one Adam step and far under the weights' change in 4 steps.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-4


def _max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_grad_accum_keeps_the_global_batch_and_bf16_runs():
    one, i1 = _tiny_unet(4)
    acc, i2 = _tiny_unet(4, grad_accum=2)
    assert i2["grad_accum"] == 2 and len(i2["losses"]) == 4
    np.testing.assert_allclose(i2["losses"], i1["losses"], rtol=LOSS_RTOL)
    assert _max_diff(one.state_dict(), acc.state_dict()) < WEIGHT_ATOL
    half, _ = _tiny_unet(4, batch_size=4)                 # another global batch: differs
    assert _max_diff(one.state_dict(), half.state_dict()) > 20 * WEIGHT_ATOL
    with pytest.raises(ValueError, match="multiple of 3"):
        _tiny_unet(1, grad_accum=3)
    _, i4 = _tiny_unet(2, mixed_precision="bf16")
    assert i4["mixed_precision"] == "bf16" and np.isfinite(i4["losses"]).all()
    assert i4["losses"][0] == pytest.approx(i1["losses"][0], rel=0.05)


# ---------------------------------------------------------------- accelerate launch, 2 processes
@contextlib.contextmanager
def _one_thread():
    """The workers run with 1 torch thread (``_launch``); the 1-process reference is computed
    with 1 as well, whatever the run's thread count (``OMP_NUM_THREADS=2 make test``): float
    results of a CPU kernel may depend on how it splits work between threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, n=2, check=True):
    """``accelerate launch`` of the worker on n CPU processes.  accelerate's ``--cpu`` launcher
    spawns several processes only through mpirun; its torchrun launcher (``--multi_gpu``) with
    ``ACCELERATE_USE_CPU=1`` gives n CPU processes in one gloo process group."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop(D.SHARD_ENV, None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(n), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(WORKER), *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if check and p.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def _stats(out):
    return {j["rank"]: j for j in (json.loads(f.read_text()) for f in Path(out).glob("stats_*.json"))}


@pytest.fixture(scope="module")
def one_process_scores():
    from t2i_common.info_decomp import information as infotheory
    from t2i_common.models import load_t2i
    from tests.dist_worker import toy_items

    from tests.dist_worker import attribution_loss

    model, items = load_t2i("toy"), toy_items(8)
    with _one_thread():
        res = infotheory.aro_scores(model, items, n_samples=4, estimator="both", images_per_call=2,
                                    progress=False)
        res["training_loss"] = attribution_loss(model, items, None)
    return res


def _assert_same_bytes(out, ref, ranks=(0, 1)):
    for r in ranks:
        z = np.load(Path(out) / f"scores_rank{r}.npz")
        for k in ("orthogonal", "standard", "training_loss"):
            assert z[k].tobytes() == ref[k].tobytes(), (r, k)


@pytest.mark.distributed
def test_two_processes_score_byte_identical_to_one(tmp_path, one_process_scores):
    _launch(["score", "--out", tmp_path, "--cache", tmp_path / "cache"])
    st = _stats(tmp_path)
    assert {r: (s["world"], s["source"], s["computed"]) for r, s in st.items()} == \
        {0: (2, "accelerate", 4), 1: (2, "accelerate", 4)}
    _assert_same_bytes(tmp_path, one_process_scores)


@pytest.mark.distributed
def test_killed_process_rerun_recomputes_only_missing(tmp_path, one_process_scores):
    cache = tmp_path / "cache"
    p = _launch(["score", "--out", tmp_path, "--cache", cache, "--kill-after", 1], check=False)
    assert p.returncode != 0 and not (tmp_path / "stats_rank1.json").exists()
    done = len(list(cache.glob("dist_test/*/*.pt")))
    assert 2 <= done < 8                     # rank 1 finished one batch of 2 before it died
    _launch(["score", "--out", tmp_path, "--cache", cache])
    st = _stats(tmp_path)
    assert sum(s["computed"] for s in st.values()) == 8 - done     # nothing finished is redone
    assert sum(s["reused"] for s in st.values()) == done and st[1]["reused"] >= 2
    _assert_same_bytes(tmp_path, one_process_scores)


@pytest.mark.distributed
def test_two_process_training_matches_one_process(tmp_path):
    _launch(["train", "--out", tmp_path, "--steps", 4, "--batch", 8])
    two = torch.load(tmp_path / "train.pt", weights_only=False)
    one, info = _tiny_unet(4)
    assert two["world"] == 2 and info["world_size"] == 1
    np.testing.assert_allclose(two["losses"], info["losses"], rtol=LOSS_RTOL)
    assert _max_diff(one.state_dict(), two["state"]) < WEIGHT_ATOL


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["unclip_prior", "unclip_decoder"])
def test_two_process_unclip_training_matches_one_process(stage, tmp_path, tiny_sd_dir):
    """The unCLIP prior and decoder under accelerate launch (2 CPU processes, 4 rows each) take
    the steps of one process on the global batch of 8."""
    from tests.dist_worker import unclip_train

    _launch(["train", "--stage", stage, "--sd-folder", tiny_sd_dir, "--out", tmp_path,
             "--steps", 3, "--batch", 8])
    two = torch.load(tmp_path / "train.pt", weights_only=False)
    with _one_thread():
        one, info = unclip_train(stage, tiny_sd_dir, 3, 8)
    assert two["world"] == 2 and info["world_size"] == 1
    np.testing.assert_allclose(two["losses"], info["losses"], rtol=LOSS_RTOL)
    assert _max_diff(one.state_dict(), two["state"]) < WEIGHT_ATOL
    with _one_thread():
        other, _ = unclip_train(stage, tiny_sd_dir, 3, 4)     # another global batch: differs
    assert _max_diff(one.state_dict(), other.state_dict()) > 20 * WEIGHT_ATOL


# ---------------------------------------------------------------- AD's embedding pass
def test_ad_embedding_shards_merge_into_the_cache(tmp_path, tiny_sd_dir):
    from t2i_common.implosion import ad_embeddings as ade
    from t2i_common.formats import read_embedding_cache
    from t2i_common.models import load_clip
    from tests.test_alignment import CountingCLIP, _write_pairs

    clip = load_clip(tiny_sd_dir / "clip")
    _write_pairs(tmp_path / "data", 10)
    glob = str(tmp_path / "data" / "*")               # also matches the cache's own files
    ref = ade.embed_pairs(glob, clip, None, batch_size=3, resize=32, progress=False)
    cache = tmp_path / "data" / "emb.pickle"
    counts = []
    for r in (0, 1):
        c = CountingCLIP(clip)
        part = ade.embed_pairs(glob, c, cache, batch_size=3, resize=32, progress=False,
                               shard=(r, 2))
        counts.append(c.images)
        mine = D.shard_ids(ref.paths, (r, 2), 3)
        rows = [ref.paths.index(p) for p in mine]
        assert part.paths == ref.paths and torch.equal(part.img_emb[rows], ref.img_emb[rows])
        assert torch.isnan(part.img_emb[[i for i in range(10) if i not in rows]]).all()
    assert counts == [6, 4] and not cache.exists()
    assert len(list((tmp_path / "data").glob("emb.pickle.shard*of2.part"))) == 2
    c = CountingCLIP(clip)                            # the reduce: merge, embed nothing
    out = ade.embed_pairs(glob, c, cache, batch_size=3, resize=32, progress=False)
    assert c.images == 0 and out.num_new == 0 and torch.equal(out.img_emb, ref.img_emb)
    assert torch.equal(out.txt_emb, ref.txt_emb) and len(read_embedding_cache(cache)) == 10
    assert not list((tmp_path / "data").glob("*.part*"))
    with pytest.raises(D.ShardError, match="cache_path"):
        ade.embed_pairs(glob, clip, None, shard=(0, 2), progress=False)


# ---------------------------------------------------------------- the Slurm template
def test_slurm_template_submits_shards_then_reduce(tmp_path):
    script = ROOT / "scripts" / "slurm_shards.sbatch"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.log"
    for name, body in (("sbatch", f'echo "$@" >> {log}\necho 4242'), ("py", 'echo "$@"')):
        (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bindir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bindir}:{env['PATH']}", T2I_CACHE=str(tmp_path / "cache"))
    run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=60)
    p = subprocess.run(["bash", str(script), "50_relation_testing", "3", "-p", "n_samples", "8"],
                       env=env, **run)
    assert p.returncode == 0, p.stderr
    array, reduce = log.read_text().splitlines()
    assert "--array=0-2" in array and array.endswith("shard 50_relation_testing 3 -p n_samples 8")
    assert "--dependency=afterok:4242" in reduce
    assert reduce.endswith("reduce 50_relation_testing 3 -p n_samples 8")
    job = dict(env, SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(tmp_path), PY=str(bindir / "py"))
    task = subprocess.run(["bash", str(script), "shard", "50_relation_testing", "3", "-p", "x", "1"],
                          env=dict(job, SLURM_ARRAY_TASK_ID="2"), **run)
    assert task.stdout.strip() == "-m t2i_common.runner 50_relation_testing --shard 2/3 -p x 1"
    red = subprocess.run(["bash", str(script), "reduce", "50_relation_testing", "3", "-p", "x", "1"],
                         env=job, **run)
    assert red.stdout.strip() == "-m t2i_common.runner 50_relation_testing -p x 1"
    bad = subprocess.run(["bash", str(script), "50_relation_testing", "0"], env=env, **run)
    assert bad.returncode == 2 and "N_SHARDS a positive integer" in bad.stderr


# ---------------------------------------------------------------- DiffusionITM grid and adaptive
def _match_items(tiny_images):
    from t2i_common.formats import MatchItem

    caps = ["a red circle", "a blue square", "a green triangle", "a circle red"]
    im = tiny_images
    return [MatchItem([im[0]], caps, 0, 1), MatchItem([im[1], im[2], im[0]], [caps[0]], 2, 0),
            MatchItem([im[2], im[3]], caps[1:3], 0, 0), MatchItem([im[3]], caps[:2], 0, 0),
            MatchItem([im[1]], caps[2:], 0, 1)]


def test_diffitm_grid_shards_are_byte_identical(tiny_model, tiny_images, tmp_path):
    from t2i_common import diffusion_itm as itm

    items = _match_items(tiny_images)
    one = itm.diffitm_distances(tiny_model, items, S=4, chunk=2, progress=False)
    rc = ResultCache("itm", {"k": 3}, root=tmp_path)
    with pytest.warns(UserWarning, match="shard 1/2"):
        part = itm.diffitm_distances(tiny_model, items, S=4, chunk=2, cache=rc, shard=(1, 2),
                                     progress=False)
    assert D.last_stats.mine == 2 and D.last_stats.computed == 2       # chunk 1 of 0..2
    assert torch.isnan(part.dists[0]).all() and part.dists[0].shape == one.dists[0].shape
    assert torch.equal(part.dists[2], one.dists[2])
    itm.diffitm_distances(tiny_model, items, S=4, chunk=2, cache=rc, shard=(0, 2), progress=False)
    both = itm.diffitm_distances(tiny_model, items, S=4, chunk=2, cache=rc, progress=False)
    assert D.last_stats.computed == 0 and D.last_stats.reused == len(items)
    assert all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(both.dists, one.dists))


def test_adaptive_shards_reduce_from_the_cache(tiny_model, tiny_images, tmp_path):
    from t2i_common import diffusion_itm as itm

    items = [it for it in _match_items(tiny_images) if len(it.images) == 1]
    one = itm.adaptive_scores(tiny_model, items, S=4, progress=False)
    rc = ResultCache("itm_ad", {"k": 4}, root=tmp_path)
    for r in (0, 1, 2):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "adaptive DiffusionITM", UserWarning)  # placeholders
            itm.adaptive_scores(tiny_model, items, S=4, cache=rc, shard=(r, 3), progress=False)
        assert D.last_stats.computed == len(D.shard_ids(list(range(len(items))), (r, 3), 1))
    both = itm.adaptive_scores(tiny_model, items, S=4, cache=rc, progress=False)
    assert D.last_stats.computed == 0
    assert both.evals == one.evals
    for a, b in zip(both.scores, one.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_two_process_lora_matches_one_process(tmp_path):
    """HardNeg LoRA, 3 steps of 2 micro-batches: micro-batch m runs on process m mod 2 and the
    LoRA gradients are summed over the processes.  One process accumulates g1/2 + g2/2 in the
    same order the all-reduce adds the two terms (a sum of two floats is commutative), so here
    the curves and the weights are *identical*, not just close (measured: max difference 0.0;
    with more micro-batches per process the summation order, hence the last bits, may differ,
    which the tolerances above would cover).  The logged loss is 0 while the hinge is closed
    (L_pos - stopgrad(L_pos)), so L_pos and L_neg carry the curve."""
    from t2i_common.diffusion_itm import hardneg as lora
    from t2i_common.models import load_t2i
    from tests.dist_worker import lora_cfg, lora_data

    _launch(["lora", "--out", tmp_path, "--steps", 3])
    two = torch.load(tmp_path / "lora.pt", weights_only=False)
    model = load_t2i("toy")
    with _one_thread():
        hist = lora.finetune_hardneg(model, lora_data(), None, lora_cfg(3), progress=False)
    for k in ("loss", "l_pos", "l_neg", "hinge_open", "kinds"):
        assert two["history"][k] == list(hist[k]), k
    assert len(set(two["history"]["l_pos"])) == 3               # a curve, not a constant
    one = lora.lora_state_dict(model)
    assert all(torch.equal(one[k], two["state"][k]) for k in one)
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3  # trained


