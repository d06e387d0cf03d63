"""Rank plans: which linear gets which rank, which MLP keeps how many neurons.

A plan is a ``{module name: rank}`` mapping (layers absent stay dense), an optional
``{MLP module name: kept neurons}`` mapping (that MLP keeps whole neurons instead: gate/up
keep those rows, down_proj is refitted on them) and a description, saved with the
compressed model. Budgets are fractions of the model's *total* parameter count
(embeddings included), as in the paper's tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from rom_fast.adapters import ModelAdapter
from rom_fast.lowrank import lowrank_params, mlp_neuron_params, saves_parameters
from rom_fast.util import total_params

# The paper's LLaMA-7B recipes: (kept ratio, last k of 32 blocks, module budget).
PAPER_RECIPES: Dict[str, Tuple[float, int, float]] = {
    "paper-90": (0.90, 8, 0.60),
    "paper-80": (0.80, 12, 0.46),
    "paper-50": (0.50, 24, 0.33),
}


@dataclass
class RankPlan:
    ranks: Dict[str, int]
    description: str
    details: dict = field(default_factory=dict)
    neurons: Dict[str, int] = field(default_factory=dict)   # {MLP module name: kept neurons}

    def to_json(self) -> dict:
        out = {"ranks": dict(self.ranks), "description": self.description, "details": self.details}
        if self.neurons:
            out["neurons"] = dict(self.neurons)
        return out

    def modules(self):
        """Every module name the plan changes (linears and MLPs)."""
        return list(self.ranks) + list(self.neurons)


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs to know of a model: every compressible linear's shape and block, and
    the whole model's parameter count (embeddings included, a tied head counted once). Built
    from a model object or from a weightless skeleton alike."""

    shapes: Dict[str, Tuple[int, int]]     # {module name: (d_out, d_in)}, in block order
    block_of: Dict[str, int]               # {module name: block index}, MLP module names too
    n_blocks: int
    total_params: int
    # {MLP module name (an expert's, in a routed MLP): (its input linears (gate, up), its
    # down_proj)}, full names
    mlps: Dict[str, Tuple[Tuple[str, ...], str]] = field(default_factory=dict)

    @classmethod
    def of(cls, adapter: ModelAdapter, total: Optional[int] = None) -> "ModelShape":
        shapes, block_of, mlps = {}, {}, {}
        for i, block in enumerate(adapter.blocks()):
            prefix = adapter.block_prefix(i)
            for rel in adapter.linear_names():
                lin = block.get_submodule(rel)
                shapes[prefix + rel] = (lin.out_features, lin.in_features)
                block_of[prefix + rel] = i
            for mlp in adapter.mlp_units:      # the MLP, or every expert of a routed one
                mlps[prefix + mlp.module] = (tuple(prefix + n for n in mlp.inputs), prefix + mlp.output)
                block_of[prefix + mlp.module] = i
        return cls(shapes, block_of, adapter.n_blocks,
                   total_params(adapter.model) if total is None else int(total), mlps)

    @classmethod
    def of_source(cls, source) -> "ModelShape":
        """The shape of a :class:`~rom_fast.io.sources.BlockSource`'s model, with the parameter
        count the source read (a streamed model's skeleton holds no weights)."""
        return cls.of(source.adapter, source.param_count)

    def mlp_linears(self, mlp: str) -> Tuple[str, ...]:
        """The full names of an MLP module's linears: its inputs (gate, up), then down_proj."""
        inputs, down = self.mlps[mlp]
        return tuple(inputs) + (down,)

    def mlp_size(self, mlp: str) -> Tuple[int, int]:
        """(d_model, intermediate neurons) of an MLP module."""
        return self.shapes[self.mlps[mlp][1]]


def kept_params(total: int, shapes: Dict[str, Tuple[int, int]], ranks: Dict[str, int],
                neurons: Optional[Dict[str, int]] = None, shape: Optional["ModelShape"] = None) -> int:
    """Parameters left when ``ranks`` (and ``neurons``, which needs ``shape``) are applied."""
    kept = total
    for name, r in ranks.items():
        d_out, d_in = shapes[name]
        kept += lowrank_params(d_out, d_in, r) - d_out * d_in
    for mlp, k in (neurons or {}).items():
        d_model, n = shape.mlp_size(mlp)
        kept += mlp_neuron_params(d_model, k) - mlp_neuron_params(d_model, n)
    return kept


