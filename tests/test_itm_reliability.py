"""DiffusionITM reliability: latent modes against a per-call loop, ties, bad S / chunk, kills and
damaged cache entries."""
import hashlib
import math

import numpy as np
import pytest
import torch

from t2i_common import diffusion_itm as itm, engine
from t2i_common.diffusion_itm import scoring as itm_scoring
from t2i_common.cache import ResultCache
from t2i_common.engine import NoiseBank, grid_timesteps
from t2i_common.formats import MatchItem

CAPS = ["a red circle", "a blue square to the left of a green triangle", "a small yellow diamond"]


@pytest.fixture(scope="module")
def items(tiny_images):
    im = tiny_images
    return [MatchItem([im[0]], CAPS, 0, 1),                                  # text retrieval
            MatchItem([im[1], im[2], im[0]], [CAPS[0]], 2, 0),                # image retrieval
            MatchItem([im[2], im[3]], [CAPS[1], CAPS[2]], 0, 0)]              # Winoground 2 x 2


@torch.inference_mode()
def _call_loop(model, item, S, seed, mode, img_retrieval=False):
    """Reference: one call per (caption, image) as the original's score_batch, re-encoding the image
    at every timestep; z0 = posterior mean + std * draw k of the posterior stream named in the
    module docstring (per image in "sample", per (image, caption) in "sample_per_call")."""
    grid = grid_timesteps(S)
    K = len(grid)
    bank = NoiseBank(model.latent_shape, seed).draw(K)
    sf = model.scaling_factor
    s = torch.zeros(len(item.images), len(item.captions), dtype=torch.float64)
    for j, c in enumerate(item.captions):
        emb = model.encode_prompts([c])
        emb0 = model.encode_prompts([""])
        for i, im in enumerate(item.images):
            key = itm.image_key(im)
            tag = key + "\x00" + c if mode == "sample_per_call" else key
            stream = 1 + int(hashlib.sha1(tag.encode()).hexdigest()[:12], 16)
            draws = NoiseBank(model.latent_shape, seed).draw(K, stream=stream)
            x = model.preprocess([im]).to(model.device, model.dtype)
            d = []
            for k, t in enumerate(grid):
                post = model.vae.encode(x).latent_dist
                z0 = (post.mean.float() + post.std.float() * draws[k]) * sf
                abar = model.alphas_cumprod[t].float()
                zt = abar.sqrt() * z0 + (1 - abar).sqrt() * bank[k:k + 1]
                dk = (bank[k:k + 1] - model.unet(zt, t, encoder_hidden_states=emb).sample).norm()
                if img_retrieval:
                    dk = dk - (bank[k:k + 1] - model.unet(zt, t, encoder_hidden_states=emb0).sample).norm()
                d.append(float(dk))
            s[i, j] = -float(np.mean(d))
    return s


@pytest.mark.parametrize("mode", ["sample", "sample_per_call"])
def test_sample_modes_equal_per_call_loop(tiny_model, items, mode):
    got = itm.diffitm_scores(tiny_model, items, S=5, seed=2, latent_mode=mode, progress=False)
    for it, s in zip(items, got):
        torch.testing.assert_close(s, _call_loop(tiny_model, it, 5, 2, mode), atol=2e-5, rtol=0)


def test_sample_per_call_image_retrieval_uses_the_calls_latents(tiny_model, items):
    got = itm.diffitm_scores(tiny_model, items[1:2], S=5, seed=1, latent_mode="sample_per_call",
                             img_retrieval=True, progress=False)
    ref = _call_loop(tiny_model, items[1], 5, 1, "sample_per_call", img_retrieval=True)
    torch.testing.assert_close(got[0], ref, atol=2e-5, rtol=0)


def test_sample_per_call_differs_from_shared_sample(tiny_model, items):
    shared = itm.diffitm_distances(tiny_model, items[:1], S=5, latent_mode="sample", progress=False)
    per_call = itm.diffitm_distances(tiny_model, items[:1], S=5, latent_mode="sample_per_call",
                                     progress=False)
    assert shared.unet_evals == per_call.unet_evals == 3 * 5
    assert not torch.allclose(shared.dists[0], per_call.dists[0])
    with pytest.raises(ValueError, match="sample_per_call"):
        itm.diffitm_scores(tiny_model, items[:1], latent_mode="per_call", progress=False)


