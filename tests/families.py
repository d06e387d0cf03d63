"""Tiny random models of every supported family, built from transformers' own config classes
(no downloads): the cases the adapter contract and the family guarantees run on. A new family
adds its entry to CASES."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=112, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=2)

# {model_type: a function returning its tiny config}
CASES = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
}


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CASES[model_type]()).eval()
