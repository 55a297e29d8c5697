"""Training code: losses (closed forms), learning, determinism, exact resume, caption dropout,
saved folders loading through load_t2i / StableDiffusionPipeline / load_clip, evaluation metrics."""
import math

import numpy as np
import pytest
import torch

from t2i_common import sdformat
from t2i_common.toyworld import training as T
from tests.conftest import TINY_WORDS

COLS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40)}


def _pairs(n=16, size=16, seed=0):
    """Squares / diamonds of 4 colours on gray at random positions, caption "a {colour} {shape}"."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.full((size, size, 3), 118, np.uint8)
        colour, shape = list(COLS)[i % 4], ("square", "diamond")[(i // 4) % 2]
        x, y = rng.integers(0, size - 7, 2)
        yy, xx = np.mgrid[0:7, 0:7]
        m = np.ones((7, 7), bool) if shape == "square" else (abs(yy - 3) + abs(xx - 3) <= 3)
        img[y:y + 7, x:x + 7][m] = COLS[colour]
        out.append((img, f"a {colour} {shape}"))
    return out


@pytest.fixture(scope="module")
def cfg():
    return sdformat.TinySDConfig.tiny()


@pytest.fixture(scope="module")
def tok(cfg):
    return sdformat.build_tokenizer(TINY_WORDS, max_length=cfg.max_length)


def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- closed forms
def test_contrastive_loss_closed_form():
    n, s = 4, 2.0
    f = torch.eye(n)
    ls = torch.tensor(math.log(s))
    expected = -math.log(math.exp(s) / (math.exp(s) + n - 1))
    assert T.clip_contrastive_loss(f, f, ls).item() == pytest.approx(expected, rel=1e-5)
    # captions 0 and 1 identical: row 0 targets {0, 1} with 1/2 each
    g = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([7, 7, 3, 5])
    logits = s * torch.nn.functional.normalize(g, dim=-1) @ torch.nn.functional.normalize(g, dim=-1).t()
    tgt = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    li = -(tgt * logits.log_softmax(1)).sum(1).mean()
    lt = -(tgt * logits.t().log_softmax(1)).sum(1).mean()
    assert T.clip_contrastive_loss(g, g, ls, ids).item() == pytest.approx(((li + lt) / 2).item(), rel=1e-5)


def test_lr_schedule():
    assert T.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert T.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert T.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert T.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert T.lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)


def test_caption_dropout_rate():
    data = T.as_pairs([(np.zeros((4, 4, 3), np.uint8), ["x a", "x b"]),
                       (np.zeros((4, 4, 3), np.uint8), "y")])
    captions, per_image = T._caption_table(data, extra=("",))
    assert captions[0] == "" and captions[1:] == ["x a", "x b", "y"]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(2, (20000,), generator=g)
    cap = T.draw_captions(per_image, idx, g, caption_dropout=0.1)
    dropped = (cap == 0).float().mean().item()
    assert abs(dropped - 0.1) < 4 * math.sqrt(0.09 / 20000)
    kept = cap != 0
    for i, c in zip(idx[kept].tolist(), cap[kept].tolist()):
        assert c in per_image[i]
    # both captions of image 0 are used about equally
    c0 = cap[kept & (idx == 0)]
    assert abs((c0 == 1).float().mean().item() - 0.5) < 0.03
    assert (T.draw_captions(per_image, idx, g, 0.0) != 0).all()


def test_as_pairs_errors():
    with pytest.raises(ValueError, match="uint8"):
        T.as_pairs([(np.zeros((4, 4), np.uint8), "a")])
    with pytest.raises(ValueError, match="pairs must be"):
        T.as_pairs([])
    with pytest.raises(ValueError, match="at least one caption"):
        T.as_pairs([(np.zeros((4, 4, 3), np.uint8), [])])


# ---------------------------------------------------------------- learning
def test_clip_learns(cfg, tok):
    clip, info = T.train_clip(_pairs(), cfg, tok, 40, batch_size=16, lr=2e-3, warmup=5,
                              progress=False)
    l = info["losses"]
    assert np.mean(l[-5:]) < 0.6 * np.mean(l[:5])


def test_vae_learns_and_scaling(cfg):
    imgs = np.stack([p[0] for p in _pairs()])
    vae, info = T.train_vae(imgs, cfg, 30, batch_size=8, lr=2e-3, warmup=5, progress=False)
    l = info["losses"]
    assert np.mean(l[-5:]) < 0.6 * np.mean(l[:5])
    assert vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    # scaled posterior samples of the training images have unit std (SD's definition)
    mu, sd = T.encode_latent_posteriors(vae, torch.from_numpy(imgs))
    z = (mu + sd * torch.randn(mu.shape, generator=torch.Generator().manual_seed(5)))
    assert float(z.std() * vae.config.scaling_factor) == pytest.approx(1.0, rel=0.1)
    assert T.vae_reconstruction_mse(vae, imgs) == pytest.approx(info["recon_mse"], rel=1e-4)


def test_vae_decoder_only_fine_tune_keeps_the_latent_space(cfg):
    """decoder_only: encoder, quant_conv and scaling factor untouched (one latent space, so UNets
    trained on it stay valid), decoder changed, reconstruction improved; it needs an init."""
    import copy
    imgs = np.stack([p[0] for p in _pairs()])
    base, _ = T.train_vae(imgs, cfg, 10, batch_size=8, lr=2e-3, warmup=2, progress=False)
    before = copy.deepcopy(base.state_dict())
    mse0 = T.vae_reconstruction_mse(base, imgs)
    ft, info = T.train_vae(imgs, cfg, 30, batch_size=8, lr=2e-3, warmup=2, progress=False,
                           init=copy.deepcopy(base), decoder_only=True)
    after = ft.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    moved = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and moved
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in moved) > len(moved) // 2
    assert ft.config.scaling_factor == base.config.scaling_factor == info["scaling_factor"]
    assert T.vae_reconstruction_mse(ft, imgs) < mse0
    with pytest.raises(ValueError, match="decoder_only=True fine-tunes the decoder of an existing VAE"):
        T.train_vae(imgs, cfg, 1, decoder_only=True, progress=False)


def _unet_run(cfg, tok, **kw):
    from transformers import CLIPModel
    torch.manual_seed(0)
    clip = CLIPModel(sdformat.clip_config(cfg, tok))
    te, vae = sdformat.text_encoder_from_clip(clip), sdformat.build_vae(cfg)
    return T.train_unet(_pairs(), te, vae, tok, cfg, kw.pop("steps", 6), batch_size=8,
                        warmup=2, progress=False, **kw)


def test_unet_learns(cfg, tok):
    _, info = _unet_run(cfg, tok, steps=40, lr=2e-3, ema_decay=None)
    l = info["losses"]
    assert np.mean(l[-10:]) < 0.8 * np.mean(l[:5])


def test_finetune_from_returned_or_loaded_model(cfg, tok):
    from transformers import CLIPModel
    unet, _ = _unet_run(cfg, tok, steps=3)  # EMA copy, requires_grad off (like load_t2i's)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(0)
    clip = CLIPModel(sdformat.clip_config(cfg, tok))
    tuned, info = T.train_unet(_pairs(), sdformat.text_encoder_from_clip(clip), sdformat.build_vae(cfg),
                               tok, cfg, 3, batch_size=8, init=unet, ema_decay=None, progress=False)
    assert tuned is unet and len(info["losses"]) == 3
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())


def test_determinism(cfg, tok):
    a, _ = _unet_run(cfg, tok, seed=3)
    b, _ = _unet_run(cfg, tok, seed=3)
    c, _ = _unet_run(cfg, tok, seed=4)
    assert _equal_state(a, b)
    assert not _equal_state(a, c)


def test_resume_after_kill_is_exact(cfg, tok, tmp_path):
    full, info_full = _unet_run(cfg, tok, seed=1, out_dir=tmp_path / "a", ckpt_every=2)
    with pytest.raises(T.Interrupted):  # killed during step 5, after the step-4 checkpoint
        _unet_run(cfg, tok, seed=1, out_dir=tmp_path / "b", ckpt_every=2, stop_after=5)
    st = torch.load(tmp_path / "b" / "unet.ckpt", weights_only=False)
    assert st["step"] == 4 and not list((tmp_path / "b").glob("*.tmp"))
    resumed, info = _unet_run(cfg, tok, seed=1, out_dir=tmp_path / "b", ckpt_every=2)
    assert info["resumed_from"] == 4
    assert _equal_state(full, resumed)  # EMA weights, bit-identical
    assert info["losses"] == info_full["losses"]
    with pytest.raises(ValueError, match="other hyper-parameters"):
        _unet_run(cfg, tok, seed=2, out_dir=tmp_path / "b", ckpt_every=2)


# ---------------------------------------------------------------- saved folder
def test_saved_folder_loads(cfg, tok, tmp_path):
    from diffusers import StableDiffusionPipeline

    from t2i_common.models import load_clip, load_t2i

    pairs = _pairs()
    clip, _ = T.train_clip(pairs, cfg, tok, 3, batch_size=8, progress=False)
    vae, _ = T.train_vae(np.stack([p[0] for p in pairs]), cfg, 3, batch_size=8, progress=False)
    te = sdformat.text_encoder_from_clip(clip)
    unet, _ = T.train_unet(pairs, te, vae, tok, cfg, 3, batch_size=8, progress=False)
    sdformat.save_sd_folder(tmp_path / "sd", tok, te, vae, unet, sdformat.build_scheduler(cfg),
                            clip=clip, cfg=cfg)
    m = load_t2i(tmp_path / "sd")
    assert m.scaling_factor == pytest.approx(vae.config.scaling_factor)
    # the text embeddings the UNet was trained on are the ones the loader produces
    emb = T.encode_texts(te, tok, ["a red square", ""], cfg.max_length)
    assert torch.allclose(m.encode_prompts(["a red square", ""]), emb, atol=1e-5)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    out = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np")
    assert out.images.shape == (1, 16, 16, 3)
    # load_clip's preprocessing equals the training preprocessing
    emb = load_clip(tmp_path / "sd" / "clip")
    imgs = [p[0] for p in pairs[:3]]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(
            T.clip_features(clip.eval(), T.to_clip_pixels(torch.from_numpy(np.stack(imgs)))), dim=-1)
    assert torch.allclose(emb.encode_images(imgs), ref, atol=1e-4)


# ---------------------------------------------------------------- evaluation
class _Replay:
    """A fake T2I model whose 'generations' are given images."""

    def __init__(self, images):
        self.images = images

    def generate(self, prompts, **kw):
        return np.stack(self.images[:len(prompts)])


def test_generation_fidelity_against_ground_truth():
    from t2i_common import toyworld as tw

    samples = tw.make_samples(6, 11, kinds=("pair",))
    prompts = [tw.caption_for(s.scene, "a {c0} {s0} {rel} a {c1} {s1}") for s in samples]
    res, _ = T.generation_fidelity(_Replay([s.image for s in samples]), prompts)
    assert res["match"] == 1.0 and res["n"] == 6
    # wrong relation for every image: the converse relation with the same object order
    wrong = [tw.caption_for(s.scene, "a {c0} {s0} {rel} a {c1} {s1}")
             .replace(s.scene.relation[1], tw.CONVERSE[s.scene.relation[1]]) for s in samples]
    res, _ = T.generation_fidelity(_Replay([s.image for s in samples]), wrong)
    assert res["both"] == 1.0 and res["relation_ok"] == 0.0 and res["match"] == 0.0


class _OracleEmbedder:
    """Image features = one-hot(true shape, true colour) from the pixel checker; text features =
    one-hot of the words it names.  Zero-shot accuracy must be 1; with colours permuted 0."""

    def __init__(self, perm=None):
        from t2i_common import toyworld as tw
        self.tw, self.perm = tw, perm

    def _vec(self, colour, shape, perm=None):
        v = torch.zeros(len(self.tw.SHAPES) + len(self.tw.COLOURS))
        if shape:
            v[list(self.tw.SHAPES).index(shape)] = 1
        if colour:
            k = list(self.tw.COLOURS).index(colour)
            v[len(self.tw.SHAPES) + (perm[k] if perm else k)] = 1
        return v

    def encode_images(self, images):
        return torch.stack([self._vec(*self.tw.classify_object(im), perm=self.perm) for im in images])

    def encode_texts(self, texts):
        out = []
        for t in texts:
            w = t.split()
            out.append(self._vec(next((x for x in w if x in self.tw.COLOURS), None),
                                 next((x for x in w if x in self.tw.SHAPES), None)))
        return torch.stack(out)


def test_clip_zero_shot_accuracy_oracle():
    from t2i_common import toyworld as tw

    samples = tw.make_samples(30, 5, kinds=("single",))
    acc = T.clip_zero_shot_accuracy(_OracleEmbedder(), samples)
    assert acc["shape_acc"] == 1.0 and acc["colour_acc"] == 1.0 and acc["joint_acc_full_caption"] == 1.0
    bad = T.clip_zero_shot_accuracy(_OracleEmbedder(perm=[1, 2, 3, 4, 0]), samples)
    assert bad["colour_acc"] == 0.0 and bad["shape_acc"] == 1.0
    with pytest.raises(ValueError, match="single-object"):
        T.clip_zero_shot_accuracy(_OracleEmbedder(), tw.make_samples(3, 5, kinds=("pair",)))


def test_read_toy_config_round_trip_unknown_keys_and_bad_json(tmp_path):
    """toy_config.json back to the TinySDConfig it was written from (lists -> tuples), unknown keys
    ignored, no file -> None, a damaged file -> an error naming it."""
    import json
    from dataclasses import asdict
    cfg = sdformat.TinySDConfig.tiny()
    assert sdformat.read_toy_config(tmp_path) is None
    (tmp_path / "toy_config.json").write_text(json.dumps(dict(asdict(cfg), from_the_future=1)))
    assert sdformat.read_toy_config(tmp_path) == cfg
    (tmp_path / "toy_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="toy_config.json: not valid JSON"):
        sdformat.read_toy_config(tmp_path)


# ---------------------------------------------------------------- bad input
import hashlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from t2i_common.unclip import training as UT  # noqa: E402
from t2i_common import validate as V  # noqa: E402


def _hashes(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("field,value,match", [
    ("clip_steps", 0, "--clip-steps must be positive, got 0"),
    ("vae_steps", -1, "--vae-steps must be positive, got -1"),
    ("unet_steps", 2.5, "--unet-steps must be a whole number"),
    ("unet_extra_steps", -1, "--unet-extra-steps must be >= 0"),
    ("unet_lr", float("nan"), "--unet-lr must be a finite number"),
    ("clip_lr", 0.0, "--clip-lr must be > 0"),
    ("vae_lr", -1e-3, "--vae-lr must be > 0"),
    ("caption_dropout", 1.5, "--caption-dropout must be < 1"),
    ("ema_decay", float("inf"), "--ema-decay must be a finite number"),
    ("snr_gamma", -1.0, "--snr-gamma must be >= 0"),
    ("n_train", 0, "--n-train must be positive"),
    ("ckpt_every", 0, "--ckpt-every must be positive"),
    ("grad_accum", 0, "--grad-accum must be positive"),
    ("unet_batch", -4, "--unet-batch must be positive"),
    ("eval_steps", 0, "--eval-steps must be positive"),
])
def test_toy_budget_checks(field, value, match):
    import dataclasses
    b = dataclasses.replace(T.ToyBudget(), **{field: value})
    with pytest.raises(V.BadInput, match=match):
        T.check_budget(b, optional_steps=("unet_extra_steps",))
    T.check_budget(dataclasses.replace(T.ToyBudget(), unet_extra_steps=0),
                   optional_steps=("unet_extra_steps",))          # an optional stage may be skipped


@pytest.mark.parametrize("field,value,match", [
    ("prior_steps", 0, "--prior-steps must be positive"),
    ("decoder_steps", -5, "--decoder-steps must be positive"),
    ("decoder_lr", float("inf"), "--decoder-lr must be a finite number"),
    ("zero_noise_fraction", float("nan"), "--zero-noise-fraction must be a finite number"),
    ("vae_decoder_steps", -2, "--vae-decoder-steps must be >= 0"),
    ("max_noise_level", 0, "--max-noise-level must be positive"),
    ("prior_layers", 1.5, "--prior-layers must be a whole number"),
])
def test_unclip_budget_checks(field, value, match):
    import dataclasses
    b = dataclasses.replace(UT.UnCLIPBudget(), **{field: value})
    with pytest.raises(V.BadInput, match=match):
        T.check_budget(b, optional_steps=UT.OPTIONAL_STAGES)


@pytest.mark.parametrize("kw,match", [(dict(steps=-1), "unet: steps must be >= 0"),
                                      (dict(steps=2.5), "unet: steps must be a whole number"),
                                      (dict(lr=float("nan")), "unet: lr must be a finite number"),
                                      (dict(lr=0.0), "unet: lr must be > 0"),
                                      (dict(ckpt_every=0), "unet: ckpt_every must be positive")])
def test_training_loop_checks_its_numbers(cfg, tok, kw, match):
    with pytest.raises(V.BadInput, match=match):
        _unet_run(cfg, tok, **kw)


@pytest.mark.parametrize("content,match", [
    (b"garbage bytes", "is not readable"),
    (None, "is not readable"),                        # truncated: the first 100 bytes of a real one
    ("dict", "is not a checkpoint of this training loop"),
])
def test_corrupt_checkpoint_says_how_to_start_over(cfg, tok, tmp_path, content, match):
    work = tmp_path / "w"
    if content is None:
        _unet_run(cfg, tok, steps=2, out_dir=tmp_path / "full", ckpt_every=1)
        work.mkdir()
        (work / "unet.ckpt").write_bytes((tmp_path / "full" / "unet.ckpt").read_bytes()[:100])
    elif content == "dict":
        work.mkdir()
        torch.save({"weights": torch.ones(2)}, work / "unet.ckpt")
    else:
        work.mkdir()
        (work / "unet.ckpt").write_bytes(content)
    before = _hashes(work)
    with pytest.raises(ValueError, match=rf"training checkpoint .*unet.ckpt {match}.*--no-resume"):
        _unet_run(cfg, tok, steps=2, out_dir=work, ckpt_every=1)
    assert _hashes(work) == before


_ZERO = ["--clip-steps", "0", "--vae-steps", "0", "--unet-steps", "0", "--unet-extra-steps", "0"]


def _cli_cases(tmp_path):
    (tmp_path / "afile").write_text("mine")
    user = tmp_path / "user_folder"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    return [
        (["--out", str(tmp_path / "sd")] + _ZERO, "--clip-steps must be positive, got 0"),
        (["--out", str(tmp_path / "sd"), "--unet-lr", "nan"], "--unet-lr must be a finite number"),
        (["--out", str(tmp_path / "sd"), "--vae-steps", "-3"], "--vae-steps must be positive"),
        (["--out", str(tmp_path / "afile" / "sd")], r"--out: .*lies under .*afile, which is a file"),
        (["--out", str(tmp_path / "afile")], r"--out: .*afile is a file"),
        (["--out", str(user)], r"--out: .*user_folder exists and holds other files"),
        (["--out", str(tmp_path / "sd"), "--work-dir", str(tmp_path / "afile")],
         r"--work-dir: .*afile is a file"),
        (["--out", str(tmp_path / "sd"), "--threads", "0"], "--threads must be positive"),
        (["--out", str(tmp_path / "sd"), "--seed", "-1"], "--seed must be >= 0"),
        (["--out", str(tmp_path / "sd"), "--caption-dropout", "1"], "--caption-dropout must be < 1"),
    ]


def test_training_cli_one_line_errors_and_user_files_unchanged(tmp_path, capsys):
    cases = _cli_cases(tmp_path)
    before = _hashes(tmp_path)
    for argv, match in cases:
        assert T.main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert lines[0].startswith("python -m t2i_common.toyworld.training: error: ") and re.search(match, lines[0])
    assert _hashes(tmp_path) == before
    assert not (tmp_path / "sd").exists() and not (tmp_path / "train_runs").exists()


def test_unclip_training_cli_one_line_errors(tmp_path, tiny_sd_dir, capsys):
    import shutil
    (tmp_path / "afile").write_text("mine")
    no_clip = tmp_path / "no_clip"
    shutil.copytree(tiny_sd_dir, no_clip)
    shutil.rmtree(no_clip / "clip")
    no_unet_cfg = tmp_path / "no_unet_cfg"
    shutil.copytree(tiny_sd_dir, no_unet_cfg)
    (no_unet_cfg / "unet" / "config.json").unlink()
    out = ["--out", str(tmp_path / "u")]
    cases = [
        (out + ["--sd-folder", str(tmp_path / "afile")], r"--sd-folder: .*afile is a file"),
        (out + ["--sd-folder", str(tmp_path / "missing")], r"--sd-folder: .*missing not found"),
        (out + ["--sd-folder", str(no_clip)], r"--sd-folder: .*no_clip has no clip/"),
        (out + ["--sd-folder", str(no_unet_cfg)], r"--sd-folder: .*has no unet/config.json"),
        (out + ["--sd-folder", str(tiny_sd_dir), "--prior-steps", "0"], "--prior-steps must be positive"),
        (out + ["--sd-folder", str(tiny_sd_dir), "--decoder-lr", "inf"], "--decoder-lr must be a finite"),
        (["--out", str(tmp_path / "afile"), "--sd-folder", str(tiny_sd_dir)], r"--out: .*is a file"),
        (["--out", str(tiny_sd_dir), "--sd-folder", str(tiny_sd_dir)],
         r"--out: .*exists and holds other files \(it is not a toy unCLIP"),
    ]
    before = _hashes(tmp_path), _hashes(tiny_sd_dir)
    for argv, match in cases:
        assert UT.main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert re.search(match, lines[0]), (argv, lines[0])
    assert (_hashes(tmp_path), _hashes(tiny_sd_dir)) == before
    assert not (tmp_path / "u").exists() and not (tmp_path / "train_runs").exists()


def test_training_cli_subprocess_all_zero_steps(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(T.__file__).parents[1]))
    r = subprocess.run([sys.executable, "-m", "t2i_common.toyworld.training", "--out", str(tmp_path / "sd")]
                       + _ZERO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "python -m t2i_common.toyworld.training: error: --clip-steps must be positive, got 0 "
        "(--debug shows the traceback)"]
    assert not (tmp_path / "sd").exists() and not (tmp_path / "train_runs").exists()
    r = subprocess.run([sys.executable, "-m", "t2i_common.toyworld.training", "--out", str(tmp_path / "sd"),
                        "--debug"] + _ZERO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_corrupt_stage_checkpoint_from_the_cli_names_it(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "clip.ckpt").write_bytes(b"\x00" * 40)
    before = _hashes(tmp_path)
    argv = ["--out", str(tmp_path / "sd"), "--work-dir", str(work), "--n-train", "4", "--no-eval"]
    assert T.main(argv) == 2
    out, err = capsys.readouterr()
    assert f"stage checkpoints (resume) in {work}" in out
    assert re.search(r"error: training checkpoint .*clip.ckpt is not readable .*delete .*clip.ckpt "
                     r"\(or pass --no-resume", err) and "Traceback" not in err
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("caption,word", [("a red q square", "q"), ("a red squares", "squares"),
                                          ("a red, square", "red,")])
def test_unknown_caption_words_are_named(cfg, tok, caption, word):
    pairs = _pairs(4)
    pairs[2] = (pairs[2][0], caption)
    with pytest.raises(V.BadInput, match=rf"training captions: .*does not know the word\(s\) \['{word}'\]"):
        T.train_clip(pairs, cfg, tok, 1, batch_size=2, progress=False)
    from transformers import CLIPModel
    clip = CLIPModel(sdformat.clip_config(cfg, tok))
    with pytest.raises(V.BadInput, match=rf"\['{word}'\]"):
        T.train_unet(pairs, sdformat.text_encoder_from_clip(clip), sdformat.build_vae(cfg), tok, cfg, 1,
                     batch_size=2, progress=False)


def test_run_paths_accept_new_empty_or_own_folders(tmp_path):
    T.check_run_paths(tmp_path / "new" / "sd", tmp_path / "work")            # nothing exists yet
    (tmp_path / "empty").mkdir()
    T.check_run_paths(tmp_path / "empty", tmp_path / "work")
    own = tmp_path / "own"
    own.mkdir()
    (own / "training_log.json").write_text("{}")
    (own / "model_index.json").write_text("{}")
    T.check_run_paths(own, tmp_path / "work")                                # an earlier build
    assert not (tmp_path / "new").exists() and not (tmp_path / "work").exists()
    assert T.default_work_dir(tmp_path / "x" / "sd") == tmp_path / "x" / "train_runs"
    assert UT.default_work_dir(tmp_path / "x" / "u") == tmp_path / "x" / "train_runs" / "u"


# ---------------------------------------------------------------- v3: zero terminal SNR, v-prediction, joint text encoder
from t2i_common.toyworld import vpred as VP  # noqa: E402


def _sd_betas():
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2


def test_v_target_closed_form_and_diffusers():
    from diffusers import DDPMScheduler
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    sched = sdformat.build_scheduler(prediction_type="v_prediction", zero_snr=True)
    t = torch.tensor([0, 10, 500, 998, 999])
    ab = sched.alphas_cumprod[t]
    v = VP.v_target(z0, eps, ab)
    for b in range(5):
        a, s = math.sqrt(float(ab[b])), math.sqrt(1 - float(ab[b]))
        assert torch.allclose(v[b], a * eps[b] - s * z0[b], atol=1e-6)
    assert torch.allclose(v, DDPMScheduler.from_config(sched.config).get_velocity(z0, eps, t), atol=1e-6)
    assert torch.equal(v[-1], -z0[-1])                          # abar = 0: v = -z0
    assert torch.equal(VP.diffusion_target(z0, eps, ab, "epsilon"), eps)


def test_zero_snr_schedule_is_lin_et_al_algorithm_1():
    sched = sdformat.build_scheduler(prediction_type="v_prediction", zero_snr=True)
    ac = sched.alphas_cumprod
    assert float(ac[-1]) == 0.0 and float(ac[-2]) > 0
    # Algorithm 1 of Lin et al. 2023 written out: shift sqrt(abar) to 0 at T, keep it at t = 0
    sq = torch.cumprod(1 - _sd_betas(), 0).sqrt()
    sq = (sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])
    assert torch.allclose(ac, sq ** 2, atol=1e-6)
    assert float(ac[0]) == pytest.approx(float(torch.cumprod(1 - _sd_betas(), 0)[0]), abs=1e-7)
    old = sdformat.build_scheduler()
    assert float(old.alphas_cumprod[-1]) == pytest.approx(0.0047, abs=2e-4)   # SD's: not zero
    c = sched.config
    assert (c.prediction_type, c.rescale_betas_zero_snr, c.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    with pytest.raises(ValueError, match="zero_snr=True needs prediction_type='v_prediction'"):
        sdformat.build_scheduler(zero_snr=True)


def test_eps_from_v_exact_also_at_zero_snr():
    from t2i_common.models import eps_from_output
    sched = sdformat.build_scheduler(prediction_type="v_prediction", zero_snr=True)
    ac = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 900, 999])
    ab = ac[t].float().view(-1, 1, 1, 1)
    zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    v = VP.v_target(z0, eps, ac[t].float())
    assert torch.allclose(eps_from_output(v, zt, ac, t, "v_prediction"), eps, atol=1e-5)
    assert torch.equal(eps_from_output(v[3:], zt[3:], ac, 999, "v_prediction"), zt[3:])  # eps = z_t


def test_min_snr_weights_and_high_t_draws():
    ab = torch.tensor([0.0, 0.5, 0.99])
    assert torch.equal(VP.loss_weight(ab, "v_prediction", None), torch.ones(3))
    snr = ab / (1 - ab)
    assert torch.allclose(VP.loss_weight(ab, "v_prediction", 5.0), snr.clamp(max=5) / (snr + 1))
    assert float(VP.loss_weight(ab, "v_prediction", 5.0)[0]) == 0.0   # why v3 uses snr_gamma 0
    assert torch.allclose(VP.loss_weight(ab[1:], "epsilon", 5.0), snr[1:].clamp(max=5) / snr[1:])
    g = torch.Generator().manual_seed(0)
    t = VP.draw_timesteps(40000, 1000, g, high_t_fraction=0.5)
    assert int(t.min()) == 0 and int(t.max()) == 999
    assert abs(float((t >= 600).float().mean()) - (0.5 + 0.5 * 0.4)) < 0.01
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(VP.draw_timesteps(64, 1000, g1), torch.randint(1000, (64,), generator=g2))


def test_kind_weights_give_pairs_their_share():
    import t2i_common.toyworld as tw
    samples = tw.make_samples(60, 0)
    w = VP.kind_weights(samples, 0.7)
    is_pair = torch.tensor([s.scene.kind == "pair" for s in samples])
    assert float(w[is_pair].sum()) == pytest.approx(0.7) and float(w.sum()) == pytest.approx(1.0)
    assert VP.kind_weights(samples, 0.0) is None


def _joint_run(cfg, tok, **kw):
    from transformers import CLIPModel
    torch.manual_seed(0)
    clip = CLIPModel(sdformat.clip_config(cfg, tok))
    te, vae = sdformat.text_encoder_from_clip(clip), sdformat.build_vae(cfg)
    sched = kw.pop("scheduler", None) or VP.build_zero_snr_scheduler(cfg)
    return VP.train_unet_joint(_pairs(), te, vae, tok, cfg, kw.pop("steps", 6), scheduler=sched,
                               batch_size=8, warmup=2, progress=False, **kw), te


def test_joint_training_resumes_bit_exactly(cfg, tok, tmp_path):
    kw = dict(seed=1, ckpt_every=2, high_t_fraction=0.3, weights=np.linspace(1, 2, 16))
    (u_full, te_full, info_full), _ = _joint_run(cfg, tok, out_dir=tmp_path / "a", **kw)
    with pytest.raises(T.Interrupted):
        _joint_run(cfg, tok, out_dir=tmp_path / "b", stop_after=5, **kw)
    assert torch.load(tmp_path / "b" / "unet_joint.ckpt", weights_only=False)["step"] == 4
    (u, te, info), _ = _joint_run(cfg, tok, out_dir=tmp_path / "b", **kw)
    assert info["resumed_from"] == 4 and info["losses"] == info_full["losses"]
    assert _equal_state(u_full, u) and _equal_state(te_full, te)
    with pytest.raises(ValueError, match="other hyper-parameters"):
        _joint_run(cfg, tok, out_dir=tmp_path / "b", **dict(kw, high_t_fraction=0.0))


def test_joint_training_trains_or_freezes_the_text_encoder(cfg, tok):
    from transformers import CLIPModel
    torch.manual_seed(0)
    ref = sdformat.text_encoder_from_clip(CLIPModel(sdformat.clip_config(cfg, tok)))
    (_, te_out, _), te_in = _joint_run(cfg, tok, ema_decay=None, lr=1e-3)
    assert te_out is te_in and not _equal_state(te_out, ref)
    (_, te_out, _), _ = _joint_run(cfg, tok, ema_decay=None, train_text_encoder=False)
    assert _equal_state(te_out, ref)
    (_, _, info), _ = _joint_run(cfg, tok, steps=40, lr=2e-3, ema_decay=None)
    assert np.mean(info["losses"][-10:]) < 0.8 * np.mean(info["losses"][:5])
    with pytest.raises(ValueError, match="eps-prediction is undefined at zero terminal SNR"):
        from diffusers import DDPMScheduler
        bad = DDPMScheduler.from_config(VP.build_zero_snr_scheduler(cfg).config,
                                        prediction_type="epsilon")
        _joint_run(cfg, tok, scheduler=bad)


def test_v3_folder_loads_samples_from_t999_and_scores_in_eps(cfg, tok, tmp_path):
    from diffusers import StableDiffusionPipeline

    from t2i_common.models import load_t2i
    pairs = _pairs()
    clip, _ = T.train_clip(pairs, cfg, tok, 2, batch_size=8, progress=False)
    vae, _ = T.train_vae(np.stack([p[0] for p in pairs]), cfg, 2, batch_size=8, progress=False)
    sched = VP.build_zero_snr_scheduler(cfg)
    unet, te, _ = VP.train_unet_joint(pairs, sdformat.text_encoder_from_clip(clip), vae, tok, cfg, 3,
                                      scheduler=sched, batch_size=8, progress=False)
    sdformat.save_sd_folder(tmp_path / "sd", tok, te, vae, unet, sched, clip=clip, cfg=cfg)
    m = load_t2i(tmp_path / "sd")
    c = m.scheduler.config
    assert (m.prediction_type, c.rescale_betas_zero_snr, c.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    assert float(m.alphas_cumprod[-1]) == 0.0
    # the saved text encoder is the jointly trained one, not the CLIP text tower
    assert torch.allclose(m.encode_prompts(["a red square"]),
                          T.encode_texts(te, tok, ["a red square"], cfg.max_length), atol=1e-5)
    # eps at t = 999 (abar = 0) is z_t exactly, whatever the UNet says
    z = torch.randn((2,) + m.latent_shape, generator=torch.Generator().manual_seed(0))
    emb = m.encode_prompts(["a red square", ""])
    assert torch.equal(m.eps(z, 999, emb), z)
    assert torch.isfinite(m.eps(z, torch.tensor([999, 500]), emb)).all()
    # generate starts at t = 999 (trailing) and gives finite images
    seen = []
    fwd = m.unet.forward
    m.unet.forward = lambda x, t, **kw: (seen.append(int(t.reshape(-1)[0])), fwd(x, t, **kw))[1]
    img = m.generate(["a red square"], num_steps=4, guidance_scale=3.0)
    assert seen == [999, 749, 499, 249] and img.shape == (1, 16, 16, 3)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert pipe.scheduler.config.rescale_betas_zero_snr and \
        pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np")
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize("kw,match", [
    (dict(zero_snr=True, snr_gamma=0.0), "--zero-snr needs --prediction-type v_prediction"),
    (dict(zero_snr=True, prediction_type="v_prediction", snr_gamma=5.0), "pass --snr-gamma 0"),
    (dict(prediction_type="sample"), "--prediction-type must be epsilon or v_prediction"),
    (dict(pair_weight=1.0), "--pair-weight must be < 1"),
    (dict(unet_channels="32,x"), "--unet-channels must be comma-separated"),
    (dict(high_t_fraction=1.5), "--high-t-fraction must be < 1"),
])
def test_v3_budget_checks(kw, match):
    import dataclasses
    with pytest.raises(V.BadInput, match=match):
        T.check_budget(dataclasses.replace(T.ToyBudget(), **kw), optional_steps=("unet_extra_steps",))
    v3 = T.RECIPES["v3"]
    T.check_budget(v3, optional_steps=("unet_extra_steps",))
    assert v3.joint and not T.RECIPES["v2"].joint and T.RECIPES["v2"] == T.ToyBudget()
    ucfg = T.unet_config(T.toy_config(), dataclasses.replace(v3, unet_channels="48,96"))
    assert ucfg.unet_channels == (48, 96) and ucfg.unet_heads == v3.unet_heads
    assert T.unet_config(T.toy_config(), T.ToyBudget()) == T.toy_config()


def test_cli_recipe_and_bool_flags(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(T, "build_toy_checkpoint",
                        lambda out, budget, **kw: seen.update(budget=budget) or
                        dict(stages={}, train_wall_s=0))
    T.main(["--out", str(tmp_path / "m"), "--recipe", "v3", "--train-text-encoder", "false",
            "--unet-steps", "7"])
    b = seen["budget"]
    assert (b.train_text_encoder, b.unet_steps, b.zero_snr, b.prediction_type) == \
        (False, 7, True, "v_prediction")
    with pytest.raises(SystemExit):      # argparse: usage and the bad value on stderr, exit 2
        T.main(["--out", str(tmp_path / "m"), "--zero-snr", "maybe"])


def test_train_unet_follows_a_v_scheduler_and_logsnr_range_is_finite(cfg, tok, tiny_sd_dir):
    from t2i_common.models import T2IModel, load_t2i
    sched = VP.build_zero_snr_scheduler(cfg)
    unet, info = _unet_run(cfg, tok, steps=3, scheduler=sched, ema_decay=None, seed=5)
    # the v loss of the same draws: recompute step 0's loss by hand would need the draws; check
    # instead that the eps path is untouched (same losses as without a scheduler argument)
    _, eps_info = _unet_run(cfg, tok, steps=3, ema_decay=None, seed=5)
    _, eps_info2 = _unet_run(cfg, tok, steps=3, ema_decay=None, seed=5,
                             scheduler=sdformat.build_scheduler(cfg))
    assert eps_info["losses"] == eps_info2["losses"] != info["losses"]
    m = load_t2i(tiny_sd_dir)
    mz = T2IModel(m.tokenizer, m.text_encoder, m.vae, m.unet, sched)
    lo, hi = mz.logsnr_range
    assert math.isfinite(lo) and lo == pytest.approx(float(mz.logsnr_table[-2]))
    assert int(mz.logsnr_to_t(torch.tensor([lo]))) == 998


def test_and_repeats_change_the_caption_share():
    import t2i_common.toyworld as tw
    samples = tw.make_samples(40, 0)
    pairs = T.toy_training_pairs(samples)
    assert VP.with_and_repeats(pairs, samples, 1) is pairs
    more = VP.with_and_repeats(pairs, samples, 2)
    for s, c0, c in zip(samples, pairs.captions, more.captions):
        if s.scene.kind == "pair":
            assert sorted(set(c)) == sorted(c0) and sum(" and " in x for x in c) == 2 and len(c) == 4
        else:
            assert c == c0
