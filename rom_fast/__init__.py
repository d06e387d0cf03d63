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

from rom_fast import evaluate   # rom_fast.evaluate.wikitext2_perplexity / .zero_shot
from rom_fast.api import CompressionResult, PlanResult, compress, plan
from rom_fast.pipeline import DEFAULT_ANCHOR
from rom_fast.io.checkpoint import register_all as _register_all
from rom_fast.io.safetensors_index import CheckpointError
from rom_fast.io.sources import BlockSource, DirectorySource, ModelSource, load, open_source
from rom_fast.lowrank import choose_execution

__version__ = _core.__version__

# Registers the rom_fast_<base> config/model classes with transformers' Auto classes, so that
# AutoModelForCausalLM.from_pretrained(dir) rebuilds factorized checkpoints.
_register_all()

__all__ = [
    "compress", "CompressionResult", "plan", "PlanResult", "CheckpointError", "load", "open_source", "BlockSource", "DirectorySource", "ModelSource",
    "DEFAULT_ANCHOR", "choose_execution", "evaluate", "Factorization", "GramAccumulator", "InputFactor", "LapackError", "__version__",
    "eigenvalues", "factorize", "factorize_output_gram", "get_num_threads", "input_factor",
    "lowrank_apply", "output_spectrum", "set_num_threads", "top_eigenpairs",
]
