"""Gemma-2 and text-only Gemma-3 (``gemma3_text``): LLaMA's linears, with a norm before and
after each sublayer, ``h += post_norm(sublayer(norm(h)))``.

The rest is where the loop does not look: the gelu-tanh MLP and Gemma-3's per-head q/k norms
are inside the sublayer modules (a factorized q_proj or k_proj keeps its whole output, which
the head's norm then reads), the embedding scale is applied by the model's own forward before
block 0 (captured with the first block's inputs), and attention-logit soft-capping and the
sliding windows of alternating sliding/global layers are inside the attention module and the
masks the model builds for each block (captured per block, :mod:`rom_fast.blockwise`, as are
Gemma-3's two rotary bases). Only the final-logit soft-capping is the head's: :meth:`logits`.
"""

from __future__ import annotations

import torch

from rom_fast.adapters import ModelAdapter, Sublayer, register


@register
class GemmaAdapter(ModelAdapter):
    model_types = ("gemma2", "gemma3_text")
    attention = Sublayer("attention", "self_attn", "input_layernorm",
                         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                         post_norm="post_attention_layernorm")
    mlp = Sublayer("mlp", "mlp", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                   post_norm="post_feedforward_layernorm")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits soft-capped as the model's forward does: ``cap * tanh(logits / cap)``
        (the same operations, so the same numbers)."""
        logits = super().logits(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap
