"""Mixtral: LLaMA-style attention and a routed MLP (sparse mixture of experts).

transformers stores a block's experts stacked (``MixtralExperts``: ``gate_up_proj`` E x 2I x H,
``down_proj`` E x H x I). The adapter expresses them as one module per expert with ordinary
``gate_proj``/``up_proj``/``down_proj`` linears (:class:`UnfusedExperts`, the same routing,
weights and accumulation order as transformers' forward), so each expert is a unit of the
routed MLP for the low-rank and kept-neuron structures, named like any MLP
(``model.layers.0.mlp.experts.3.gate_proj``). The router ``mlp.gate`` stays dense.

A dense Mixtral checkpoint stores the experts as transformers writes them
(``block_sparse_moe.experts.3.w1``/``w3``/``w2``); :meth:`MixtralAdapter.stored_name` maps
the adapter's names to those. A compressed ``rom_fast_mixtral`` checkpoint stores the
adapter's names as they are.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from rom_fast.adapters import ModelAdapter, Sublayer, register
from rom_fast.lowrank import set_module
from rom_fast.util import positive_int

# The largest expert counts rom_fast accepts in a config.json (Mixtral: 8 of top-2).
MAX_EXPERTS = 1 << 12
# transformers' names of an expert's linears in a dense checkpoint.
_STORED_LINEARS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """A block's experts, one :class:`ExpertMLP` each, called like transformers'
    ``MixtralExperts``: ``forward(hidden (tokens x H), top_k_index, top_k_weights)``. Each
    expert runs on its routed tokens only; its outputs, scaled by their routing weights, are
    added in expert order (transformers' order)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        by_slot = top_k_index.T               # (k, tokens): transformers' per-expert mask layout
        for e, expert in enumerate(self):
            slot, token = torch.where(by_slot == e)
            if token.numel() == 0:
                continue
            out = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def unfuse_experts(model: nn.Module) -> None:
    """Replaces every stacked ``MixtralExperts`` of ``model`` by :class:`UnfusedExperts` holding
    the same weights (on the meta device for a weightless skeleton), in place."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    for name, module in list(model.named_modules()):
        if not isinstance(module, MixtralExperts):
            continue
        fused_up, fused_down = module.gate_up_proj, module.down_proj
        n, inter, hidden = module.num_experts, module.intermediate_dim, module.hidden_dim
        experts = UnfusedExperts(ExpertMLP(hidden, inter, module.act_fn, device="meta", dtype=fused_up.dtype)
                                 for _ in range(n))
        if fused_up.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(experts):
                    # Copies: the stacked tensors go with the old module.
                    expert.gate_proj.weight = nn.Parameter(fused_up[e, :inter].clone())
                    expert.up_proj.weight = nn.Parameter(fused_up[e, inter:].clone())
                    expert.down_proj.weight = nn.Parameter(fused_down[e].clone())
        set_module(model, name, experts)


def routed_mlp(n_experts: int) -> Sublayer:
    """The routed MLP role of a block with ``n_experts`` experts."""
    units = tuple(Sublayer("mlp", f"mlp.experts.{e}", "post_attention_layernorm",
                           (f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj"), f"mlp.experts.{e}.down_proj")
                  for e in range(n_experts))
    return Sublayer("mlp", "mlp", "post_attention_layernorm", (), "", router="mlp.gate", units=units)


@register
class MixtralAdapter(ModelAdapter):
    model_types = ("mixtral",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.mlp = routed_mlp(model.config.num_local_experts)

    @classmethod
    def prepare_model(cls, model: nn.Module) -> None:
        unfuse_experts(model)

    @classmethod
    def check_config_sizes(cls, config) -> None:
        n, k = config.get("num_local_experts"), config.get("num_experts_per_tok")
        if not positive_int(n) or n > MAX_EXPERTS:
            raise ValueError(f"num_local_experts = {n!r} is not a size rom_fast accepts "
                             f"(a positive integer <= {MAX_EXPERTS})")
        if not positive_int(k) or k > n:
            raise ValueError(f"num_experts_per_tok = {k!r} must be an integer in [1, num_local_experts = {n}]")

    @classmethod
    def mlp_units_of(cls, config):
        return routed_mlp(config["num_local_experts"]).units

    @classmethod
    def linear_shapes(cls, config):
        shapes = {n: s for n, s in super().linear_shapes(config).items() if not n.startswith("mlp.")}
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        for unit in routed_mlp(config["num_local_experts"]).units:
            gate, up = unit.inputs
            shapes.update({gate: (inter, hidden), up: (inter, hidden), unit.output: (hidden, inter)})
        return shapes

    def stored_name(self, name: str) -> str:
        if str(self.model.config.model_type).startswith("rom_fast_"):
            return name
        name = re.sub(r"\.mlp\.", ".block_sparse_moe.", name, count=1)
        return re.sub(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)\.",
                      lambda m: m.group(1) + _STORED_LINEARS[m.group(2)] + ".", name)
