"""HardNeg-DiffusionITM: LoRA adapter, the hinged negative loss, the step, save/load, resume."""
import numpy as np
import pytest
import torch

from t2i_common.diffusion_itm import hardneg as lora
from t2i_common.models import load_t2i

CAPS = ["a red circle", "a blue circle", "a green square", "a yellow triangle"]


@pytest.fixture()
def fresh(tiny_sd_dir):
    """A model of its own per test (the adapter changes the UNet)."""
    return load_t2i(tiny_sd_dir)


@pytest.fixture(scope="module")
def data(tiny_images):
    return lora.HardNegData(list(tiny_images), CAPS, [[CAPS[1]], [CAPS[0]], [CAPS[3]], [CAPS[2]]],
                            [[1], [0], [3], [2]])


def small_cfg(**kw):
    base = dict(batch_size=2, grad_accum=1, steps=4, val_every=2, ckpt_every=1, val_S=2)
    base.update(kw)
    return lora.HardNegConfig(**base)


def test_add_lora_targets_and_identity(fresh):
    n_proj = sum(1 for n, _ in fresh.unet.named_modules()
                 if n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0"))
    z = torch.randn(2, *fresh.latent_shape, generator=torch.Generator().manual_seed(0))
    emb = fresh.encode_prompts(CAPS[:2])
    with torch.no_grad():
        before = fresh.eps(z, torch.tensor([10, 500]), emb)
    lora.add_lora(fresh, rank=4)
    params = dict(fresh.unet.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * n_proj                         # A and B per projection
    for n in trainable:
        if "lora_A" in n:
            assert params[n].shape[0] == 4
        else:
            assert torch.all(params[n] == 0)                     # B = 0 at init
    with torch.no_grad():
        after = fresh.eps(z, torch.tensor([10, 500]), emb)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="already"):
        lora.add_lora(fresh)


def test_loss_hinge_by_gradients(fresh, data):
    """lambda = 0: L = L_pos (min(L_neg, 0) = 0); lambda huge: L = L_pos - L_neg, so the gradients
    are those of L_pos and of L_pos - L_neg."""
    lora.add_lora(fresh)
    b = lora.micro_batch(fresh, data, small_cfg(p_neg_image=0.0, p_hard_caption=1.0), step=0)
    assert b["kind"] == "caption"
    with torch.no_grad():   # make B non-zero so A gets gradients too
        for p in lora.lora_parameters(fresh):
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ps = lora.lora_parameters(fresh)

    def grads(lam, which="loss"):
        loss, lp, ln = lora.hardneg_loss(fresh, b["z_pos"], b["emb_pos"], b["t"], b["eps"], "caption",
                                         emb_neg=b["emb_neg"], neg_loss_factor=lam)
        out = {"loss": loss, "pos": lp, "neg": ln}[which]
        return torch.autograd.grad(out, ps), float(loss.detach()), float(lp.detach()), float(ln.detach())

    g0, loss0, lp, ln = grads(0.0)
    gp, *_ = grads(0.0, "pos")
    gbig, lossbig, _, _ = grads(1e6)
    gn, *_ = grads(0.0, "neg")
    assert loss0 == pytest.approx(lp) and lossbig == pytest.approx(lp - ln)
    for a, p_, big, n_ in zip(g0, gp, gbig, gn):
        torch.testing.assert_close(a, p_)
        torch.testing.assert_close(big, p_ - n_, atol=1e-6, rtol=1e-4)
    _, loss1, lp1, ln1 = grads(1.0)
    assert loss1 == pytest.approx(lp1 - min(ln1, lp1))


def test_step_changes_only_lora_and_lowers_loss(fresh, data):
    lora.add_lora(fresh)
    cfg = small_cfg(lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in fresh.unet.named_parameters() if "lora_" not in n}
    frozen.update({f"te.{n}": p.detach().clone() for n, p in fresh.text_encoder.named_parameters()})
    frozen.update({f"vae.{n}": p.detach().clone() for n, p in fresh.vae.named_parameters()})
    lora0 = {n: p.detach().clone() for n, p in fresh.unet.named_parameters() if "lora_" in n}
    b = lora.micro_batch(fresh, data, cfg, step=0)
    opt = lora.make_optimizer(fresh, cfg)

    # lambda = 1e6 keeps the hinge open (L = L_pos - L_neg): with lambda = 1 the value is exactly 0
    # whenever L_neg >= L_pos (only its gradient, that of L_pos, is informative)
    def loss(lam=1e6):
        return lora.hardneg_loss(fresh, b["z_pos"], b["emb_pos"], b["t"], b["eps"], b["kind"],
                                 b["z_neg"], b["emb_neg"], neg_loss_factor=lam)

    with torch.no_grad():
        before = float(loss()[0])
        pos_before = float(loss()[1])
    for _ in range(5):
        opt.zero_grad()
        loss()[0].backward()
        torch.nn.utils.clip_grad_norm_(lora.lora_parameters(fresh), cfg.max_grad_norm)
        opt.step()
    with torch.no_grad():
        after = float(loss()[0])
    assert after < before
    for _ in range(5):    # lambda = 0: the positive loss alone goes down
        opt.zero_grad()
        loss(0.0)[0].backward()
        opt.step()
    with torch.no_grad():
        assert float(loss()[1]) < pos_before
    now = dict(fresh.unet.named_parameters())
    now.update({f"te.{n}": p for n, p in fresh.text_encoder.named_parameters()})
    now.update({f"vae.{n}": p for n, p in fresh.vae.named_parameters()})
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert any(not torch.equal(now[n], v) for n, v in lora0.items())
    # the library step does the same kind of update and only touches LoRA weights
    out = lora.train_step(fresh, opt, data, cfg, step=1)
    assert set(out) == {"loss", "l_pos", "l_neg", "hinge_open", "kinds"}
    assert out["hinge_open"] == float(out["l_neg"] < out["l_pos"])      # grad_accum 1, lambda 1
    assert out["loss"] == pytest.approx(out["l_pos"] - min(out["l_neg"], out["l_pos"]), abs=1e-7)
    assert all(torch.equal(now[n], v) for n, v in frozen.items())


def test_mixed_negative_draws_are_seeded_and_balanced(data):
    cfg = small_cfg()
    a, b = lora.draw_batch(data, cfg, 7), lora.draw_batch(data, cfg, 7)
    assert (a["idx"], a["kind"], a["neg"]) == (b["idx"], b["kind"], b["neg"])
    assert torch.equal(a["t"], b["t"])
    kinds = [lora.draw_batch(data, cfg, s)["kind"] for s in range(2000)]
    for k, p in (("image", 0.5), ("caption", 0.25), ("random", 0.25)):
        assert abs(kinds.count(k) / 2000 - p) < 0.04
    d = lora.draw_batch(data, lora.HardNegConfig(p_neg_image=0, p_hard_caption=0, batch_size=8), 0)
    assert d["kind"] == "random" and all(n != CAPS[i] for i, n in zip(d["idx"], d["neg"]))


def test_save_load_roundtrip(fresh, data, tiny_sd_dir, tmp_path):
    cfg = small_cfg(lr=1e-2)
    lora.add_lora(fresh)
    opt = lora.make_optimizer(fresh, cfg)
    for s in range(2):
        lora.train_step(fresh, opt, data, cfg, s)
    lora.save_lora(fresh, tmp_path / "ad")
    other = lora.load_lora(load_t2i(tiny_sd_dir), tmp_path / "ad")
    sa, sb = lora.lora_state_dict(fresh), lora.lora_state_dict(other)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    z = torch.randn(1, *fresh.latent_shape, generator=torch.Generator().manual_seed(0))
    emb = fresh.encode_prompts(CAPS[:1])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eps(z, 300, emb), other.eps(z, 300, emb), atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="lora.safetensors"):
        lora.load_lora(other, tmp_path / "missing")


