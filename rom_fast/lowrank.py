"""The module that replaces a compressed linear layer: ``y = expand(reduce(x))``."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = W1 (W2 x + b2) + b1`` with ``reduce`` = W2 (r × d_in) and ``expand`` = W1 (d_out × r).

    Holds ``r (d_in + d_out)`` weights instead of ``d_in d_out``. Exposes ``in_features`` and
    ``out_features`` like the ``nn.Linear`` it replaces.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, reduce_bias: bool = False,
                 expand_bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.reduce = nn.Linear(in_features, rank, bias=reduce_bias, device=device, dtype=dtype)
        self.expand = nn.Linear(rank, out_features, bias=expand_bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))

    def merged_weight(self) -> torch.Tensor:
        """The dense equivalent ``W1 W2`` (d_out × d_in)."""
        return self.expand.weight @ self.reduce.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class PrunedLinear(nn.Linear):
    """An ``nn.Linear`` cut to some of its rows or columns (an MLP keeping k of its neurons:
    gate/up keep k output rows, down_proj k input columns, refitted). A subclass only so a
    checkpoint can tell it from the dense layer it replaced and record its new shape."""

    def spec(self) -> dict:
        return {"structure": "pruned", "out_features": self.out_features, "in_features": self.in_features,
                "bias": self.bias is not None}


def pruned_linear(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> PrunedLinear:
    """A PrunedLinear holding ``weight`` (d_out × d_in) and ``bias`` as its parameters (no copy)."""
    layer = PrunedLinear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous())
    return layer


def mlp_neuron_params(d_model: int, neurons: int) -> int:
    """Weights of a gate/up/down MLP keeping ``neurons`` intermediate neurons (no biases):
    each neuron owns a row of gate and of up (whether separate or stacked in one fused
    gate_up projection, as Phi-3's) and a column of down."""
    return 3 * d_model * neurons


def lowrank_params(d_out: int, d_in: int, rank: int) -> int:
    return rank * (d_in + d_out)


def saves_parameters(d_out: int, d_in: int, rank: int) -> bool:
    """A layer is only ever replaced by factors that hold fewer weights than it had."""
    return lowrank_params(d_out, d_in, rank) < d_out * d_in


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def from_factors(linear: nn.Linear, w1, w2, b1=None, b2=None) -> LowRankLinear:
    """A LowRankLinear in the dtype/device of ``linear`` holding the given factors."""
    d_out, rank = w1.shape
    # Built on "meta" and given the factors as its parameters: no random init to overwrite
    # and no second copy of each factor (a 7B gate_proj's are 60 MB each in float32).
    layer = LowRankLinear(linear.in_features, linear.out_features, rank,
                          reduce_bias=b2 is not None, expand_bias=b1 is not None, device="meta")
    dtype, device = linear.weight.dtype, linear.weight.device
    param = lambda a: nn.Parameter(torch.as_tensor(a).to(device=device, dtype=dtype).contiguous())  # noqa: E731
    layer.reduce.weight, layer.expand.weight = param(w2), param(w1)
    if b2 is not None:
        layer.reduce.bias = param(b2)
    if b1 is not None:
        layer.expand.bias = param(b1)
    return layer


def apply_structure(model: nn.Module, layers: Mapping[str, Mapping], device=None, dtype=None) -> None:
    """Replaces the named linears by empty modules of their compressed structure (to load saved
    tensors into).

    ``layers`` maps a module name to ``{"rank": r, "reduce_bias": bool, "expand_bias": bool}``
    (a LowRankLinear) or ``{"structure": "pruned", "out_features": o, "in_features": i, "bias":
    bool}`` (a PrunedLinear: an MLP linear keeping some of its neurons).
    """
    for name, spec in layers.items():
        old = get_module(model, name)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is {type(old).__name__}, expected nn.Linear")
        dev = device if device is not None else old.weight.device
        kind = dtype if dtype is not None else old.weight.dtype
        if spec.get("structure") == "pruned":
            set_module(model, name, PrunedLinear(int(spec["in_features"]), int(spec["out_features"]),
                                                 bias=bool(spec.get("bias", False)), device=dev, dtype=kind))
            continue
        set_module(model, name, LowRankLinear(
            old.in_features, old.out_features, int(spec["rank"]),
            reduce_bias=bool(spec.get("reduce_bias", False)),
            expand_bias=bool(spec.get("expand_bias", False)),
            device=dev, dtype=kind))


def merge_lowrank(model: nn.Module, names: Optional[list] = None) -> None:
    """Replaces LowRankLinear modules by dense nn.Linear holding ``W1 W2`` (for tools that
    cannot hold factorized layers)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear) or (names is not None and name not in names):
            continue
        dense = nn.Linear(module.in_features, module.out_features,
                          bias=module.reduce.bias is not None or module.expand.bias is not None,
                          device=module.expand.weight.device, dtype=module.expand.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(module.merged_weight())
            if dense.bias is not None:
                b = torch.zeros_like(dense.bias)
                if module.reduce.bias is not None:
                    b += module.expand.weight @ module.reduce.bias
                if module.expand.bias is not None:
                    b += module.expand.bias
                dense.bias.copy_(b)
        set_module(model, name, dense)


def _seconds(fn, x: torch.Tensor, repeat: int) -> float:
    import time
    fn(x)   # warm-up: first calls allocate
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def choose_execution(model: nn.Module, tokens: int = 1, repeat: int = 50,
                     margin: float = 0.1) -> Dict[str, str]:
    """Keeps each LowRankLinear as two linears unless its dense merge ``W1 W2`` is measured
    faster by more than ``margin`` (relative) for inputs of ``tokens`` rows (1: decoding; e.g.
    512: prefill); those are merged in place. Layers of one shape and rank are timed once (best
    of ``repeat``). Returns ``{module name: "two-linears" | "merged"}``.

    Merging gives back the parameters a layer saved, so it needs a clear win: it happens for
    small layers whose matmuls are dominated by per-call overhead.
    """
    choice: Dict[tuple, str] = {}
    result: Dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        key = (module.in_features, module.out_features, module.rank, module.expand.weight.dtype)
        if key not in choice:
            x = torch.randn(tokens, module.in_features, dtype=module.expand.weight.dtype)
            w = module.merged_weight()
            two = _seconds(module, x, repeat)
            merged = _seconds(lambda t: nn.functional.linear(t, w), x, repeat)
            choice[key] = "merged" if merged * (1 + margin) < two else "two-linears"
        result[name] = choice[key]
    merge_lowrank(model, [n for n, c in result.items() if c == "merged"])
    return result
