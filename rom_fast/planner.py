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

import contextlib
import dataclasses
import heapq
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from rom_fast import kernels, plans
from rom_fast.adapters import ModelAdapter
from rom_fast.blockwise import capture_block_inputs
from rom_fast.distributed import Communicator
from rom_fast.lowrank import lowrank_params, mlp_neuron_params
from rom_fast.io.safetensors_index import write_safetensors
from rom_fast.io.sources import BlockSource
from rom_fast.util import StageTimer, release_freed_memory

WEIGHTINGS = ("fisher", "energy", "tail")
# How an MLP may be compressed: low-rank linears, whole neurons kept (gate/up rows, down_proj
# refitted), or whichever the planner's curves say loses less ("auto").
MLP_STRUCTURES = ("auto", "lowrank", "neurons")
# "auto" is the default: at 80% of SmolLM2 it keeps neurons in every MLP it compresses and
# cuts WikiText-2 perplexity from 69.5 to 40.3 (bench/README.md, "Whole-MLP structure").
DEFAULT_MLP_STRUCTURE = "auto"
# Greedy neuron removal in the planner takes about this many steps per MLP (exact curve points;
# 256 made the planner pass 12x longer on SmolLM2).
NEURON_CURVE_STEPS = 64
# Sensitivities are per-layer means: 32 sequences plan as well as 128 on SmolLM2 (WikiText-2
# perplexity 69.48 vs 69.44 at 80%, 945 vs 1019 at 50%; bench/README.md) at 58% of the time.
DEFAULT_GRAD_SAMPLES = 32
HEAD_CHUNK_TOKENS = 256   # tokens per head forward/backward in the planner (SmolLM2: 50 MB of logits)


@dataclasses.dataclass
class LayerSpectrum:
    """What the planner knows of one linear (``eigenvalues`` descending, summed over tokens)."""
    name: str
    d_out: int
    d_in: int
    eigenvalues: np.ndarray
    sensitivity: float          # E‖∂L/∂y‖² / d_out per token
    # On an MLP's down_proj: the loss of keeping fewer of its input neurons, (kept counts
    # descending from d_in, output error energy of the greedy set with down_proj refitted).
    neuron_curve: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def to_json(self) -> dict:
        out = {"d_out": self.d_out, "d_in": self.d_in, "sensitivity": self.sensitivity,
               "eigenvalues": [float(v) for v in self.eigenvalues]}
        if self.neuron_curve is not None:
            out["neuron_curve"] = {"kept": [int(k) for k in self.neuron_curve[0]],
                                   "loss": [float(v) for v in self.neuron_curve[1]]}
        return out


