"""Checkpoints as untrusted input, one test per attack: absurd sizes in config.json, a
compressed checkpoint whose plan does not fit its layers, shards that escape the directory
through a symlink, and no code path that unpickles or runs remote code. Each is refused with
a CheckpointError (a ValueError) naming the file, before any module is built."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import rom_fast
from rom_fast import lowrank
from rom_fast.io.safetensors_index import CheckpointError

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=2, tie_word_embeddings=True)
RANKS = {"model.layers.0.mlp.up_proj": 6, "model.layers.1.self_attn.q_proj": 5}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).eval()
    model.save_pretrained(root / "dense")
    g = torch.Generator().manual_seed(1)
    calib = {"input_ids": torch.randint(0, TINY["vocab_size"], (8, 16), generator=g),
             "attention_mask": torch.ones(8, 16, dtype=torch.long)}
    rom_fast.compress(model, calibration=calib, ranks=RANKS, out=root / "rom", progress=False)
    return root


def _edit_config(d: Path, edit) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture
def no_building(monkeypatch):
    """Records every model skeleton and LowRankLinear built (there must be none)."""
    built = []
    from_config = AutoModelForCausalLM.from_config
    monkeypatch.setattr(AutoModelForCausalLM, "from_config",
                        lambda *a, **k: built.append("model") or from_config(*a, **k))
    init = lowrank.LowRankLinear.__init__
    monkeypatch.setattr(lowrank.LowRankLinear, "__init__",
                        lambda self, *a, **k: built.append("lowrank") or init(self, *a, **k))
    return built


SIZES = [("hidden_size", 10 ** 12), ("hidden_size", "32"), ("hidden_size", 0), ("intermediate_size", -1),
         ("num_hidden_layers", 10 ** 9), ("vocab_size", 2 ** 40), ("num_attention_heads", True),
         ("head_dim", 2 ** 31), ("max_position_embeddings", 10 ** 15), ("num_key_value_heads", 3)]


@pytest.mark.parametrize("key,value", SIZES, ids=[f"{k}={v!r}" for k, v in SIZES])
def test_absurd_config_sizes_are_refused_before_building(dirs, tmp_path, no_building, key, value):
    d = _edit_config(_copy(dirs / "dense", tmp_path / "m"), lambda c: c.__setitem__(key, value))
    for call in (lambda: rom_fast.compress(d, budget=0.8, progress=False), lambda: rom_fast.load(d),
                 lambda: rom_fast.open_source(d)):
        with pytest.raises(CheckpointError, match=re.escape(key)) as err:
            call()
        assert str(d / "config.json") in str(err.value) and "\n" not in str(err.value)
    assert no_building == []


def _layers(edit):
    return lambda c: edit(c["rom_fast"]["layers"])


PLANS = {
    "rank larger than the layer": (_layers(lambda l: l["model.layers.0.mlp.up_proj"].__setitem__("rank", 33)),
                                   "rank 33"),
    "rank zero": (_layers(lambda l: l["model.layers.0.mlp.up_proj"].__setitem__("rank", 0)), "rank 0"),
    "rank not an integer": (_layers(lambda l: l["model.layers.0.mlp.up_proj"].__setitem__("rank", "6")), "rank '6'"),
    "block the model lacks": (_layers(lambda l: l.__setitem__("model.layers.7.mlp.up_proj", {"rank": 2})),
                              "model.layers.7"),
    "not a linear layer": (_layers(lambda l: l.__setitem__("model.layers.0.input_layernorm", {"rank": 2})),
                           "input_layernorm"),
    "outside the blocks": (_layers(lambda l: l.__setitem__("lm_head", {"rank": 2})), "lm_head"),
    "bias flag not a bool": (_layers(lambda l: l["model.layers.0.mlp.up_proj"].__setitem__("reduce_bias", "yes")),
                             "reduce_bias"),
    "layers not an object": (lambda c: c["rom_fast"].__setitem__("layers", [1, 2]), "layers"),
}


@pytest.mark.parametrize("how", list(PLANS))
def test_a_compressed_plan_that_does_not_fit_is_refused_before_building(dirs, tmp_path, no_building, how):
    edit, fragment = PLANS[how]
    d = _edit_config(_copy(dirs / "rom", tmp_path / "m"), edit)
    with pytest.raises(CheckpointError, match=re.escape(fragment)) as err:
        rom_fast.load(d)
    assert str(d / "config.json") in str(err.value)
    assert no_building == []
    # Through transformers (import rom_fast registered the class): refused in the model's
    # __init__, before its first module.
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        AutoModelForCausalLM.from_pretrained(d)
    assert "lowrank" not in no_building


def test_a_plan_whose_rank_disagrees_with_the_stored_factors_is_refused(dirs, tmp_path):
    d = _edit_config(_copy(dirs / "rom", tmp_path / "m"),
                     _layers(lambda l: l["model.layers.0.mlp.up_proj"].__setitem__("rank", 4)))
    with pytest.raises(CheckpointError, match="mlp.up_proj.reduce.weight.*shape"):
        rom_fast.load(d)


def test_the_intact_compressed_checkpoint_loads_both_ways(dirs):
    a = rom_fast.load(dirs / "rom")
    b = AutoModelForCausalLM.from_pretrained(dirs / "rom")
    assert {n: m.rank for n, m in a.named_modules() if isinstance(m, lowrank.LowRankLinear)} == RANKS
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_a_shard_symlinked_out_of_the_directory_is_refused(dirs, tmp_path):
    outside = _copy(dirs / "dense", tmp_path / "elsewhere")
    d = _copy(dirs / "dense", tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(outside / "model.safetensors")
    for call in (lambda: rom_fast.open_source(d), lambda: rom_fast.load(d)):
        with pytest.raises(CheckpointError, match="resolves outside the model directory"):
            call()
    # Links that stay inside (a shard linked into a subfolder, the directory itself linked) are fine.
    inside = _copy(dirs / "dense", tmp_path / "inside")
    (inside / "sub").mkdir()
    os.rename(inside / "model.safetensors", inside / "sub" / "real.safetensors")
    (inside / "model.safetensors").symlink_to(Path("sub") / "real.safetensors")
    (tmp_path / "link").symlink_to(inside, target_is_directory=True)
    assert rom_fast.open_source(tmp_path / "link").n_blocks == TINY["num_hidden_layers"]


def test_nothing_unpickles_or_runs_remote_code():
    """The package never calls a pickle-based loader nor asks for remote code (pickle.dumps,
    used to size collectives between cooperating processes, reads nothing)."""
    root = Path(rom_fast.__file__).parent
    bad = re.compile(r"torch\.load\(|pickle\.loads?\(|Unpickler|trust_remote_code\s*=\s*True|"
                     r"weights_only\s*=\s*False|use_safetensors\s*=\s*False|allow_pickle\s*=\s*True")
    hits = [f"{p.name}:{i}" for p in root.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert hits == []


def test_the_error_type_is_public_and_a_value_error():
    assert rom_fast.CheckpointError is CheckpointError and issubclass(CheckpointError, ValueError)
    assert issubclass(rom_fast.LapackError, RuntimeError)
