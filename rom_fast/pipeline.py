"""The layer loop: error-aware reduced order modelling of every decoder block.

Each block's sublayers (the adapter's named roles: attention, then MLP) are compressed in
order, each on activations produced by the layers already compressed (the paper's
error-aware order). A sublayer runs two statistics stages:

1. its input   -> the linears reading the normed input (q/k/v; gate/up): one shared Gram
2. its output  -> the output linear (o_proj; down_proj) from its inputs' Gram, or from its
                  *output* Gram when d_in > d_out (~(d_in/d_out)^2 cheaper)

What a stage accumulates and how it is fitted is the sublayer's structure
(:mod:`rom_fast.structures`): low-rank factors, or an MLP keeping whole neurons (one stage:
its hidden activations' Gram chooses them, down_proj is refitted). Each stage runs only the
part of the block it needs, once; the block's outputs become the next block's inputs.
Dense-anchored targets follow the dense model beside the loop (:class:`DensePath`); every
accumulator comes from one seam (:class:`Statistics`). Statistics and factors are computed
by the native core.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Union

import torch
from torch import nn

from rom_fast import kernels, plans
from rom_fast.adapters import ModelAdapter
from rom_fast.blockwise import capture_block_inputs, kwargs_of_block
from rom_fast.distributed import Communicator
from rom_fast.io import units
from rom_fast.io.sources import BlockSource
from rom_fast.lowrank import set_module
from rom_fast.structures import LOWRANK, NEURONS
from rom_fast.structures.lowrank import OUTPUT
from rom_fast.util import StageTimer, release_freed_memory

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
        if self.gram_precision not in kernels.GRAM_PRECISIONS:
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
    original = parent.get_submodule(child)
    set_module(parent, child, nn.Identity())
    try:
        yield original
    finally:
        set_module(parent, child, original)


def _rows(x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The (n_real_tokens × d) rows of a (batch × seq × d) activation: padding never counts."""
    return x[token_mask].float().contiguous()


def _inputs_label(prefix: str, linears) -> str:
    """How a statistics error names the activations: the block's prefix and the stage."""
    return "inputs of " + ", ".join(prefix + n for n in linears)


class Statistics:
    """The one place the loop's accumulators are made: Grams of activations (float64, or
    float32 blocks added in float64 at ``kernels.FLOAT32_GRAM_MIN_DIM`` columns and wider under
    "auto") and the cross moments of dense-anchored targets. The communicator's accumulators
    sum over the processes of a data-parallel run when read; another backend (a device) plugs
    in here without the loop knowing."""

    def __init__(self, comm: Communicator, precision: str = "auto"):
        self.comm, self.precision = comm, precision

    def gram(self, dim: int, label: str) -> kernels.GramAccumulator:
        return self.comm.gram_accumulator(dim, label, precision=kernels.resolve_gram_precision(self.precision, dim))

    def cross(self, dim_dense: int, dim_comp: int, label: str) -> kernels.CrossGramAccumulator:
        return self.comm.cross_accumulator(dim_dense, dim_comp, label)


def _dense_view(block: nn.Module) -> nn.Module:
    """A copy of ``block``'s modules that shares its parameters and buffers (no weight is
    copied): compressing a layer replaces the block's module, and the old one lives on here
    for the dense path as long as that needs it. At 7B this is the 0.54 GB of a float32 MLP
    that a deep copy would hold through the gate/up peak."""
    shared = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    return copy.deepcopy(block, memo=shared)


