"""Bounded fuzzing (hypothesis) of what reads untrusted bytes: a shard header either parses into
consistent tensor records or is refused with a CheckpointError naming the file, never another
exception. Runs in the default suite (a few hundred examples each, seeded by hypothesis)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rom_fast.io.safetensors_index import CheckpointError, read_header, write_safetensors

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check(path):
    try:
        infos = read_header(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        return None
    size = path.stat().st_size
    for info in infos.values():           # what parsed is self-consistent
        assert info.nbytes >= 0 and all(d >= 0 for d in info.shape)
    return infos, size


@FUZZ
@given(data=st.binary(max_size=256))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    _check(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "bogus"]) | json_values,
    "shape": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-5, 2**40), min_size=0, max_size=3) | json_values,
})


@FUZZ
@given(header=st.dictionaries(st.text(max_size=12), entries | json_values, max_size=4),
       payload=st.integers(0, 64))
def test_structured_headers(tmp_path, header, payload):
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * payload)
    parsed = _check(path)
    if parsed is not None:
        infos, size = parsed
        assert sum(i.nbytes for i in infos.values()) <= size


@FUZZ
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6))
def test_mutated_real_shards(tmp_path, cut, flips):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)})
    data = bytearray(path.read_bytes())
    for pos, value in flips:
        data[pos % len(data)] = value
    path.write_bytes(bytes(data[: max(0, len(data) - cut % (len(data) + 1))]))
    _check(path)


def test_deeply_nested_header_is_refused(tmp_path):
    raw = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="not JSON"):
        read_header(path)
