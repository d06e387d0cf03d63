"""Tiny random models of every supported family, built from transformers' own config classes
(no downloads): the cases the adapter contract (tests/test_adapter_contract.py) and the family
guarantees (tests/test_families.py) run on. A new family adds its entry to CASES.

Each case also names its block's linears independently of the adapter (``stages``, for the
float64 reference of the paper's loop) and which rows of each MLP input linear belong to
neuron j (``neuron_rows``): the tests check the adapter against these, not against itself.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
import transformers
from transformers import AutoModelForCausalLM

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=112, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=2)

LLAMA_STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def separate_rows(linear: str, kept: List[int], intermediate: int) -> List[int]:
    """Separate gate and up projections: neuron j is row j of each."""
    return list(kept)


def alternating_attention(config_class):
    """``config_class`` with its blocks alternating sliding-window and full attention, sliding
    first, for any number of blocks: every tiny model mixes both types."""
    def build(**kw):
        types = [("sliding_attention", "full_attention")[i % 2] for i in range(kw["num_hidden_layers"])]
        return config_class(layer_types=types, **kw)
    return build


# Gemma's tiny sizes: a window shorter than the test sequences (so the sliding masks matter)
# but longer than their padding (transformers' eager attention turns a float64 query row that
# sees only padding into NaN: its softmax runs in float32, where float64's min is -inf; the
# float64 reference runs that code), a head_dim that is not hidden/heads and a query scale of
# its own; soft-capping thresholds near the tiny models' logits and attention scores, so the
# caps bend them.
GEMMA = dict(sliding_window=8, head_dim=16, query_pre_attn_scalar=8, final_logit_softcapping=0.3)


def expert_stages(n_experts: int) -> Tuple[Tuple[str, ...], ...]:
    """A routed MLP's stages: each expert's gate/up, then its down projection."""
    return tuple(stage for e in range(n_experts)
                 for stage in ((f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj"), (f"mlp.experts.{e}.down_proj",)))


def mixtral_stored(name: str) -> str:
    """Where transformers' save_pretrained puts a Mixtral tensor (its original per-expert layout)."""
    if ".experts." in name:
        for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            name = name.replace(f".{ours}.", f".{theirs}.")
    return name.replace(".mlp.", ".block_sparse_moe.", 1)


def gate_up_rows(linear: str, kept: List[int], intermediate: int) -> List[int]:
    """A fused gate_up projection (gate's rows, then up's): neuron j is rows j and
    intermediate + j."""
    return list(kept) + [intermediate + j for j in kept]


PHI3_STAGES = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))

# Llama-3.1's rotary scaling (its config.json's rope_scaling, transformers 5's rope_parameters),
# its original context shrunk so the tiny model's positions reach the scaled frequencies.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)


@dataclass(frozen=True)
class FamilyCase:
    config: Callable[..., "transformers.PretrainedConfig"]    # keyword overrides of the tiny sizes
    stages: Tuple[Tuple[str, ...], ...] = LLAMA_STAGES
    mlp: str = "mlp"
    neuron_rows: Callable[[str, List[int], int], List[int]] = separate_rows
    overrides: Dict = field(default_factory=dict)              # the case's own tiny-config fields
    stored: Callable[[str], str] = str                        # a tensor's name in a dense save_pretrained
    routed: bool = False            # a mixture of experts: its own versions of the reference tests

    def build_config(self, **over):
        return self.config(**dict(TINY, **dict(self.overrides, **over)))

    @property
    def model_type(self) -> str:
        return self.build_config().model_type

    @property
    def linears(self) -> Tuple[str, ...]:
        return tuple(n for stage in self.stages for n in stage)


# {case name: its tiny model}; several cases may share a model_type (Llama-3 is "llama").
CASES: Dict[str, FamilyCase] = {
    "llama": FamilyCase(transformers.LlamaConfig),
    # Llama-3: scaled rotary frequencies and a 128k vocabulary (tied, as Llama-3.2-1B's).
    "llama3": FamilyCase(transformers.LlamaConfig, overrides=dict(
        rope_parameters=LLAMA3_ROPE, vocab_size=128256, tie_word_embeddings=True)),
    "mistral": FamilyCase(transformers.MistralConfig),
    "qwen2": FamilyCase(transformers.Qwen2Config),
    "gemma2": FamilyCase(alternating_attention(transformers.Gemma2Config),
                         overrides=dict(GEMMA, attn_logit_softcapping=0.05)),
    "gemma3_text": FamilyCase(alternating_attention(transformers.Gemma3TextConfig), overrides=GEMMA),
    "mixtral": FamilyCase(transformers.MixtralConfig, stages=LLAMA_STAGES[:2] + expert_stages(4), mlp="mlp.experts.1",
                          overrides=dict(num_local_experts=4, num_experts_per_tok=2), stored=mixtral_stored,
                          routed=True),
    # Qwen3: per-head q/k norms; head_dim 16 is not hidden / heads = 12.
    "qwen3": FamilyCase(transformers.Qwen3Config, overrides=dict(head_dim=16)),
    "phi3": FamilyCase(transformers.Phi3Config, stages=PHI3_STAGES, neuron_rows=gate_up_rows,
                       overrides=dict(pad_token_id=None, bos_token_id=1, eos_token_id=2)),
}


def tiny_model(case: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CASES[case].build_config(**over)).eval()
    # Trained models have non-trivial biases and norm gains; random init leaves them 0 and 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.3)
    return model
