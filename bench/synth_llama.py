"""A LLaMA-7B-shaped model directory with random weights, so scale can be measured offline.

  python bench/synth_llama.py --blocks 4 --out /tmp/llama7b-4

Hidden 4096, intermediate 11008, 32 heads (no GQA), vocabulary 32000, untied head, bfloat16
safetensors, one shard per block plus one for the embeddings/norm/head, and the index file a
sharded Hugging Face checkpoint has. Weights are Gaussian with LLaMA-7B's typical scale
(std 0.02 for projections and embeddings, RMSNorm gains 1). A byte-level BPE tokenizer of at
most 32000 tokens (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, as LLaMA's) is trained here, offline, on
the local Wikipedia calibration text when ``../shared/data`` is present, else on generated
words, so text calibration and ``rom-fast eval`` work; :func:`random_token_ids` calibrates
without it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
WEIGHT_STD = 0.02


def block_tensors(i: int, cfg: dict, gen: torch.Generator) -> dict:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
              "mlp.down_proj": (h, f)}
    out = {}
    for name, shape in shapes.items():
        w = torch.empty(shape, dtype=torch.float32).normal_(0.0, WEIGHT_STD, generator=gen)
        out[f"model.layers.{i}.{name}.weight"] = w.to(torch.bfloat16)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def _training_text() -> str:
    import os
    import random
    data = Path(os.environ.get("ROM_FAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    wiki = data / "calibration_text" / "exllamav2_wiki.utf8"
    if wiki.is_file():
        return wiki.read_text(encoding="utf-8")
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))) for _ in range(40000))


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained locally (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = _training_text()
    tok.train_from_iterator((text[i:i + 10000] for i in range(0, len(text), 10000)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   add_bos_token=True)
    from tokenizers import processors
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast.save_pretrained(out)


def write_llama7b_shaped(out, n_blocks: int, seed: int = 0) -> Path:
    """Writes the directory (skipped when a complete one with this many blocks exists)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if not 1 <= n_blocks <= 32:
        raise ValueError(f"n_blocks must be in 1..32, got {n_blocks}")
    out = Path(out)
    index_file = out / "model.safetensors.index.json"
    cfg = dict(LLAMA_7B, num_hidden_layers=n_blocks)
    if index_file.is_file() and json.loads((out / "config.json").read_text())["num_hidden_layers"] == n_blocks:
        if not (out / "tokenizer.json").is_file():
            write_tokenizer(out, cfg["vocab_size"])
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    for i in range(n_blocks):
        shard(f"model-{i + 1:05d}-of-{n_blocks + 1:05d}.safetensors", block_tensors(i, cfg, gen))
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    outer = {
        "model.embed_tokens.weight": torch.empty(v, h).normal_(0.0, WEIGHT_STD, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": torch.empty(v, h).normal_(0.0, WEIGHT_STD, generator=gen).to(torch.bfloat16),
    }
    shard(f"model-{n_blocks + 1:05d}-of-{n_blocks + 1:05d}.safetensors", outer)
    LlamaConfig(**cfg, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2).save_pretrained(out)
    write_tokenizer(out, cfg["vocab_size"])
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def random_token_ids(n_samples: int, seq_len: int, vocab_size: int = 32000, seed: int = 0) -> torch.Tensor:
    """Tokenizer-free calibration: uniform random ids (BOS = 1 first, as LLaMA's tokenizer does)."""
    ids = torch.randint(2, vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, required=True, help="decoder blocks (1..32)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write_llama7b_shaped(a.out, a.blocks, a.seed))


if __name__ == "__main__":
    main()
