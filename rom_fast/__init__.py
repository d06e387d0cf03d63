"""rom_fast: training-free compression of LLaMA-family models by reduced order modelling."""

from rom_fast._native import _core
from rom_fast.kernels import (
    Factorization,
    GramAccumulator,
    InputFactor,
    LapackError,
    eigenvalues,
    factorize,
    factorize_output_gram,
    get_num_threads,
    input_factor,
    lowrank_apply,
    output_spectrum,
    set_num_threads,
    top_eigenpairs,
)

__version__ = _core.__version__

__all__ = [
    "Factorization", "GramAccumulator", "InputFactor", "LapackError", "__version__",
    "eigenvalues", "factorize", "factorize_output_gram", "get_num_threads", "input_factor",
    "lowrank_apply", "output_spectrum", "set_num_threads", "top_eigenpairs",
]
