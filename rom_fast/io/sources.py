"""Block sources: one interface for a model held in memory and a model streamed from disk.

The compression loop, the rank planner, evaluation and data-free calibration all run the model
block by block through a :class:`BlockSource`: ``load_block(i)`` gives block i with float32
weights, ``release_block(i)`` drops what loading cost, ``embedding()`` and ``head()`` bring the
outer modules in for as long as they are needed (``head()`` gives a :class:`~rom_fast.head.Head`,
which computes in float32). For a model in memory these are (almost) free; for a Hugging Face
safetensors directory only one block is in memory at a time, so the same code handles a 135M
model and a 70B one. The embedding and a big head (:func:`~rom_fast.head.chunked_head`) of a
directory stay in their storage precision: a 256k vocabulary is 3.7 GB in float32.

A directory is read as untrusted input: its config must name a supported architecture, every
shard header is parsed and checked (:mod:`rom_fast.io.safetensors_index`), and every tensor the
config implies must be there with the right shape and a floating dtype, all before the first
block is loaded. Nothing is unpickled and no remote code runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from rom_fast.adapters import ModelAdapter, adapter_for
from rom_fast.head import Head, chunked_head
from rom_fast.io import units
from rom_fast.io.checkpoint import read_config
from rom_fast.io.models import TOKENIZER_FILES, load_model
from rom_fast.io.safetensors_index import FLOAT_DTYPES, CheckpointError, SafetensorsIndex
from rom_fast.util import release_freed_memory, total_params

COMPUTE_DTYPE = units.COMPUTE_DTYPE      # arithmetic precision of every block (weights widened on load)


def _materialize(module: nn.Module, prefix: str, tensors: Dict[str, torch.Tensor], parked=()) -> None:
    """Puts loaded tensors (named ``prefix``...) into ``module``'s parameters and buffers (the
    parameters under the ``parked`` relative module prefixes excepted: loaded when needed)."""
    state = {k[len(prefix):]: v for k, v in tensors.items()}
    missing = [n for n, _ in module.named_parameters() if n not in state and not n.startswith(tuple(parked))]
    if missing:
        raise CheckpointError(f"checkpoint lacks {prefix}{missing[0]} (and {len(missing) - 1} more)")
    module.load_state_dict(state, strict=False, assign=True)


def _unload(module: nn.Module) -> None:
    """Back to the skeleton: parameters on the meta device. Buffers stay as the skeleton built
    them: checkpoints do not hold the non-persistent ones (Gemma's embedding scale, rotary
    frequencies), so one that went to the meta device would never be real again."""
    buffers = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    module.to_empty(device="meta")
    for m, name, b in buffers:
        m._buffers[name] = b


def block_state(block: nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    """Block tensors named as in a checkpoint (detached views, no copy)."""
    return {prefix + k: v.detach() for k, v in block.state_dict().items()}


class BlockSource:
    """A causal LM whose decoder blocks are brought into memory one at a time."""

    model: nn.Module            # the model object; a streamed one holds weights only while loaded
    adapter: ModelAdapter
    tokenizer = None
    name: str                   # what the model card calls the source
    streamed: bool
    storage_dtype: torch.dtype  # the precision tensors are written back in
    param_count: int            # parameters of the whole model (a tied head counted once)

    @property
    def n_blocks(self) -> int:
        return self.adapter.n_blocks

    @property
    def config(self):
        return self.model.config

    def load_block(self, i: int) -> nn.Module:
        raise NotImplementedError

    def release_block(self, i: int) -> None:
        raise NotImplementedError

    def block_tensors(self, i: int) -> Dict[str, torch.Tensor]:
        """Block i as it is now (compressed or not), uncopied: write it in :meth:`block_dtype`."""
        return block_state(self.adapter.blocks()[i], self.adapter.block_prefix(i))

    def block_dtype(self, i: int) -> torch.dtype:
        """The precision block i is written back in (the source's own)."""
        return self.storage_dtype

    def original_block_tensors(self, i: int) -> Dict[str, torch.Tensor]:
        """Block i as the source holds it (for blocks a plan leaves dense)."""
        raise NotImplementedError

    def outer_tensors(self) -> Dict[str, torch.Tensor]:
        """Everything outside the blocks (embedding, final norm, an untied head)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def embedding(self) -> Iterator[nn.Module]:
        yield self.adapter.embedding()

    @contextlib.contextmanager
    def head(self) -> Iterator[Head]:
        yield Head(self.adapter, chunked_head(self.adapter.head()))

    def fingerprint(self) -> str:
        """Identifies the source's weights (for refusing to resume on a different model)."""
        raise NotImplementedError

    def finished_model(self) -> nn.Module:
        """The whole model in memory (compressed blocks included): for callers without ``out``."""
        return self.model


class ModelSource(BlockSource):
    """A model object held in memory. A half-precision model's block is widened to float32
    while it is worked on and narrowed back when released."""

    streamed = False

    def __init__(self, model: nn.Module, tokenizer=None, name: Optional[str] = None):
        self.model = model.eval()
        self.adapter = adapter_for(model)
        self.tokenizer = tokenizer
        self.name = name or type(model).__name__
        first = next(model.parameters())
        if any(p.device.type == "meta" for p in model.parameters()):
            raise ValueError(f"{self.name} has weights on the meta device (never loaded): pass a loaded "
                             "model, or its directory to stream it")
        self.storage_dtype = first.dtype
        if not self.storage_dtype.is_floating_point:
            raise TypeError(f"{self.name}: weights are {self.storage_dtype}, expected floating point")
        self.param_count = total_params(model)

    def load_block(self, i: int) -> nn.Module:
        block = self.adapter.blocks()[i]
        if self.storage_dtype != COMPUTE_DTYPE:
            block.to(COMPUTE_DTYPE)
        return block

    def release_block(self, i: int) -> None:
        if self.storage_dtype != COMPUTE_DTYPE:
            self.adapter.blocks()[i].to(self.storage_dtype)

    def original_block_tensors(self, i: int) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.storage_dtype) for k, v in self.block_tensors(i).items()}

    def outer_tensors(self) -> Dict[str, torch.Tensor]:
        a = self.adapter
        out = {}
        for k, v in self.model.state_dict().items():
            if a.block_index(k) is None and not (a.tied() and k.startswith(a.head_path + ".")):
                out[k] = v.detach().to(self.storage_dtype).contiguous()
        return out

    @contextlib.contextmanager
    def head(self) -> Iterator[Head]:
        """The final norm widened to float32 while in use, and the head too unless it is big
        (then computed by chunks from its own precision)."""
        a = self.adapter
        chunked = chunked_head(a.head())
        if self.storage_dtype == COMPUTE_DTYPE:
            yield Head(a, chunked)
            return
        modules = [a.final_norm()] + ([] if chunked else [a.head()])
        for m in modules:
            m.to(COMPUTE_DTYPE)
        try:
            yield Head(a, chunked)
        finally:
            for m in modules:
                m.to(self.storage_dtype)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, p in self.model.state_dict().items():
            h.update(name.encode())
            t = p.detach().contiguous()
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


