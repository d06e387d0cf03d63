"""Automatic rank allocation under a global parameter budget.

One pass over calibration tokens on the *dense* model gives, for every compressible linear,

- the spectrum ``λ_1 ≥ λ_2 ≥ …`` of its output second moment ``C_y`` (the loss of keeping rank r
  is the tail ``Σ_{i>r} λ_i`` exactly, on these tokens), and
- its sensitivity ``s = E‖∂L/∂y‖² / d_out``: the mean squared gradient of the language-model
  loss with respect to the layer's outputs (one backward pass). Under a Fisher/isotropic
  approximation, perturbing the outputs by ``Δy`` raises the loss by about ``s · ‖Δy‖² / 2``.

The estimated loss of a plan is then ``Σ_layers s · tail(r)`` and the allocation minimises it
under the budget exactly over each layer's lower convex hull of (parameters, loss) points:
a Lagrange multiplier is bisected until the plan fits, then the remaining parameters go to
the best marginal gains. Dense stays an option for every layer (loss 0). Energy-normalised
tails (each layer's own ``Σλ``) are available for comparison (``weighting="energy"``); they
ignore how much a layer's error costs at the output and spread cuts over early blocks.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from rom_fast import kernels, plans
from rom_fast.adapters import ModelAdapter
from rom_fast.lowrank import lowrank_params

WEIGHTINGS = ("fisher", "energy", "tail")


@dataclasses.dataclass
class LayerSpectrum:
    """What the planner knows of one linear (``eigenvalues`` descending, summed over tokens)."""
    name: str
    d_out: int
    d_in: int
    eigenvalues: np.ndarray
    sensitivity: float          # E‖∂L/∂y‖² / d_out per token

    def to_json(self) -> dict:
        return {"d_out": self.d_out, "d_in": self.d_in, "sensitivity": self.sensitivity,
                "eigenvalues": [float(v) for v in self.eigenvalues]}


@torch.no_grad()
def _spectrum(weight: torch.Tensor, acc: kernels.GramAccumulator, output_gram: bool) -> np.ndarray:
    if output_gram:
        vals = kernels.eigenvalues(acc.gram)
    else:
        vals = kernels.output_spectrum(weight.detach().double().numpy(), kernels.input_factor(acc))
    vals = np.clip(np.asarray(vals, dtype=np.float64), 0.0, None)
    return np.sort(vals)[::-1]


def collect_spectra(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, batch_size: int = 8,
                    progress: bool = False) -> Dict[str, LayerSpectrum]:
    """Spectra and sensitivities of every compressible linear, from one forward and one backward
    pass per micro-batch of the dense model (parameters get no gradients)."""
    blocks = adapter.blocks()
    accs: Dict[str, kernels.GramAccumulator] = {}
    output_route: Dict[str, bool] = {}
    grad_sq: Dict[str, float] = {}
    handles = []
    masks: List[torch.Tensor] = []   # the current micro-batch's real-token mask

    for i, block in enumerate(blocks):
        prefix = adapter.block_prefix(i)
        for stage in adapter.stages:
            lead = stage.linears[0]
            lin = block.get_submodule(lead)
            # Wide inputs (down_proj) use the output Gram of each linear; shared inputs one Gram.
            for rel in (stage.linears if lin.in_features > lin.out_features else (lead,)):
                mod = block.get_submodule(rel)
                use_out = mod.in_features > mod.out_features
                name = prefix + rel
                accs[name] = kernels.GramAccumulator(mod.out_features if use_out else mod.in_features)
                output_route[name] = use_out

                def stats_hook(_m, args, out, name=name, use_out=use_out):
                    x = out if use_out else args[0]
                    accs[name].update(x.detach()[masks[0]].float())
                handles.append(mod.register_forward_hook(stats_hook))
        for rel in adapter.linear_names():
            name = prefix + rel
            grad_sq[name] = 0.0

            def grad_hook(_m, _gin, gout, name=name):
                g = gout[0].detach()[masks[0]].double()
                grad_sq[name] += float((g * g).sum())
            handles.append(block.get_submodule(rel).register_full_backward_hook(grad_hook))

    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    n_tokens = 0
    try:
        with torch.enable_grad():
            starts = range(0, input_ids.shape[0], batch_size)
            if progress:
                from tqdm.auto import tqdm
                starts = tqdm(starts, desc="rom_fast spectra", unit="batch")
            for start in starts:
                ids = input_ids[start:start + batch_size]
                mask = attention_mask[start:start + batch_size]
                masks[:] = [mask.bool()]
                out = model(input_ids=ids, attention_mask=mask, use_cache=False)
                logits = out.logits[:, :-1].float()
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   target.reshape(-1), reduction="sum")
                loss.backward()
                n_tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)

    spectra = {}
    for i, block in enumerate(blocks):
        prefix = adapter.block_prefix(i)
        for stage in adapter.stages:
            for rel in stage.linears:
                name = prefix + rel
                source = name if name in accs else prefix + stage.linears[0]   # shared input
                mod = block.get_submodule(rel)
                vals = _spectrum(mod.weight, accs[source], output_route[source])
                spectra[name] = LayerSpectrum(name, mod.out_features, mod.in_features, vals,
                                              grad_sq[name] / max(n_tokens, 1) / mod.out_features)
    return spectra


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


def _hull_options(s: LayerSpectrum, weighting: str):
    """The lower convex hull of (params, loss) over dense and every parameter-saving rank,
    from the most parameters to the fewest: [(params, loss, rank or None for dense)]."""
    loss = _loss_curve(s, weighting)
    dense = s.d_out * s.d_in
    points = [(dense, 0.0, None)]
    r_max = min(len(s.eigenvalues), s.d_out, s.d_in)
    for r in range(r_max, 0, -1):
        p = lowrank_params(s.d_out, s.d_in, r)
        if p < dense:
            points.append((p, float(loss[r]), r))
    hull: list = []
    for pt in points:   # params strictly decreasing: monotone-chain lower hull
        while len(hull) >= 2:
            (p1, l1, _), (p2, l2, _) = hull[-2], hull[-1]
            # keep hull[-1] only if it lies below the segment hull[-2] -> pt
            if (l2 - l1) * (p1 - pt[0]) >= (pt[1] - l1) * (p1 - p2):
                hull.pop()
            else:
                break
        hull.append(pt)
    return hull


def allocate(spectra: Dict[str, LayerSpectrum], total_params: int, ratio: float,
             weighting: str = "fisher") -> Dict[str, int]:
    """Ranks ``{name: rank}`` (dense layers absent) minimising the weighted truncation loss with
    the whole model keeping at most ``ratio`` of ``total_params``."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"budget must be in (0, 1), got {ratio}")
    hulls = {n: _hull_options(s, weighting) for n, s in spectra.items()}
    dense_sum = sum(h[0][0] for h in hulls.values())
    allowed = ratio * total_params - (total_params - dense_sum)   # params the linears may keep
    floor = sum(h[-1][0] for h in hulls.values())
    if allowed < floor:
        raise ValueError(f"a budget of {ratio:.0%} is below what rank 1 everywhere keeps")
    # Greedy along each convex hull = the Lagrangian solution, one segment at a time: always
    # take the step with the smallest loss increase per parameter saved.
    pos = {n: 0 for n in hulls}
    kept = dense_sum
    heap = []
    for n, h in hulls.items():
        if len(h) > 1:
            heapq.heappush(heap, (_slope(h, 0), n))
    while kept > allowed and heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pos[n]
        kept -= h[i][0] - h[i + 1][0]
        pos[n] = i + 1
        if i + 2 < len(h):
            heapq.heappush(heap, (_slope(h, i + 1), n))
    ranks = {n: hulls[n][i][2] for n, i in pos.items() if hulls[n][i][2] is not None}
    # The last hull step may overshoot: give parameters back one rank at a time where they
    # buy the most loss, while the plan still fits.
    ranks = _refill(spectra, ranks, allowed - sum(_params(spectra[n], ranks.get(n)) for n in spectra),
                    weighting)
    return ranks