@torch.no_grad()
def _spectrum(weight: torch.Tensor, stats, output_gram: bool) -> np.ndarray:
    """A linear's output spectrum from its output Gram, or from the input factor it shares."""
    vals = kernels.eigenvalues(stats.gram) if output_gram else \
        kernels.output_spectrum(weight.detach().numpy(), stats)
    vals = np.clip(np.asarray(vals, dtype=np.float64), 0.0, None)
    return np.sort(vals)[::-1]


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """No parameter gradients inside (only activation gradients are needed); flags restored."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def _block_statistics(adapter: ModelAdapter, block: nn.Module, prefix: str, token_mask: List[torch.Tensor],
                      timer: StageTimer, comm: Communicator, neuron_curves: bool = False):
    """Forward hooks accumulating, on the real tokens, the Gram each stage's spectra need: one
    shared input Gram for q/k/v and for gate/up, the output Gram of each linear whose input is
    wider than its output (down_proj), and with ``neuron_curves`` down_proj's input Gram too
    (under the key ``NEURONS + name``). Returns (accumulators, output-route flags, handles)."""
    accs: Dict[str, kernels.GramAccumulator] = {}
    output_route: Dict[str, bool] = {}
    handles = []
    if neuron_curves:
        (down,) = adapter.stages[3].linears
        mod = block.get_submodule(down)
        accs[NEURONS + down] = comm.gram_accumulator(mod.in_features, f"inputs of {prefix}{down} (planner)",
                                                     precision=_precision(mod.in_features))

        def neuron_hook(_m, args, _out):
            with timer("statistics"):
                accs[NEURONS + down].update(args[0].detach()[token_mask[0]].float())
        handles.append(mod.register_forward_hook(neuron_hook))
    for stage in adapter.stages:
        lead = block.get_submodule(stage.linears[0])
        for rel in (stage.linears if lead.in_features > lead.out_features else stage.linears[:1]):
            mod = block.get_submodule(rel)
            use_out = mod.in_features > mod.out_features
            accs[rel] = comm.gram_accumulator(mod.out_features if use_out else mod.in_features,
                                              f"{'outputs' if use_out else 'inputs'} of {prefix}{rel} (planner)")
            output_route[rel] = use_out

            def hook(_m, args, out, rel=rel, use_out=use_out):
                x = out if use_out else args[0]
                with timer("statistics"):      # inside planner_forward
                    accs[rel].update(x.detach()[token_mask[0]].float())
            handles.append(mod.register_forward_hook(hook))
    return accs, output_route, handles


NEURONS = "neurons:"   # key prefix of the down_proj input Gram among a block's accumulators


def _precision(dim: int) -> str:
    from rom_fast.pipeline import FLOAT32_GRAM_MIN_DIM
    return "float32" if dim >= FLOAT32_GRAM_MIN_DIM else "float64"


def neuron_curve(weight, gram) -> Tuple[np.ndarray, np.ndarray]:
    """(kept counts from d_in down to 1, output error energy) of greedy neuron removal with
    the weight refitted (:func:`kernels.select_inputs`), about NEURON_CURVE_STEPS exact points.
    ``gram`` is an array (left unchanged) or a GramAccumulator the caller hands over: the
    kernel takes its own n x n as the workspace (the accumulator is spent; no copy)."""
    n = weight.shape[1]
    sel = kernels.select_inputs(weight, gram, n, curve_to=1, block=max(1, n // NEURON_CURVE_STEPS),
                                overwrite_gram=isinstance(gram, kernels.GramAccumulator))
    return np.asarray(sel.curve_kept, dtype=np.int64), np.clip(np.asarray(sel.curve_loss, dtype=np.float64), 0.0, None)


def _block_spectra(adapter: ModelAdapter, block: nn.Module, prefix: str, accs, output_route):
    """Spectra of a block's linears, one stage at a time: each shared input factor is built
    once, and each Gram is dropped as soon as its stage is done (``accs`` is emptied). A
    down_proj input Gram (``NEURONS``) becomes its MLP's neuron curve."""
    out = {}
    curves = {}
    for key in [k for k in accs if k.startswith(NEURONS)]:
        rel = key[len(NEURONS):]
        curves[rel] = neuron_curve(block.get_submodule(rel).weight.detach().numpy(), accs.pop(key))
    for stage in adapter.stages:
        shared = None
        for rel in stage.linears:
            mod = block.get_submodule(rel)
            if rel in accs and output_route[rel]:
                vals = _spectrum(mod.weight, accs.pop(rel), output_gram=True)
            else:
                if shared is None:
                    shared = kernels.input_factor(accs.pop(stage.linears[0]))
                vals = _spectrum(mod.weight, shared, output_gram=False)
            out[prefix + rel] = (mod.out_features, mod.in_features, vals, curves.get(rel))
    return out


