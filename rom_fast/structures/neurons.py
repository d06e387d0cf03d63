"""Kept neurons: an MLP keeps k of its intermediate neurons, its output linear refitted.

The input linears (gate/up) keep the rows of those neurons unchanged; the output linear
(down_proj) is refitted on them by ridge least squares, ``W H[:,S] H[S,S]^-1`` with ``H`` the
Gram of the MLP's hidden activations on the compressed path plus a small ridge: the exact
optimum for the kept set. The native core chooses the set by greedy optimal-brain-surgeon
removal on that Gram (exact rank-g downdates of its inverse).
"""

from __future__ import annotations

import numpy as np
import torch

from rom_fast import kernels
from typing import List, Tuple

from rom_fast.lowrank import mlp_neuron_params, pruned_linear, set_module
from rom_fast.structures.lowrank import CORE
from rom_fast.util import float_array, positive_int

# Greedy neuron selection removes about n / SELECTION_GROUPS neurons per exact step: each step
# is a rank-g update of the n x n inverse, memory-bound for g = 1 (one at a time took 3.5x the
# time at 576 x 1536).
SELECTION_GROUPS = 256


def retained_energy(curve_kept, curve_loss, keep: int, total: float) -> float:
    """The fraction of the MLP's output energy kept with ``keep`` neurons, from the greedy
    removal's curve (kept counts, output error energy) and the total output energy."""
    lost = float(curve_loss[int(np.flatnonzero(np.asarray(curve_kept) == keep)[0])])
    return 1.0 if total <= 0 else max(0.0, 1.0 - lost / total)