class DensePath:
    """The dense model's hidden states beside the compressed ones, for dense-anchored targets:
    the block as it was (:func:`_dense_view`) run over the same tokens, sublayer by sublayer,
    a step behind the compressed path. Each sublayer's dense module is dropped once the dense
    path is past it, so its old weights do not sit through the next factorizations."""

    def __init__(self, adapter: ModelAdapter, block: nn.Module, hiddens: List[torch.Tensor]):
        self.adapter, self.hiddens = adapter, hiddens
        self.block = _dense_view(block)

    def normed(self, sub, i: int) -> torch.Tensor:
        return self.block.get_submodule(sub.norm)(self.hiddens[i].float())

    def core(self, sub, i: int, kwargs: Dict):
        """The dense sublayer's core outputs on micro-batch i, and its output linear."""
        with _as_identity(self.block.get_submodule(sub.module), sub.output_in_module) as output:
            return self.adapter.sublayer_forward(self.block, sub, self.normed(sub, i), kwargs), output

    def advance(self, sub, i: int, out: torch.Tensor) -> None:
        """Adds the dense sublayer's output ``out`` to micro-batch i's residual stream."""
        self.hiddens[i].add_(self.adapter.branch_output(self.block, sub, out))

    def run(self, sub, i: int, kwargs: Dict) -> None:
        """Micro-batch i through the whole dense sublayer."""
        self.advance(sub, i, self.adapter.sublayer_forward(self.block, sub, self.normed(sub, i), kwargs))

    def done_with(self, sub) -> None:
        set_module(self.block, sub.module, nn.Identity())


