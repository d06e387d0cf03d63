"""Low-rank factors: a linear ``W`` becomes ``W1 W2`` (the paper's reduced order model).

Statistics: the linears of a sublayer's input stage (q/k/v, gate/up) share the Gram of the
normed input, and one input factor of it; the output linear (o_proj, down_proj) reads the
Gram of the core outputs (its inputs), or, when its input is wider than its output
(down_proj, 11008 -> 4096), the ~(d_in/d_out)^2 cheaper Gram of its outputs (the output
route). Dense-anchored targets add the cross moment of the dense path's activations.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from rom_fast import kernels
from rom_fast.lowrank import from_factors, lowrank_params, set_module
from rom_fast.util import float_array, positive_int

# Kinds of statistics a structure reads from a sublayer's output stage.
CORE = "core"          # the output linear's inputs
OUTPUT = "output"      # the output linear's outputs


def output_route(d_out: int, d_in: int) -> bool:
    """Whether a layer is fitted from its output Gram: exact either way, cheaper when d_in > d_out."""
    return d_in > d_out


def as_dtype(target, dtype):
    """An anchored (weight, bias) target in the layer's dtype."""
    weight, bias = target
    return weight.astype(dtype, copy=False), None if bias is None else bias.astype(dtype, copy=False)


def times_widened(left: np.ndarray, weight: np.ndarray, band: int = 1024) -> np.ndarray:
    """``left @ weight`` in float64, widening ``weight`` a band of columns at a time (a whole
    7B down_proj widened would be 0.36 GB)."""
    out = np.empty((left.shape[0], weight.shape[1]))
    for j in range(0, weight.shape[1], band):
        out[:, j:j + band] = left @ weight[:, j:j + band].astype(np.float64)
    return out


