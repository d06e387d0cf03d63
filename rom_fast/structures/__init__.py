"""Structures: the ways a sublayer of a decoder block can be compressed.

Each structure is one module, owning
- the statistics it needs (which of the loop's taps it reads: a sublayer's normed input, its
  core outputs (the output linear's input) or its outputs);
- its fit, as pure math on numpy arrays and accumulators (testable without torch modules);
- how it replaces the block's modules;
- its checkpoint spec and the validation of an untrusted one;
- its planner curve: the (parameters, estimated loss) options it offers a planning unit.

:mod:`rom_fast.pipeline` runs every sublayer of every block through the same passes and asks
the sublayer's structure what to accumulate and how to fit; :mod:`rom_fast.planner` asks each
structure for its options. Adding a structure is one module here, its entry in
:data:`STRUCTURES`, and its tests.
"""

from __future__ import annotations

from rom_fast.structures.lowrank import LowRank
from rom_fast.structures.neurons import KeptNeurons

LOWRANK = LowRank()
NEURONS = KeptNeurons()

# By the name plans and checkpoints use.
STRUCTURES = {s.name: s for s in (LOWRANK, NEURONS)}

__all__ = ["KeptNeurons", "LOWRANK", "LowRank", "NEURONS", "STRUCTURES"]
