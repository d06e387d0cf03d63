"""The planner's allocation: ranks (and kept MLP neurons) under a global parameter budget.

The estimated loss of a plan is ``Σ_layers s · tail(r)`` (:mod:`rom_fast.planner.measure`: the
sensitivity ``s`` and spectrum tail of every linear) and the allocation minimises it under the
budget exactly over each layer's lower convex hull of (parameters, loss) points: a Lagrange
multiplier is bisected until the plan fits, then the remaining parameters go to the best
marginal gains. Dense stays an option for every layer (loss 0). Energy-normalised tails (each
layer's own ``Σλ``) are available for comparison (``weighting="energy"``); they ignore how much
a layer's error costs at the output and spread cuts over early blocks.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Dict, List, Optional, Tuple

import numpy as np

from rom_fast import plans
from rom_fast.structures import LOWRANK, NEURONS
from rom_fast.structures.neurons import retained_energy
from rom_fast.lowrank import lowrank_params, mlp_neuron_params
from rom_fast.planner.measure import LayerSpectrum

WEIGHTINGS = ("fisher", "energy", "tail")
# How an MLP may be compressed: low-rank linears, whole neurons kept (gate/up rows, down_proj
# refitted), or whichever the planner's curves say loses less ("auto").
MLP_STRUCTURES = ("auto", "lowrank", "neurons")
# "auto" is the default: at 80% of SmolLM2 it keeps neurons in every MLP it compresses and
# cuts WikiText-2 perplexity from 69.5 to 40.3 (bench/README.md, "Whole-MLP structure").
DEFAULT_MLP_STRUCTURE = "auto"
# Which structures a plan may use at all: "all" (low-rank layers and kept neurons, as
# ``mlp_structure`` allows), or "standard": only what a plain dense runtime runs with per-layer
# widths (llama.cpp's GGUF): dense layers and whole kept MLP neurons (kept attention heads
# will join them). Attention then stays dense.
PLAN_STRUCTURES = ("all", "standard")


def _loss_curve(s: LayerSpectrum, weighting: str) -> np.ndarray:
    """loss[r] for r = 0 .. len(eigenvalues): the weighted tail beyond rank r."""
    tail = np.concatenate([np.cumsum(s.eigenvalues[::-1])[::-1], [0.0]])
    if weighting == "fisher":
        return s.sensitivity * tail
    if weighting == "energy":
        return tail / tail[0] if tail[0] > 0 else tail
    if weighting == "tail":
        return tail
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


@dataclasses.dataclass(frozen=True)
class _Option:
    """One way to compress a planning unit (a linear, or an MLP's three linears together)."""
    params: int
    loss: float
    ranks: Tuple[Tuple[str, int], ...] = ()     # linears made low-rank (absent: dense)
    neurons: Optional[int] = None               # the MLP keeps this many neurons


def _dense_option(s: LayerSpectrum) -> _Option:
    """A linear left dense: its only option where no structure may compress it."""
    return _Option(s.d_out * s.d_in, 0.0)


def _lower_hull(points: List[_Option]) -> List[_Option]:
    """The lower convex hull of (params, loss), from the most parameters to the fewest (of the
    points with equal params, the lowest loss, the first of equal ones; collinear points dropped)."""
    best: Dict[int, _Option] = {}
    for pt in points:
        if pt.params not in best or pt.loss < best[pt.params].loss:
            best[pt.params] = pt
    hull: List[_Option] = []
    for pt in sorted(best.values(), key=lambda o: -o.params):   # monotone chain
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # keep b only if it lies below the segment a -> pt
            if (b.loss - a.loss) * (a.params - pt.params) >= (pt.loss - a.loss) * (a.params - b.params):
                hull.pop()
            else:
                break
        hull.append(pt)
    return hull


def _linear_options(name: str, s: LayerSpectrum, weighting: str) -> List[_Option]:
    """Dense, then every parameter-saving rank from the highest down (params strictly decreasing)."""
    return [_Option(p, loss, () if r is None else ((name, r),))
            for p, loss, r in LOWRANK.planner_points(s.d_out, s.d_in, _loss_curve(s, weighting))]


def _linear_hull(name: str, s: LayerSpectrum, weighting: str) -> List[_Option]:
    """The lower convex hull of (params, loss) over dense and every parameter-saving rank of one
    linear, from the most parameters to the fewest."""
    return _lower_hull(_linear_options(name, s, weighting))


def _sum_of_hulls(hulls: List[List[_Option]]) -> List[_Option]:
    """The hull of independent choices for several linears (their Minkowski sum): one walk
    along every hull's segments, in order of loss per parameter saved."""
    steps = sorted(((_slope_of(h[j], h[j + 1]), i, j) for i, h in enumerate(hulls) for j in range(len(h) - 1)))
    pos = [0] * len(hulls)
    points = [_combine([h[0] for h in hulls])]
    for _, i, j in steps:
        pos[i] = j + 1
        points.append(_combine([h[p] for h, p in zip(hulls, pos)]))
    return points


def _combine(options: List[_Option]) -> _Option:
    return _Option(sum(o.params for o in options), sum(o.loss for o in options),
                   tuple(x for o in options for x in o.ranks))


def _slope_of(a: _Option, b: _Option) -> float:
    return (b.loss - a.loss) / (a.params - b.params)


def _neuron_weight(s: LayerSpectrum, weighting: str) -> float:
    """The factor that puts a down_proj's output error energy on its low-rank tails' scale."""
    if weighting == "fisher":
        return s.sensitivity
    if weighting == "energy":
        total = float(s.eigenvalues.sum())
        return 1.0 / total if total > 0 else 0.0
    return 1.0


def _mlp_hull(mlp: str, linears: Tuple[str, ...], spectra: Dict[str, LayerSpectrum], weighting: str,
              structure: str) -> List[_Option]:
    """Every way to compress one MLP: its linears low-rank (independently), or whole neurons
    kept (the down_proj's neuron curve); the lower envelope of what ``structure`` allows."""
    points = [_Option(sum(spectra[n].d_out * spectra[n].d_in for n in linears), 0.0)]
    if structure in ("auto", "lowrank"):
        points += _sum_of_hulls([_linear_hull(n, spectra[n], weighting) for n in linears])
    down = spectra[linears[-1]]
    if structure in ("auto", "neurons") and down.neuron_curve is not None:
        points += [_Option(p, loss, neurons=k) for p, loss, k in
                   NEURONS.planner_points(down.d_out, down.d_in, down.neuron_curve, _neuron_weight(down, weighting))]
    return _lower_hull(points)


def check_structures(structures: str, mlp_structure: str) -> str:
    """The MLP structure a ``structures`` setting leaves: "standard" plans keep neurons (never
    low-rank), so it refuses ``mlp_structure="lowrank"``."""
    if structures not in PLAN_STRUCTURES:
        raise ValueError(f"structures must be one of {PLAN_STRUCTURES}, got {structures!r}")
    if mlp_structure not in MLP_STRUCTURES:
        raise ValueError(f"MLP structure must be one of {MLP_STRUCTURES}, got {mlp_structure!r}")
    if structures == "standard":
        if mlp_structure == "lowrank":
            raise ValueError("structures='standard' plans dense layers and kept neurons only: it cannot "
                             "take mlp_structure='lowrank'")
        return "neurons"
    return mlp_structure


def allocate_plan(spectra: Dict[str, LayerSpectrum], total_params: int, ratio: float,
                  weighting: str = "fisher", mlps: Optional[Dict[str, Tuple[Tuple[str, ...], str]]] = None,
                  structure: str = "lowrank", structures: str = "all") -> Tuple[Dict[str, int], Dict[str, int]]:
    """``(ranks, neurons)``: per-linear ranks and per-MLP kept neurons minimising the weighted
    loss with the whole model keeping at most ``ratio`` of ``total_params``. ``mlps`` ({MLP
    name: (input linears, down_proj)}) with ``structure`` "auto" or "neurons" lets each MLP keep
    whole neurons instead (its down_proj's spectrum must carry a neuron curve).
    ``structures="standard"``: no low-rank layer at all (MLPs keep neurons or stay dense,
    every other linear stays dense)."""
    ratio = plans.check_budget(ratio)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    structure = check_structures(structures, structure)
    units: Dict[str, List[_Option]] = {}
    grouped = set()
    if structure != "lowrank":
        for mlp, (inputs, down) in (mlps or {}).items():
            linears = tuple(inputs) + (down,)
            if all(n in spectra for n in linears) and spectra[down].neuron_curve is not None:
                units[mlp] = _mlp_hull(mlp, linears, spectra, weighting, structure)
                grouped.update(linears)
    for n, s in spectra.items():
        if n not in grouped:
            units[n] = _linear_hull(n, s, weighting) if structures == "all" else [_dense_option(s)]
    dense_sum = sum(h[0].params for h in units.values())
    allowed = ratio * total_params - (total_params - dense_sum)   # params the compressible layers may keep
    if allowed < sum(h[-1].params for h in units.values()):
        least = (total_params - dense_sum + sum(h[-1].params for h in units.values())) / total_params
        what = "rank 1 everywhere" if structures == "all" else \
            "one neuron in every MLP with dense attention (structures='standard')"
        raise ValueError(f"a budget of {ratio:.0%} is below what {what} keeps ({least:.1%})")
    # Greedy along each convex hull = the Lagrangian solution, one segment at a time: always
    # take the step with the smallest loss increase per parameter saved.
    pos = {n: 0 for n in units}
    kept = dense_sum
    heap = [(_slope_of(h[0], h[1]), n) for n, h in units.items() if len(h) > 1]
    heapq.heapify(heap)
    while kept > allowed and heap:
        _, n = heapq.heappop(heap)
        h, i = units[n], pos[n]
        kept -= h[i].params - h[i + 1].params
        pos[n] = i + 1
        if i + 2 < len(h):
            heapq.heappush(heap, (_slope_of(h[i + 1], h[i + 2]), n))
    ranks: Dict[str, int] = {}
    neurons: Dict[str, int] = {}
    for n, i in pos.items():
        opt = units[n][i]
        ranks.update(dict(opt.ranks))
        if opt.neurons is not None:
            neurons[n] = opt.neurons
    # The last hull step may overshoot: give parameters back where they buy the most loss
    # (one rank, or the next neuron count on the curve), while the plan still fits.
    return _refill(spectra, ranks, neurons, mlps or {}, allowed - kept, weighting)


def allocate(spectra: Dict[str, LayerSpectrum], total_params: int, ratio: float,
             weighting: str = "fisher") -> Dict[str, int]:
    """Ranks ``{name: rank}`` (dense layers absent) minimising the weighted truncation loss with
    the whole model keeping at most ``ratio`` of ``total_params`` (every layer low-rank)."""
    return allocate_plan(spectra, total_params, ratio, weighting)[0]


def _refill(spectra, ranks, neurons, mlps, spare: float, weighting: str):
    ranks, neurons = dict(ranks), dict(neurons)
    curves = {n: _loss_curve(spectra[n], weighting) for n in ranks}
    while True:
        best, best_gain, best_cost = None, 0.0, 0
        for n, r in ranks.items():
            s = spectra[n]
            cost = s.d_out + s.d_in
            if cost > spare or r + 1 > min(len(s.eigenvalues), s.d_out, s.d_in):
                continue
            if lowrank_params(s.d_out, s.d_in, r + 1) >= s.d_out * s.d_in:
                continue
            gain = (curves[n][r] - curves[n][r + 1]) / cost
            if gain > best_gain:
                best, best_gain, best_cost = ("rank", n), gain, cost
        for mlp, k in neurons.items():
            down = spectra[mlps[mlp][1]]
            kept, loss = down.neuron_curve
            j = int(np.flatnonzero(kept == k)[0])
            if j == 0 or kept[j - 1] >= down.d_in:
                continue
            cost = mlp_neuron_params(down.d_out, int(kept[j - 1]) - k)
            gain = _neuron_weight(down, weighting) * (loss[j] - loss[j - 1]) / cost
            if cost <= spare and gain > best_gain:
                best, best_gain, best_cost = ("neurons", mlp, int(kept[j - 1])), gain, cost
        if best is None:
            return ranks, neurons
        if best[0] == "rank":
            ranks[best[1]] += 1
        else:
            neurons[best[1]] = best[2]
        spare -= best_cost


def planned(shape: plans.ModelShape, ratio: float, spectra: Dict[str, LayerSpectrum],
            weighting: str = "fisher", structure: str = DEFAULT_MLP_STRUCTURE,
            structures: str = "all") -> plans.RankPlan:
    """A RankPlan from :func:`allocate_plan`, with the details a user needs to audit it (MLPs
    keep neurons only where their down_proj spectra carry neuron curves)."""
    total = shape.total_params
    structure = check_structures(structures, structure)
    ranks, neurons = allocate_plan(spectra, total, ratio, weighting, shape.mlps, structure, structures)
    kept = plans.kept_params(total, shape.shapes, ranks, neurons, shape)
    retained = {}
    for n, s in spectra.items():
        e = s.eigenvalues.sum()
        retained[n] = 1.0 if n not in ranks or e <= 0 else float(s.eigenvalues[:ranks[n]].sum() / e)
    for mlp, k in neurons.items():
        down = spectra[shape.mlps[mlp][1]]
        energy = retained_energy(*down.neuron_curve, k, down.eigenvalues.sum())
        for n in shape.mlp_linears(mlp):     # the MLP's output energy kept, on each of its linears
            retained[n] = energy
    what = "dense layers and whole MLP neurons: standard structures" if structures == "standard" else \
        "low-rank layers" if structure == "lowrank" else \
        "low-rank layers or whole MLP neurons" if structure == "auto" else "whole MLP neurons, low-rank attention"
    details = {"kind": "planned", "weighting": weighting, "target_ratio": ratio, "structure": structure,
               "kept_params": kept, "total_params": total, "ratio": kept / total,
               "retained_energy": retained,
               "sensitivity": {n: s.sensitivity for n, s in spectra.items()}}
    if structures != "all":      # recorded when set (plans made before the option read as "all")
        details["structures"] = structures
    return plans.RankPlan(ranks, f"planned ({weighting}-weighted spectra; {what}) for {ratio:.0%} of all parameters",
                          details, neurons)