def collect_spectra(source: BlockSource, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    batch_size: int = 8, progress: bool = False,
                    activation_dtype: torch.dtype = torch.float32,
                    workdir: Optional[str] = None,
                    seconds: Optional[Dict[str, float]] = None,
                    grad_samples: Optional[int] = DEFAULT_GRAD_SAMPLES,
                    comm: Optional[Communicator] = None,
                    neuron_curves: bool = False) -> Dict[str, LayerSpectrum]:
    """Spectra and sensitivities of every compressible linear of the dense model, one block in
    memory at a time, so a streamed 70B model is planned in the memory one block takes.

    1. Forward, bottom up: each block's input hidden states are saved to a temporary directory
       (under ``workdir``, default the system's); the Grams of the block's stages are
       accumulated on the real tokens and turned into spectra at once, then dropped.
    2. At the top, the gradient of the summed next-token loss with respect to the last
       block's outputs (final norm and head brought in for that only).
    3. Backward, top down: each block's forward is recomputed from its saved input with
       autograd and backpropagated from the gradient of its output; the squared gradients of
       every linear's outputs are summed; the gradient of its input goes to the block below.
       Parameters get no gradients.

    With ``neuron_curves``, every down_proj's input Gram is accumulated too and turned into its
    MLP's neuron curve (:func:`neuron_curve`), for plans that keep whole neurons.

    The result equals a whole-model forward and backward (the chain rule, split at block
    boundaries; inputs are saved exactly in ``activation_dtype``). ``grad_samples``: the
    sensitivities come from the first this many sequences only (rounded up to whole
    micro-batches; None: all), the spectra from all of them. ``seconds``, if given,
    accumulates wall time under ``planner_*`` keys (capture, load, forward (statistics
    included), statistics, spectra, head, backward (the recomputed forward included), io).

    With ``comm`` (:mod:`rom_fast.distributed`) each process runs its shard of the sequences
    (and of the first ``grad_samples``); Grams, squared gradients and token counts are summed
    over the processes, so every process returns the spectra one process would.
    """
    timer = StageTimer(seconds if seconds is not None else {}, prefix="planner_")
    comm = comm or Communicator()
    n_blocks = source.n_blocks
    n_total = input_ids.shape[0]
    n_grad_total = n_total if grad_samples is None else \
        min(n_total, -(-_check_positive(grad_samples) // batch_size) * batch_size)
    rows = comm.shard_rows(n_total, batch_size)
    input_ids, attention_mask = input_ids[rows], attention_mask[rows]
    n_grad = int((rows < n_grad_total).sum())      # whole micro-batches: n_grad_total is a batch boundary
    with timer("capture"):
        hidden, kwargs_list = capture_block_inputs(source, input_ids, attention_mask, batch_size, activation_dtype)
    masks = [m.bool() for m in attention_mask.split(batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=2 * n_blocks, desc="rom_fast planner", unit="block")
    try:
        with tempfile.TemporaryDirectory(prefix="rom_fast_planner-", dir=workdir) as tmp:
            saved = [Path(tmp) / f"input-{i:05d}.safetensors" for i in range(n_blocks)]
            raw = {}
            for i in range(n_blocks):
                if n_grad:
                    with timer("io"):
                        write_safetensors(saved[i], {"hidden": hidden[:n_grad]})
                raw.update(_forward_block(source, i, hidden, kwargs_list, masks, batch_size, timer, comm,
                                          neuron_curves))
                if bar is not None:
                    bar.update(1)
            if n_grad:
                with timer("head"):
                    grads = _loss_gradient(source, hidden[:n_grad], input_ids[:n_grad], attention_mask[:n_grad])
            del hidden
            grad_sq: Dict[str, float] = {}
            for i in reversed(range(n_blocks)):
                if not n_grad:      # a process whose shard has none of the gradient's sequences
                    grad_sq.update({source.adapter.block_prefix(i) + rel: 0.0 for rel in source.adapter.linear_names()})
                    continue
                with timer("io"):
                    with safe_open(str(saved[i]), framework="pt") as f:
                        inputs = f.get_tensor("hidden")
                    saved[i].unlink()
                grad_sq.update(_backward_block(source, i, inputs, grads, kwargs_list, masks, batch_size, timer))
                del inputs
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    release_freed_memory()       # the backward passes' buffers, before compression's own
    names = list(raw)
    sums = np.array([grad_sq[n] for n in names] + [float(attention_mask[:n_grad].sum())], dtype=np.float64)
    comm.all_reduce(sums, "planner sensitivities")
    n_tokens = max(sums[-1], 1.0)
    return {name: LayerSpectrum(name, d_out, d_in, vals, float(sums[k]) / n_tokens / d_out, curve)
            for k, (name, (d_out, d_in, vals, curve)) in enumerate(raw.items())}


def _check_positive(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"grad_samples must be a positive integer, got {n!r}")
    return n


def _forward_block(source: BlockSource, i: int, hidden: torch.Tensor, kwargs_list, masks, batch_size: int,
                   timer: StageTimer, comm: Communicator, neuron_curves: bool = False) -> Dict[str, tuple]:
    """Block i over every sequence, in place in ``hidden``, with its stages' Grams accumulated
    on the way; returns its linears' ``{name: (d_out, d_in, eigenvalues, neuron curve or None)}``."""
    adapter = source.adapter
    with timer("load"):
        block = source.load_block(i)
    try:
        current = [masks[0]]           # the micro-batch's real-token mask, for the hooks
        accs, output_route, handles = _block_statistics(adapter, block, adapter.block_prefix(i), current, timer,
                                                        comm, neuron_curves)
        try:
            with timer("forward"), torch.inference_mode():
                for v, kw, m in zip(hidden.split(batch_size), kwargs_list, masks):
                    current[0] = m
                    v.copy_(adapter.block_forward(block, v.float(), kw))
        finally:
            for h in handles:
                h.remove()
        with timer("spectra"):
            return _block_spectra(adapter, block, adapter.block_prefix(i), accs, output_route)
    finally:
        source.release_block(i)


def _loss_gradient(source: BlockSource, hidden: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """d(summed next-token loss)/d(last block's outputs), float32, a few hundred tokens at a
    time (norm and head act per token): the vocabulary-wide logits and their gradient stay small."""
    adapter = source.adapter
    grads = torch.empty(hidden.shape, dtype=torch.float32)
    targets = input_ids.roll(-1, dims=1).masked_fill(attention_mask.roll(-1, dims=1) == 0, -100)
    targets[:, -1] = -100                       # the last position predicts nothing here
    flat_hidden = hidden.view(-1, hidden.shape[-1])
    flat_grads, flat_targets = grads.view(-1, grads.shape[-1]), targets.reshape(-1)
    with source.head(), _frozen(source.model), torch.enable_grad():
        for start in range(0, flat_hidden.shape[0], HEAD_CHUNK_TOKENS):
            rows = slice(start, start + HEAD_CHUNK_TOKENS)
            x = flat_hidden[rows].to(torch.float32, copy=True).requires_grad_(True)
            loss = nn.functional.cross_entropy(adapter.logits(x).float(), flat_targets[rows], reduction="sum")
            (gx,) = torch.autograd.grad(loss, x)
            flat_grads[rows].copy_(gx)
            del loss, gx, x
    return grads


def _backward_block(source: BlockSource, i: int, inputs: torch.Tensor, grads: torch.Tensor, kwargs_list,
                    masks, batch_size: int, timer: StageTimer) -> Dict[str, float]:
    """Recomputes block i from its saved ``inputs`` and backpropagates ``grads`` (its outputs'
    gradient, replaced in place by its inputs' gradient); returns the summed squared
    gradient of every linear's outputs on the real tokens."""
    adapter = source.adapter
    prefix = adapter.block_prefix(i)
    with timer("load"):
        block = source.load_block(i)
    current = [masks[0]]
    grad_sq: Dict[str, float] = {}
    handles = []
    try:
        for rel in adapter.linear_names():
            name = prefix + rel
            grad_sq[name] = 0.0

            def on_grad(g, name=name):
                g = g.detach()[current[0]].reshape(-1)
                grad_sq[name] += float(torch.dot(g, g))   # float32 dot, summed in float64

            def forward_hook(_m, _a, out, on_grad=on_grad):
                if out.requires_grad:
                    out.register_hook(on_grad)
            handles.append(block.get_submodule(rel).register_forward_hook(forward_hook))
        with timer("backward"), _frozen(block), torch.enable_grad():
            for x, g, kw, m in zip(inputs.split(batch_size), grads.split(batch_size), kwargs_list, masks):
                current[0] = m
                x = x.to(torch.float32, copy=True).requires_grad_(True)
                y = adapter.block_forward(block, x, kw)
                (gx,) = torch.autograd.grad(y, x, grad_outputs=g)
                g.copy_(gx)
    finally:
        for h in handles:
            h.remove()
        source.release_block(i)
    return grad_sq


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


@dataclasses.dataclass(frozen=True)
class _Option:
    """One way to compress a planning unit (a linear, or an MLP's three linears together)."""
    params: int
    loss: float
    ranks: Tuple[Tuple[str, int], ...] = ()     # linears made low-rank (absent: dense)
    neurons: Optional[int] = None               # the MLP keeps this many neurons


def _lower_hull(points: List[_Option]) -> List[_Option]:
    """The lower convex hull of (params, loss), from the most parameters to the fewest."""
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


def _linear_hull(name: str, s: LayerSpectrum, weighting: str) -> List[_Option]:
    return [_Option(p, l, () if r is None else ((name, r),)) for p, l, r in _hull_options(s, weighting)]


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
        w = _neuron_weight(down, weighting)
        for k, loss in zip(*down.neuron_curve):
            if 1 <= k < down.d_in:
                points.append(_Option(mlp_neuron_params(down.d_out, int(k)), w * float(loss), neurons=int(k)))
    return _lower_hull(points)


def allocate_plan(spectra: Dict[str, LayerSpectrum], total_params: int, ratio: float,
                  weighting: str = "fisher", mlps: Optional[Dict[str, Tuple[Tuple[str, ...], str]]] = None,
                  structure: str = "lowrank") -> Tuple[Dict[str, int], Dict[str, int]]:
    """``(ranks, neurons)``: per-linear ranks and per-MLP kept neurons minimising the weighted
    loss with the whole model keeping at most ``ratio`` of ``total_params``. ``mlps`` ({MLP
    name: (input linears, down_proj)}) with ``structure`` "auto" or "neurons" lets each MLP keep
    whole neurons instead (its down_proj's spectrum must carry a neuron curve)."""
    ratio = plans.check_budget(ratio)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if structure not in MLP_STRUCTURES:
        raise ValueError(f"MLP structure must be one of {MLP_STRUCTURES}, got {structure!r}")
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
            units[n] = _linear_hull(n, s, weighting)
    dense_sum = sum(h[0].params for h in units.values())
    allowed = ratio * total_params - (total_params - dense_sum)   # params the compressible layers may keep
    if allowed < sum(h[-1].params for h in units.values()):
        raise ValueError(f"a budget of {ratio:.0%} is below what rank 1 everywhere keeps")
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


def _params(s: LayerSpectrum, rank: Optional[int]) -> int:
    return s.d_out * s.d_in if rank is None else lowrank_params(s.d_out, s.d_in, rank)


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
            weighting: str = "fisher", structure: str = DEFAULT_MLP_STRUCTURE) -> plans.RankPlan:
    """A RankPlan from :func:`allocate_plan`, with the details a user needs to audit it (MLPs
    keep neurons only where their down_proj spectra carry neuron curves)."""
    total = shape.total_params
    ranks, neurons = allocate_plan(spectra, total, ratio, weighting, shape.mlps, structure)
    kept = plans.kept_params(total, shape.shapes, ranks, neurons, shape)
    retained = {}
    for n, s in spectra.items():
        e = s.eigenvalues.sum()
        retained[n] = 1.0 if n not in ranks or e <= 0 else float(s.eigenvalues[:ranks[n]].sum() / e)
    for mlp, k in neurons.items():
        down = spectra[shape.mlps[mlp][1]]
        e = down.eigenvalues.sum()
        kept_k, loss = down.neuron_curve
        lost = float(loss[int(np.flatnonzero(kept_k == k)[0])])
        for n in shape.mlp_linears(mlp):     # the MLP's output energy kept, on each of its linears
            retained[n] = 1.0 if e <= 0 else max(0.0, 1.0 - lost / e)
    what = "low-rank layers" if structure == "lowrank" else \
        "low-rank layers or whole MLP neurons" if structure == "auto" else "whole MLP neurons, low-rank attention"
    details = {"kind": "planned", "weighting": weighting, "target_ratio": ratio, "structure": structure,
               "kept_params": kept, "total_params": total, "ratio": kept / total,
               "retained_energy": retained,
               "sensitivity": {n: s.sensitivity for n, s in spectra.items()}}
    return plans.RankPlan(ranks, f"planned ({weighting}-weighted spectra; {what}) for {ratio:.0%} of all parameters",
                          details, neurons)


def plot_plan(spectra: Dict[str, LayerSpectrum], plan: plans.RankPlan, shape: plans.ModelShape,
              path: str) -> None:
    """PNG: per layer (in model order), the kept rank as a fraction of full rank and the
    retained output energy, one line per linear type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: Dict[str, list] = {}
    kept_fraction = {n: k / shape.mlp_size(mlp)[1] for mlp, k in plan.neurons.items()
                     for n in shape.mlp_linears(mlp)}
    for name, s in spectra.items():
        kind = name.rsplit(".", 1)[-1]
        full = min(s.d_out, s.d_in)
        frac = kept_fraction.get(name, plan.ranks.get(name, full) / full)
        kinds.setdefault(kind, []).append((shape.block_of[name], frac, plan.details["retained_energy"][name]))
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for kind, pts in kinds.items():
        blocks, frac, energy = zip(*pts)
        axes[0].plot(blocks, frac, marker=".", label=kind)
        axes[1].plot(blocks, energy, marker=".", label=kind)
    axes[0].set_ylabel("rank / full rank\n(kept neurons / all)")
    axes[1].set_ylabel("retained output energy")
    axes[1].set_xlabel("block")
    axes[0].set_title(plan.description)
    axes[0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
