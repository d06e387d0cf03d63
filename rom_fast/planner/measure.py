"""The planner's dense pass: what it knows of every compressible linear.

One pass over calibration tokens on the *dense* model gives, for every compressible linear,

- the spectrum ``λ_1 ≥ λ_2 ≥ …`` of its output second moment ``C_y`` (the loss of keeping rank r
  is the tail ``Σ_{i>r} λ_i`` exactly, on these tokens), and
- its sensitivity ``s = E‖∂L/∂y‖² / d_out``: the mean squared gradient of the language-model
  loss with respect to the layer's outputs (one backward pass). Under a Fisher/isotropic
  approximation, perturbing the outputs by ``Δy`` raises the loss by about ``s · ‖Δy‖² / 2``.

With neuron curves, each MLP's down_proj also gets the loss of keeping fewer of its input
neurons (greedy removal, down_proj refitted). :mod:`rom_fast.planner.allocation` turns these into
a plan.

A routed sublayer (mixture of experts) is planned unit by unit: each expert's linears get the
spectra of their Grams over the real tokens routed to that expert only, and sensitivities
averaged over those tokens; the router is left dense, and an expert no calibration token
reaches gets no spectrum (it stays dense).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from rom_fast import kernels
from rom_fast.adapters import ModelAdapter
from rom_fast.blockwise import capture_block_inputs, kwargs_of_block
from rom_fast.distributed import Communicator
from rom_fast.head import IGNORE_INDEX
from rom_fast.structures.lowrank import output_route
from rom_fast.io.safetensors_index import write_safetensors
from rom_fast.io.sources import BlockSource
from rom_fast.util import StageTimer, float_array, release_freed_memory

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
        kernels.output_spectrum(float_array(weight), stats)
    vals = np.clip(np.asarray(vals, dtype=np.float64), 0.0, None)
    return np.sort(vals)[::-1]


@contextlib.contextmanager
def _real_rows_only(adapter: ModelAdapter, block: nn.Module, token_mask: List[torch.Tensor]):
    """Inside, every routed sublayer of ``block`` (:attr:`Sublayer.units`) runs on the real
    tokens of the micro-batch only (``token_mask[0]``): its input's real rows as one sequence,
    its output put back in their places (zero on padding). A routed unit's linears then see
    exactly the real tokens routed to it. Padding never reaches a real token (attention masks
    it as a key), so the real tokens' activations and gradients are the model's own; routing
    is per token."""
    handles, shapes = [], []

    def real_rows(_m, args):
        shapes.append(args[0].shape)
        return (args[0][token_mask[0]].unsqueeze(0),) + tuple(args[1:])

    def put_back(_m, _args, out):
        rows = out[0] if isinstance(out, tuple) else out
        full = rows.new_zeros(shapes.pop())
        full[token_mask[0]] = rows[0]
        return (full,) + tuple(out[1:]) if isinstance(out, tuple) else full
    for sub in adapter.sublayers:
        if sub.units:
            module = block.get_submodule(sub.module)
            handles += [module.register_forward_pre_hook(real_rows), module.register_forward_hook(put_back)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rows(x: torch.Tensor, rel: str, routed, token_mask: List[torch.Tensor]) -> torch.Tensor:
    """An activation's real-token rows: all rows of a routed unit's linear (it is only given
    real tokens, :func:`_real_rows_only`), the masked ones elsewhere."""
    x = x.detach()
    return x.reshape(-1, x.shape[-1]) if rel in routed else x[token_mask[0]]


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
                      timer: StageTimer, comm: Communicator, neuron_curves: bool = False,
                      gram_precision: str = "auto"):
    """Forward hooks accumulating, on the real tokens, the Gram each stage's spectra need: one
    shared input Gram for q/k/v and for gate/up, the output Gram of each linear whose input is
    wider than its output (down_proj), and with ``neuron_curves`` each MLP's (each expert's)
    down_proj input Gram too (under the key ``NEURONS + name``), each in the precision
    ``gram_precision`` gives its width (:func:`kernels.resolve_gram_precision`). A routed
    unit's Grams are over the real tokens routed to it (run under :func:`_real_rows_only`).
    Returns (accumulators, output-route flags, handles)."""
    accs: Dict[str, kernels.GramAccumulator] = {}
    routes: Dict[str, bool] = {}
    handles = []
    routed = adapter.routed_linears()

    def watch(key: str, rel: str, use_out: bool, what: str) -> None:
        mod = block.get_submodule(rel)
        dim = mod.out_features if use_out else mod.in_features
        accs[key] = comm.gram_accumulator(dim, f"{what} of {prefix}{rel} (planner)",
                                          precision=kernels.resolve_gram_precision(gram_precision, dim))

        def hook(_m, args, out):
            x = out if use_out else args[0]
            with timer("statistics"):      # inside planner_forward
                accs[key].update(_rows(x, rel, routed, token_mask).float())
        handles.append(mod.register_forward_hook(hook))
    if neuron_curves:
        for mlp in adapter.mlp_units:       # the MLP, or each expert of a routed one
            watch(NEURONS + mlp.output, mlp.output, False, "inputs")
    for stage in adapter.stages:
        lead = block.get_submodule(stage.linears[0])
        for rel in (stage.linears if output_route(lead.out_features, lead.in_features) else stage.linears[:1]):
            mod = block.get_submodule(rel)
            use_out = output_route(mod.out_features, mod.in_features)
            watch(rel, rel, use_out, "outputs" if use_out else "inputs")
            routes[rel] = use_out
    return accs, routes, handles


NEURONS = "neurons:"   # key prefix of the down_proj input Gram among a block's accumulators


def neuron_curve(weight, gram) -> Tuple[np.ndarray, np.ndarray]:
    """(kept counts from d_in down to 1, output error energy) of greedy neuron removal with
    the weight refitted (:func:`kernels.select_inputs`), about NEURON_CURVE_STEPS exact points.
    ``gram`` is an array (left unchanged) or a GramAccumulator the caller hands over: the
    kernel takes its own n x n as the workspace (the accumulator is spent; no copy)."""
    n = weight.shape[1]
    sel = kernels.select_inputs(weight, gram, n, curve_to=1, block=max(1, n // NEURON_CURVE_STEPS),
                                overwrite_gram=isinstance(gram, kernels.GramAccumulator))
    return np.asarray(sel.curve_kept, dtype=np.int64), np.clip(np.asarray(sel.curve_loss, dtype=np.float64), 0.0, None)


def _unreached(adapter: ModelAdapter, accs) -> set:
    """The linears of the routed units no real calibration token was routed to (on any
    process), their accumulators dropped from ``accs``: they have nothing to plan on and stay
    dense (compression leaves them dense too)."""
    routed = adapter.routed_linears()
    skipped = {n for leaf in adapter.leaf_sublayers if leaf.linears[0] in routed
               and accs[leaf.linears[0]].count == 0 for n in leaf.linears}
    for key in [k for k in accs if k.removeprefix(NEURONS) in skipped]:
        del accs[key]
    return skipped


def _block_spectra(adapter: ModelAdapter, block: nn.Module, prefix: str, accs, routes):
    """Spectra of a block's linears, one stage at a time: each shared input factor is built
    once, and each Gram is dropped as soon as its stage is done (``accs`` is emptied). A
    down_proj input Gram (``NEURONS``) becomes its MLP's neuron curve. Routed units no token
    reached get no spectrum."""
    out = {}
    curves = {}
    skipped = _unreached(adapter, accs)
    for key in [k for k in accs if k.startswith(NEURONS)]:
        rel = key[len(NEURONS):]
        curves[rel] = neuron_curve(float_array(block.get_submodule(rel).weight), accs.pop(key))
    for stage in adapter.stages:
        if stage.linears[0] in skipped:
            continue
        shared = None
        for rel in stage.linears:
            mod = block.get_submodule(rel)
            if rel in accs and routes[rel]:
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
                    neuron_curves: bool = False,
                    gram_precision: str = "auto") -> Dict[str, LayerSpectrum]:
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

    Routed sublayers run on the real tokens only (:func:`_real_rows_only`), so every unit's
    statistics and sensitivities are over the real tokens routed to it.

    ``gram_precision`` is the compression's option of that name, resolved per Gram by
    :func:`kernels.resolve_gram_precision` ("auto": float32 blocks from FLOAT32_GRAM_MIN_DIM
    columns up, exact float64 below).

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
    kernels.resolve_gram_precision(gram_precision, 1)      # an unknown option is refused before any work
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
        bar = tqdm(total=2 * source.n_blocks, desc="rom_fast planner", unit="block")
    try:
        with tempfile.TemporaryDirectory(prefix="rom_fast_planner-", dir=workdir) as tmp:
            saved = [Path(tmp) / f"input-{i:05d}.safetensors" for i in range(source.n_blocks)]
            raw = _forward_sweep(source, hidden, kwargs_list, masks, batch_size, saved, n_grad, timer, comm,
                                 neuron_curves, gram_precision, bar)
            grads = None
            if n_grad:
                with timer("head"):
                    grads = _loss_gradient(source, hidden[:n_grad], input_ids[:n_grad], attention_mask[:n_grad])
            del hidden
            grad_sq, routed_tokens = _backward_sweep(source, saved, grads, kwargs_list, masks, batch_size, timer,
                                                     bar)
    finally:
        if bar is not None:
            bar.close()

    release_freed_memory()       # the backward passes' buffers, before compression's own
    peers = {source.adapter.block_prefix(i) + rel: (i,) + part for i in range(source.n_blocks)
             for rel, part in source.adapter.routed_linears().items()}
    return _reduced_spectra(raw, grad_sq, float(attention_mask[:n_grad].sum()), comm, routed_tokens, peers)


def _forward_sweep(source: BlockSource, hidden: torch.Tensor, kwargs_list, masks, batch_size: int,
                   saved: List[Path], n_grad: int, timer: StageTimer, comm: Communicator, neuron_curves: bool,
                   gram_precision: str, bar) -> Dict[str, tuple]:
    """Step 1, bottom up: each block's input (its first ``n_grad`` sequences) saved to
    ``saved[i]``, then the block run in place in ``hidden`` with its spectra taken on the way;
    returns every linear's ``{name: (d_out, d_in, eigenvalues, neuron curve or None)}``."""
    raw: Dict[str, tuple] = {}
    for i in range(source.n_blocks):
        if n_grad:
            with timer("io"):
                write_safetensors(saved[i], {"hidden": hidden[:n_grad]})
        raw.update(_forward_block(source, i, hidden, kwargs_list, masks, batch_size, timer, comm, neuron_curves,
                                  gram_precision))
        if bar is not None:
            bar.update(1)
    return raw


