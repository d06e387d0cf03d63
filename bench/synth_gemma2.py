"""A Gemma-2-9B-shaped model directory with random weights, so streamed loading (and later
compression) of Gemma's real shapes can be checked offline.

  python bench/synth_gemma2.py --blocks 1 --out /tmp/gemma2-9b-1 [--check]

Names and shapes come from transformers' own Gemma2ForCausalLM built on the meta device (no
memory), so the directory holds the tensors a real checkpoint does: four norms per block and
the embedding stored once (the head is tied to it). bfloat16, one shard per block plus one for
the embedding and final norm, and the index file of a sharded checkpoint. Projections and the
embedding are Gaussian, std 0.02; norm weights 0 (Gemma's RMSNorm scales by 1 + weight). No
tokenizer: calibrate with random token ids. ``--check`` opens the directory with
:class:`rom_fast.io.sources.DirectorySource` (every tensor validated before block 0) and runs
block 0 on a few random hidden states.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# google/gemma-2-9b's config.json sizes (42 blocks; --blocks writes the first n).
GEMMA2_9B = dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=256, vocab_size=256000, num_hidden_layers=42, max_position_embeddings=8192,
                 query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                 attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                 tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
WEIGHT_STD = 0.02


def _random(shape, name: str, gen: torch.Generator) -> torch.Tensor:
    if "norm" in name:
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, WEIGHT_STD, generator=gen)


def write_gemma2_9b_shaped(out, n_blocks: int, seed: int = 0) -> Path:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, Gemma2Config

    from rom_fast.io.safetensors_index import write_safetensors

    if not 1 <= n_blocks <= GEMMA2_9B["num_hidden_layers"]:
        raise ValueError(f"n_blocks must be in 1..{GEMMA2_9B['num_hidden_layers']}, got {n_blocks}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = Gemma2Config(**dict(GEMMA2_9B, num_hidden_layers=n_blocks), dtype="bfloat16")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items() if n != "lm_head.weight"}
    shards = [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(n_blocks)]
    shards.append([n for n in shapes if not n.startswith("model.layers.")])
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _random(shapes[n], n, gen) for n in names}
        write_safetensors(out / file, tensors)
        weight_map.update({n: file for n in names})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    config.save_pretrained(out)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def check(out: Path) -> None:
    """Opens the directory streamed and runs block 0 on random hidden states (causal mask; no
    embedding: a 256k float32 vocabulary alone is 3.7 GB)."""
    from rom_fast.io.sources import DirectorySource

    source = DirectorySource(out, read_tokenizer=False)
    print(f"{out}: {source.n_blocks} block(s), {source.param_count:,} parameters, {source.storage_dtype}")
    block = source.load_block(0)
    rotary = source.model.model.rotary_emb
    hidden = torch.randn(1, 16, source.config.hidden_size, generator=torch.Generator().manual_seed(1))
    causal = torch.full((16, 16), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        y = source.adapter.block_forward(block, hidden, {
            "position_embeddings": rotary(hidden, torch.arange(16)[None]), "attention_mask": causal})
    print(f"block 0: output {tuple(y.shape)}, finite {bool(torch.isfinite(y).all())}, "
          f"{sum(p.numel() for p in block.parameters()):,} parameters")
    source.release_block(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, required=True, help=f"decoder blocks (1..{GEMMA2_9B['num_hidden_layers']})")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="open it with DirectorySource and run block 0")
    a = p.parse_args()
    out = write_gemma2_9b_shaped(a.out, a.blocks, a.seed)
    print(out)
    if a.check:
        check(out)


if __name__ == "__main__":
    main()