def test_finetune_resumes_exactly(tiny_sd_dir, data, tmp_path):
    val = lora.negclip_val_items(data)
    cfg = small_cfg(lr=1e-3)
    full = load_t2i(tiny_sd_dir)
    h_full = lora.finetune_hardneg(full, data, val, cfg, out_dir=tmp_path / "a", progress=False)
    killed = load_t2i(tiny_sd_dir)
    lora.finetune_hardneg(killed, data, val, cfg, out_dir=tmp_path / "b", progress=False, stop_after=2)
    assert not (tmp_path / "b" / "lora.safetensors").exists()
    resumed = load_t2i(tiny_sd_dir)
    h_res = lora.finetune_hardneg(resumed, data, val, cfg, out_dir=tmp_path / "b", progress=False)
    sa, sb = lora.lora_state_dict(full), lora.lora_state_dict(resumed)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-7, rtol=0) for k in sa)
    assert list(h_full["step"]) == list(h_res["step"])
    vals = h_res.dropna(subset=["val_acc"])
    assert list(vals["step"]) == [0, 2, 4]
    assert set(vals.columns) >= {"val_text", "val_image", "val_acc"}
    act = lora.hinge_activity(h_res)
    assert act["steps"].sum() == cfg.steps and act["hinge_open"].between(0, 1).all()
    assert (tmp_path / "b" / "lora.safetensors").exists()


def test_toy_negclip_pairs_are_reciprocal(tmp_path):
    from t2i_common import formats, toyworld

    tsv = lora.export_toy_negclip(tmp_path, 4, seed=0, families=("relation",))
    rows = formats.read_negclip_tsv(tsv)
    data = lora.hardneg_data_from_negclip(rows, tsv.parent)
    assert len(data) == 8
    for i, r in enumerate(rows):
        j = r.neg_images[0]
        assert rows[j].neg_images == [i] and r.neg_captions == [rows[j].title]
        assert sorted(r.title.split()) == sorted(r.neg_captions[0].split())   # same words, other order
        img = np.asarray(formats.to_pil(data.images[i]))
        assert toyworld.check_prompt(img, r.title)["relation_ok"]
    items = lora.negclip_val_items(data)
    assert [it.task for it in items] == ["text"] * 8 + ["image"] * 8