@pytest.mark.parametrize("mode", ["mean", "sample", "sample_per_call"])
def test_identical_captions_tie_exactly(tiny_model, tiny_images, mode):
    it = MatchItem([tiny_images[0]], [CAPS[0], CAPS[1], CAPS[0], CAPS[2], CAPS[1]], 0, 0)
    s = itm.diffitm_scores(tiny_model, [it], S=5, latent_mode=mode, progress=False)[0]
    assert s[0, 0] == s[0, 2] and s[0, 1] == s[0, 4] and s[0, 0] != s[0, 1]


def test_clip_identical_captions_tie_exactly(tiny_sd_dir, tiny_images):
    from t2i_common.models import load_clip

    clip = load_clip(tiny_sd_dir / "clip")
    it = MatchItem([tiny_images[1]], [CAPS[2], CAPS[0], CAPS[2]], 0, 0)
    s = itm.clip_scores(clip, [it])[0]
    assert s[0, 0] == s[0, 2] and s[0, 0] != s[0, 1]


def _text_item(n, gold):
    return MatchItem([np.zeros((4, 4, 3), np.uint8)], [f"c{j}" for j in range(n)], 0, gold)


def test_near_ties_within_tolerance():
    assert itm.TIE_RTOL == 1e-6
    base = -40.0
    near = base * (1 + 3e-7)          # a few float32 ulps apart: a tie
    far = base * (1 - 2e-6)           # beyond the tolerance: strictly better
    items = [_text_item(2, 1), _text_item(2, 1), _text_item(2, 0)]
    scores = [torch.tensor([[near, base]]), torch.tensor([[base, far]]), torch.tensor([[base, near]])]
    m = itm.retrieval_metrics(items, scores)
    assert m["ties"] == 2
    assert m["accuracy"] == pytest.approx(1 / 3)          # only item 1 is won alone
    assert m["accuracy_first"] == pytest.approx(1.0)      # original's rule: ties count as correct
    assert itm.pick(np.array([base, near, base - 1])) == 0
    wino = itm.winoground_metrics([torch.tensor([[base, near], [base - 1, base]])])
    assert wino["text"] == 0.0 and wino["image"] == 0.0   # s(c0,i0) vs s(c1,i0) is a near tie


def test_aro_gold_second_follows_the_original_rule():
    # ARO VG stores [false, true]: gold at 1; an exact tie is correct under the original's rule
    it = _text_item(2, 1)
    m = itm.retrieval_metrics([it], [torch.tensor([[-3.0, -3.0]])])
    assert m["accuracy_first"] == 1.0 and m["accuracy"] == 0.0 and m["ties"] == 1
    assert "a tie at the top counts as correct" in itm.TIE_RULES["accuracy_first"]


