"""Automatic rank allocation under a global parameter budget.

One pass over calibration tokens on the *dense* model (:mod:`~rom_fast.planner.measure`) gives,
for every compressible linear, the spectrum of its output second moment (the loss of keeping
rank r is its tail beyond r, exactly, on these tokens) and its sensitivity, the mean squared
gradient of the language-model loss with respect to its outputs; with neuron curves, the loss
of keeping fewer of each MLP's neurons too. :mod:`~rom_fast.planner.allocation` minimises the
sensitivity-weighted loss under the budget over each layer's (or MLP's) lower convex hull of
(parameters, loss) points; :mod:`~rom_fast.planner.plot` draws the plan.

(The allocation module is ``allocation``, not ``allocate``: a submodule named like the
re-exported function :func:`allocate` would be shadowed by it as a package attribute.)
"""

from rom_fast.planner.allocation import (DEFAULT_MLP_STRUCTURE, MLP_STRUCTURES, PLAN_STRUCTURES, WEIGHTINGS, _loss_curve,
                                         allocate, allocate_plan, check_structures, planned)
from rom_fast.planner.measure import (DEFAULT_GRAD_SAMPLES, HEAD_CHUNK_TOKENS, NEURON_CURVE_STEPS, LayerSpectrum,
                                      collect_spectra, neuron_curve)
from rom_fast.planner.plot import plot_plan

__all__ = ["WEIGHTINGS", "MLP_STRUCTURES", "PLAN_STRUCTURES", "DEFAULT_MLP_STRUCTURE", "check_structures", "NEURON_CURVE_STEPS", "DEFAULT_GRAD_SAMPLES",
           "HEAD_CHUNK_TOKENS", "LayerSpectrum", "collect_spectra", "neuron_curve", "allocate", "allocate_plan",
           "planned", "plot_plan"]
