"""The layer loop: error-aware reduced order modelling of every decoder block.

For each block, four statistics stages run in order, each on activations produced by the
layers already compressed (the paper's error-aware order):

1. attention input  -> q, k, v   (one shared input Gram and factor)
2. attention output -> o_proj
3. MLP input        -> gate, up  (one shared input Gram and factor)
4. MLP hidden       -> down_proj (the *output* Gram when d_in > d_out: ~(d_in/d_out)^2 cheaper)

An MLP may instead keep k whole neurons (stages 3-4 become one): its hidden activations'
Gram on the compressed path chooses them (greedy optimal-brain-surgeon removal in the native
core), gate/up keep those rows unchanged and down_proj is refitted on them by least squares.

Each stage runs only the part of the block it needs, once; the block's outputs become the next
block's inputs. Statistics and factors are computed by the native core.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Union

import numpy as np
import torch
from torch import nn

from rom_fast import kernels, plans
from rom_fast.adapters import ModelAdapter
from rom_fast.blockwise import capture_block_inputs
from rom_fast.distributed import Communicator
from rom_fast.lowrank import from_factors, pruned_linear, set_module
from rom_fast.io.sources import BlockSource
from rom_fast.util import StageTimer, release_freed_memory


# Grams at least this wide multiply float32 activations in float32 blocks (ssyrk, accumulated in
# float64; error <= ~6e-5 of sum|x_i||x_j| per element, measured ~1e-7): 1.56x/1.95x/1.70x
# torch's float32 X^T X at d = 1536/4096/11008, but 0.62x at 576 (bench/README.md, "Gram").
FLOAT32_GRAM_MIN_DIM = 1536

# Greedy neuron selection removes about n / NEURON_GROUPS neurons per exact step.
NEURON_GROUPS = 256

# The anchor weight alpha a run uses unless told (bench/README.md, "Dense-anchored targets").
DEFAULT_ANCHOR = 0.0

ACTIVATION_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CompressionOptions:
    centered: bool = False          # paper's released code centres; uncentred is the optimal linear fit
    batch_size: int = 8             # calibration sequences per forward (16 raised peak RSS by 0.24 GB, same speed)
    eigen_method: str = "auto"
    # Precision the calibration activations (block inputs and per-block scratch) are *stored*
    # in, a torch dtype or its name; all arithmetic stays float32. Half precision halves the
    # largest buffers at ≤ 1.5% perplexity either way (bench/README.md, "Activation precision").
    activation_dtype: Union[str, torch.dtype] = torch.float32
    # Dense-anchored targets: 0 fits each layer's own output on the compressed path's inputs
    # (the paper); alpha > 0 also fits the *dense* model's output at the same tokens, weight
    # alpha (inf: only the dense one), which corrects the drift of the layers before it.
    anchor: float = DEFAULT_ANCHOR
    ridge: float = 1e-3             # of the mean eigenvalue, regularises C_cc^-1 in the anchored fit
    # "auto": float32 blocks for Grams of at least FLOAT32_GRAM_MIN_DIM columns, exact float64
    # widening below; or "float32" / "float64" for every Gram.
    gram_precision: str = "auto"

    def __post_init__(self):
        dtype = ACTIVATION_DTYPES.get(self.activation_dtype, self.activation_dtype)
        if dtype not in ACTIVATION_DTYPES.values():
            raise ValueError(f"activation_dtype must be one of {sorted(ACTIVATION_DTYPES)}, "
                             f"got {self.activation_dtype!r}")
        self.activation_dtype = dtype
        if not (self.anchor >= 0):
            raise ValueError(f"anchor must be >= 0 (0: the paper's objective, inf: the dense outputs), got {self.anchor}")
        if self.anchor and self.centered:
            raise ValueError("anchor= and centered= cannot be combined")
        if self.gram_precision not in ("auto", "float32", "float64"):
            raise ValueError(f"gram_precision must be 'auto', 'float32' or 'float64', got {self.gram_precision!r}")
        if not (self.ridge > 0):
            raise ValueError(f"ridge must be > 0, got {self.ridge}")


@dataclass
class LayerRecord:
    name: str
    d_out: int
    d_in: int
    rank: int
    retained_energy: float          # fraction of the output energy kept on calibration tokens
    route: str                      # "input-gram" or "output-gram"


@dataclass
class CompressionReport:
    layers: List[LayerRecord] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=lambda: defaultdict(float))


@contextlib.contextmanager
def _as_identity(parent: nn.Module, child: str) -> Iterator[nn.Module]:
    """Temporarily replaces ``parent.child`` by the identity, yielding the original module, so
    the parent's forward returns the child's input (e.g. attention without o_proj)."""
    original = getattr(parent, child)
    setattr(parent, child, nn.Identity())
    try:
        yield original
    finally:
        setattr(parent, child, original)


def _rows(x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The (n_real_tokens × d) rows of a (batch × seq × d) activation: padding never counts."""
    return x[token_mask].float().contiguous()


