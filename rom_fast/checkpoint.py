"""Compressed checkpoints: an ordinary Hugging Face directory with factorized layers.

``config.json`` keeps the base architecture's fields, with ``model_type`` ``rom_fast_<base>``
and a ``rom_fast`` section listing every factorized layer (rank, biases) and the plan used.
The ``rom_fast_<base>`` classes are registered with transformers' Auto classes when rom_fast is
imported, so ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the factorized model.
Directories are written atomically: built under a temporary name, then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator

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


def factorized_layers(model: nn.Module) -> dict:
    return {name: {"rank": m.rank, "reduce_bias": m.reduce.bias is not None,
                   "expand_bias": m.expand.bias is not None}
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _config_dict(model: nn.Module, extra: dict, merged: bool) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)   # a GGUF source was de-quantized on load
    base_type = cfg["model_type"]
    if base_type.startswith("rom_fast_"):
        base_type = base_type[len("rom_fast_"):]
    section = dict(extra, format_version=FORMAT_VERSION, base_model_type=base_type)
    if merged:
        cfg["model_type"] = base_type        # dense W1 W2: a plain checkpoint of the base class
        cfg["rom_fast_merged"] = section
    else:
        cfg["model_type"] = _register(base_type)
        cfg["architectures"] = [_MODEL_CLASSES[cfg["model_type"]].__name__]
        section["layers"] = factorized_layers(model)
        cfg["rom_fast"] = section
    return cfg


@contextlib.contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``out`` to fill; renames it to ``out`` only on success."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_metadata(directory: Path, model: nn.Module, tokenizer, metadata: dict, card: str,
                   merged: bool = False) -> None:
    """config.json (with the factorized layers and plan), tokenizer files and the model card;
    the planner's spectra, when the plan came from it, go to ``rom_fast_spectra.json``."""
    metadata = dict(metadata)
    spectra = metadata.pop("spectra", None)
    if spectra:
        (directory / SPECTRA_FILE).write_text(json.dumps(spectra) + "\n")
    (directory / "config.json").write_text(json.dumps(_config_dict(model, metadata, merged), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(card)


def save_compressed(model: nn.Module, tokenizer, out, metadata: dict, card: str,
                    merged: bool = False, overwrite: bool = False) -> Path:
    """Writes an in-memory model, its tokenizer and a model card to ``out``, atomically."""
    with atomic_directory(out, overwrite) as tmp:
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None        # GGUF weights are already de-quantized floats
        model.save_pretrained(tmp, safe_serialization=True)
        write_metadata(tmp, model, tokenizer, metadata, card, merged)
    return Path(out)


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
