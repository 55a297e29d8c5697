"""Shared fixtures: a tiny random-weight SD-format model built from configs (no downloads)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# 1 thread unless the run asks for another count (`OMP_NUM_THREADS=2 make test` runs the unit tests
# and, through the `threads = None` default of the notebooks that do not train, those notebooks with 2)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))

TINY_WORDS = ["a", "red", "green", "blue", "yellow", "purple", "circle", "square", "triangle",
              "diamond", "small", "large", "to", "the", "left", "right", "of", "above", "below",
              "and", "photo", "_"]


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from t2i_common.sdformat import TinySDConfig, build_random_sd, save_sd_folder

    cfg = TinySDConfig.tiny()
    parts = build_random_sd(cfg, TINY_WORDS, seed=0)
    folder = tmp_path_factory.mktemp("tiny_sd")
    save_sd_folder(folder, parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                   parts["scheduler"], clip=parts["clip"], cfg=cfg)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_sd_dir):
    from t2i_common.models import load_t2i

    return load_t2i(tiny_sd_dir)


@pytest.fixture(scope="session")
def tiny_images():
    """Four deterministic 16x16 RGB uint8 images."""
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy() for _ in range(4)]