class SublayerStep:
    """One sublayer of one block through its structure: the input stage (the linears reading
    the normed input, from its shared statistics), then the output stage (the output linear,
    from its inputs' or outputs' statistics), then the residual stream advanced past it.

    Passes over the calibration batches are the loop's; what they accumulate and how it is
    fitted is the structure's (:mod:`rom_fast.structures`). A sublayer whose core outputs are
    no wider than the residual stream (attention) keeps them in the scratch buffer for its
    output stage and advance; a wider one (an MLP) runs its core again instead.
    """

    def __init__(self, compressor: "BlockCompressor", block: nn.Module, prefix: str, sub, structure, setting,
                 batches, dense: Optional[DensePath]):
        self.compressor, self.block, self.prefix, self.sub = compressor, block, prefix, sub
        self.structure, self.setting, self.dense = structure, setting, dense
        self.hiddens, self.kwargs_list, self.token_masks = batches
        self.adapter, self.options, self.comm = compressor.adapter, compressor.options, compressor.comm
        self.report, self.timer, self.stats = compressor.report, compressor.timer, compressor.stats

    def record(self, name: str, lin: nn.Module, rank: int, energy: float, route: str) -> None:
        route += "+anchored" if self.dense is not None else ""
        self.report.layers.append(LayerRecord(self.prefix + name, lin.out_features, lin.in_features,
                                              rank, energy, route))

    def _normed(self, h: torch.Tensor) -> torch.Tensor:
        return self.block.get_submodule(self.sub.norm)(h.float())

    def _branch(self, out: torch.Tensor) -> torch.Tensor:
        return self.adapter.branch_output(self.block, self.sub, out)

    def run(self) -> None:
        if self.structure.input_ranks(self.sub, self.setting):
            self._input_stage()
        output = self.block.get_submodule(self.sub.output)
        tap = self.structure.output_tap(self.sub, self.setting, output)
        if output.in_features <= output.out_features:
            self._stored_core_stage(tap)
        elif tap is None:
            self._plain_advance()
        else:
            self._output_stage(tap)

    # -- the input stage ------------------------------------------------------------------------
    def _input_stage(self) -> None:
        """Gram of the normed input over the real tokens (shared by the stage's linears) and,
        when anchoring, the cross moment of the dense path's normed input with it. The list
        is passed straight through: the structure drops the statistics as it goes (no
        reference here keeps a 7B stage's 0.3 GB of Grams alive through its factorization)."""
        sub, dense = self.sub, self.dense
        label = _inputs_label(self.prefix, sub.inputs)
        acc = self.stats.gram(self.hiddens[0].shape[-1], label)
        cross = self.stats.cross(acc.dim, acc.dim, label) if dense is not None else None
        for i, (h, m) in enumerate(zip(self.hiddens, self.token_masks)):
            with self.timer("forward"):
                x = _rows(self._normed(h), m)
                xd = None if cross is None else _rows(dense.normed(sub, i), m)
            with self.timer("statistics"):
                acc.update(x)
                if cross is not None:
                    cross.update(xd, x)
        stats = [acc, cross]
        del acc, cross
        with self.timer("factorize"):
            self.structure.compress_inputs(self, stats, self.setting)

    # -- the output stage -----------------------------------------------------------------------
    def _stored_core_stage(self, tap: Optional[str]) -> None:
        """The core outputs are computed once (with the input stage compressed) into the scratch
        buffer: the output stage's statistics and the advance both read them."""
        sub, dense, masks = self.sub, self.dense, self.token_masks
        output = self.block.get_submodule(sub.output)
        core_out = self.compressor.scratch_batches(self.hiddens, output.in_features)
        label = _inputs_label(self.prefix, (sub.output,))
        cross = self.stats.cross(output.in_features, output.in_features, label) \
            if dense is not None and tap is not None else None
        with _as_identity(self.block.get_submodule(sub.module), sub.output_in_module):
            with self.timer("forward"):
                for i, (h, kw, o) in enumerate(zip(self.hiddens, self.kwargs_list, core_out)):
                    o.copy_(self.adapter.sublayer_forward(self.block, sub, self._normed(h), kw))
                    if dense is not None:
                        od, dense_output = dense.core(sub, i, kw)
                        if cross is not None:
                            cross.update(_rows(od, masks[i]), _rows(o, masks[i]))
                        dense.advance(sub, i, dense_output(od))
        if dense is not None:
            # The dense path is past this sublayer: its old weights (q/k/v: 0.2 GB at 7B) go
            # before the next factorizations, the loop's references to them included.
            od = dense_output = None
            dense.done_with(sub)
        if tap is not None:
            acc = self.stats.gram(output.in_features, label)
            with self.timer("statistics"):
                for x, m in zip(core_out, masks):
                    acc.update(_rows(x, m))
            stats = [acc, cross]
            del acc, cross
            with self.timer("factorize"):
                self.structure.compress_output(self, tap, stats, self.setting)
        else:
            del cross
        output = self.block.get_submodule(sub.output)   # compressed now
        with self.timer("forward"):
            for h, o in zip(self.hiddens, core_out):
                h.add_(self._branch(output(o.float())))
        # The loop variables are views of the scratch buffer: they would keep all of it alive
        # (0.54 GB at 7B) when it is freed for the next peak.
        o = None
        del core_out

    def _output_stage(self, tap: str) -> None:
        """One pass over the batches accumulating the output linear's inputs (``CORE``) or its
        outputs (``OUTPUT``, kept in the scratch buffer to finish the block without a second
        pass), then the structure's fit, then the advance."""
        sub, dense = self.sub, self.dense
        output = self.block.get_submodule(sub.output)
        width = output.out_features if tap == OUTPUT else output.in_features
        acc = self.stats.gram(width, f"{'outputs' if tap == OUTPUT else 'inputs'} of {self.prefix}{sub.output}")
        cross = self.stats.cross(width, width, acc.label) if dense is not None else None
        kept_outputs = self.compressor.scratch_batches(self.hiddens, output.out_features) if tap == OUTPUT else None
        with _as_identity(self.block.get_submodule(sub.module), sub.output_in_module):
            for i, (h, kw, m) in enumerate(zip(self.hiddens, self.kwargs_list, self.token_masks)):
                with self.timer("forward"):
                    act = self.adapter.sublayer_forward(self.block, sub, self._normed(h), kw)
                    if tap == OUTPUT:
                        act = output(act)                   # y = W x + b, kept
                        kept_outputs[i].copy_(act)
                    act = _rows(act, m)
                    if dense is not None:
                        od, dense_output = dense.core(sub, i, kw)
                        y_d = dense_output(od)
                        dense.advance(sub, i, y_d)
                        act_d = _rows(y_d if tap == OUTPUT else od, m)
                with self.timer("statistics"):
                    acc.update(act)
                    if cross is not None:
                        cross.update(act_d, act)
        # The dense path is past this sublayer: its old weights (a 7B MLP's gate/up, 0.36 GB)
        # and the last micro-batch's activations go before the factorization.
        act = act_d = y_d = od = dense_output = None
        if dense is not None:
            dense.done_with(sub)
        stats = [acc, cross]
        del acc, cross
        with self.timer("factorize"):
            finish = self.structure.compress_output(self, tap, stats, self.setting)
        with self.timer("forward"):
            if finish is not None:
                for h, y in zip(self.hiddens, kept_outputs):
                    h.add_(self._branch(finish(y)))
                del kept_outputs
            else:
                self._advance()

    def _plain_advance(self) -> None:
        """No statistics after the input stage: both paths run the whole sublayer."""
        with self.timer("forward"):
            if self.dense is not None:
                for i, kw in enumerate(self.kwargs_list):
                    self.dense.run(self.sub, i, kw)
                self.dense.done_with(self.sub)
            self._advance()

    def _advance(self) -> None:
        for h, kw in zip(self.hiddens, self.kwargs_list):
            h.add_(self._branch(self.adapter.sublayer_forward(self.block, self.sub, self._normed(h), kw)))


