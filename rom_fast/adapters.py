"""Model adapters: the one place that knows a model family's layout.

Everything else (the compression loop, the planner, block-by-block evaluation, streamed
checkpoints) asks the adapter where the blocks, norms, embedding and head live, what their
checkpoint names are, and how to call a block or its attention. LLaMA, Mistral and Qwen2 share
the pre-norm block ``h += attn(norm1(h)); h += mlp(norm2(h))`` with q/k/v/o and gate/up/down
projections; they differ in biases (Qwen2's q/k/v, handled exactly by the factorization) and
attention masks (built by the model's own forward, captured before the first block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    """Linears that read the same input, compressed together (they share one input factor)."""

    name: str
    linears: Tuple[str, ...]      # names relative to the decoder block


class ModelAdapter:
    """Architecture facts the compression loop needs. Subclass per model family."""

    model_types: Tuple[str, ...] = ()
    # Module paths from the causal-LM root; checkpoint tensor names start with them.
    layers_path = "model.layers"
    embedding_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    head_path = "lm_head"
    # Inside a decoder block.
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
    # Keyword arguments the model hands its blocks that describe a cache, not the tokens.
    _cache_kwargs = ("cache", "past_key_values", "past_key_value", "use_cache")

    def __init__(self, model: nn.Module):
        self.model = model
        self.check(model)

    def check(self, model: nn.Module) -> None:
        types = getattr(model.config, "layer_types", None)
        if types is not None and len(set(types)) > 1:
            raise NotImplementedError(
                f"{type(model).__name__} mixes attention types {sorted(set(types))}; "
                "rom_fast supports models whose blocks share one attention mask")

    # -- layout ---------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks())

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def block_index(self, name: str) -> Optional[int]:
        """The block a module or tensor name belongs to, or None outside the blocks."""
        head = self.layers_path + "."
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def linear_names(self) -> List[str]:
        return [name for stage in self.stages for name in stage.linears]

    @staticmethod
    def linear_shapes(config: Dict) -> Dict[str, Tuple[int, int]]:
        """``{linear name in a block: (d_out, d_in)}`` from a config.json dict (sizes already
        checked): what a checkpoint's ranks are checked against before any module is built."""
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        q, k = heads * head_dim, kv * head_dim
        return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (k, hidden), "self_attn.v_proj": (k, hidden),
                "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                "mlp.down_proj": (hidden, inter)}

    def tied(self) -> bool:
        """True when the head reuses the input embedding (stored once in checkpoints)."""
        return bool(getattr(self.model.config, "tie_word_embeddings", False))

    def embedding(self) -> nn.Module:
        return self.model.get_submodule(self.embedding_path)

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.final_norm_path)

    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    # -- calls ----------------------------------------------------------------------------
    def block_kwargs(self, kwargs: Dict) -> Dict:
        """What a block needs besides its hidden states, from the kwargs the model passed it
        (rotary embeddings, mask, positions), without cache objects."""
        return {k: v for k, v in kwargs.items() if k not in self._cache_kwargs and k != "hidden_states"}

    def block_forward(self, block: nn.Module, hidden: torch.Tensor, kwargs: Dict) -> torch.Tensor:
        """The block's output hidden states (transformers returns a tuple in older versions)."""
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def attention_forward(self, block: nn.Module, normed: torch.Tensor, kwargs: Dict) -> torch.Tensor:
        """The block's attention on already-normed inputs (o_proj included)."""
        attn = block.get_submodule(self.attention)
        return attn(hidden_states=normed, position_embeddings=kwargs.get("position_embeddings"),
                    attention_mask=kwargs.get("attention_mask"))[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the last block's outputs."""
        norm = self.final_norm()
        head = self.head()
        return head(norm(hidden.to(head.weight.dtype)))


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)


ADAPTERS: Dict[str, Type[ModelAdapter]] = {
    t: cls for cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter) for t in cls.model_types
}


def adapter_class(model_type: Optional[str], what: str = "") -> Type[ModelAdapter]:
    """The adapter of a ``config.model_type`` (a compressed ``rom_fast_<base>`` included)."""
    base = model_type[len("rom_fast_"):] if isinstance(model_type, str) and model_type.startswith("rom_fast_") \
        else model_type
    cls = ADAPTERS.get(base)
    if cls is None:
        raise ValueError(f"unsupported architecture {model_type!r}{f' ({what})' if what else ''}; "
                         f"supported: {', '.join(sorted(ADAPTERS))}")
    return cls


def adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return adapter_class(model_type, type(model).__name__)(model)
