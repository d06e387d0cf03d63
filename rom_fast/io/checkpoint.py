"""Compressed checkpoints: an ordinary Hugging Face directory with factorized layers.

``config.json`` keeps the base architecture's fields, with ``model_type`` ``rom_fast_<base>``
and a ``rom_fast`` section listing every factorized layer (rank, biases) and the plan used.
The ``rom_fast_<base>`` classes are registered with transformers' Auto classes when rom_fast is
imported, so ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the factorized model.
Directories are written by :mod:`rom_fast.io.output`: block by block under a temporary name,
resumable, renamed into place when complete; :func:`rom_fast.io.sources.load` reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from rom_fast.adapters import ADAPTERS, adapter_class
from rom_fast.structures import STRUCTURES
from rom_fast.util import positive_int
from rom_fast.lowrank import LowRankLinear, PrunedLinear, apply_structure
from rom_fast.io.output import SPECTRA_FILE
from rom_fast.io.safetensors_index import CheckpointError

FORMAT_VERSION = 1
_BASES = {}   # base model_type -> registered rom_fast model_type
_MODEL_CLASSES: Dict[str, type] = {}   # registered model_type -> its causal-LM class


# Sanity limits for the sizes a config.json may ask for, checked before anything is built:
# several times the largest LLaMA-family model (405B: hidden 16384, MLP 53248, 126 blocks).
SIZE_LIMITS = {"hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 4096,
               "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 4096,
               "vocab_size": 1 << 23, "max_position_embeddings": 1 << 26}
REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_config(cfg: dict, where: str) -> None:
    """Refuses a config.json (as a dict) whose sizes are absurd or inconsistent, or whose
    ``rom_fast`` section names layers, ranks or biases the architecture cannot have; ``where``
    (the file) starts every message. Called before any module or buffer is built."""
    for key, limit in SIZE_LIMITS.items():
        value = cfg.get(key)
        if value is None and key not in REQUIRED_SIZES:
            continue
        if not positive_int(value) or value > limit:
            raise CheckpointError(f"{where}: {key} = {value!r} is not a size rom_fast accepts "
                                  f"(a positive integer <= {limit})")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv:
        raise CheckpointError(f"{where}: num_attention_heads = {heads} is not a multiple of "
                              f"num_key_value_heads = {kv}")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        raise CheckpointError(f"{where}: hidden_size = {cfg['hidden_size']} is not a multiple of "
                              f"num_attention_heads = {heads}")
    adapter = adapter_class(cfg.get("model_type"), where)
    try:
        adapter.check_config_sizes(cfg)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    section = cfg.get("rom_fast")
    if section is None:
        return
    layers = section.get("layers") if isinstance(section, dict) else None
    if not isinstance(layers, dict):
        raise CheckpointError(f"{where}: the rom_fast section has no 'layers' object")
    shapes = adapter.linear_shapes(cfg)
    units = adapter.mlp_units_of(cfg)
    head = adapter.layers_path + "."
    # {structure: {block prefix: {linear: spec}}}, in layer order; each structure checks its own
    grouped: Dict[object, Dict[str, Dict[str, dict]]] = {s: {} for s in STRUCTURES.values()}
    by_spec = {s.spec_name: s for s in STRUCTURES.values()}
    for name, spec in layers.items():
        block, _, rel = name[len(head):].partition(".") if name.startswith(head) else ("", "", "")
        if not (block.isdigit() and int(block) < cfg["num_hidden_layers"] and rel in shapes):
            raise CheckpointError(f"{where}: rom_fast layer {name!r} is not a linear layer of this "
                                  f"{cfg['num_hidden_layers']}-block model")
        if not isinstance(spec, dict):
            raise CheckpointError(f"{where}: rom_fast layer {name!r}: expected an object")
        structure = by_spec.get(spec.get("structure", "lowrank"))
        if structure is None:
            raise CheckpointError(f"{where}: rom_fast layer {name!r}: unknown structure {spec.get('structure')!r}")
        grouped[structure].setdefault(head + block + ".", {})[rel] = spec
    for structure, blocks in grouped.items():
        for prefix, specs in blocks.items():
            try:
                structure.check_specs(units, shapes, prefix, specs)
            except ValueError as exc:
                raise CheckpointError(f"{where}: {exc}") from None


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
        # Before the first module: a downloaded config.json is untrusted (via transformers too).
        check_config(config.to_dict(), f"config of {name}")
        base_model.__init__(self, config)
        adapter_class(base_type).prepare_model(self)     # the layout the saved layer names use
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
    for base_type in ADAPTERS:
        _register(base_type)


def read_config(directory: Path):
    """The transformers config of model directory ``directory``, read as untrusted input: its
    config.json must be a JSON object naming a supported architecture with sane sizes and a
    valid rom_fast section (:func:`check_config`), all checked before anything is built. The
    ``rom_fast_<base>`` classes are registered first, so a compressed checkpoint's config reads."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} is not a model directory (no config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    adapter_class(raw.get("model_type"), str(config_file))      # supported, before building anything
    check_config(raw, str(config_file))                           # sane sizes, a valid rom_fast plan
    register_all()                                                # rom_fast_<base> compressed checkpoints
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None


def factorized_layers(module: nn.Module, prefix: str = "") -> dict:
    """``{name: spec}`` of the compressed linears under ``module`` (names prefixed with
    ``prefix``): LowRankLinear ``{rank, reduce_bias, expand_bias}`` and PrunedLinear
    ``{structure: "pruned", out_features, in_features, bias}``; what config.json records to
    rebuild them."""
    layers = {}
    for name, m in module.named_modules():
        if isinstance(m, LowRankLinear):
            layers[prefix + name] = {"rank": m.rank, "reduce_bias": m.reduce.bias is not None,
                                     "expand_bias": m.expand.bias is not None}
        elif isinstance(m, PrunedLinear):
            layers[prefix + name] = m.spec()
    return layers


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
