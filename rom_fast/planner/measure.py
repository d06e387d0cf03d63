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
from rom_fast.util import StageTimer, release_freed_memory

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
                      timer: StageTimer, comm: Communicator, neuron_curves: bool = False,
                      gram_precision: str = "auto"):
    """Forward hooks accumulating, on the real tokens, the Gram each stage's spectra need: one
    shared input Gram for q/k/v and for gate/up, the output Gram of each linear whose input is
    wider than its output (down_proj), and with ``neuron_curves`` down_proj's input Gram too
    (under the key ``NEURONS + name``), each in the precision ``gram_precision`` gives its width
    (:func:`kernels.resolve_gram_precision`). Returns (accumulators, output-route flags, handles)."""
    accs: Dict[str, kernels.GramAccumulator] = {}
    routes: Dict[str, bool] = {}
    handles = []
    if neuron_curves:
        down = adapter.mlp.output
        mod = block.get_submodule(down)
        precision = kernels.resolve_gram_precision(gram_precision, mod.in_features)
        accs[NEURONS + down] = comm.gram_accumulator(mod.in_features, f"inputs of {prefix}{down} (planner)",
                                                     precision=precision)

        def neuron_hook(_m, args, _out):
            with timer("statistics"):
                accs[NEURONS + down].update(args[0].detach()[token_mask[0]].float())
        handles.append(mod.register_forward_hook(neuron_hook))
    for stage in adapter.stages:
        lead = block.get_submodule(stage.linears[0])
        for rel in (stage.linears if output_route(lead.out_features, lead.in_features) else stage.linears[:1]):
            mod = block.get_submodule(rel)
            use_out = output_route(mod.out_features, mod.in_features)
            dim = mod.out_features if use_out else mod.in_features
            accs[rel] = comm.gram_accumulator(dim, f"{'outputs' if use_out else 'inputs'} of {prefix}{rel} (planner)",
                                              precision=kernels.resolve_gram_precision(gram_precision, dim))
            routes[rel] = use_out

            def hook(_m, args, out, rel=rel, use_out=use_out):
                x = out if use_out else args[0]
                with timer("statistics"):      # inside planner_forward
                    accs[rel].update(x.detach()[token_mask[0]].float())
            handles.append(mod.register_forward_hook(hook))
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


def _block_spectra(adapter: ModelAdapter, block: nn.Module, prefix: str, accs, routes):
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
    if any(sub.units for sub in source.adapter.sublayers):
        # Its hooks read every linear's activations on the real tokens of a (batch x seq)
        # micro-batch; an expert's linears see routed rows instead.
        raise ValueError(f"the rank planner does not handle {type(source.adapter).__name__}'s routed "
                         "(mixture-of-experts) sublayers yet: give explicit ranks= (or recipe= / last_k=)")
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
            grad_sq = _backward_sweep(source, saved, grads, kwargs_list, masks, batch_size, timer, bar)
    finally:
        if bar is not None:
            bar.close()

    release_freed_memory()       # the backward passes' buffers, before compression's own
    return _reduced_spectra(raw, grad_sq, float(attention_mask[:n_grad].sum()), comm)


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
                    batch_size: int, timer: StageTimer, bar) -> Dict[str, float]:
    """Step 3, top down: each block recomputed from its saved input (the file deleted once
    read) and backpropagated from ``grads``, the gradient of its outputs, which becomes that of
    its inputs; returns every linear's summed squared output gradient. ``grads`` None: this
    process has none of the gradient's sequences (every sum 0)."""
    grad_sq: Dict[str, float] = {}
    for i in reversed(range(source.n_blocks)):
        if grads is None:      # a process whose shard has none of the gradient's sequences
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
    return grad_sq


def _reduced_spectra(raw: Dict[str, tuple], grad_sq: Dict[str, float], n_tokens: float,
                     comm: Communicator) -> Dict[str, LayerSpectrum]:
    """The LayerSpectrum of every linear: squared gradients and the gradient's token count
    (this process's) summed over the processes, the sensitivities their per-token, per-output
    means."""
    names = list(raw)
    sums = np.array([grad_sq[n] for n in names] + [n_tokens], dtype=np.float64)
    comm.all_reduce(sums, "planner sensitivities")
    n_tokens = max(sums[-1], 1.0)
    return {name: LayerSpectrum(name, d_out, d_in, vals, float(sums[k]) / n_tokens / d_out, curve)
            for k, (name, (d_out, d_in, vals, curve)) in enumerate(raw.items())}


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
            with timer("forward"), torch.inference_mode():
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
    return grad_sq