# How a unit the router sent no calibration token is recorded: it stays as it was.
NO_TOKENS_ROUTE = "dense:no-routed-tokens"


class RoutedUnitStep(SublayerStep):
    """One unit of a routed sublayer (an expert) through its structure, on the tokens the router
    sends it (its ``token_masks``: real tokens routed to it): the input stage as any
    sublayer's, then its output stage's statistics on the unit's core outputs of those rows
    only. The residual stream is advanced by the routed sublayer once all its units are done,
    so a structure's finisher is not used. A unit no calibration token reaches (on any
    process) has no statistics to fit: it stays dense, recorded as ``NO_TOKENS_ROUTE``."""

    def run(self) -> None:
        tokens = sum(int(m.sum()) for m in self.token_masks)
        if self.comm.all_reduce_scalar(float(tokens), "routed tokens") == 0:
            self._left_dense()
            return
        if self.structure.input_ranks(self.sub, self.setting):
            self._input_stage()
        output = self.block.get_submodule(self.sub.output)
        tap = self.structure.output_tap(self.sub, self.setting, output)
        if tap is not None:
            self._unit_output_stage(tap, output)

    def _unit_output_stage(self, tap: str, output: nn.Module) -> None:
        """The output linear's statistics on the unit's rows (anchored: with the cross moment
        of the dense unit's activations on the dense path's inputs at the same tokens), then
        its fit."""
        sub, dense = self.sub, self.dense
        width = output.out_features if tap == OUTPUT else output.in_features
        acc = self.stats.gram(width, f"{'outputs' if tap == OUTPUT else 'inputs'} of {self.prefix}{sub.output}")
        cross = self.stats.cross(width, width, acc.label) if dense is not None else None
        with units.widened(self.block.get_submodule(sub.module)):     # (a streamed unit: widened once here)
            for i, (h, m) in enumerate(zip(self.hiddens, self.token_masks)):
                with self.timer("forward"):
                    act = self._unit_activations(self.block, tap, _rows(self._normed(h), m))
                    act_d = None if cross is None else \
                        self._unit_activations(dense.block, tap, _rows(dense.normed(sub, i), m))
                with self.timer("statistics"):
                    acc.update(act)
                    if cross is not None:
                        cross.update(act_d, act)
        act = act_d = None
        stats = [acc, cross]
        del acc, cross
        with self.timer("factorize"):
            self.structure.compress_output(self, tap, stats, self.setting)

    def _unit_activations(self, block: nn.Module, tap: str, rows: torch.Tensor) -> torch.Tensor:
        """What the output stage reads on the unit's rows: its outputs (the whole unit, run by
        its own forward, which a parked unit needs) or its output linear's inputs; ``block``:
        the compressed block or the dense path's."""
        if tap == OUTPUT:
            return self.adapter.sublayer_forward(block, self.sub, rows, {})
        with _as_identity(block.get_submodule(self.sub.module), self.sub.output_in_module):
            return self.adapter.sublayer_forward(block, self.sub, rows, {})

    def _left_dense(self) -> None:
        warnings.warn(f"{self.prefix}{self.sub.module}: the router sent it no calibration token; it stays dense")
        # The linears the plan would have changed: all of a unit keeping neurons, else those given a rank.
        changed = self.sub.linears if self.structure is NEURONS else [n for n in self.sub.linears if n in self.setting]
        for name in changed:
            lin = self.block.get_submodule(name)
            self.report.layers.append(LayerRecord(self.prefix + name, lin.out_features, lin.in_features, 0, 1.0,
                                                  NO_TOKENS_ROUTE))