def check_neurons(shape: ModelShape, ranks: Dict[str, int], neurons: Dict[str, int], source: str) -> Dict[str, int]:
    """Kept-neuron counts ``{MLP module name: k}``: known MLPs, 1 <= k < intermediate size,
    and none of the MLP's linears also given a rank."""
    out = {}
    for mlp, k in neurons.items():
        if mlp not in shape.mlps:
            raise ValueError(f"{source}: {mlp!r} is not an MLP of this model")
        d_model, n = shape.mlp_size(mlp)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
            raise ValueError(f"{source}: kept neurons of {mlp} must be an integer in [1, {n - 1}], got {k!r}")
        both = [n for n in shape.mlp_linears(mlp) if n in ranks]
        if both:
            raise ValueError(f"{source}: {mlp} keeps {k} neurons, so its linears take no rank: {both}")
        out[mlp] = k
    return out


def module_rank(d_out: int, d_in: int, budget: float) -> int:
    """Rank that keeps ``budget`` of a layer's weights: max(1, floor(b d_out d_in / (d_out + d_in)))."""
    return max(1, math.floor(budget * d_out * d_in / (d_out + d_in)))


def uniform_ranks(shapes, names, budget: float) -> Dict[str, int]:
    ranks = {}
    for name in names:
        d_out, d_in = shapes[name]
        r = module_rank(d_out, d_in, budget)
        if saves_parameters(d_out, d_in, r):   # never more weights than the dense layer
            ranks[name] = r
    return ranks


def check_budget(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1), got {ratio!r}")
    return float(ratio)


def check_reachable(shape: ModelShape, ratio: float, structures: str = "all") -> None:
    """Refuses, before any work, a budget below what rank 1 in every compressible layer keeps
    (``structures="standard"``: one kept neuron in every MLP, every other layer dense)."""
    if structures == "standard":
        sizes = [shape.mlp_size(m) for m in shape.mlps]
        floor = shape.total_params - sum(mlp_neuron_params(d, n) - mlp_neuron_params(d, 1) for d, n in sizes)
        what = "one neuron in every MLP with dense attention (structures='standard')"
    else:
        floor = shape.total_params - sum(a * b - min(a * b, a + b) for a, b in shape.shapes.values())
        what = "rank 1 in every layer"
    if ratio * shape.total_params < floor:
        raise ValueError(f"a budget of {ratio:.0%} is below what {what} keeps "
                         f"({floor / shape.total_params:.1%} of the {shape.total_params:,} parameters)")


def last_k_plan(shape: ModelShape, ratio: float, k: int, label: Optional[str] = None) -> RankPlan:
    """Uniform module budget on the last ``k`` blocks, solved so the whole model keeps ``ratio``
    of its parameters (the paper's recipe; its budgets are per module, ours is solved from the
    total so it transfers to models whose embeddings weigh differently)."""
    n_blocks = shape.n_blocks
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_blocks:
        raise ValueError(f"k must be in [1, {n_blocks}], got {k!r}")
    ratio = check_budget(ratio)
    shapes, total = shape.shapes, shape.total_params
    names = [n for n in shapes if shape.block_of[n] >= n_blocks - k]
    target = ratio * total
    lo, hi = 0.0, 1.0
    if kept_params(total, shapes, uniform_ranks(shapes, names, 0.0)) > target:
        raise ValueError(f"the last {k} blocks cannot reach {ratio:.0%} of the parameters even at rank 1; "
                         "use more blocks")
    for _ in range(60):   # bisection on the module budget; kept params grow with it
        mid = (lo + hi) / 2
        if kept_params(total, shapes, uniform_ranks(shapes, names, mid)) > target:
            hi = mid
        else:
            lo = mid
    ranks = uniform_ranks(shapes, names, lo)
    kept = kept_params(total, shapes, ranks)
    return RankPlan(ranks, label or f"last {k} of {n_blocks} blocks at module budget {lo:.3f}",
                    {"kind": "last_k", "k": k, "module_budget": lo, "target_ratio": ratio,
                     "kept_params": kept, "total_params": total, "ratio": kept / total})


