"""A mixture-of-experts model directory of a real shape with random weights, stored under the
names transformers' ``save_pretrained`` writes (Mixtral: ``block_sparse_moe.experts.E.w1``...).

  python bench/synth_moe.py mixtral-8x7b --blocks 2 --out /tmp/mixtral-8x7b-2

The model is built from its transformers config on the meta device (nothing is allocated);
each tensor the adapter's layout names is written under :meth:`ModelAdapter.stored_name`, so
the writer knows no family's layout: bfloat16, Gaussian with std 0.02 (norm gains 1, biases
0). A block's tensors go into one shard per routed unit plus one for the rest of the block
(a whole Mixtral-8x7B block is 2.9 GB in bfloat16; one expert's shard is 0.35 GB), the
embedding, final norm and head into the last shard, with the index file of a sharded Hugging
Face checkpoint. Calibrate with :func:`synth_llama.random_token_ids` (no tokenizer is written).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
import transformers

WEIGHT_STD = 0.02

SHAPES: Dict[str, Tuple[str, dict]] = {
    # Mixtral-8x7B: 8 experts, top-2, GQA 32/8.
    "mixtral-8x7b": ("MixtralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}


def shape_config(name: str, n_blocks: int, **over) -> transformers.PretrainedConfig:
    """The config of shape ``name`` with ``n_blocks`` decoder blocks (``over``: fields changed,
    e.g. a shrunk width for a quick check)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    cls, fields = SHAPES[name]
    return getattr(transformers, cls)(**dict(fields, num_hidden_layers=n_blocks, **over), dtype="bfloat16")


def shards(config) -> Iterator[Tuple[str, Dict[str, tuple]]]:
    """``(shard key, {stored tensor name: shape})``: per block, each routed unit's tensors and
    the rest of the block; then everything outside the blocks."""
    from rom_fast.adapters import adapter_for

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)            # the adapter's layout (an MoE's experts one module each)
    units = [u.module + "." for sub in adapter.sublayers for u in sub.units]
    groups: Dict[str, Dict[str, tuple]] = {}
    for name, p in model.named_parameters():       # tied parameters once
        i = adapter.block_index(name)
        rel = "" if i is None else name[len(adapter.block_prefix(i)):]
        unit = next((u for u in units if rel.startswith(u)), "")
        key = "outer" if i is None else f"block{i}-{unit or 'rest'}"
        groups.setdefault(key, {})[adapter.stored_name(name)] = tuple(p.shape)
    yield from groups.items()


def random_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, WEIGHT_STD, generator=gen)


def write_synthetic(config, out, seed: int = 0) -> Path:
    """Writes the directory of ``config`` (kept when a complete one of the same config exists)."""
    from rom_fast.io.safetensors_index import write_safetensors

    out = Path(out)
    index = out / "model.safetensors.index.json"
    if index.is_file() and (out / "config.json").is_file():
        have = json.loads((out / "config.json").read_text())
        if all(have.get(k) == getattr(config, k) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                              "intermediate_size", "num_local_experts")):
            return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups = list(shards(config))
    weight_map, total = {}, 0
    for k, (_, shapes) in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, gen) for name, shape in shapes.items()}
        write_safetensors(out / file, tensors, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        del tensors
    config.save_pretrained(out)
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("--blocks", type=int, required=True, help="decoder blocks")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.blocks < 1:
        p.error("--blocks must be at least 1")
    print(write_synthetic(shape_config(a.shape, a.blocks), a.out, a.seed))


if __name__ == "__main__":
    main()
