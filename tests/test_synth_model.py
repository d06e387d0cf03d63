"""bench/synth_model.py writes a streamable directory of any family's shape from its
transformers config alone (here the real shapes' configs, shrunk to run in a second)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import rom_fast
from rom_fast.io.sources import DirectorySource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from synth_model import SHAPES, shape_config, write_synthetic  # noqa: E402

# Each shape's widths divided by 64 (heads by 8), its vocabulary cut: the same config classes
# and layouts (GQA, head_dim, fused projections).
SHRUNK = {
    "llama3-8b": dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=1,
                      vocab_size=300),
    "qwen3-8b": dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=1,
                     head_dim=32, vocab_size=300),
    "phi3-medium": dict(hidden_size=80, intermediate_size=280, num_attention_heads=5, num_key_value_heads=1,
                        vocab_size=300, pad_token_id=None, eos_token_id=2),
}


def test_every_shape_is_a_supported_family_at_its_real_size():
    sizes = {name: (shape_config(name, 1).hidden_size, shape_config(name, 1).intermediate_size) for name in SHAPES}
    assert sizes == {"llama3-8b": (4096, 14336), "qwen3-8b": (4096, 12288), "phi3-medium": (5120, 17920)}
    assert set(SHRUNK) == set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_a_written_directory_streams_with_every_tensor_in_place(name, tmp_path):
    config = shape_config(name, 2, **SHRUNK[name])
    out = write_synthetic(config, tmp_path / name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3                   # a shard per block, one outside
    source = DirectorySource(out, read_tokenizer=False)                  # every tensor's name and shape checked
    assert source.storage_dtype == torch.bfloat16
    with torch.device("meta"):
        model = type(source.model)(config)
    assert source.param_count == sum(p.numel() for p in model.parameters())
    block = source.load_block(1)
    weights = [p for n, p in block.named_parameters() if p.dim() == 2]
    assert all(0.015 < float(w.detach().std()) < 0.025 for w in weights)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in block.named_parameters() if "norm" in n)
    source.release_block(1)
    # Written once: a complete directory is left as it is.
    stamp = (out / "config.json").stat().st_mtime_ns
    assert write_synthetic(config, out) == out and (out / "config.json").stat().st_mtime_ns == stamp
    assert rom_fast.compress(str(out), calibration=torch.randint(0, 300, (4, 16)),
                             ranks={f"model.layers.0.{n}": 8 for n in source.adapter.mlp.inputs},
                             progress=False).summary["params_after"] < source.param_count
