"""Model adapters: the one place that knows a model family's layout.

Everything else (the compression loop, the planner, block-by-block evaluation, streamed
checkpoints) asks the adapter where the blocks, norms, embedding and head live, what their
checkpoint names are, and how to call a block or its attention. :class:`ModelAdapter` is the
LLaMA layout: the pre-norm block ``h += attn(norm1(h)); h += mlp(norm2(h))`` with q/k/v/o and
gate/up/down projections. Each family is one module under :mod:`rom_fast.families` that
subclasses it (overriding only what differs) and registers itself with :func:`register`;
attention masks and rotary embeddings are built by the model's own forward and captured per
block (:mod:`rom_fast.blockwise`).
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


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a decoder block, by role:
    ``h <- h + finish(output(core(norm(h))))``.

    ``inputs`` are the linears that read the normed input (one stage: they share its Gram and
    input factor), ``output`` is the last linear, reading the core's outputs. ``core`` is the
    sublayer module with ``output`` replaced by the identity. ``post_norm`` (Gemma-2 style
    blocks) normalises the branch before the residual add; None: added as it is. All names
    are relative to the decoder block.
    """

    role: str                     # "attention" or "mlp"
    module: str                   # the sublayer module, e.g. "self_attn"
    norm: str                     # the norm applied to the block's hidden states first
    inputs: Tuple[str, ...]
    output: str
    post_norm: Optional[str] = None
    # A routed sublayer (mixture of experts): ``router`` (left dense) sends each token to some
    # of ``units``, each a sublayer of its own (an expert: its input linears and output linear)
    # seeing only the tokens routed to it; the sublayer's output mixes theirs. A routed
    # sublayer has no ``inputs``/``output`` of its own.
    router: Optional[str] = None
    units: Tuple["Sublayer", ...] = ()
    # Input linears that stack the rows of several projections, one block of ``units`` rows
    # each, as ``(name, parts)`` (Phi-3's gate_up_proj: gate's rows, then up's: 2 parts).
    fused: Tuple[Tuple[str, int], ...] = ()

    @property
    def linears(self) -> Tuple[str, ...]:
        if self.units:
            return tuple(n for unit in self.units for n in unit.linears)
        return self.inputs + (self.output,)

    @property
    def output_in_module(self) -> str:
        """``output`` relative to the sublayer module."""
        return self.output[len(self.module) + 1:]

    def stages(self) -> Tuple[Stage, ...]:
        if self.units:
            return tuple(stage for unit in self.units for stage in unit.stages())
        return Stage(f"{self.role}_input", self.inputs), Stage(f"{self.role}_output", (self.output,))

    def rows_per_unit(self, linear: str) -> int:
        """How many output rows of input linear ``linear`` one unit (MLP neuron) owns."""
        return dict(self.fused).get(linear, 1)

    def unit_rows(self, linear: str, kept: torch.Tensor, units: int) -> torch.Tensor:
        """The output rows of input linear ``linear`` that belong to the kept units (MLP
        neurons) ``kept`` of the sublayer's ``units``: the same indices for separate gate/up
        projections; for a fused one, those rows of each of its parts, part after part (the
        order its forward splits them in)."""
        return torch.cat([kept + part * units for part in range(self.rows_per_unit(linear))])


