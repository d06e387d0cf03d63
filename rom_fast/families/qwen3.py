"""Qwen3: the base adapter's layout plus an RMSNorm on every query and key head, inside
attention. The norms act on each head of q_proj's and k_proj's outputs, so a factorized q_proj
or k_proj keeps its whole output width (``W1 W2`` gives all heads x head_dim outputs) and the
norm applies to it as it did to the dense projection: nothing differs for the loop.
``head_dim`` may differ from hidden / heads (Qwen3-0.6B: 16 heads of 128 over hidden 1024);
``linear_shapes`` reads it from the config."""

from __future__ import annotations

from rom_fast.adapters import ModelAdapter, register


@register
class Qwen3Adapter(ModelAdapter):
    model_types = ("qwen3",)
