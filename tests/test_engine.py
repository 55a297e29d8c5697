"""The engine against a plain per-example reference loop, noise sharing, determinism."""
import pytest
import torch

from t2i_common.engine import NoiseBank, denoise_errors, grid_timesteps

PROMPTS = ["a red circle", "", "a blue square to the left of a green triangle"]


def reference_loop(model, z0, emb, cond_idx, t, noise):
    """One UNet call per (example, condition, timestep), the originals' structure."""
    B, P, K = z0.shape[0], len(cond_idx), len(t)
    l2 = torch.empty(B, P, K)
    maps = torch.empty(B, P, K, *z0.shape[2:])
    preds = {}
    for b in range(B):
        for p, c in enumerate(cond_idx):
            for k in range(K):
                abar = model.alphas_cumprod[t[k]].float()
                zt = abar.sqrt() * z0[b:b + 1] + (1 - abar).sqrt() * noise[k:k + 1]
                with torch.no_grad():
                    pred = model.unet(zt, t[k], encoder_hidden_states=emb[c:c + 1]).sample
                err = noise[k:k + 1] - pred
                l2[b, p, k] = err.flatten().norm()
                maps[b, p, k] = err.pow(2).sum(1)[0]
                preds[b, p, k] = pred[0]
    return l2, maps, preds


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_images):
    x = tiny_model.preprocess(tiny_images[:3])
    z0 = tiny_model.encode_images(x)
    emb = tiny_model.encode_prompts(PROMPTS)
    t = grid_timesteps(5)
    noise = NoiseBank(tiny_model.latent_shape, seed=3).draw(len(t))
    return z0, emb, t, noise