class LowRank:
    """Every linear of a sublayer given a rank keeps ``W1 W2`` of that rank; the others stay dense."""

    name = "lowrank"
    spec_name = "lowrank"       # config.json's "structure" of a factorized layer (the default)

    # -- statistics ---------------------------------------------------------------------------
    def input_ranks(self, sub, ranks: dict) -> dict:
        """The sublayer's input linears that take a rank: ``{relative name: rank}``."""
        return {n: ranks[n] for n in sub.inputs if n in ranks}

    def output_tap(self, sub, ranks: dict, output_linear) -> Optional[str]:
        """What the output stage accumulates: nothing (dense output linear), its inputs, or its
        outputs (the output route)."""
        if sub.output not in ranks:
            return None
        return OUTPUT if output_route(output_linear.out_features, output_linear.in_features) else CORE

    def peak_bytes(self, sub, ranks: dict, block) -> int:
        """The float64 ``W L`` products of the input stage: what its factorization peaks at."""
        return sum(block.get_submodule(n).weight.numel() for n in sub.inputs if n in ranks) * 8

    # -- fit ------------------------------------------------------------------------------------
    def fit_shared_input(self, stats: list, names: List[str], layer: Callable[[str], tuple], ranks: dict,
                         options) -> Iterator[Tuple[str, kernels.Factorization]]:
        """Factorizations of the linears ``names``, which read one input whose statistics are
        ``stats = [acc, cross]`` (``cross`` None unless dense-anchored). ``layer(name)`` gives
        its ``(weight, bias)`` numpy arrays when its turn comes. ``stats`` is emptied: the
        Gram is freed once the input factor is built, the cross moment once the correction is
        (the caller's list is its only hold on them: a 7B block's peak is here). Anchored, each
        weight is first moved to its target, one at a time in the layer's dtype (a 7B
        gate_proj's float64 target is 0.36 GB)."""
        acc, cross = stats
        stats.clear()
        has_bias = any(layer(n)[1] is not None for n in names)
        correction = None
        if cross is not None:
            correction = kernels.anchor_correction(acc, cross, ridge=options.ridge, with_bias=has_bias)
            del cross
        factor = kernels.input_factor(acc, centered=options.centered, with_bias=has_bias and not options.centered)
        del acc
        for name in names:
            weight, bias = layer(name)
            dtype = weight.dtype
            if correction is not None:
                weight, bias = as_dtype(kernels.anchored_target(correction, weight, options.anchor, bias=bias), dtype)
            f = kernels.factorize(weight, factor, ranks[name], centered=options.centered, bias=bias,
                                  method=options.eigen_method)
            del weight, bias
            yield name, f.astype(dtype)     # the factors come back float64
            del f

    def fit_output_route(self, weight: np.ndarray, bias, stats: list, rank: int, options,
                         where: str) -> Tuple[kernels.Factorization, Optional[np.ndarray]]:
        """A layer fitted from the Gram of its outputs ``stats = [acc, cross]`` (emptied).
        Returns the factorization and, anchored, the map ``V M`` (r x d_out) with ``W2 = V M W``:
        the dense outputs are regressed on the compressed ones in the output space (ROM of
        ``M`` on ``y_c``)."""
        acc, cross = stats
        stats.clear()
        if cross is None:
            return kernels.factorize_output_gram(weight, acc, rank, centered=options.centered, bias=bias,
                                                 method=options.eigen_method), None
        if bias is not None:
            raise ValueError(f"{where}: anchored targets on the output route need a layer without bias")
        m_eff, _ = kernels.anchored_target(kernels.anchor_correction(acc, cross, ridge=options.ridge),
                                           np.eye(acc.dim), options.anchor)
        factor = kernels.input_factor(acc)
        del cross, acc
        fm = kernels.factorize(m_eff, factor, rank, method=options.eigen_method)
        f = kernels.Factorization(fm.w1, times_widened(fm.w2, weight), None, None, fm.eigenvalues,
                                  fm.total_energy, fm.eigen_seconds).astype(weight.dtype)
        return f, fm.w2

    @staticmethod
    def retained_energy(f: kernels.Factorization) -> float:
        """The fraction of the layer's output energy the factors keep on the calibration tokens."""
        return f.eigenvalues.sum() / f.total_energy if f.total_energy > 0 else 1.0

    # -- the next block's inputs ----------------------------------------------------------------
    @staticmethod
    def outputs_from_kept(f: kernels.Factorization, bias, anchored_map: Optional[np.ndarray]):
        """``(left, w1, const)`` with ``W1 (W2 x + b2) + b1 = (y @ left) @ w1.T + const`` for the
        kept outputs ``y = W x + b`` of the dense layer, so the block is finished without a
        second pass through the sublayer: ``W1 = V^T, W2 = V W`` give ``c = b1 + W1 (b2 - V b)``;
        anchored, ``W1 W2 x = V^T (V M) y``."""
        w1 = torch.as_tensor(f.w1).float()
        left = w1 if anchored_map is None else torch.as_tensor(anchored_map).float().T
        const = torch.zeros(w1.shape[0], dtype=torch.float64)
        if f.b1 is not None:
            const += torch.as_tensor(f.b1, dtype=torch.float64)
        shift = torch.zeros(w1.shape[1], dtype=torch.float64)
        if f.b2 is not None:
            shift += torch.as_tensor(f.b2, dtype=torch.float64)
        if bias is not None:
            shift -= torch.as_tensor(f.w1, dtype=torch.float64).T @ torch.as_tensor(bias, dtype=torch.float64)
        const = (const + torch.as_tensor(f.w1, dtype=torch.float64) @ shift).to(w1.dtype)
        return left, w1, const

    # -- modules --------------------------------------------------------------------------------
    @staticmethod
    def replace(block, name: str, linear, f: kernels.Factorization) -> None:
        with torch.inference_mode(False):   # ordinary parameters: the model can be cast, saved, fine-tuned
            set_module(block, name, from_factors(linear, f.w1, f.w2, f.b1, f.b2))

    # -- checkpoint spec ------------------------------------------------------------------------
    @staticmethod
    def check_specs(mlp_units, shapes: dict, prefix: str, specs: dict) -> None:
        """Untrusted config.json specs of one block's factorized linears: a rank the layer can
        have and boolean bias flags (ValueError otherwise)."""
        for rel, spec in specs.items():
            name = prefix + rel
            d_out, d_in = shapes[rel]
            rank = spec.get("rank")
            if not positive_int(rank) or rank > min(d_out, d_in):
                raise ValueError(f"rom_fast layer {name!r} has rank {rank!r}; a {d_out} x {d_in} "
                                 f"layer takes 1 to {min(d_out, d_in)}")
            for flag in ("reduce_bias", "expand_bias"):
                if not isinstance(spec.get(flag, False), bool):
                    raise ValueError(f"rom_fast layer {name!r}: {flag} must be true or false")

    # -- planner curve --------------------------------------------------------------------------
    @staticmethod
    def planner_points(d_out: int, d_in: int, loss) -> List[Tuple[int, float, Optional[int]]]:
        """``(parameters, loss, rank)`` of dense (rank None, loss 0), then of every
        parameter-saving rank from the highest down (parameters strictly decreasing);
        ``loss[r]`` is the planner's estimated loss of rank r."""
        dense = d_out * d_in
        points = [(dense, 0.0, None)]
        for r in range(min(len(loss) - 1, d_out, d_in), 0, -1):
            p = lowrank_params(d_out, d_in, r)
            if p < dense:
                points.append((p, float(loss[r]), r))
        return points

    # -- the loop's calls (rom_fast.pipeline.SublayerStep) ----------------------------------------
    def compress_inputs(self, step, stats: list, ranks: dict) -> None:
        """The input stage: the linears given a rank, from their shared input's statistics."""
        names = list(self.input_ranks(step.sub, ranks))
        self._commit_all(step, stats, names, ranks)

    def compress_output(self, step, tap: str, stats: list, ranks: dict):
        """The output linear from its inputs' or outputs' statistics. Returns how the block's
        outputs are finished: None (run the compressed sublayer), or, on the output route, a
        function of the kept dense outputs ``y`` (no second pass through the sublayer)."""
        name = step.sub.output
        if tap == CORE:
            self._commit_all(step, stats, [name], ranks)
            return None
        lin = step.block.get_submodule(name)
        weight = float_array(lin.weight)
        bias = None if lin.bias is None else float_array(lin.bias)
        f, anchored_map = self.fit_output_route(weight, bias, stats, ranks[name], step.options, step.prefix + name)
        self._commit(step, name, lin, f, "output-gram")
        left, w1, const = self.outputs_from_kept(f, bias, anchored_map)
        return lambda y: (y.float() @ left) @ w1.T + const

    def _commit_all(self, step, stats: list, names: List[str], ranks: dict) -> None:
        def layer(name):
            lin = step.block.get_submodule(name)
            return float_array(lin.weight), None if lin.bias is None else float_array(lin.bias)
        for name, f in self.fit_shared_input(stats, names, layer, ranks, step.options):
            self._commit(step, name, step.block.get_submodule(name), f, "input-gram")
            del f

    def _commit(self, step, name: str, lin, f: kernels.Factorization, route: str) -> None:
        # Process 0's factors on every process, bit for bit (another machine's BLAS may round otherwise).
        step.comm.broadcast_arrays([a for a in (f.w1, f.w2, f.b1, f.b2, f.eigenvalues) if a is not None], "factors")
        step.report.seconds["eigensolver"] += f.eigen_seconds   # part of "factorize"
        self.replace(step.block, name, lin, f)
        step.record(name, lin, f.rank, float(self.retained_energy(f)), route)