def _slope(hull, i) -> float:
    (p0, l0, _), (p1, l1, _) = hull[i], hull[i + 1]
    return (l1 - l0) / (p0 - p1)


def _params(s: LayerSpectrum, rank: Optional[int]) -> int:
    return s.d_out * s.d_in if rank is None else lowrank_params(s.d_out, s.d_in, rank)


def _refill(spectra, ranks, spare: float, weighting: str) -> Dict[str, int]:
    ranks = dict(ranks)
    curves = {n: _loss_curve(spectra[n], weighting) for n in ranks}
    while True:
        best, best_gain = None, 0.0
        for n, r in ranks.items():
            s = spectra[n]
            cost = s.d_out + s.d_in
            if cost > spare or r + 1 > min(len(s.eigenvalues), s.d_out, s.d_in):
                continue
            if lowrank_params(s.d_out, s.d_in, r + 1) >= s.d_out * s.d_in:
                continue
            gain = (curves[n][r] - curves[n][r + 1]) / cost
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return ranks
        ranks[best] += 1
        spare -= spectra[best].d_out + spectra[best].d_in


def planned(model: nn.Module, adapter: ModelAdapter, ratio: float, spectra: Dict[str, LayerSpectrum],
            weighting: str = "fisher") -> plans.RankPlan:
    """A RankPlan from :func:`allocate`, with the details a user needs to audit it."""
    total = plans.total_params(model)
    ranks = allocate(spectra, total, ratio, weighting)
    shapes = plans.layer_shapes(model, adapter)
    kept = plans.kept_params(total, shapes, ranks)
    retained = {}
    for n, s in spectra.items():
        e = s.eigenvalues.sum()
        retained[n] = 1.0 if n not in ranks or e <= 0 else float(s.eigenvalues[:ranks[n]].sum() / e)
    return plans.RankPlan(ranks, f"planned ({weighting}-weighted spectra) for {ratio:.0%} of all parameters",
                          {"kind": "planned", "weighting": weighting, "target_ratio": ratio,
                           "kept_params": kept, "total_params": total, "ratio": kept / total,
                           "retained_energy": retained,
                           "sensitivity": {n: s.sensitivity for n, s in spectra.items()}})


def plot_plan(spectra: Dict[str, LayerSpectrum], plan: plans.RankPlan, path: str) -> None:
    """PNG: per layer (in model order), the kept rank as a fraction of full rank and the
    retained output energy, one line per linear type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: Dict[str, list] = {}
    for i, (name, s) in enumerate(spectra.items()):
        kind = name.rsplit(".", 1)[-1]
        full = min(s.d_out, s.d_in)
        rank = plan.ranks.get(name, full)
        kinds.setdefault(kind, []).append((int(name.split(".")[2]), rank / full,
                                           plan.details["retained_energy"][name]))
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for kind, pts in kinds.items():
        blocks, frac, energy = zip(*pts)
        axes[0].plot(blocks, frac, marker=".", label=kind)
        axes[1].plot(blocks, energy, marker=".", label=kind)
    axes[0].set_ylabel("rank / full rank")
    axes[1].set_ylabel("retained output energy")
    axes[1].set_xlabel("block")
    axes[0].set_title(plan.description)
    axes[0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
