"""Gemma-2 and text-only Gemma-3 (``gemma3_text``): LLaMA's linears, with a norm before and
after each sublayer, ``h += post_norm(sublayer(norm(h)))``.

The rest is where the loop does not look: the gelu-tanh MLP and Gemma-3's per-head q/k norms
are inside the sublayer modules (a factorized q_proj or k_proj keeps its whole output, which
the head's norm then reads), the embedding scale is applied by the model's own forward before
block 0 (captured with the first block's inputs), and attention-logit soft-capping and the
sliding windows of alternating sliding/global layers are inside the attention module and the
masks the model builds for each block (captured per block, :mod:`rom_fast.blockwise`, as are
Gemma-3's two rotary bases). Only the final-logit soft-capping is the head's
(:meth:`logit_transform`); the embedding scale says how a streamed embedding kept in bfloat16
forms its float32 output (:meth:`embedding_output`).
"""

from __future__ import annotations

import torch
from torch import nn

from rom_fast.adapters import ModelAdapter, Sublayer, register


@register
class GemmaAdapter(ModelAdapter):
    model_types = ("gemma2", "gemma3_text")
    attention = Sublayer("attention", "self_attn", "input_layernorm",
                         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                         post_norm="post_attention_layernorm")
    mlp = Sublayer("mlp", "mlp", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                   post_norm="post_feedforward_layernorm")

    def logit_transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft-capped as the model's forward does: ``cap * tanh(logits / cap)`` (the same
        operations, so the same numbers)."""
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def embedding_output(self, module, input_ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Gemma's embedding scales its rows by ``sqrt(hidden_size)`` in the weight's precision:
        with float32 weights that is the float32 lookup times the float32 scale, formed here
        from the ids (the module's own product in a bfloat16 weight's precision rounds)."""
        scale = getattr(module, "embed_scale", None)
        if scale is None or module.weight.dtype == torch.float32:
            return super().embedding_output(module, input_ids, output)
        rows = nn.functional.embedding(input_ids, module.weight, module.padding_idx)
        return rows.to(torch.float32) * scale.to(torch.float32)
