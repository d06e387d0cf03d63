"""Block-by-block streaming of a Hugging Face safetensors directory.

The model skeleton is built without weights (parameters on the meta device; buffers such as
rotary frequencies are computed for real). Only the input embedding is loaded up front (to
capture the first block's inputs) and it is dropped once they are; block i is read from its
shards just before the loop needs it and, once compressed, its weights are written to the
output and dropped; the final norm and head are copied from disk to the output at the end.
Peak memory is about one block plus the calibration activations, whatever the depth and
vocabulary of the model. Tensors are written back in the checkpoint's own precision (a
bfloat16 model gives bfloat16 factors); the arithmetic is float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM


class SafetensorsIndex:
    """Where each tensor of a (sharded or single-file) safetensors checkpoint lives."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files: Dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{self.directory} holds no *.safetensors weights")
            self.files = {}
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    for key in f.keys():
                        self.files[key] = shard.name

    def keys_with_prefix(self, prefix: str) -> List[str]:
        return [k for k in self.files if k.startswith(prefix)]

    def load(self, keys: List[str], dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """The named tensors, cast to ``dtype`` (``None``: as stored)."""
        by_file: Dict[str, List[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with safe_open(self.directory / name, framework="pt") as f:
                for k in ks:
                    t = f.get_tensor(k)
                    out[k] = t if dtype is None else t.to(dtype)
        return out


def _materialize(module: nn.Module, prefix: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Replaces meta parameters of ``module`` (named ``prefix``...) by the loaded tensors."""
    state = {k[len(prefix):]: v for k, v in tensors.items()}
    missing = [n for n, _ in module.named_parameters() if n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {prefix}{missing[0]} (and {len(missing) - 1} more)")
    module.load_state_dict(state, strict=False, assign=True)


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc keeps them otherwise, and the heap of a long
    streamed run then grows block after block through fragmentation). No-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _storage_dtype(tensors: Dict[str, torch.Tensor]) -> torch.dtype:
    """The precision most of a block's weights are stored in (its largest tensor's)."""
    return max(tensors.values(), key=lambda t: t.numel()).dtype


class StreamedModel:
    """A model whose blocks live on disk until asked for."""

    def __init__(self, directory, dtype: torch.dtype = torch.float32):
        self.directory = Path(directory)
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(self.directory, local_files_only=True)
        self.index = SafetensorsIndex(self.directory)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        self.n_blocks = len(self.model.model.layers)
        self._block_dtypes: Dict[int, torch.dtype] = {}
        self._check_outer()
        embed = self.model.get_input_embeddings()
        prefix = next(n for n, m in self.model.named_modules() if m is embed) + "."
        _materialize(embed, prefix, self.index.load(self.index.keys_with_prefix(prefix), dtype))

    def _tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def _outer_keys(self) -> List[str]:
        """Checkpoint tensors outside the blocks (a tied head is stored once, as the embedding)."""
        return [k for k in self.index.files if not k.startswith("model.layers.")
                and not (self._tied() and k == "lm_head.weight")]

    def _check_outer(self) -> None:
        stored = set(self.index.files)
        for n, _ in self.model.named_parameters():
            if n.startswith("model.layers.") or (self._tied() and n == "lm_head.weight"):
                continue
            if n not in stored:
                raise ValueError(f"checkpoint lacks {n}")

    def release_embedding(self) -> None:
        """Frees the input embedding: call once the first block's inputs are captured."""
        self.model.get_input_embeddings().to_empty(device="meta")

    def block_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def load_block(self, i: int) -> None:
        prefix = self.block_prefix(i)
        raw = self.index.load(self.index.keys_with_prefix(prefix))
        self._block_dtypes[i] = _storage_dtype(raw)
        # Cast one tensor at a time, dropping each stored copy as it goes.
        state = {k: raw.pop(k).to(self.dtype) for k in list(raw)}
        _materialize(self.model.model.layers[i], prefix, state)

    def release_block(self, i: int) -> Dict[str, torch.Tensor]:
        """Returns block i's (possibly compressed) tensors in the checkpoint's precision and
        frees its memory."""
        block = self.model.model.layers[i]
        prefix = self.block_prefix(i)
        dtype = self._block_dtypes.pop(i)
        state = {prefix + k: v.detach().to(dtype).contiguous() for k, v in block.state_dict().items()}
        block.to_empty(device="meta")
        release_freed_memory()
        return state

    def outer_state(self) -> Dict[str, torch.Tensor]:
        """Embeddings, final norm and head, straight from disk."""
        return self.index.load(self._outer_keys())

    def raw_block(self, i: int) -> Dict[str, torch.Tensor]:
        """Block i's tensors straight from disk (blocks the plan leaves dense)."""
        return self.index.load(self.index.keys_with_prefix(self.block_prefix(i)))


class ShardWriter:
    """Writes tensors to numbered safetensors shards as they come, plus the index."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 << 30):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: Dict[str, str] = {}
        self.n_shards = 0
        self.total_bytes = 0

    def add(self, tensors: Dict[str, torch.Tensor], flush: bool = False) -> None:
        """Queues tensors for the current shard; ``flush=True`` writes it now (a finished
        block goes to disk at once, so memory does not grow with the number of blocks)."""
        for k, v in tensors.items():
            self.pending[k] = v
            self.pending_bytes += v.numel() * v.element_size()
        if flush or self.pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.n_shards += 1
        name = f"model-{self.n_shards:05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        for k in self.pending:
            self.weight_map[k] = name
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
