"""A model directory of a family's real shape with random weights, so scale can be measured
offline for any supported family.

  python bench/synth_model.py qwen3-8b --blocks 2 --out /tmp/qwen3-8b-2
  python bench/synth_model.py llama3-8b --blocks 2 --out /tmp/llama3-8b-2
  python bench/synth_model.py phi3-medium --blocks 2 --out /tmp/phi3-medium-2

The model is built from its transformers config on the meta device (no weight is allocated)
and every tensor it names is written with its own shape, so the writer knows no family's
layout: bfloat16, Gaussian with std 0.02 (norm gains 1, biases 0), one shard per block plus
one for the embedding, final norm and head, and the index file of a sharded Hugging Face
checkpoint. At most one block's tensors are in memory (0.7 GB for Phi-3-medium's). With
``--tokenizer`` a byte-level BPE tokenizer of at most 32000 tokens is trained locally
(bench/synth_llama.py); without it, calibrate with :func:`synth_llama.random_token_ids`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
import transformers

WEIGHT_STD = 0.02

# Real 7-9B shapes: (config class, its fields; num_hidden_layers is the directory's block count).
SHAPES: Dict[str, Tuple[str, dict]] = {
    # Llama-3.1-8B: GQA 32/8, 128k vocabulary, llama3 rotary scaling.
    "llama3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001)),
    # Qwen3-8B: per-head q/k norms, head_dim 128, 152k vocabulary.
    "qwen3-8b": ("Qwen3Config", dict(
        hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        bos_token_id=151643, eos_token_id=151645)),
    # Phi-3-medium (14B's block; fused qkv_proj and gate_up_proj).
    "phi3-medium": ("Phi3Config", dict(
        hidden_size=5120, intermediate_size=17920, num_attention_heads=40, num_key_value_heads=10,
        vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)),
}


def shape_config(name: str, n_blocks: int, **over) -> transformers.PretrainedConfig:
    """The config of shape ``name`` with ``n_blocks`` decoder blocks (``over``: fields changed,
    e.g. a shrunk hidden size for a quick check)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    cls, fields = SHAPES[name]
    return getattr(transformers, cls)(**dict(fields, num_hidden_layers=n_blocks, **over), dtype="bfloat16")


def _meta_model(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shard_shapes(config) -> Iterator[Tuple[str, Dict[str, tuple]]]:
    """``(shard file, {tensor name: shape})`` of every shard: one per block, then the rest. The
    names are the model's own parameters (a tied head stored once, as transformers saves it)."""
    from rom_fast.adapters import adapter_for

    model = _meta_model(config)
    adapter = adapter_for(model)
    n = adapter.n_blocks
    by_block: Dict[int, Dict[str, tuple]] = {}
    for name, p in model.named_parameters():       # tied parameters once
        i = adapter.block_index(name)
        by_block.setdefault(n if i is None else i, {})[name] = tuple(p.shape)
    for i in range(n + 1):
        yield f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors", by_block.get(i, {})


def random_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, WEIGHT_STD, generator=gen)


def _complete(out: Path, config) -> bool:
    try:
        have = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (out / "model.safetensors.index.json").is_file() and \
        (have.get("model_type"), have.get("num_hidden_layers"), have.get("hidden_size")) == \
        (config.model_type, config.num_hidden_layers, config.hidden_size)


def write_synthetic(config, out, seed: int = 0, tokenizer: bool = False) -> Path:
    """Writes the directory of ``config`` (skipped when a complete one of this type, depth and
    width exists)."""
    from rom_fast.io.safetensors_index import write_safetensors

    out = Path(out)
    if not _complete(out, config):
        out.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed)
        weight_map, total = {}, 0
        for file, shapes in shard_shapes(config):
            tensors = {name: random_tensor(name, shape, gen) for name, shape in shapes.items()}
            write_safetensors(out / file, tensors, metadata={"format": "pt"})
            for name, t in tensors.items():
                weight_map[name] = file
                total += t.numel() * t.element_size()
            del tensors
        config.save_pretrained(out)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer and not (out / "tokenizer.json").is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from synth_llama import write_tokenizer
        write_tokenizer(out, min(config.vocab_size, 32000))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("--blocks", type=int, required=True, help="decoder blocks")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", action="store_true", help="also train a local BPE tokenizer (<= 32000 tokens)")
    a = p.parse_args()
    if a.blocks < 1:
        p.error("--blocks must be at least 1")
    print(write_synthetic(shape_config(a.shape, a.blocks), a.out, a.seed, a.tokenizer))


if __name__ == "__main__":
    main()