class RoutedSublayerStep(SublayerStep):
    """A routed sublayer (mixture of experts, :attr:`Sublayer.units`): the router, left dense,
    chooses each real token's units from the compressed path's normed input (once: the input
    does not move while the sublayer's units are compressed); each unit the plan names runs
    through its structure on its own tokens (:class:`RoutedUnitStep`); then the residual
    stream advances through the whole sublayer, compressed units included. Dense-anchored:
    each unit's cross moments pair its rows with the dense path's inputs at the same tokens
    (the tokens the compressed path routes to it), and the dense path then runs the dense
    sublayer (its own routing)."""

    def __init__(self, compressor: "BlockCompressor", block: nn.Module, prefix: str, sub, batches,
                 ranks: Dict[str, int], neurons: Dict[str, int], dense: Optional[DensePath] = None):
        super().__init__(compressor, block, prefix, sub, None, None, batches, dense)
        self.ranks, self.neurons = ranks, neurons

    def run(self) -> None:
        with self.timer("forward"):
            chosen = [self.adapter.routed_units(self.block, self.sub, _rows(self._normed(h), m))
                      for h, m in zip(self.hiddens, self.token_masks)]
        for e, unit in enumerate(self.sub.units):
            structure, setting = self.compressor.structure_of(unit, self.ranks, self.neurons)
            if not (structure.input_ranks(unit, setting)
                    or structure.output_tap(unit, setting, self.block.get_submodule(unit.output))):
                continue
            self.compressor._release_scratch_for(structure.peak_bytes(unit, setting, self.block))
            units.materialize(self.block.get_submodule(unit.module))    # a streamed unit is read now
            masks = [_routed_mask(m, (c == e).any(-1)) for m, c in zip(self.token_masks, chosen)]
            RoutedUnitStep(self.compressor, self.block, self.prefix, unit, structure, setting,
                           (self.hiddens, self.kwargs_list, masks), self.dense).run()
            release_freed_memory()      # the unit's fit buffers, before the next unit's
        self._plain_advance()