def _inputs_label(prefix: str, linears) -> str:
    """How a statistics error names the activations: the block's prefix and the stage."""
    return "inputs of " + ", ".join(prefix + n for n in linears)


class BlockCompressor:
    """Compresses one decoder block in place, given its calibration inputs."""

    def __init__(self, adapter: ModelAdapter, options: CompressionOptions, report: CompressionReport,
                 timer: StageTimer, comm: Optional[Communicator] = None):
        self.adapter, self.options, self.report, self.timer = adapter, options, report, timer
        self.comm = comm or Communicator()   # data-parallel runs: Grams summed over processes when read
        self._scratch: Dict[tuple, torch.Tensor] = {}

    def _scratch_batches(self, hiddens: List[torch.Tensor], width: int) -> List[torch.Tensor]:
        """Views of one reusable (tokens × width) buffer shaped like ``hiddens``: a block's dense
        down outputs and the next block's attention outputs live in the same memory."""
        n = sum(h.shape[0] for h in hiddens)
        key = (n,) + tuple(hiddens[0].shape[1:-1]) + (width, hiddens[0].dtype)
        if key not in self._scratch:
            self._scratch.clear()
            self._scratch[key] = hiddens[0].new_empty(key[:-1])
        return list(self._scratch[key].split([h.shape[0] for h in hiddens]))

    # -- statistics -> factors ------------------------------------------------------------
    def _factorize_input_stage(self, block: nn.Module, prefix: str, names, ranks, stats: list):
        """Factorizes the linears of one stage from their shared input statistics ``stats`` =
        ``[acc, cross]`` (``cross`` None unless dense-anchored), which it empties: the list is
        the caller's only hold on them, so the Gram is freed once the input factor is built,
        the cross moment once the correction is, and each dense weight once its factors are in
        place (a 7B block's peak is here). With ``cross``, each weight is first moved to its
        anchored target."""
        acc, cross = stats
        stats.clear()
        todo = [n for n in names if n in ranks]
        if not todo:
            return
        with self.timer("factorize"):
            has_bias = any(block.get_submodule(n).bias is not None for n in todo)
            correction, anchored = None, cross is not None
            if anchored:
                correction = kernels.anchor_correction(acc, cross, ridge=self.options.ridge, with_bias=has_bias)
                del cross
            factor = kernels.input_factor(acc, centered=self.options.centered,
                                          with_bias=has_bias and not self.options.centered)
            del acc
            for name in todo:
                lin = block.get_submodule(name)
                weight, bias = lin.weight.detach().numpy(), None if lin.bias is None else lin.bias.detach().numpy()
                if correction is not None:
                    # One target at a time, in the layer's dtype: the factorization widens a
                    # float32 weight band by band, so a 7B gate_proj's float64 target (0.36 GB)
                    # would otherwise sit through its peak.
                    weight, bias = _as_dtype(kernels.anchored_target(correction, weight, self.options.anchor,
                                                                     bias=bias), weight.dtype)
                f = kernels.factorize(weight, factor, ranks[name],
                                      centered=self.options.centered, bias=bias,
                                      method=self.options.eigen_method)
                f = f.astype(lin.weight.detach().numpy().dtype)   # the factors come back float64
                self._replace(block, prefix, name, lin, f, "input-gram" + ("+anchored" if anchored else ""))
                del lin, f, weight, bias

    def _replace(self, block, prefix, name, lin, f: kernels.Factorization, route: str):
        # Process 0's factors on every process, bit for bit (another machine's BLAS may round otherwise).
        self.comm.broadcast_arrays([a for a in (f.w1, f.w2, f.b1, f.b2, f.eigenvalues) if a is not None], "factors")
        self.report.seconds["eigensolver"] += f.eigen_seconds   # part of "factorize"
        parent, _, child = name.rpartition(".")
        with torch.inference_mode(False):   # ordinary parameters: the model can be cast, saved, fine-tuned
            setattr(block.get_submodule(parent), child, from_factors(lin, f.w1, f.w2, f.b1, f.b2))
        energy = f.eigenvalues.sum() / f.total_energy if f.total_energy > 0 else 1.0
        self.report.layers.append(LayerRecord(prefix + name, lin.out_features, lin.in_features,
                                              f.rank, float(energy), route))

    def _accumulator(self, dim: int, label: str) -> kernels.GramAccumulator:
        precision = self.options.gram_precision
        if precision == "auto":
            precision = "float32" if dim >= FLOAT32_GRAM_MIN_DIM else "float64"
        return self.comm.gram_accumulator(dim, label, precision=precision)

    def _gram(self, batches, token_masks, label: str) -> kernels.GramAccumulator:
        """Gram of stored activations over the real tokens (o_proj's input)."""
        acc = self._accumulator(batches[0].shape[-1], label)
        with self.timer("statistics"):
            for x, m in zip(batches, token_masks):
                acc.update(_rows(x, m))
        return acc

    def _normed_input_stats(self, norm, hiddens, dense_hiddens, token_masks, label: str):
        """Gram of norm(h) over the real tokens (the input shared by q/k/v, or by gate/up) and,
        when anchoring, the cross moment of the dense path's norm(h_d) with it."""
        acc = self._accumulator(hiddens[0].shape[-1], label)
        cross = self.comm.cross_accumulator(acc.dim, acc.dim, label) if dense_hiddens is not None else None
        for i, (h, m) in enumerate(zip(hiddens, token_masks)):
            with self.timer("forward"):
                x = _rows(norm(h.float()), m)
                xd = None if cross is None else _rows(norm(dense_hiddens[i].float()), m)
            with self.timer("statistics"):
                acc.update(x)
                if cross is not None:
                    cross.update(xd, x)
        return acc, cross

    def _keep_neurons(self, block: nn.Module, dense: Optional[nn.Module], prefix: str, keep: int,
                      hiddens, dense_hiddens, token_masks) -> None:
        """The MLP keeps ``keep`` whole neurons: chosen on the Gram of its hidden activations
        (compressed path), gate/up keep those rows, down_proj is refitted on them (to its
        dense-anchored target when anchoring). Advances ``dense_hiddens`` past the dense MLP."""
        a = self.adapter
        mlp, norm2 = block.get_submodule(a.mlp), block.get_submodule(a.post_attention_norm)
        inputs = [block.get_submodule(n) for n in a.stages[2].linears]
        (down_name,) = a.stages[3].linears
        down = block.get_submodule(down_name)
        if any(m.bias is not None for m in inputs + [down]):
            raise ValueError(f"{prefix}{a.mlp}: keeping whole neurons needs an MLP without biases")
        n = down.in_features
        label = f"inputs of {prefix}{down_name}"
        acc = self._accumulator(n, label)
        cross = self.comm.cross_accumulator(n, n, label) if dense_hiddens is not None else None
        with _as_identity(mlp, a.down_proj):
            for i, (h, m) in enumerate(zip(hiddens, token_masks)):
                with self.timer("forward"):
                    act = _rows(mlp(norm2(h.float())), m)
                    if cross is not None:
                        hd, dense_mlp = dense_hiddens[i], dense.get_submodule(a.mlp)
                        with _as_identity(dense_mlp, a.down_proj) as dense_down:
                            act_d = dense_mlp(norm2(hd.float()))
                        hd.add_(dense_down(act_d))
                        act_d = _rows(act_d, m)
                with self.timer("statistics"):
                    acc.update(act)
                    if cross is not None:
                        cross.update(act_d, act)
        with self.timer("factorize"):
            weight = down.weight.detach().numpy()
            if cross is not None:
                weight, _ = kernels.anchored_target(kernels.anchor_correction(acc, cross, ridge=self.options.ridge),
                                                    weight, self.options.anchor)
                del cross
            # n/256 removals per greedy step (SmolLM2: 6, 7B: 43): each step is a rank-g update of
            # the n x n inverse, memory-bound for g = 1 (one at a time: 3.5x the time at 576 x 1536).
            # The kernel takes the accumulator's own n x n as its workspace (take_gram): one
            # n x n while it runs (0.97 GB at 7B's n = 11008), never a copy beside it.
            sel = kernels.select_inputs(weight, acc, keep, ridge=self.options.ridge,
                                        block=max(1, n // NEURON_GROUPS), overwrite_gram=True)
            del acc
        kept = np.ascontiguousarray(sel.kept, dtype=np.int64)
        refit = np.ascontiguousarray(sel.weight)
        self.comm.broadcast_arrays([kept, refit], "kept neurons")    # process 0's choice everywhere
        dtype = down.weight.dtype
        rows = torch.as_tensor(kept)
        lost = float(sel.curve_loss[int(np.flatnonzero(np.asarray(sel.curve_kept) == keep)[0])])
        energy = 1.0 if sel.total_energy <= 0 else max(0.0, 1.0 - lost / sel.total_energy)
        with torch.inference_mode(False):
            for name, lin in zip(a.stages[2].linears, inputs):
                set_module(block, name, pruned_linear(lin.weight.detach()[rows].clone()))
            set_module(block, down_name, pruned_linear(torch.as_tensor(refit).to(dtype)))
        route = "neurons" + ("+anchored" if dense_hiddens is not None else "")
        for name, lin in zip(list(a.stages[2].linears) + [down_name], inputs + [down]):
            self.report.layers.append(LayerRecord(prefix + name, lin.out_features, lin.in_features, keep,
                                                  energy, route))

    # -- the block --------------------------------------------------------------------------
    @torch.inference_mode()
    def compress(self, block: nn.Module, prefix: str, hiddens: List[torch.Tensor], kwargs_list,
                 token_masks: List[torch.Tensor], ranks: Dict[str, int],
                 dense_hiddens: Optional[List[torch.Tensor]] = None,
                 neurons: Optional[int] = None) -> List[torch.Tensor]:
        """Compresses the linears of ``block`` named in ``ranks`` (relative names) and returns
        the block's outputs, computed with the compressed block. ``neurons``: the MLP keeps
        that many whole neurons (its linears must not be in ``ranks``). With ``dense_hiddens``
        (the dense model's inputs of this block at the same tokens; dense-anchored targets),
        those are advanced in place to the dense block's outputs."""
        a = self.adapter
        anchoring = dense_hiddens is not None
        dense = _dense_view(block) if anchoring else None   # the block as it was, for the dense path
        norm1 = block.get_submodule(a.input_norm)
        norm2 = block.get_submodule(a.post_attention_norm)
        attn = block.get_submodule(a.attention)
        mlp = block.get_submodule(a.mlp)
        stages = a.stages

        def attention(blk, h, kw):
            return a.attention_forward(blk, norm1(h.float()), kw)

        # 1. q/k/v from the attention input.
        if any(n in ranks for n in stages[0].linears):
            # Passed straight through: the stage drops the statistics as it goes (no caller
            # reference keeps a 7B stage's 0.3 GB of Grams alive through its factorization).
            self._factorize_input_stage(block, prefix, stages[0].linears, ranks, list(self._normed_input_stats(
                norm1, hiddens, dense_hiddens, token_masks, _inputs_label(prefix, stages[0].linears))))

        # 2. o_proj from the attention output (computed once, with q/k/v compressed).
        out_proj = attn.get_submodule(a.out_proj)
        attn_out = self._scratch_batches(hiddens, out_proj.in_features)
        need_o = any(n in ranks for n in stages[1].linears)
        cross = self.comm.cross_accumulator(out_proj.in_features, out_proj.in_features,
                                             _inputs_label(prefix, stages[1].linears)) if anchoring and need_o else None
        with _as_identity(attn, a.out_proj):
            with self.timer("forward"):
                for i, (h, kw, o) in enumerate(zip(hiddens, kwargs_list, attn_out)):
                    o.copy_(attention(block, h, kw))
                    if anchoring:
                        dense_attn = dense.get_submodule(a.attention)
                        with _as_identity(dense_attn, a.out_proj) as dense_o:
                            od = attention(dense, dense_hiddens[i], kw)
                        if cross is not None:
                            cross.update(_rows(od, token_masks[i]), _rows(o, token_masks[i]))
                        dense_hiddens[i].add_(dense_o(od))
        if anchoring:
            # The dense path is past the attention: its old q/k/v (0.2 GB at 7B) go before the
            # o_proj and MLP peaks, the loop's references to them included.
            dense_attn = dense_o = od = None
            parent, _, child = a.attention.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, nn.Identity())
        if need_o:
            stats = [self._gram(attn_out, token_masks, _inputs_label(prefix, stages[1].linears)), cross]
            del cross
            self._factorize_input_stage(block, prefix, stages[1].linears, ranks, stats)
        else:
            del cross
        out_proj = attn.get_submodule(a.out_proj)   # compressed now
        with self.timer("forward"):
            for h, o in zip(hiddens, attn_out):
                h.add_(out_proj(o.float()))
        # The loop variables are views of the scratch buffer: they would keep all of it alive
        # (0.54 GB at 7B) when it is freed for the gate/up peak below.
        o = od = None
        del attn_out
        # A 7B block's memory peak is the gate/up factorization (float64 W·L, 0.36 GB per
        # gate_proj, and more): when that outweighs the idle scratch buffer, the buffer goes
        # first (the down stage allocates it again). On small models keeping it is cheaper
        # (SmolLM2: 1.34 vs 1.47 GiB peak when freed and reallocated every block).
        # (Sizes only: holding the modules here would keep gate/up's old weights alive after
        # their replacement, 0.36 GB at 7B through the rest of the block.)
        scratch_bytes = sum(t.numel() * t.element_size() for t in self._scratch.values())
        peak_bytes = sum(block.get_submodule(n).weight.numel() for n in stages[2].linears if n in ranks) * 8
        if neurons is not None:    # the neuron selection's float64 Gram and its inverse
            peak_bytes = 2 * 8 * block.get_submodule(stages[3].linears[0]).in_features ** 2
        if peak_bytes > scratch_bytes:
            self._scratch.clear()

        # 3. gate/up from the MLP input.
        if any(n in ranks for n in stages[2].linears):
            self._factorize_input_stage(block, prefix, stages[2].linears, ranks, list(self._normed_input_stats(
                norm2, hiddens, dense_hiddens, token_masks, _inputs_label(prefix, stages[2].linears))))

        # 4. down_proj from the MLP hidden activations (gate/up compressed).
        (down_name,) = stages[3].linears
        dense_outputs = None   # the output route keeps y = down(act) to finish the block cheaply
        if neurons is not None:
            self._keep_neurons(block, dense, prefix, neurons, hiddens, dense_hiddens, token_masks)
        elif down_name in ranks:
            down = block.get_submodule(down_name)
            output_route = down.in_features > down.out_features
            width = down.out_features if output_route else down.in_features
            acc = self._accumulator(width, f"{'outputs' if output_route else 'inputs'} of {prefix}{down_name}")
            cross = self.comm.cross_accumulator(width, width, acc.label) if anchoring else None
            dense_outputs = self._scratch_batches(hiddens, down.out_features) if output_route else None
            dense_mlp = dense.get_submodule(a.mlp) if anchoring else None
            with _as_identity(mlp, a.down_proj):
                for i, (h, m) in enumerate(zip(hiddens, token_masks)):
                    with self.timer("forward"):
                        act = mlp(norm2(h.float()))
                        if output_route:
                            act = down(act)                   # y = W x + b, kept
                            dense_outputs[i].copy_(act)
                        act = _rows(act, m)
                        if anchoring:
                            hd = dense_hiddens[i]
                            with _as_identity(dense_mlp, a.down_proj) as dense_down:
                                act_d = dense_mlp(norm2(hd.float()))
                            y_d = dense_down(act_d)
                            hd.add_(y_d)
                            act_d = _rows(y_d if output_route else act_d, m)
                    with self.timer("statistics"):
                        acc.update(act)
                        if cross is not None:
                            cross.update(act_d, act)
            # The dense path is past this block: its MLP's old gate/up (0.36 GB at 7B) and the
            # last micro-batch's activations go before the factorization.
            act = act_d = y_d = hd = dense_mlp = dense_down = dense = None
            with self.timer("factorize"):
                bias = None if down.bias is None else down.bias.detach().numpy()
                if output_route:
                    if cross is not None:
                        if bias is not None:
                            raise ValueError(f"{prefix}{down_name}: anchored targets on the output route "
                                             "need a layer without bias")
                        # Regress the dense outputs on the compressed ones in the output space:
                        # ROM of the map M (d_out x d_out) on y_c, then W2 = (V M) W.
                        m_eff, _ = kernels.anchored_target(kernels.anchor_correction(acc, cross, ridge=self.options.ridge),
                                                           np.eye(width), self.options.anchor)
                        factor = kernels.input_factor(acc)
                        del cross, acc
                        fm = kernels.factorize(m_eff, factor, ranks[down_name], method=self.options.eigen_method)
                        w = down.weight.detach().numpy()
                        f = kernels.Factorization(fm.w1, _times_widened(fm.w2, w), None, None, fm.eigenvalues,
                                                  fm.total_energy, fm.eigen_seconds).astype(w.dtype)
                    else:
                        f = kernels.factorize_output_gram(down.weight.detach().numpy(), acc, ranks[down_name],
                                                          centered=self.options.centered, bias=bias,
                                                          method=self.options.eigen_method)
                else:
                    weight = down.weight.detach().numpy()
                    if cross is not None:
                        weight, bias = _as_dtype(kernels.anchored_target(
                            kernels.anchor_correction(acc, cross, ridge=self.options.ridge, with_bias=bias is not None),
                            weight, self.options.anchor, bias=bias), weight.dtype)
                        del cross
                    factor = kernels.input_factor(acc, centered=self.options.centered,
                                                  with_bias=bias is not None and not self.options.centered)
                    del acc
                    f = kernels.factorize(weight, factor, ranks[down_name],
                                          centered=self.options.centered, bias=bias,
                                          method=self.options.eigen_method)
                    f = f.astype(down.weight.detach().numpy().dtype)
                self._replace(block, prefix, down_name, down, f,
                              ("output-gram" if output_route else "input-gram") + ("+anchored" if anchoring else ""))
        elif anchoring:
            with self.timer("forward"):
                dense_mlp = dense.get_submodule(a.mlp)
                for hd in dense_hiddens:
                    hd.add_(dense_mlp(norm2(hd.float())))
        del dense

        # The block's outputs with every layer compressed: the next block's inputs.
        with self.timer("forward"):
            if dense_outputs is not None:
                # W1 (W2 x + b2) + b1 = V^T V y + c with y = W x + b and W1 = V^T, W2 = V W, so
                # c = b1 + W1 (b2 - V b): no second pass through gate/up. Anchored: W1 W2 x = V M y.
                w1 = torch.as_tensor(f.w1).float()
                w_left = w1 if not anchoring else torch.as_tensor(fm.w2).float().T
                const = torch.zeros(w1.shape[0], dtype=torch.float64)
                if f.b1 is not None:
                    const += torch.as_tensor(f.b1, dtype=torch.float64)
                shift = torch.zeros(w1.shape[1], dtype=torch.float64)
                if f.b2 is not None:
                    shift += torch.as_tensor(f.b2, dtype=torch.float64)
                if bias is not None:
                    shift -= torch.as_tensor(f.w1, dtype=torch.float64).T @ torch.as_tensor(bias, dtype=torch.float64)
                const = (const + torch.as_tensor(f.w1, dtype=torch.float64) @ shift).to(w1.dtype)
                for h, y in zip(hiddens, dense_outputs):
                    h.add_((y.float() @ w_left) @ w1.T + const)
                del dense_outputs
            else:
                for h in hiddens:
                    h.add_(mlp(norm2(h.float())))
        return hiddens


def _dense_view(block: nn.Module) -> nn.Module:
    """A copy of ``block``'s modules that shares its parameters and buffers (no weight is
    copied): compressing a layer replaces the block's module, and the old one lives on here
    for the dense path as long as that needs it. At 7B this is the 0.54 GB of a float32 MLP
    that a deep copy would hold through the gate/up peak."""
    shared = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    return copy.deepcopy(block, memo=shared)


def _times_widened(left: np.ndarray, weight: np.ndarray, band: int = 1024) -> np.ndarray:
    """``left @ weight`` in float64, widening ``weight`` a band of columns at a time (a whole
    7B down_proj widened would be 0.36 GB)."""
    out = np.empty((left.shape[0], weight.shape[1]))
    for j in range(0, weight.shape[1], band):
        out[:, j:j + band] = left @ weight[:, j:j + band].astype(np.float64)
    return out


def _as_dtype(target, dtype):
    """An anchored (weight, bias) target in the layer's dtype."""
    weight, bias = target
    return weight.astype(dtype, copy=False), None if bias is None else bias.astype(dtype, copy=False)


def compress_blocks(source: BlockSource, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    ranks: Dict[str, int], options: Optional[CompressionOptions] = None,
                    progress: Optional[Callable[[int, int], None]] = None,
                    block_done: Optional[Callable[[int, nn.Module, torch.Tensor], None]] = None,
                    start_block: int = 0, start_hidden: Optional[Callable[[torch.Tensor], None]] = None,
                    report: Optional[CompressionReport] = None,
                    comm: Optional[Communicator] = None,
                    neurons: Optional[Dict[str, int]] = None) -> CompressionReport:
    """Compresses the blocks of ``source`` named in ``ranks`` ({full module name: rank}) and
    ``neurons`` ({full MLP module name: kept neurons}), in order, each on the outputs of the
    blocks already compressed.

    ``block_done(i, block, hidden)`` runs after block i, with ``hidden`` the next block's inputs
    (one tensor, all calibration sequences); releasing the block is up to it. To continue an
    interrupted run, ``start_block`` skips the blocks before it and ``start_hidden(buffer)``
    fills the hidden-state buffer with that block's saved inputs. Blocks after the last one in
    ``ranks`` are not run. With ``comm`` (:mod:`rom_fast.distributed`), this process runs its
    shard of the sequences: ``hidden`` and the buffer ``start_hidden`` fills are the shard's.
    """
    options = options or CompressionOptions()
    comm = comm or Communicator()
    input_ids, attention_mask = comm.shard(options.batch_size, input_ids, attention_mask)
    report = report if report is not None else CompressionReport()
    timer = StageTimer(report.seconds)
    adapter = source.adapter
    neurons = dict(neurons or {})
    shape = plans.ModelShape.of_source(source)
    unknown = sorted(n for n in ranks if n not in shape.shapes) + sorted(n for n in neurons if n not in shape.mlps)
    if unknown:
        raise ValueError(f"plan names layers this model does not have: {unknown[:5]}")
    plans.check_neurons(shape, ranks, neurons, "plan")
    block_of = {n: adapter.block_index(n) for n in list(ranks) + list(neurons)}
    touched = list(ranks) + [n for mlp in neurons for n in shape.mlp_linears(mlp)]
    not_dense = [n for n in touched if block_of.get(n, adapter.block_index(n)) >= start_block
                 and type(source.model.get_submodule(n)) is not nn.Linear]
    if not_dense:
        raise ValueError(f"layers are already compressed (not nn.Linear): {not_dense[:5]}")
    last_needed = max(block_of.values(), default=-1)
    if start_block > last_needed:
        return report
    with timer("capture"):
        buffer, kwargs_list = capture_block_inputs(source, input_ids, attention_mask,
                                                   options.batch_size, options.activation_dtype)
        if options.anchor:
            # Anchored targets follow the dense model's hidden states beside the compressed
            # ones: one buffer [compressed, dense], saved and resumed as one tensor.
            both = buffer.new_empty((2,) + tuple(buffer.shape))
            both[0].copy_(buffer)
            both[1].copy_(buffer)
            buffer = both
            del both
        if start_hidden is not None:
            start_hidden(buffer)
    dense_hiddens = list(buffer[1].split(options.batch_size)) if options.anchor else None
    hiddens = list((buffer[0] if options.anchor else buffer).split(options.batch_size))
    token_masks = [m.bool() for m in attention_mask.split(options.batch_size)]
    compressor = BlockCompressor(adapter, options, report, timer, comm)
    for i in range(start_block, last_needed + 1):
        with timer("load"):
            block = source.load_block(i)
        prefix = adapter.block_prefix(i)
        block_ranks = {n[len(prefix):]: r for n, r in ranks.items() if block_of[n] == i}
        compressor.compress(block, prefix, hiddens, kwargs_list, token_masks, block_ranks, dense_hiddens,
                            neurons.get(prefix + adapter.mlp))
        if block_done:
            with timer("write"):
                block_done(i, block, buffer)
        release_freed_memory()      # per-block buffers: the heap must not creep block after block
        if progress:
            progress(i + 1, last_needed + 1)
    return report