@pytest.mark.parametrize("batch_size", [1, 4, 7, 64])
def test_engine_matches_reference_loop(tiny_model, setup, batch_size):
    z0, emb, t, noise = setup
    res = denoise_errors(tiny_model, z0, emb, [0, 1, 2], timesteps=t, noise=noise,
                         outputs=("l2", "mse", "sq", "map", "pred"), diff_pairs=[(0, 1), (2, 0)],
                         batch_size=batch_size)
    l2, maps, preds = reference_loop(tiny_model, z0, emb, [0, 1, 2], t, noise)
    torch.testing.assert_close(res["l2"], l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["map"], maps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["sq"], l2 ** 2, atol=1e-4, rtol=1e-5)
    C, h, w = tiny_model.latent_shape
    torch.testing.assert_close(res["mse"], l2 ** 2 / (C * h * w), atol=1e-6, rtol=1e-5)
    # the map summed over pixels is the squared error
    torch.testing.assert_close(res["map"].sum((-1, -2)), res["sq"], atol=1e-4, rtol=1e-5)
    for (b, p, k), pr in list(preds.items())[::7]:
        torch.testing.assert_close(res["pred"][b, p, k], pr, atol=1e-5, rtol=1e-5)
    d01 = torch.stack([torch.stack([(preds[b, 0, k] - preds[b, 1, k]).pow(2).sum()
                                    for k in range(len(t))]) for b in range(3)])
    torch.testing.assert_close(res["diff_sq"][:, 0], d01, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(res["diff_map"].sum((-1, -2)), res["diff_sq"], atol=1e-4, rtol=1e-5)


def test_per_image_conditions_and_noise(tiny_model, setup):
    z0, emb, t, _ = setup
    bank = NoiseBank(tiny_model.latent_shape, seed=5)
    noise = torch.stack([bank.draw(len(t), stream=i) for i in range(3)])
    idx = torch.tensor([[0, 1], [2, 0], [1, 1]])
    res = denoise_errors(tiny_model, z0, emb, idx, timesteps=t, noise=noise, outputs=("l2",))
    for b in range(3):
        ref, _, _ = reference_loop(tiny_model, z0[b:b + 1], emb, idx[b].tolist(), t, noise[b])
        torch.testing.assert_close(res["l2"][b], ref[0], atol=1e-5, rtol=1e-5)
    # the same condition twice on one image sees the same noised latent: identical errors
    assert torch.equal(res["l2"][2, 0], res["l2"][2, 1])


def test_noise_shared_across_conditions(tiny_model, setup):
    z0, emb, t, noise = setup
    res = denoise_errors(tiny_model, z0, emb, [0, 0, 1], timesteps=t, noise=noise,
                         outputs=("l2",), diff_pairs=[(0, 1)], batch_size=2)
    assert torch.equal(res["l2"][:, 0], res["l2"][:, 1])  # same prompt -> same error, any batching
    assert torch.all(res["diff_sq"] == 0)


def test_logsnr_mode_equals_timestep_mode_on_grid(tiny_model, setup):
    z0, emb, t, noise = setup
    a = tiny_model.t_to_logsnr(t)
    r1 = denoise_errors(tiny_model, z0, emb, [0, 1], timesteps=t, noise=noise, outputs=("l2",))
    r2 = denoise_errors(tiny_model, z0, emb, [0, 1], logsnr=a, noise=noise, outputs=("l2",))
    torch.testing.assert_close(r1["l2"], r2["l2"], atol=1e-5, rtol=1e-5)


def test_noise_bank_deterministic_and_stream_independent():
    b1, b2 = NoiseBank((4, 8, 8), seed=7), NoiseBank((4, 8, 8), seed=7)
    assert torch.equal(b1.draw(5), b2.draw(5))
    assert torch.equal(b1.draw(5, stream=3), b2.draw(5, stream=3))
    assert torch.equal(b1.draw(5)[:2], b1.draw(2))  # a prefix of a longer draw
    assert not torch.equal(b1.draw(5, stream=0), b1.draw(5, stream=1))
    assert not torch.equal(b1.draw(5), NoiseBank((4, 8, 8), seed=8).draw(5))
    x = b1.draw(20000)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


def test_determinism_same_seed_same_numbers(tiny_model, setup):
    z0, emb, t, _ = setup
    outs = [denoise_errors(tiny_model, z0, emb, [0, 2], timesteps=t,
                           noise=NoiseBank(tiny_model.latent_shape, seed=s).draw(len(t)),
                           outputs=("l2",))["l2"] for s in (11, 11, 12)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_grid_timesteps_matches_original():
    assert grid_timesteps(10).tolist() == list(range(10, 990, 100))
    assert len(grid_timesteps(250)) == len(range(10, 990, 4)) == 245
    with pytest.raises(ValueError):
        grid_timesteps(0)


def test_engine_bad_inputs(tiny_model, setup):
    z0, emb, t, noise = setup
    with pytest.raises(ValueError, match="noise"):
        denoise_errors(tiny_model, z0, emb, [0], timesteps=t, noise=noise[:2])
    with pytest.raises(ValueError, match="cond_emb"):
        denoise_errors(tiny_model, z0, emb, [5], timesteps=t, noise=noise)
    with pytest.raises(ValueError, match="unknown outputs"):
        denoise_errors(tiny_model, z0, emb, [0], timesteps=t, noise=noise, outputs=("bogus",))
    with pytest.raises(ValueError, match="timesteps or logsnr"):
        denoise_errors(tiny_model, z0, emb, [0], noise=noise)
    with pytest.raises(ValueError, match="diff pair"):
        denoise_errors(tiny_model, z0, emb, [0], timesteps=t, noise=noise, diff_pairs=[(0, 3)])


def test_engine_rejects_timesteps_outside_schedule(tiny_model, setup):
    z0, emb, t, noise = setup
    for bad in ([-1] + [10] * (len(t) - 1), [10] * (len(t) - 1) + [1000]):
        with pytest.raises(ValueError, match=r"timesteps \[(-1|1000)\] are outside \[0, 1000\).*"
                           r"use t in 0\.\.999"):
            denoise_errors(tiny_model, z0, emb, [0], timesteps=torch.tensor(bad), noise=noise)
    with pytest.raises(ValueError, match=r"timesteps must be integers.*pass logsnr"):
        denoise_errors(tiny_model, z0, emb, [0], timesteps=t.double() + 0.5, noise=noise)


def test_engine_rejects_empty_inputs(tiny_model, setup):
    z0, emb, t, noise = setup
    with pytest.raises(ValueError, match=r"condition list is empty \(cond_idx has P=0"):
        denoise_errors(tiny_model, z0, emb, [], timesteps=t, noise=noise)
    with pytest.raises(ValueError, match=r"no latents given"):
        denoise_errors(tiny_model, z0[:0], emb, [0], timesteps=t, noise=noise)
    with pytest.raises(ValueError, match=r"no noise levels given"):
        denoise_errors(tiny_model, z0, emb, [0], timesteps=t[:0], noise=noise[:0])
    with pytest.raises(ValueError, match=r"logsnr holds NaN"):
        denoise_errors(tiny_model, z0, emb, [0], logsnr=torch.full((len(t),), float("nan")),
                       noise=noise)


def test_engine_rejects_wrong_shapes_before_the_unet(tiny_model, setup, monkeypatch):
    z0, emb, t, noise = setup
    monkeypatch.setattr(tiny_model.unet, "forward", lambda *a, **k: pytest.fail("UNet called"))
    C = tiny_model.latent_shape[0]
    with pytest.raises(ValueError, match=rf"latents \(3, {C - 1}, 8, 8\) have {C - 1} channels but the "
                       rf"UNet expects {C}.*model.encode_images"):
        denoise_errors(tiny_model, z0[:, :C - 1], emb, [0], timesteps=t, noise=noise[:, :C - 1])
    D = emb.shape[-1]
    with pytest.raises(ValueError, match=rf"cond_emb \(3, {emb.shape[1]}, {D + 1}\) has width {D + 1} "
                       rf"but the UNet's cross-attention expects {D}"):
        denoise_errors(tiny_model, z0, torch.cat([emb, emb[..., :1]], -1), [0], timesteps=t,
                       noise=noise)
    with pytest.raises(ValueError, match=r"cond_emb must be \[U, L, D\]"):
        denoise_errors(tiny_model, z0, emb[0], [0], timesteps=t, noise=noise)
    with pytest.raises(ValueError, match=r"refers to row -1 .*valid: 0\.\.2"):
        denoise_errors(tiny_model, z0, emb, [-1], timesteps=t, noise=noise)