class KeptNeurons:
    """The MLP sublayer keeps ``k`` whole neurons (the plan's setting is k)."""

    name = "neurons"
    spec_name = "pruned"        # config.json's "structure" of each linear of a pruned MLP

    # -- statistics ---------------------------------------------------------------------------
    def input_ranks(self, sub, keep: int) -> dict:
        return {}

    def output_tap(self, sub, keep: int, output_linear) -> str:
        return CORE        # the hidden activations the output linear reads

    def peak_bytes(self, sub, keep: int, block) -> int:
        """The selection's float64 Gram and its inverse."""
        return 2 * 8 * block.get_submodule(sub.output).in_features ** 2

    def check(self, sub, block, where: str) -> None:
        if any(block.get_submodule(n).bias is not None for n in sub.linears):
            raise ValueError(f"{where}{sub.module}: keeping whole neurons needs an MLP without biases")

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, weight: np.ndarray, stats: list, keep: int, options) -> kernels.InputSelection:
        """The kept neurons and the refit output weight from the hidden activations' statistics
        ``stats = [acc, cross]`` (emptied; ``cross`` None unless dense-anchored: the refit then
        targets the dense outputs). The kernel takes the accumulator's own n x n as its
        workspace (0.97 GB at 7B's n = 11008), never a copy beside it."""
        acc, cross = stats
        stats.clear()
        if cross is not None:
            weight, _ = kernels.anchored_target(kernels.anchor_correction(acc, cross, ridge=options.ridge),
                                                weight, options.anchor)
            del cross
        n = acc.dim
        return kernels.select_inputs(weight, acc, keep, ridge=options.ridge,
                                     block=max(1, n // SELECTION_GROUPS), overwrite_gram=True)

    def compress_output(self, step, tap: str, stats: list, keep: int):
        """Chooses the kept neurons and refits the output linear; the block is then finished by
        running the pruned MLP."""
        sub, block = step.sub, step.block
        down = block.get_submodule(sub.output)
        inputs = [block.get_submodule(n) for n in sub.inputs]
        selection = self.fit(float_array(down.weight), stats, keep, step.options)
        kept = np.ascontiguousarray(selection.kept, dtype=np.int64)
        refit = np.ascontiguousarray(selection.weight)
        step.comm.broadcast_arrays([kept, refit], "kept neurons")    # process 0's choice everywhere
        energy = self.energy(selection, keep)
        self.replace(block, sub, kept, refit, down.weight.dtype)
        for name, lin in zip(list(sub.inputs) + [sub.output], inputs + [down]):
            step.record(name, lin, keep, energy, "neurons")
        return None

    # -- checkpoint spec ------------------------------------------------------------------------
    @staticmethod
    def check_specs(mlp_units, shapes: dict, prefix: str, specs: dict) -> None:
        """Untrusted config.json specs of one block's pruned linears: each MLP (each expert of a
        routed one) is pruned whole or not at all (its input linears keep the same k
        neurons' rows, k rows each or, fused, k per part, and its output linear reads those k,
        1 <= k <= intermediate size; the other sides keep their sizes). ValueError otherwise."""
        units = [u for u in mlp_units if set(u.linears) & set(specs)]
        whole = {n for u in units for n in u.linears}
        if set(specs) != whole:
            stray = sorted(set(specs) ^ whole)
            raise ValueError(f"{prefix}: pruned layers {stray[:4]} do not form whole MLPs (each prunes "
                             f"{', '.join(mlp_units[0].inputs)} and {mlp_units[0].output} together)")
        for unit in units:
            KeptNeurons._check_unit(unit, shapes, prefix, {n: specs[n] for n in unit.linears})

    @staticmethod
    def _check_unit(unit, shapes: dict, prefix: str, specs: dict) -> None:
        down = unit.output
        for rel, spec in specs.items():
            for key in ("out_features", "in_features"):
                if not positive_int(spec.get(key)):
                    raise ValueError(f"rom_fast layer {prefix + rel!r}: {key} = {spec.get(key)!r} "
                                     "is not a positive integer")
            if not isinstance(spec.get("bias", False), bool):
                raise ValueError(f"rom_fast layer {prefix + rel!r}: bias must be true or false")
        kept = specs[down]["in_features"]
        for rel, spec in specs.items():
            d_out, d_in = shapes[rel]
            want = (d_out, kept) if rel == down else (unit.rows_per_unit(rel) * kept, d_in)
            if kept > shapes[down][1] or (spec["out_features"], spec["in_features"]) != want:
                raise ValueError(f"rom_fast layer {prefix + rel!r} is {spec['out_features']} x "
                                 f"{spec['in_features']}; an MLP keeping {kept} of {shapes[down][1]} neurons "
                                 f"needs {want[0]} x {want[1]}")

    # -- planner curve --------------------------------------------------------------------------
    @staticmethod
    def planner_points(d_model: int, n: int, curve, weight: float) -> List[Tuple[int, float, int]]:
        """``(parameters, loss, kept neurons)`` of every point of the greedy removal's curve
        (kept counts, output error energy) that keeps 1 to n - 1 neurons, the loss scaled by
        the planner's ``weight``."""
        return [(mlp_neuron_params(d_model, int(k)), weight * float(loss), int(k))
                for k, loss in zip(*curve) if 1 <= k < n]

    # -- modules --------------------------------------------------------------------------------
    @staticmethod
    def replace(block, sub, kept: np.ndarray, refit: np.ndarray, dtype: torch.dtype) -> None:
        """Input linears keep the kept neurons' rows, the output linear becomes the refit."""
        rows = torch.as_tensor(kept)
        units = block.get_submodule(sub.output).in_features
        inputs = [block.get_submodule(n) for n in sub.inputs]
        with torch.inference_mode(False):
            for name, lin in zip(sub.inputs, inputs):
                kept_rows = lin.weight.detach()[sub.unit_rows(name, rows, units)]
                set_module(block, name, pruned_linear(kept_rows.clone()))
            set_module(block, sub.output, pruned_linear(torch.as_tensor(refit).to(dtype)))

    @staticmethod
    def energy(selection: kernels.InputSelection, keep: int) -> float:
        return retained_energy(selection.curve_kept, selection.curve_loss, keep, selection.total_energy)


__all__ = ["KeptNeurons", "SELECTION_GROUPS", "retained_energy"]