class DirectorySource(BlockSource):
    """A Hugging Face safetensors directory, streamed: the model skeleton is built without
    weights (parameters on the meta device; buffers such as rotary frequencies are real) and
    each block is read from its shards when asked for."""

    streamed = True

    def __init__(self, directory, tokenizer=None, read_tokenizer: bool = True):
        self.directory = Path(directory)
        self.name = str(directory)
        config = read_config(self.directory)
        self.index = SafetensorsIndex(self.directory)
        self.model = _skeleton(config)
        self.adapter = adapter_for(self.model)
        self.param_count = self._check_tensors()
        self.storage_dtype = self._storage_dtype()
        self.tokenizer = tokenizer if tokenizer is not None or not read_tokenizer \
            else _directory_tokenizer(self.directory)
        self._block_dtypes: Dict[int, torch.dtype] = {}
        self._loaded: set = set()
        self._parked: Dict[int, Dict[str, list]] = {}     # {block: {routed unit module: hook handles}}

    # -- validation -------------------------------------------------------------------------
    def _expected(self) -> Dict[str, tuple]:
        """Every tensor the skeleton implies, with its shape (a tied head is stored once)."""
        a = self.adapter
        return {n: tuple(p.shape) for n, p in self.model.named_parameters(remove_duplicate=False)
                if not (a.tied() and n.startswith(a.head_path + "."))}

    def _check_tensors(self) -> int:
        """Every tensor the skeleton implies is stored (under the family's stored name), with
        its shape and a floating dtype; returns the parameter count."""
        stored = self.index.tensors
        count = 0
        self._model_names: Dict[str, str] = {}      # {stored name: the model's name}, where they differ
        for model_name, shape in self._expected().items():
            name = self.adapter.stored_name(model_name)
            if name != model_name:
                self._model_names[name] = model_name
            info = stored.get(name)
            if info is None:
                raise CheckpointError(f"{self.directory}: the checkpoint lacks tensor {name!r} "
                                      "that its config.json implies")
            if info.shape != shape:
                raise CheckpointError(f"{self.directory / info.file}: tensor {name!r} has shape "
                                      f"{list(info.shape)}, config.json implies {list(shape)}")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{self.directory / info.file}: tensor {name!r} is {info.dtype}, "
                                      "expected a floating dtype (quantized checkpoints are not supported)")
            count += info.numel
        return count

    def _storage_dtype(self) -> torch.dtype:
        """The precision most of the checkpoint is stored in (by bytes)."""
        by_dtype: Dict[torch.dtype, int] = {}
        for info in self.index.tensors.values():
            by_dtype[info.torch_dtype] = by_dtype.get(info.torch_dtype, 0) + info.nbytes
        return max(by_dtype, key=by_dtype.get)

    def stored_bytes(self) -> int:
        return sum(info.nbytes for info in self.index.tensors.values())

    # -- blocks -------------------------------------------------------------------------------
    def load_block(self, i: int) -> nn.Module:
        """Block i in float32, the units of its routed sublayers parked (:mod:`rom_fast.io.units`:
        each read when first needed and kept in the stored dtype)."""
        block = self.adapter.blocks()[i]
        if i in self._loaded:
            return block
        prefix = self.adapter.block_prefix(i)
        unit_modules = [u.module for sub in self.adapter.sublayers for u in sub.units]
        keys = self._stored_keys(prefix)
        unit_keys = {m: self._stored_keys(f"{prefix}{m}.") for m in unit_modules}
        parked = {k for ks in unit_keys.values() for k in ks}
        raw = self._load([k for k in keys if k not in parked])
        self._block_dtypes[i] = max(raw.values(), key=lambda t: t.numel()).dtype
        # Widen one tensor at a time, dropping each stored copy as it goes.
        state = {k: raw.pop(k).to(COMPUTE_DTYPE) for k in list(raw)}
        _materialize(block, prefix, state, parked=[m + "." for m in unit_modules])
        self._parked[i] = {m: units.park(block.get_submodule(m), self._unit_loader(f"{prefix}{m}.", unit_keys[m]))
                           for m in unit_modules}
        self._loaded.add(i)
        return block

    def _stored_keys(self, prefix: str) -> List[str]:
        """The stored names of the tensors whose model names start with ``prefix``."""
        return self.index.keys_with_prefix(self.adapter.stored_name(prefix))

    def _unit_loader(self, prefix: str, keys: List[str]):
        def load() -> Dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in self._load(keys).items()}
        return load

    def release_block(self, i: int) -> None:
        if i in self._loaded:
            block = self.adapter.blocks()[i]
            for module, handles in self._parked.pop(i, {}).items():
                units.unpark(block.get_submodule(module), handles)
            _unload(block)
            self._loaded.discard(i)
            release_freed_memory()

    def block_tensors(self, i: int) -> Dict[str, torch.Tensor]:
        block = self.adapter.blocks()[i]
        for module in self._parked.get(i, {}):      # a unit nothing has needed yet is read now
            units.materialize(block.get_submodule(module))
        return super().block_tensors(i)

    def block_dtype(self, i: int) -> torch.dtype:
        return self._block_dtypes.get(i, self.storage_dtype)

    def original_block_tensors(self, i: int) -> Dict[str, torch.Tensor]:
        return self._load(self.index.keys_with_prefix(self.adapter.block_prefix(i)))

    def _load(self, keys: List[str], dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """The stored tensors ``keys``, by the model's names."""
        return {self._model_names.get(k, k): t for k, t in self.index.load(keys, dtype).items()}

    def _outer_keys(self) -> List[str]:
        a = self.adapter
        return [k for k in self.index.tensors if a.block_index(k) is None
                and not (a.tied() and k.startswith(a.head_path + "."))]

    def outer_tensors(self) -> Dict[str, torch.Tensor]:
        return self._load(self._outer_keys())

    def _load_module(self, path: str, source_path: Optional[str] = None,
                     dtype: Optional[torch.dtype] = COMPUTE_DTYPE) -> nn.Module:
        """The module at ``path`` with its stored tensors (under ``source_path``: a tied head)
        in ``dtype`` (None: as stored, each tensor put in place without a copy)."""
        module = self.model.get_submodule(path)
        prefix = (source_path or path) + "."
        tensors = self._load(self.index.keys_with_prefix(self.adapter.stored_name(prefix)), dtype)
        _materialize(module, prefix, tensors)
        return module

    @contextlib.contextmanager
    def embedding(self) -> Iterator[nn.Module]:
        """The embedding in its storage precision (a row lookup needs no widening), its output
        made what the float32 model's forward expects by the adapter (``embedding_output``)."""
        a = self.adapter
        module = self._load_module(a.embedding_path, dtype=None)

        def widen(m, args, kwargs, output):
            return a.embedding_output(m, args[0] if args else next(iter(kwargs.values())), output)
        handle = module.register_forward_hook(widen, with_kwargs=True)
        try:
            yield module
        finally:
            handle.remove()
            _unload(module)
            release_freed_memory()

    @contextlib.contextmanager
    def head(self) -> Iterator[Head]:
        """The final norm in float32 and the head: in float32, or as stored when it is big."""
        a = self.adapter
        chunked = chunked_head(a.head())
        norm = self._load_module(a.final_norm_path)
        head = self._load_module(a.head_path, a.embedding_path if a.tied() else None,
                                 dtype=None if chunked else COMPUTE_DTYPE)
        try:
            yield Head(a, chunked)
        finally:
            for m in (norm, head):
                _unload(m)
            release_freed_memory()

    def fingerprint(self) -> str:
        h = hashlib.sha256((self.directory / "config.json").read_bytes())
        for path in self.index.files():
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def finished_model(self) -> nn.Module:
        """Loads every block not yet in memory and the outer modules, for good."""
        for i in range(self.n_blocks):
            block = self.load_block(i)
            for module, handles in self._parked.pop(i, {}).items():
                units.settle(block.get_submodule(module), handles)
        a = self.adapter
        self._load_module(a.embedding_path)
        self._load_module(a.final_norm_path)
        if a.tied():
            self.model.tie_weights()
        else:
            self._load_module(a.head_path)
        return self.model


def _skeleton(config) -> nn.Module:
    """The causal LM of ``config`` without weights (parameters on the meta device, buffers
    real), in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=COMPUTE_DTYPE)
    return model.eval()


def _directory_tokenizer(path: Path):
    from transformers import AutoTokenizer
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: its tokenizer files cannot be loaded ({exc})") from None


def open_source(model, tokenizer=None) -> BlockSource:
    """A BlockSource for what ``rom_fast.compress`` accepts: a BlockSource (returned as is), a
    transformers model object (compressed in place), a Hugging Face directory (streamed), a
    ``.gguf`` file or ``"smollm2"`` (loaded into memory, de-quantized to float32)."""
    from transformers import PreTrainedModel
    if isinstance(model, BlockSource):
        if tokenizer is not None:
            model.tokenizer = tokenizer
        return model
    if isinstance(model, PreTrainedModel):
        return ModelSource(model, tokenizer)
    if isinstance(model, (str, os.PathLike)) and Path(model).expanduser().is_dir():
        return DirectorySource(Path(model).expanduser(), tokenizer)
    loaded, tok = load_model(model, tokenizer=tokenizer)
    return ModelSource(loaded, tok, name=str(model))


def load(path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = False):
    """Loads a directory written by :func:`rom_fast.compress` (factorized or merged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    # Config sizes, plan, shard headers and every tensor's shape checked on a weightless
    # skeleton before transformers allocates anything.
    DirectorySource(path, read_tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model