def _backward_sweep(source: BlockSource, saved: List[Path], grads: Optional[torch.Tensor], kwargs_list, masks,
                    batch_size: int, timer: StageTimer, bar) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Step 3, top down: each block recomputed from its saved input (the file deleted once
    read) and backpropagated from ``grads``, the gradient of its outputs, which becomes that of
    its inputs; returns every linear's summed squared output gradient and each routed unit's
    linear's gradient token count. ``grads`` None: this process has none of the gradient's
    sequences (every sum 0)."""
    grad_sq: Dict[str, float] = {}
    counts: Dict[str, float] = {}
    for i in reversed(range(source.n_blocks)):
        if grads is None:      # a process whose shard has none of the gradient's sequences
            prefix = source.adapter.block_prefix(i)
            grad_sq.update({prefix + rel: 0.0 for rel in source.adapter.linear_names()})
            counts.update({prefix + rel: 0.0 for rel in source.adapter.routed_linears()})
            continue
        with timer("io"):
            with safe_open(str(saved[i]), framework="pt") as f:
                inputs = f.get_tensor("hidden")
            saved[i].unlink()
        block_sq, block_counts = _backward_block(source, i, inputs, grads, kwargs_list, masks, batch_size, timer)
        grad_sq.update(block_sq)
        counts.update(block_counts)
        del inputs
        if bar is not None:
            bar.update(1)
    return grad_sq, counts


def _reduced_spectra(raw: Dict[str, tuple], grad_sq: Dict[str, float], n_tokens: float,
                     comm: Communicator, routed_tokens: Dict[str, float],
                     peers: Dict[str, tuple]) -> Dict[str, LayerSpectrum]:
    """The LayerSpectrum of every linear: squared gradients and the gradient's token counts
    (this process's) summed over the processes, the sensitivities their per-token, per-output
    means. A routed unit's linear is averaged over the tokens routed to it; one that got none
    of the gradient's tokens (only later sequences reached it) takes the mean over its peers
    (``peers``: the same linear of the other units of its routed sublayer)."""
    names = list(raw)
    routed = [n for n in names if n in peers]
    sums = np.array([grad_sq[n] for n in names] + [routed_tokens[n] for n in routed] + [n_tokens], dtype=np.float64)
    comm.all_reduce(sums, "planner sensitivities")
    n_tokens = max(sums[-1], 1.0)
    squares = dict(zip(names, sums[:len(names)]))
    counts = dict(zip(routed, sums[len(names):-1]))
    for name in routed:
        if counts[name] == 0:
            group = [n for n in routed if peers[n] == peers[name] and counts[n] > 0]
            squares[name] = sum(squares[n] for n in group)
            counts[name] = sum(counts[n] for n in group)
    return {name: LayerSpectrum(name, d_out, d_in, vals,
                                float(squares[name]) / (max(counts[name], 1.0) if name in counts else n_tokens) / d_out,
                                curve)
            for name, (d_out, d_in, vals, curve) in raw.items()}


def _check_positive(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"grad_samples must be a positive integer, got {n!r}")
    return n


def _forward_block(source: BlockSource, i: int, hidden: torch.Tensor, kwargs_list, masks, batch_size: int,
                   timer: StageTimer, comm: Communicator, neuron_curves: bool = False,
                   gram_precision: str = "auto") -> Dict[str, tuple]:
    """Block i over every sequence, in place in ``hidden``, with its stages' Grams accumulated
    on the way; returns its linears' ``{name: (d_out, d_in, eigenvalues, neuron curve or None)}``."""
    adapter = source.adapter
    with timer("load"):
        block = source.load_block(i)
    try:
        current = [masks[0]]           # the micro-batch's real-token mask, for the hooks
        accs, routes, handles = _block_statistics(adapter, block, adapter.block_prefix(i), current, timer,
                                                        comm, neuron_curves, gram_precision)
        try:
            with timer("forward"), torch.inference_mode(), _real_rows_only(adapter, block, current):
                for v, kw, m in zip(hidden.split(batch_size), kwargs_of_block(kwargs_list, i), masks):
                    current[0] = m
                    v.copy_(adapter.block_forward(block, v.float(), kw))
        finally:
            for h in handles:
                h.remove()
        with timer("spectra"):
            return _block_spectra(adapter, block, adapter.block_prefix(i), accs, routes)
    finally:
        source.release_block(i)


def _loss_gradient(source: BlockSource, hidden: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """d(summed next-token loss)/d(last block's outputs), float32, a few hundred tokens at a
    time (norm and head act per token): the vocabulary-wide logits and their gradient stay
    small (a big head: by vocabulary chunks, exactly; :mod:`rom_fast.head`)."""
    targets = input_ids.roll(-1, dims=1).masked_fill(attention_mask.roll(-1, dims=1) == 0, IGNORE_INDEX)
    targets[:, -1] = IGNORE_INDEX               # the last position predicts nothing here
    with source.head() as head, _frozen(source.model):
        return head.loss_gradient(hidden, targets, HEAD_CHUNK_TOKENS)


def _backward_block(source: BlockSource, i: int, inputs: torch.Tensor, grads: torch.Tensor, kwargs_list,
                    masks, batch_size: int, timer: StageTimer) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Recomputes block i from its saved ``inputs`` and backpropagates ``grads`` (its outputs'
    gradient, replaced in place by its inputs' gradient); returns the summed squared
    gradient of every linear's outputs on the real tokens, and for each routed unit's linear
    the number of those tokens (the real tokens routed to it)."""
    adapter = source.adapter
    prefix = adapter.block_prefix(i)
    routed = adapter.routed_linears()
    with timer("load"):
        block = source.load_block(i)
    current = [masks[0]]
    grad_sq: Dict[str, float] = {}
    counts: Dict[str, float] = {prefix + rel: 0.0 for rel in routed}
    handles = []
    try:
        for rel in adapter.linear_names():
            name = prefix + rel
            grad_sq[name] = 0.0

            def on_grad(g, name=name, rel=rel):
                g = _rows(g, rel, routed, current)
                if rel in routed:
                    counts[name] += g.shape[0]
                g = g.reshape(-1)
                grad_sq[name] += float(torch.dot(g, g))   # float32 dot, summed in float64

            def forward_hook(_m, _a, out, on_grad=on_grad):
                if out.requires_grad:
                    out.register_hook(on_grad)
            handles.append(block.get_submodule(rel).register_forward_hook(forward_hook))
        with timer("backward"), _frozen(block), torch.enable_grad(), _real_rows_only(adapter, block, current):
            for x, g, kw, m in zip(inputs.split(batch_size), grads.split(batch_size),
                                   kwargs_of_block(kwargs_list, i), masks):
                current[0] = m
                x = x.to(torch.float32, copy=True).requires_grad_(True)
                y = adapter.block_forward(block, x, kw)
                (gx,) = torch.autograd.grad(y, x, grad_outputs=g)
                g.copy_(gx)
    finally:
        for h in handles:
            h.remove()
        source.release_block(i)
    return grad_sq, counts
