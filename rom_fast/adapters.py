"""Model adapters: where a decoder block keeps its norms, attention, MLP and linears.

One model-agnostic loop (rom_fast.pipeline) drives every architecture through this interface.
LLaMA, Mistral and Qwen2 share the pre-norm block ``h += attn(norm1(h)); h += mlp(norm2(h))``
with q/k/v/o and gate/up/down projections; they differ in biases (Qwen2's q/k/v, handled
exactly by the factorization) and attention masks (built by the model's own forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple, Type

from torch import nn


@dataclass(frozen=True)
class Stage:
    """Linears that read the same input, compressed together (they share one input factor)."""

    name: str
    linears: Tuple[str, ...]      # names relative to the decoder block


class ModelAdapter:
    """Architecture facts the compression loop needs. Subclass per model family."""

    model_types: Tuple[str, ...] = ()
    attention = "self_attn"
    mlp = "mlp"
    input_norm = "input_layernorm"
    post_attention_norm = "post_attention_layernorm"
    out_proj = "o_proj"            # last linear of the attention, relative to `attention`
    down_proj = "down_proj"        # last linear of the MLP, relative to `mlp`
    stages = (
        Stage("attention_input", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Stage("attention_output", ("self_attn.o_proj",)),
        Stage("mlp_input", ("mlp.gate_proj", "mlp.up_proj")),
        Stage("mlp_output", ("mlp.down_proj",)),
    )

    def __init__(self, model: nn.Module):
        self.model = model
        self.check(model)

    def check(self, model: nn.Module) -> None:
        types = getattr(model.config, "layer_types", None)
        if types is not None and len(set(types)) > 1:
            raise NotImplementedError(
                f"{type(model).__name__} mixes attention types {sorted(set(types))}; "
                "rom_fast supports models whose blocks share one attention mask")

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def block_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def linear_names(self) -> List[str]:
        return [name for stage in self.stages for name in stage.linears]


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)


ADAPTERS: Dict[str, Type[ModelAdapter]] = {
    t: cls for cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter) for t in cls.model_types
}


def adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise ValueError(f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                         f"supported: {', '.join(sorted(ADAPTERS))}")
    return cls(model)
