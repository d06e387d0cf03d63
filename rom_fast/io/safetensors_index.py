"""A safetensors checkpoint read as untrusted input: every shard header parsed and checked
before any tensor is loaded.

A shard is ``u64 header length | JSON header | data``; the header gives each tensor's dtype,
shape and byte range. We check, for every shard the checkpoint uses: the file name stays inside
the model directory (no ``..``, absolute paths or symlinks out of it), the header length is
sane and fits the file, each tensor's byte range matches its dtype and shape and lies inside the
file (a truncated shard fails here, before block 0, not after hours of work). Loading itself is
``safetensors.safe_open`` (no pickle anywhere).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20     # the safetensors library's own limit
MAX_INDEX_BYTES = 64 << 20

DTYPES: Dict[str, Tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I64": (8, torch.int64), "I32": (4, torch.int32),
    "I16": (2, torch.int16), "I8": (1, torch.int8), "U8": (1, torch.uint8), "BOOL": (1, torch.bool),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str                  # safetensors name, e.g. "BF16"
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]


_NAMES = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}


def write_safetensors(path, tensors: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes a safetensors file one tensor at a time, each cast to ``dtype`` (None: as is)
    just before it is written: no second copy of the whole file in memory, as
    ``safetensors.torch.save_file`` makes (0.5 GB for a 7B model's hidden states)."""
    header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in tensors.items():
        out_dtype = t.dtype if dtype is None or not t.dtype.is_floating_point else dtype
        if out_dtype not in _NAMES:
            raise TypeError(f"{name}: cannot store {out_dtype} in safetensors")
        size = t.numel() * torch.empty(0, dtype=out_dtype).element_size()
        header[name] = {"dtype": _NAMES[out_dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)            # data aligned to 8 bytes, as the library does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors.items():
            t = t.detach()
            if dtype is not None and t.dtype.is_floating_point:
                t = t.to(dtype)
            t = t.contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as it is (the message names the file)."""


def confined(directory: Path, name) -> Path:
    """``directory / name`` if that names a file inside ``directory`` (symlinks resolved)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{directory}: shard name {name!r} points outside the model directory")
    path = directory / name
    root = directory.resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise CheckpointError(f"{path}: resolves outside the model directory ({real})")
    return path


def read_header(path: Path) -> Dict[str, TensorInfo]:
    """The checked header of one shard: ``{tensor name: TensorInfo}``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file or truncated "
                                      f"(header of {n} bytes in a file of {size})")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):   # RecursionError: [[[[...
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    data_bytes = size - 8 - n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
            ok = dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in shape) \
                and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}")
        info = TensorInfo(path.name, dtype, shape)
        if end - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} holds {end - begin} bytes, its dtype and "
                                  f"shape {list(shape)} need {info.nbytes}")
        if end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {8 + n + end} of a "
                                  f"{size}-byte file")
        out[name] = info
    return out


class SafetensorsIndex:
    """Where each tensor of a (sharded or single-file) safetensors checkpoint lives, with every
    shard's header checked."""

    def __init__(self, directory):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            if index.stat().st_size > MAX_INDEX_BYTES:
                raise CheckpointError(f"{index}: {index.stat().st_size} bytes is not an index file")
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: 'weight_map' is not an object")
            files = sorted(set(weight_map.values()), key=str)
        else:
            weight_map = None
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory} holds no *.safetensors weights "
                                      "(pickled .bin checkpoints are not loaded)")
        self.tensors: Dict[str, TensorInfo] = {}
        for name in files:
            path = confined(self.directory, name)
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (named by {INDEX_FILE})")
            for key, info in read_header(path).items():
                if weight_map is None or weight_map.get(key) == name:
                    self.tensors[key] = info
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self.tensors]
            if missing:
                raise CheckpointError(f"{self.directory / weight_map[missing[0]]}: lacks tensor "
                                      f"{missing[0]!r} that {INDEX_FILE} puts there")

    def keys_with_prefix(self, prefix: str) -> List[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def files(self) -> List[Path]:
        return sorted({self.directory / t.file for t in self.tensors.values()})

    def load(self, keys: List[str], dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """The named tensors, cast to ``dtype`` one at a time (``None``: as stored)."""
        by_file: Dict[str, List[str]] = {}
        for k in keys:
            by_file.setdefault(self.tensors[k].file, []).append(k)
        out = {}
        for name, ks in by_file.items():
            with safe_open(str(self.directory / name), framework="pt") as f:
                for k in ks:
                    t = f.get_tensor(k)
                    out[k] = t if dtype is None else t.to(dtype)
        return out
