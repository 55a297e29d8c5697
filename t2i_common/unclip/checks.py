"""Input checks of :mod:`t2i_common.unclip`: sampler settings and the Stable-unCLIP folder layout.

:func:`sampler_args` checks the numbers of one generate / decode / prior call (whole-number step
counts >= 1, finite guidance scales, seeds); :func:`check_folder` names the damaged component of
a local Stable-unCLIP folder (the component, its folder and what is wrong with it) before
anything is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import validate as V

#: the file each kind of component must hold (any one of them)
_CONFIG_FILES = {
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
    "feature_extractor": ("preprocessor_config.json",),
    "model": ("config.json",),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_EXPECTED = {
    "prior_tokenizer": ("transformers", "CLIPTokenizer"),
    "prior_text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "prior": ("diffusers", "PriorTransformer"),
    "prior_scheduler": ("diffusers", "DDPMScheduler"),
    "image_normalizer": ("stable_diffusion", "StableUnCLIPImageNormalizer"),
    "image_noising_scheduler": ("diffusers", "DDPMScheduler"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "scheduler": ("diffusers", "DDIMScheduler"),
    "vae": ("diffusers", "AutoencoderKL"),
    "feature_extractor": ("transformers", "CLIPImageProcessor"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
}


def _kind(component: str) -> str:
    if component.endswith("scheduler"):
        return "scheduler"
    if component.endswith("tokenizer"):
        return "tokenizer"
    if component == "feature_extractor":
        return "feature_extractor"
    return "model"


def check_component(folder: Path, component: str, sub: str | None = None) -> None:
    """``folder/sub`` holds a loadable ``component``: the folder, its config file (valid JSON)
    and, for models, a weights file."""
    sub = sub or component
    d = Path(folder) / sub
    if not d.is_dir():
        raise FileNotFoundError(f"unCLIP component {component}: {d} is missing (or not a folder); "
                                f"restore {sub}/ from the checkpoint's release")
    kind = _kind(component)
    names = _CONFIG_FILES[kind]
    found = [d / n for n in names if (d / n).is_file()]
    if not found:
        raise FileNotFoundError(f"unCLIP component {component}: {d} has no {' or '.join(names)}; "
                                f"restore it from the checkpoint's release")
    for f in found:
        if f.suffix == ".json":
            try:
                json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise V.BadInput(f"unCLIP component {component}: {f} is not valid JSON; restore it "
                                 f"from the checkpoint's release") from None
    if kind == "model" and not any(p.suffix in _WEIGHT_SUFFIXES for p in d.iterdir()):
        raise FileNotFoundError(f"unCLIP component {component}: {d} has a config.json but no weights "
                                f"(*.safetensors or *.bin); restore them from the checkpoint's release")


def check_folder(loc, index: dict, parts) -> None:
    """Every component of ``parts`` that the local folder ``loc`` should hold: listed in
    ``model_index.json`` and present as a folder with its config (and weights).  Errors name the
    component, the folder and what is wrong."""
    loc = Path(loc)
    for k in parts:
        listed = bool(index.get(k)) and bool(index[k][0])
        if not listed:
            if (loc / k).is_dir():
                lib, cls = _EXPECTED[k]
                raise V.BadInput(f"unCLIP component {k}: {loc / 'model_index.json'} does not list it "
                                 f"although {loc / k}/ exists; add \"{k}\": [\"{lib}\", \"{cls}\"] "
                                 f"to model_index.json")
            raise FileNotFoundError(f"unCLIP component {k}: {loc} has no {k}/ folder and "
                                    f"model_index.json does not list it (a "
                                    f"{index.get('_class_name', 'pipeline')} folder, not a Stable "
                                    f"unCLIP one?); a Stable unCLIP folder needs {k}/")
        check_component(loc, k)


def prompts_arg(prompts, name: str = "prompts") -> list[str]:
    return V.text_list(prompts, name)


def seeds_arg(seeds, n: int, name: str = "seeds"):
    if seeds is None:
        return None
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise V.BadInput(f"{name} must be a list of {n} whole numbers, got {seeds!r}")
    out = [V.count(s, f"{name}[{i}]", low=0) for i, s in enumerate(seeds)]
    if len(out) != n:
        raise V.BadInput(f"{name} has {len(out)} entries for {n} prompts/embeddings; pass one seed each")
    return out


def sampler_args(**kw) -> None:
    """Check the sampler settings given by keyword: ``*_steps`` / ``n_candidates`` / ``n`` /
    ``batch_size`` whole numbers >= 1, ``noise_level`` >= 0, ``*guidance*`` finite numbers,
    ``seed`` a whole number >= 0."""
    for k, v in kw.items():
        if v is None:
            continue
        if k.endswith("steps") or k in ("n_candidates", "n", "batch_size"):
            V.count(v, k)
        elif k in ("noise_level", "seed"):
            V.count(v, k, low=0)
        elif "guidance" in k:
            V.real(v, k)
        else:
            raise TypeError(f"sampler_args: unknown setting {k}")