def paper_recipe(shape: ModelShape, name: str) -> RankPlan:
    """The paper's 90/80/50% recipes, with "last k of 32 blocks" scaled to the model's depth."""
    if name not in PAPER_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(PAPER_RECIPES)}")
    ratio, k32, _ = PAPER_RECIPES[name]
    n_blocks = shape.n_blocks
    k = max(1, min(n_blocks, round(k32 * n_blocks / 32)))
    return last_k_plan(shape, ratio, k,
                       label=f"{name}: last {k} of {n_blocks} blocks (paper: last {k32} of 32), "
                             f"module budget solved for {ratio:.0%} of all parameters")


def recipe_for_budget(shape: ModelShape, ratio: float) -> RankPlan:
    """The paper's recipe at any budget: k/32 interpolated between its 90/80/50% settings."""
    ratio = check_budget(ratio)
    pts = sorted((r, k) for r, k, _ in PAPER_RECIPES.values())
    if ratio <= pts[0][0]:
        k32 = pts[0][1]
    elif ratio >= pts[-1][0]:
        k32 = pts[-1][1]
    else:
        for (r0, k0), (r1, k1) in zip(pts, pts[1:]):
            if r0 <= ratio <= r1:
                k32 = k0 + (k1 - k0) * (ratio - r0) / (r1 - r0)
    n_blocks = shape.n_blocks
    k = max(1, min(n_blocks, round(k32 * n_blocks / 32)))
    return last_k_plan(shape, ratio, k,
                       label=f"paper recipe at {ratio:.0%}: last {k} of {n_blocks} blocks")


def explicit_plan(shape: ModelShape, ranks: Dict[str, int], source: str = "explicit ranks",
                  neurons: Optional[Dict[str, int]] = None) -> RankPlan:
    """Checks user-given ranks ``{module name: rank}``: known layers, positive integers, and
    never more parameters than the dense layer; and kept neurons ``{MLP name: k}`` (see
    :func:`check_neurons`). ``source`` prefixes the error messages."""
    shapes = shape.shapes
    plan = {}
    for name, r in ranks.items():
        if name not in shapes:
            raise ValueError(f"{source}: {name!r} is not a compressible linear of this model")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{source}: rank of {name} must be a positive integer, got {r!r}")
        d_out, d_in = shapes[name]
        if not saves_parameters(d_out, d_in, r):
            raise ValueError(f"{source}: rank {r} for {name} ({d_out}x{d_in}) would not save parameters")
        plan[name] = r
    kept_neurons = check_neurons(shape, plan, neurons or {}, source)
    total = shape.total_params
    kept = kept_params(total, shapes, plan, kept_neurons, shape)
    return RankPlan(plan, source, {"kind": "explicit", "kept_params": kept, "total_params": total,
                                   "ratio": kept / total}, kept_neurons)


def split_plan(obj: dict) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(ranks, neurons) of ``{module name: rank}`` or ``{"ranks": {...}, "neurons": {...}}``."""
    if isinstance(obj.get("ranks"), dict):
        neurons = obj.get("neurons", {})
        if not isinstance(neurons, dict):
            raise ValueError("plan: 'neurons' must map MLP module names to kept neuron counts")
        return obj["ranks"], neurons
    return obj, {}


def read_ranks_file(path: Union[str, Path]) -> dict:
    """A JSON object ``{module name: rank}`` (or ``{"ranks": {...}, "neurons": {...}}``, as
    ``rom-fast plan --json`` writes it), with the file named in every error."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"ranks file {path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"ranks file {path}: not valid JSON ({exc})") from None
    ranks = data.get("ranks", data) if isinstance(data, dict) else None
    if not isinstance(ranks, dict):
        raise ValueError(f"ranks file {path}: expected a JSON object mapping module names to ranks")
    if isinstance(data.get("neurons"), dict) and data["neurons"]:
        return {"ranks": ranks, "neurons": data["neurons"]}
    return ranks


def ranks_from_file(shape: ModelShape, path: Union[str, Path]) -> RankPlan:
    """Explicit ranks (and kept neurons) from a JSON file (see :func:`read_ranks_file`)."""
    ranks, neurons = split_plan(read_ranks_file(path))
    return explicit_plan(shape, ranks, f"explicit ranks from {Path(path).name}", neurons)