def _routed_mask(token_mask: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """The (batch x seq) mask of the real tokens routed to a unit (``routed``: per real token)."""
    mask = torch.zeros_like(token_mask)
    mask[token_mask] = routed
    return mask


class BlockCompressor:
    """Compresses one decoder block in place, given its calibration inputs: each sublayer in
    the block's order through its structure (:class:`SublayerStep`)."""

    def __init__(self, adapter: ModelAdapter, options: CompressionOptions, report: CompressionReport,
                 timer: StageTimer, comm: Optional[Communicator] = None):
        self.adapter, self.options, self.report, self.timer = adapter, options, report, timer
        self.comm = comm or Communicator()   # data-parallel runs: Grams summed over processes when read
        self.stats = Statistics(self.comm, options.gram_precision)
        self._scratch: Dict[tuple, torch.Tensor] = {}

    def scratch_batches(self, hiddens: List[torch.Tensor], width: int) -> List[torch.Tensor]:
        """Views of one reusable (tokens × width) buffer shaped like ``hiddens``: a block's kept
        MLP outputs and the next block's attention outputs live in the same memory."""
        n = sum(h.shape[0] for h in hiddens)
        key = (n,) + tuple(hiddens[0].shape[1:-1]) + (width, hiddens[0].dtype)
        if key not in self._scratch:
            self._scratch.clear()
            self._scratch[key] = hiddens[0].new_empty(key[:-1])
        return list(self._scratch[key].split([h.shape[0] for h in hiddens]))

    def _release_scratch_for(self, peak_bytes: int) -> None:
        """A 7B block's memory peak is a sublayer's factorization (gate/up's float64 W·L, 0.36
        GB per gate_proj, or the neuron selection's n x n pair): when that outweighs the idle
        scratch buffer, the buffer goes first (the next stage that needs it allocates it
        again). On small models keeping it is cheaper (SmolLM2: 1.34 vs 1.47 GiB peak when
        freed and reallocated every block)."""
        if peak_bytes > sum(t.numel() * t.element_size() for t in self._scratch.values()):
            self._scratch.clear()

    def structure_of(self, sub, ranks: Dict[str, int], neurons: Dict[str, int]):
        """The structure a plan gives a sublayer (or a routed unit), and its setting."""
        if sub.module in neurons:
            return NEURONS, neurons[sub.module]
        return LOWRANK, ranks

    @torch.inference_mode()
    def compress(self, block: nn.Module, prefix: str, hiddens: List[torch.Tensor], kwargs_list,
                 token_masks: List[torch.Tensor], ranks: Dict[str, int],
                 dense_hiddens: Optional[List[torch.Tensor]] = None,
                 neurons: Optional[Dict[str, int]] = None) -> List[torch.Tensor]:
        """Compresses the linears of ``block`` named in ``ranks`` (relative names) and returns
        the block's outputs, computed with the compressed block. ``neurons``: ``{MLP module
        (relative: the MLP, or an expert of a routed one): kept neurons}`` (its linears must
        not be in ``ranks``). With ``dense_hiddens`` (the dense model's inputs of this block at
        the same tokens; dense-anchored targets), those are advanced in place to the dense
        block's outputs."""
        dense = DensePath(self.adapter, block, dense_hiddens) if dense_hiddens is not None else None
        neurons = dict(neurons or {})
        for unit in self.adapter.mlp_units:
            if unit.module in neurons:
                NEURONS.check(unit, block, prefix)
        batches = (hiddens, kwargs_list, token_masks)
        for sub in self.adapter.sublayers:
            if sub.units:
                RoutedSublayerStep(self, block, prefix, sub, batches, ranks, neurons, dense).run()
                continue
            structure, setting = self.structure_of(sub, ranks, neurons)
            # (Sizes only: holding modules here would keep replaced weights alive.)
            self._release_scratch_for(structure.peak_bytes(sub, setting, block))
            SublayerStep(self, block, prefix, sub, structure, setting, batches, dense).run()
        return hiddens


def _check_plan(source: BlockSource, ranks: Dict[str, int], neurons: Dict[str, int],
                start_block: int) -> Dict[str, int]:
    """``{module name: block}`` of a plan's modules, after refusing names the model lacks,
    invalid kept-neuron counts and layers (from ``start_block`` on) already compressed."""
    adapter = source.adapter
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
    return block_of


def _first_block_inputs(source: BlockSource, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        options: CompressionOptions, start_hidden: Optional[Callable[[torch.Tensor], None]]):
    """The first block's calibration inputs in one buffer (anchored: ``[compressed, dense]``,
    saved and resumed as one tensor), or a resumed run's saved inputs of its next block;
    and the keyword arguments (masks, rotary embeddings) of every block, per micro-batch."""
    buffer, kwargs_list = capture_block_inputs(source, input_ids, attention_mask,
                                               options.batch_size, options.activation_dtype)
    if options.anchor:
        both = buffer.new_empty((2,) + tuple(buffer.shape))
        both[0].copy_(buffer)
        both[1].copy_(buffer)
        buffer = both
        del both
    if start_hidden is not None:
        start_hidden(buffer)
    return buffer, kwargs_list


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
    block_of = _check_plan(source, ranks, neurons, start_block)
    last_needed = max(block_of.values(), default=-1)
    if start_block > last_needed:
        return report
    with timer("capture"):
        buffer, kwargs_list = _first_block_inputs(source, input_ids, attention_mask, options, start_hidden)
    dense_hiddens = list(buffer[1].split(options.batch_size)) if options.anchor else None
    hiddens = list((buffer[0] if options.anchor else buffer).split(options.batch_size))
    token_masks = [m.bool() for m in attention_mask.split(options.batch_size)]
    compressor = BlockCompressor(adapter, options, report, timer, comm)
    for i in range(start_block, last_needed + 1):
        with timer("load"):
            block = source.load_block(i)
        prefix = adapter.block_prefix(i)
        block_ranks = {n[len(prefix):]: r for n, r in ranks.items() if block_of[n] == i}
        block_neurons = {n[len(prefix):]: k for n, k in neurons.items() if block_of[n] == i}
        compressor.compress(block, prefix, hiddens, kwargs_of_block(kwargs_list, i), token_masks, block_ranks,
                            dense_hiddens, block_neurons)
        if block_done:
            with timer("write"):
                block_done(i, block, buffer)
        release_freed_memory()      # per-block buffers: the heap must not creep block after block
        if progress:
            progress(i + 1, last_needed + 1)
    return report
