"""Test-only float64 reference of LLM-ROM (Chavan et al., arXiv 2312.07046).

Plain PyTorch, written to be obviously correct rather than fast; the package never imports
it. Each compressed linear W (d_out x d_in, bias b) becomes
``Sequential(Linear(d_in, r, bias=V_r b), Linear(r, d_out, bias=False))`` with weights
``W2 = V_r W`` and ``W1 = V_r^T``, where the rows of V_r (r x d_out) are the top-r
eigenvectors of the uncentred output second moment ``C = Y^T Y``, ``Y = X W^T + b`` over
the non-padding calibration tokens X of that layer.

Error-aware order: blocks are compressed first to last; inside a block the stages are
(q, k, v) -> o -> (gate, up) -> down, and every stage's inputs are captured by running the
block as compressed so far, on the output of the already-compressed previous blocks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Stages of one LLaMA decoder block, in error-aware order (module paths inside the block).
STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class _Stop(Exception):
    """Raised by a capture hook once everything needed was captured (saves the rest of the
    forward pass; only used inside this test reference)."""


@torch.no_grad()
def reference_compress(model, input_ids, attention_mask, ranks: dict[str, int], stages=STAGES):
    """Compress the linears named in ``ranks`` of a LLaMA-family causal LM, in float64.

    Args:
        model: a transformers LLaMA-family model (``model.model.layers``); left untouched.
        input_ids: LongTensor (n, s) calibration tokens.
        attention_mask: LongTensor (n, s), 1 = real token, 0 = right padding (excluded
            from the statistics).
        ranks: full module name (e.g. ``"model.layers.3.self_attn.q_proj"``) -> rank r,
            1 <= r <= d_out. Linears not named stay dense.
        stages: the block's linears in error-aware order, grouped by shared input (LLaMA's
            by default; a family with other names or fused projections gives its own).

    Returns:
        (compressed float64 deep copy of the model, {name: V_r float64 (r, d_out)}).
    """
    model = copy.deepcopy(model).to(torch.float64).eval()
    layers = model.model.layers
    plan = _check_ranks(model, ranks, stages)
    mask = attention_mask.bool()

    hidden, kwargs_of_layer = _block_inputs(model, input_ids, attention_mask)
    bases: dict[str, torch.Tensor] = {}
    last = max((i for i, _ in plan), default=-1)
    for i in range(last + 1):
        layer = layers[i]
        layer_kwargs = kwargs_of_layer[i]
        for stage in stages:
            todo = [p for p in stage if (i, p) in plan]
            if not todo:
                continue
            inputs = _capture_inputs(layer, todo, hidden, layer_kwargs)
            for path in todo:
                name = f"model.layers.{i}.{path}"
                linear = layer.get_submodule(path)
                x = inputs[path][mask]  # (N, d_in): real tokens only
                v_r = _top_eigenvectors(linear, x, plan[(i, path)])
                _replace(layer, path, _factorized(linear, v_r))
                bases[name] = v_r
        hidden = layer(hidden, **layer_kwargs)  # block i fully compressed -> input of i+1
    return model, bases


def _check_ranks(model, ranks, stages) -> dict[tuple[int, str], int]:
    """{(block index, path inside block): r}; ValueError on unknown names or bad ranks."""
    plan = {}
    n_layers = len(model.model.layers)
    allowed = {f"model.layers.{i}.{p}": (i, p) for i in range(n_layers) for s in stages for p in s}
    for name, r in ranks.items():
        if name not in allowed:
            raise ValueError(f"{name!r} is not a linear of a decoder block")
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name!r} is a {type(linear).__name__}, not nn.Linear")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= linear.out_features:
            raise ValueError(f"rank of {name!r} must be an int in [1, {linear.out_features}], got {r!r}")
        plan[allowed[name]] = r
    return plan


def _block_inputs(model, input_ids, attention_mask):
    """Hidden states entering block 0 and, per decoder layer, the keyword arguments the
    model's forward passes it (causal or sliding-window mask, rotary position embeddings,
    position ids), recorded during one plain forward of the dense model."""
    captured = {"kwargs": {}}
    handles = []

    def make_hook(i):
        def hook(module, args, kwargs):
            if i == 0:
                captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"][i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache",
                                                                                 "past_key_values", "use_cache")}
        return hook

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hidden = captured["hidden"].clone()
    return hidden, [captured["kwargs"][i] for i in range(len(model.model.layers))]


def _capture_inputs(layer, paths, hidden, layer_kwargs) -> dict[str, torch.Tensor]:
    """Inputs (n, s, d_in) of the linears ``paths`` when ``layer`` runs on ``hidden``."""
    inputs = {}
    handles = []

    def make_hook(path):
        def hook(module, args):
            inputs[path] = args[0]
            if len(inputs) == len(paths):
                raise _Stop

        return hook

    for path in paths:
        handles.append(layer.get_submodule(path).register_forward_pre_hook(make_hook(path)))
    try:
        layer(hidden, **layer_kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return inputs


def _top_eigenvectors(linear: nn.Linear, x: torch.Tensor, r: int) -> torch.Tensor:
    """Rows = top-r eigenvectors (largest first) of Y^T Y, Y = x W^T + b; (r, d_out)."""
    y = linear(x)  # (N, d_out)
    c = y.T @ y  # uncentred second moment
    # One thread for eigh: MKL's threaded syevd spins on barriers when the cores are
    # shared and was measured 10-50x slower (28 s vs 0.6 s for 1536x1536 on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, vecs = torch.linalg.eigh(c)  # ascending eigenvalues
    finally:
        torch.set_num_threads(threads)
    return vecs[:, -r:].flip(-1).T.contiguous()


def _factorized(linear: nn.Linear, v_r: torch.Tensor) -> nn.Sequential:
    """Sequential(x -> V_r (W x + b), z -> V_r^T z)."""
    r, d_out = v_r.shape
    has_bias = linear.bias is not None
    first = nn.Linear(linear.in_features, r, bias=has_bias, dtype=torch.float64)
    second = nn.Linear(r, d_out, bias=False, dtype=torch.float64)
    first.weight.copy_(v_r @ linear.weight)
    if has_bias:
        first.bias.copy_(v_r @ linear.bias)
    second.weight.copy_(v_r.T)
    return nn.Sequential(first, second)


def _replace(layer: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(layer.get_submodule(parent_path), child, new)