class ModelAdapter:
    """Architecture facts the compression loop needs. Subclass per model family.

    The loop and the planner reach a block's layers only through the named roles
    (:attr:`attention`, :attr:`mlp`: :class:`Sublayer`), in block order (:attr:`sublayers`),
    and build a block's output from them with :meth:`sublayer_forward` and
    :meth:`branch_output`; nothing outside this module knows module names.
    """

    model_types: Tuple[str, ...] = ()
    # Module paths from the causal-LM root; checkpoint tensor names start with them.
    layers_path = "model.layers"
    embedding_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    head_path = "lm_head"
    # The block's residual branches, in the order the block applies them.
    attention = Sublayer("attention", "self_attn", "input_layernorm",
                         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj")
    mlp = Sublayer("mlp", "mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
    # Keyword arguments the model hands its blocks that describe a cache, not the tokens.
    _cache_kwargs = ("cache", "past_key_values", "past_key_value", "use_cache")

    def __init__(self, model: nn.Module):
        self.prepare_model(model)
        self.model = model

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        """Brings a freshly built model of the family into the module layout the roles name,
        in place and with the same forward (an MoE family unfuses its stacked expert weights
        into one module per expert). Called on every model the adapter is given and by the
        compressed checkpoint class before its structure is applied; idempotent."""

    @property
    def sublayers(self) -> Tuple[Sublayer, ...]:
        return (self.attention, self.mlp)

    @property
    def leaf_sublayers(self) -> Tuple[Sublayer, ...]:
        """The sublayers that hold linears themselves, in block order: a routed sublayer's
        units in its place (its router is no compressible linear)."""
        return tuple(leaf for sub in self.sublayers for leaf in (sub.units or (sub,)))

    def routed_linears(self) -> Dict[str, Tuple[str, int]]:
        """``{linear of a routed unit: (its routed sublayer's module, its position in the unit)}``:
        the linears that see routed rows only, and which of them play the same part."""
        return {name: (sub.module, k) for sub in self.sublayers for unit in sub.units
                for k, name in enumerate(unit.linears)}

    @property
    def mlp_units(self) -> Tuple[Sublayer, ...]:
        """The MLPs of a block that can keep whole neurons: the MLP, or each expert of a routed one."""
        return self.mlp.units or (self.mlp,)

    @classmethod
    def mlp_units_of(cls, config: Dict) -> Tuple[Sublayer, ...]:
        """:attr:`mlp_units` from a config.json dict (sizes already checked), before any module is built."""
        return cls.mlp.units or (cls.mlp,)

    @property
    def stages(self) -> Tuple[Stage, ...]:
        """Every statistics stage of a block, in the order the loop runs them."""
        return tuple(stage for sub in self.sublayers for stage in sub.stages())

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
        return [name for sub in self.sublayers for name in sub.linears]

    @staticmethod
    def config_widths(config: Dict) -> Tuple[int, int, int, int]:
        """``(hidden, intermediate, query width, key/value width)`` of a config.json dict."""
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        return hidden, config["intermediate_size"], heads * head_dim, kv * head_dim

    @classmethod
    def linear_shapes(cls, config: Dict) -> Dict[str, Tuple[int, int]]:
        """``{linear name in a block: (d_out, d_in)}`` from a config.json dict (sizes already
        checked): what a checkpoint's ranks are checked against before any module is built."""
        hidden, inter, q, k = cls.config_widths(config)
        (q_proj, k_proj, v_proj), (gate, up) = cls.attention.inputs, cls.mlp.inputs
        return {q_proj: (q, hidden), k_proj: (k, hidden), v_proj: (k, hidden), cls.attention.output: (hidden, q),
                gate: (inter, hidden), up: (inter, hidden), cls.mlp.output: (hidden, inter)}

    @classmethod
    def check_config_sizes(cls, config: Dict) -> None:
        """Refuses (ValueError) sizes of a config.json dict that this family adds to the common
        ones, before :meth:`linear_shapes` relies on them."""

    def stored_name(self, name: str) -> str:
        """The name a checkpoint of the model's own type stores tensor ``name`` under (a family
        whose transformers class renames tensors on load maps them back)."""
        return name

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

    def sublayer_forward(self, block: nn.Module, sub: Sublayer, normed: torch.Tensor, kwargs: Dict) -> torch.Tensor:
        """The sublayer module on already-normed inputs (its output linear included, unless the
        caller replaced it)."""
        module = block.get_submodule(sub.module)
        if sub is self.attention:
            return module(hidden_states=normed, position_embeddings=kwargs.get("position_embeddings"),
                          attention_mask=kwargs.get("attention_mask"))[0]
        return module(normed)

    def routed_units(self, block: nn.Module, sub: Sublayer, normed_rows: torch.Tensor) -> torch.Tensor:
        """The indices (tokens x k) into ``sub.units`` of the units each token (a row of the
        normed input) is routed to, by the sublayer's own router (transformers' top-k routers
        return ``(logits, weights, indices)``)."""
        return block.get_submodule(sub.router)(normed_rows)[-1]

    def branch_output(self, block: nn.Module, sub: Sublayer, out: torch.Tensor) -> torch.Tensor:
        """What the residual stream adds for a sublayer's output (the block's forward form)."""
        return out if sub.post_norm is None else block.get_submodule(sub.post_norm)(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the last block's outputs, as the model's forward makes them: the
        final norm, the head, then :meth:`logit_transform`."""
        norm = self.final_norm()
        head = self.head()
        return self.logit_transform(head(norm(hidden.to(head.weight.dtype))))

    def logit_transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The elementwise function the model applies to the head's outputs (none here). A
        family puts all of its head's own arithmetic here: a head too big to widen whole is
        computed by vocabulary chunks (:mod:`rom_fast.head`), each transformed by this."""
        return logits

    def embedding_output(self, module: nn.Module, input_ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What the embedding gives the model's forward with float32 weights, from its ``output``
        with the weight kept in its storage precision (a streamed source does not widen it):
        a plain lookup's rows widened, which is exact. A family whose embedding computes more
        (a scale) forms it from ``input_ids`` itself."""
        if module.weight.dtype == torch.float32:
            return output
        if type(module) is not nn.Embedding:
            raise TypeError(f"{type(self).__name__} does not say how {type(module).__name__} forms its "
                            f"float32 output from a {module.weight.dtype} weight (embedding_output)")
        return output.to(torch.float32)


# {config.model_type: adapter class}; each family module under rom_fast/families registers its own.
ADAPTERS: Dict[str, Type[ModelAdapter]] = {}


def register(cls: Type[ModelAdapter]) -> Type[ModelAdapter]:
    """Class decorator: the adapter of every ``model_type`` in ``cls.model_types``."""
    for model_type in cls.model_types:
        if model_type in ADAPTERS and ADAPTERS[model_type] is not cls:
            raise ValueError(f"two adapters for model_type {model_type!r}: "
                             f"{ADAPTERS[model_type].__name__} and {cls.__name__}")
        ADAPTERS[model_type] = cls
    return cls


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


# Every family module registers its adapter on import (after the names above exist).
import rom_fast.families  # noqa: E402,F401  (registration side effect)