def test_recall_at_5_ties_rank_above_gold_as_the_original():
    # original: gold (first) in np.argsort(s)[-5:]; candidates tied with the gold sort after it
    s = np.array([0.5, 0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    it = MatchItem([np.zeros((4, 4, 3), np.uint8)] * 7, ["c"], 0, 0)
    m = itm.retrieval_metrics([it], [torch.tensor(s).unsqueeze(1)], ks=(5,))
    assert m["R@5"] == float(0 in np.argsort(s, kind="stable")[-5:]) == 0.0
    s2 = s.copy()
    s2[5] = 0.4
    m2 = itm.retrieval_metrics([it], [torch.tensor(s2).unsqueeze(1)], ks=(5,))
    assert m2["R@5"] == float(0 in np.argsort(s2, kind="stable")[-5:]) == 1.0


# ------------------------------------------------------------------------------------------------
# bad parameters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S", [10.5, "10", 0, None])
def test_non_integer_S_is_rejected_everywhere(tiny_model, items, S):
    with pytest.raises(ValueError, match=r"S \(sampling_steps\) must be a positive integer"):
        engine.grid_timesteps(S)
    with pytest.raises(ValueError, match=r"diffitm_distances: S \(sampling_steps\).*" + repr(S)[:4]):
        itm.diffitm_distances(tiny_model, items, S=S, progress=False)
    with pytest.raises(ValueError, match=r"adaptive_scores: S \(sampling_steps\)"):
        itm.adaptive_scores(tiny_model, items[:2], S=S, progress=False)
    with pytest.raises(ValueError, match=r"grid_evaluations: S \(sampling_steps\)"):
        itm.grid_evaluations(items, S)


def test_whole_number_S_types_accepted(tiny_model, items):
    a = itm.diffitm_distances(tiny_model, items[:1], S=np.int64(5), progress=False)
    b = itm.diffitm_distances(tiny_model, items[:1], S=5.0, progress=False)
    assert torch.equal(a.dists[0], b.dists[0]) and len(a.timesteps) == 5


def test_chunk_one_and_bad_chunk(tiny_model, items):
    one = itm.diffitm_distances(tiny_model, items, S=5, chunk=1, progress=False)
    many = itm.diffitm_distances(tiny_model, items, S=5, chunk=32, progress=False)
    for a, b in zip(one.dists, many.dists):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    pol = itm.AdaptivePolicy(n0=2, step=1, z=1.0)
    a1 = itm.adaptive_scores(tiny_model, items[:2], S=5, policy=pol, chunk=1, progress=False)
    a64 = itm.adaptive_scores(tiny_model, items[:2], S=5, policy=pol, chunk=64, progress=False)
    assert a1.evals == a64.evals
    for a, b in zip(a1.scores, a64.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for fn in (itm.diffitm_distances, itm.adaptive_scores):
        with pytest.raises(ValueError, match="chunk must be a positive integer"):
            fn(tiny_model, items[:2], S=5, chunk=0, progress=False)


# ------------------------------------------------------------------------------------------------
# kills and damaged caches
# ------------------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


def _kill_after(monkeypatch, calls):
    real = itm_scoring.denoise_errors
    n = {"calls": 0}

    def fake(*a, **kw):
        n["calls"] += 1
        if n["calls"] > calls:
            raise _Killed()
        return real(*a, **kw)

    monkeypatch.setattr(itm_scoring, "denoise_errors", fake)


def test_kill_loses_only_the_item_in_progress(tiny_model, tiny_images, tmp_path, monkeypatch):
    its = [MatchItem([im], [CAPS[0], CAPS[n % 3 + 1 if n % 3 < 2 else 1]], 0, 0)
           for n, im in enumerate(tiny_images)]
    # batch 2: a slice (SLICE_BATCHES x 2 = 8 evaluations) holds one item's 10 evaluations
    assert itm_scoring.SLICE_BATCHES * 2 < 10
    full = itm.diffitm_distances(tiny_model, its, S=5, batch_size=2, progress=False)
    key = dict(version=itm.SCORE_VERSION, model=itm.model_fingerprint(tiny_model), S=5, seed=0,
               latent_mode="mean", img_retrieval=False)
    _kill_after(monkeypatch, 2)          # one slice = one item
    with pytest.raises(_Killed):
        itm.diffitm_distances(tiny_model, its, S=5, batch_size=2, cache=tmp_path, progress=False)
    assert len(ResultCache("diffitm", key, root=tmp_path).done_ids()) == 2   # items 1, 2 kept
    monkeypatch.undo()
    again = itm.diffitm_distances(tiny_model, its, S=5, batch_size=2, cache=tmp_path, progress=False)
    assert again.unet_evals == 2 * 2 * 5                                    # only items 3, 4
    for a, b in zip(full.dists, again.dists):     # same batches as the uninterrupted run
        assert torch.equal(a, b)


@pytest.mark.parametrize("dropped", [[1], [0, 2], [3], [1, 2, 3], [0]])
def test_resumed_run_is_bit_identical(tiny_model, tiny_images, tmp_path, dropped):
    """Whichever items a killed run left unfinished, the resumed run batches the others exactly as
    an uninterrupted run (fixed chunks by item position, slices of finished items skipped)."""
    its = [MatchItem([im], [CAPS[n % 3], CAPS[(n + 1) % 3]], 0, 0) for n, im in enumerate(tiny_images)]
    its.append(MatchItem([tiny_images[0], tiny_images[2]], CAPS[:2], 0, 0))
    full = itm.diffitm_distances(tiny_model, its, S=5, batch_size=3, cache=tmp_path, chunk=3,
                                 progress=False)
    key = dict(version=itm.SCORE_VERSION, model=itm.model_fingerprint(tiny_model), S=5, seed=0,
               latent_mode="mean", img_retrieval=False)
    rc = ResultCache("diffitm", key, root=tmp_path)
    ids = itm_scoring._prepare(its).ids
    for n in dropped:
        rc._file(ids[n]).unlink()
    again = itm.diffitm_distances(tiny_model, its, S=5, batch_size=3, cache=tmp_path, chunk=3,
                                  progress=False)
    assert 0 < again.unet_evals < full.unet_evals
    for a, b in zip(full.dists, again.dists):
        assert torch.equal(a, b)


def test_adaptive_kill_keeps_finished_races(tiny_model, tiny_images, tmp_path, monkeypatch):
    its = [MatchItem([im], CAPS[:2], 0, 0) for im in tiny_images]
    pol = itm.AdaptivePolicy(n0=2, step=1, z=math.inf)       # every race runs all 5 points
    ref = itm.adaptive_scores(tiny_model, its, S=5, policy=pol, chunk=2, progress=False)
    _kill_after(monkeypatch, 4 + 1)      # 4 rounds finish the first pool of 2, then die
    with pytest.raises(_Killed):
        itm.adaptive_scores(tiny_model, its, S=5, policy=pol, chunk=2, cache=tmp_path, progress=False)
    assert len(list(tmp_path.rglob("*.pt"))) == 2       # the finished pool was saved at once
    monkeypatch.undo()
    again = itm.adaptive_scores(tiny_model, its, S=5, policy=pol, chunk=2, cache=tmp_path,
                                progress=False)
    assert ref.evals == again.evals == [10] * 4
    for a, b in zip(ref.scores, again.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert len(list(tmp_path.rglob("*.pt"))) == 4


def test_wrong_shape_cache_entry_is_recomputed(tiny_model, items, tmp_path):
    full = itm.diffitm_distances(tiny_model, items, S=5, cache=tmp_path, progress=False)
    key = dict(version=itm.SCORE_VERSION, model=itm.model_fingerprint(tiny_model), S=5, seed=0,
               latent_mode="mean", img_retrieval=False)
    rc = ResultCache("diffitm", key, root=tmp_path)
    first = itm_scoring._prepare(items[:1]).ids[0]
    rc.save(first, torch.zeros(1, 3, 11))                 # e.g. written by an 11-point grid
    with pytest.warns(UserWarning, match=r"\.pt is not a result of this call.*shape \(1, 3, 5\)"):
        again = itm.diffitm_distances(tiny_model, items, S=5, cache=tmp_path, progress=False)
    # item 0's slice is rerun as in the first run (one slice here: every item's requests)
    assert 3 * 5 <= again.unet_evals <= full.unet_evals
    assert torch.equal(again.dists[0], full.dists[0])
    assert tuple(rc.load(first).shape) == (1, 3, 5)


def test_wrong_adaptive_cache_entry_is_recomputed(tiny_model, items, tmp_path):
    pol = itm.AdaptivePolicy(n0=2, step=1, z=1.0)
    ref = itm.adaptive_scores(tiny_model, items[:1], S=5, policy=pol, cache=tmp_path, progress=False)
    f = next(tmp_path.rglob("*.pt"))
    torch.save({"scores": torch.zeros(2, 2), "evals": 1, "points": 1}, f)
    with pytest.warns(UserWarning, match="expected scores of shape \\(1, 3\\)"):
        again = itm.adaptive_scores(tiny_model, items[:1], S=5, policy=pol, cache=tmp_path,
                                    progress=False)
    assert again.evals == ref.evals
    torch.testing.assert_close(again.scores[0], ref.scores[0], atol=1e-5, rtol=0)


def test_seed_agreement_and_item_choices(tiny_model, items):
    wino = items[2]
    ch = itm.item_choices([items[0], wino], [torch.tensor([[0.1, 0.3, 0.3]]),
                                             torch.tensor([[1.0, 0.0], [2.0, 3.0]])])
    assert ch == [1, (0, 1, 1, 1)]
    tasks = {"text": [items[0]], "wino": [wino]}
    same = itm.seed_agreement(tiny_model, tasks, latent_modes=("mean",), seeds=(4, 4), S=5,
                              progress=False)
    assert (same["agreement"] == 1.0).all() and (same["all_agree"] == 1.0).all()
    assert list(same.index) == [("text", "mean"), ("wino", "mean")]
