"""Block-by-block streaming of a Hugging Face safetensors directory.

The model skeleton is built without weights (parameters on the meta device; buffers such as
rotary frequencies are computed for real). Embeddings, final norm and head are loaded up front;
block i is read from its shards just before the loop needs it and, once compressed, its weights
are written to the output and dropped. Peak memory is about one block plus the calibration
activations, whatever the depth of the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

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

    def load(self, keys: List[str], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        by_file: Dict[str, List[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with safe_open(self.directory / name, framework="pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k).to(dtype)
        return out


def _materialize(module: nn.Module, prefix: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Replaces meta parameters of ``module`` (named ``prefix``...) by the loaded tensors."""
    state = {k[len(prefix):]: v for k, v in tensors.items()}
    missing = [n for n, _ in module.named_parameters() if n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {prefix}{missing[0]} (and {len(missing) - 1} more)")
    module.load_state_dict(state, strict=False, assign=True)


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
        outer = [k for k in self.index.files if not k.startswith("model.layers.")]
        _materialize_outer(self.model, self.index.load(outer, dtype))

    def block_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def load_block(self, i: int) -> None:
        prefix = self.block_prefix(i)
        _materialize(self.model.model.layers[i], prefix,
                     self.index.load(self.index.keys_with_prefix(prefix), self.dtype))

    def release_block(self, i: int) -> Dict[str, torch.Tensor]:
        """Returns block i's (possibly compressed) tensors and frees its memory."""
        block = self.model.model.layers[i]
        prefix = self.block_prefix(i)
        state = {prefix + k: v.detach().contiguous() for k, v in block.state_dict().items()}
        block.to_empty(device="meta")
        return state

    def outer_state(self) -> Dict[str, torch.Tensor]:
        """Embeddings, final norm and head (a tied head is stored once, as the embedding)."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        return {k: v.detach().contiguous() for k, v in self.model.state_dict().items()
                if not k.startswith("model.layers.") and not (tied and k == "lm_head.weight")}

    def raw_block(self, i: int) -> Dict[str, torch.Tensor]:
        """Block i's tensors straight from disk (blocks the plan leaves dense)."""
        prefix = self.block_prefix(i)
        return self.index.load(self.index.keys_with_prefix(prefix), self.dtype)


def _materialize_outer(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith("model.layers.")]
    if meta:
        raise ValueError(f"checkpoint lacks {meta[0]}")


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

    def add(self, tensors: Dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.pending[k] = v
            self.pending_bytes += v.numel() * v.element_size()
        if self.pending_bytes >= self.max_shard_bytes:
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
