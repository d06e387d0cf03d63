"""LLaMA, Mistral and Qwen2: the base adapter's layout as it is. They differ in biases (Qwen2's
q/k/v, handled exactly by the factorization) and sliding-window masks (built by the model's
own forward and captured per block)."""

from __future__ import annotations

from rom_fast.adapters import ModelAdapter, register


@register
class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)


@register
class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)


@register
class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)
