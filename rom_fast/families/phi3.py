"""Phi-3 and Phi-4-mini (``model_type`` "phi3"): a LLaMA block whose attention reads one fused
``qkv_proj`` (queries, then keys, then values) and whose MLP reads one fused ``gate_up_proj``
(gate rows, then up rows). Each fused linear is the whole input stage of its sublayer; an MLP
keeping k neurons keeps rows j and intermediate + j of gate_up_proj for each kept neuron j
(``Sublayer.fused``). Residual dropouts are the identity in eval mode; partial rotary
embeddings (Phi-4-mini) come with the rotary embeddings the model's forward builds."""

from __future__ import annotations

from typing import Dict, Tuple

from rom_fast.adapters import ModelAdapter, Sublayer, register


@register
class Phi3Adapter(ModelAdapter):
    model_types = ("phi3",)
    attention = Sublayer("attention", "self_attn", "input_layernorm", ("self_attn.qkv_proj",), "self_attn.o_proj")
    mlp = Sublayer("mlp", "mlp", "post_attention_layernorm", ("mlp.gate_up_proj",), "mlp.down_proj",
                   fused=(("mlp.gate_up_proj", 2),))

    @classmethod
    def linear_shapes(cls, config: Dict) -> Dict[str, Tuple[int, int]]:
        hidden, inter, q, k = cls.config_widths(config)
        return {"self_attn.qkv_proj": (q + 2 * k, hidden), "self_attn.o_proj": (hidden, q),
                "mlp.gate_up_proj": (2 * inter, hidden), "mlp.down_proj": (hidden, inter)}
