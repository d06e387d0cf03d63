"""Compressed checkpoints: an ordinary Hugging Face directory with factorized layers.

``config.json`` keeps the base architecture's fields, with ``model_type`` ``rom_fast_<base>``
and a ``rom_fast`` section listing every factorized layer (rank, biases) and the plan used.
The ``rom_fast_<base>`` classes are registered with transformers' Auto classes when rom_fast is
imported, so ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the factorized model.
Directories are written by :mod:`rom_fast.output`: block by block under a temporary name,
resumable, renamed into place when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rom_fast.lowrank import LowRankLinear, apply_structure

FORMAT_VERSION = 1
_BASES = {}   # base model_type -> registered rom_fast model_type
SPECTRA_FILE = "rom_fast_spectra.json"
_MODEL_CLASSES: Dict[str, type] = {}   # registered model_type -> its causal-LM class


def _register(base_type: str) -> str:
    """Registers config/model classes ``rom_fast_<base_type>`` deriving from the base ones."""
    if base_type in _BASES:
        return _BASES[base_type]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_cfg = CONFIG_MAPPING[base_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_cfg]
    name = f"rom_fast_{base_type}"
    cfg_cls = type(f"RomFast{base_cfg.__name__}", (base_cfg,), {"model_type": name})

    def __init__(self, config):
        base_model.__init__(self, config)
        apply_structure(self, config.rom_fast["layers"])
        self.post_init()

    model_cls = type(f"RomFast{base_model.__name__}", (base_model,),
                     {"config_class": cfg_cls, "__init__": __init__})
    AutoConfig.register(name, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    _BASES[base_type] = name
    _MODEL_CLASSES[name] = model_cls
    return name


def register_all() -> None:
    from rom_fast.adapters import ADAPTERS
    for base_type in ADAPTERS:
        _register(base_type)


def factorized_layers(module: nn.Module, prefix: str = "") -> dict:
    """``{name: {rank, reduce_bias, expand_bias}}`` of the LowRankLinear modules under ``module``
    (names prefixed with ``prefix``): what config.json records to rebuild them."""
    return {prefix + name: {"rank": m.rank, "reduce_bias": m.reduce.bias is not None,
                            "expand_bias": m.expand.bias is not None}
            for name, m in module.named_modules() if isinstance(m, LowRankLinear)}


def config_dict(config, extra: dict, layers: dict, merged: bool) -> dict:
    """The compressed checkpoint's config.json: the base architecture's fields, the
    ``rom_fast_<base>`` model type (or the base type for merged weights) and the rom_fast
    section (plan, summary, factorized layers)."""
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)   # a GGUF source was de-quantized on load
    for key in ("rom_fast", "rom_fast_merged"):
        cfg.pop(key, None)
    base_type = cfg["model_type"]
    if base_type.startswith("rom_fast_"):
        base_type = base_type[len("rom_fast_"):]
    section = dict(extra, format_version=FORMAT_VERSION, base_model_type=base_type)
    if merged:
        cfg["model_type"] = base_type        # dense W1 W2: a plain checkpoint of the base class
        cfg["architectures"] = [_base_class(base_type).__name__]
        cfg["rom_fast_merged"] = section
    else:
        cfg["model_type"] = _register(base_type)
        cfg["architectures"] = [_MODEL_CLASSES[cfg["model_type"]].__name__]
        section["layers"] = layers
        cfg["rom_fast"] = section
    return cfg


def _base_class(base_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    return MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[base_type]]


def write_metadata(directory: Path, config, tokenizer, metadata: dict, card: str, layers: dict,
                   merged: bool = False, generation_config=None) -> None:
    """config.json (with the factorized layers and plan), generation config, tokenizer files
    and the model card; the planner's spectra, when the plan came from it, go to
    ``rom_fast_spectra.json``."""
    metadata = dict(metadata)
    spectra = metadata.pop("spectra", None)
    if spectra:
        (directory / SPECTRA_FILE).write_text(json.dumps(spectra) + "\n")
    (directory / "config.json").write_text(json.dumps(config_dict(config, metadata, layers, merged), indent=2) + "\n")
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(card)


def load(path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = False):
    """Loads a directory written by :func:`rom_fast.compress` (factorized or merged)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    register_all()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model
