"""Phi-3's fused projections: qkv_proj and gate_up_proj are each one input stage, and an MLP
keeping k neurons keeps 2k rows of gate_up_proj (rows j and intermediate + j), which the
checkpoint validation and the parameter count know; Phi-4-mini's partial rotary embeddings
(tests/test_families.py has the guarantees every family gets)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rom_fast
from rom_fast import plans
from rom_fast.io.checkpoint import check_config
from rom_fast.io.safetensors_index import CheckpointError

from families import CASES, TINY, tiny_model
from reference_rom import reference_compress
from test_families import calibration, every_linear, probe, save_dir

KEEP = 40
MLP = "model.layers.1.mlp"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny Phi-3 whose block 1 MLP keeps 40 of its 112 neurons, saved."""
    out = tmp_path_factory.mktemp("phi3") / "rom"
    result = rom_fast.compress(tiny_model("phi3"), calibration=calibration(),
                               ranks={"ranks": {}, "neurons": {MLP: KEEP}}, out=out, progress=False)
    return result, out


def test_a_pruned_fused_gate_up_keeps_both_halves_and_the_plan_counts_them(pruned):
    result, out = pruned
    mlp = result.model.get_submodule(MLP)
    assert tuple(mlp.gate_up_proj.weight.shape) == (2 * KEEP, TINY["hidden_size"])
    assert tuple(mlp.down_proj.weight.shape) == (TINY["hidden_size"], KEEP)
    # The planner's count of a kept neuron (gate row, up row, down column) is the model's.
    assert result.plan.details["kept_params"] == result.summary["params_after"] == plans.total_params(result.model)
    spec = json.loads((out / "config.json").read_text())["rom_fast"]["layers"][f"{MLP}.gate_up_proj"]
    assert (spec["out_features"], spec["in_features"]) == (2 * KEEP, TINY["hidden_size"])


def test_a_pruned_gate_up_with_one_row_per_neuron_is_refused(pruned):
    _, out = pruned
    cfg = json.loads((out / "config.json").read_text())
    check_config(cfg, "config.json")                  # as saved: 2k rows
    cfg["rom_fast"]["layers"][f"{MLP}.gate_up_proj"]["out_features"] = KEEP
    with pytest.raises(CheckpointError, match=rf"gate_up_proj.*is {KEEP} x .*needs {2 * KEEP} x"):
        check_config(cfg, "config.json")


def test_a_directory_whose_gate_up_is_not_twice_the_intermediate_size_is_refused(tmp_path):
    src = save_dir(tiny_model("phi3"), tmp_path / "dense")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] //= 2          # the stored gate_up_proj holds 2 x 112 rows
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError,
                       match=r"gate_up_proj.weight' has shape \[224, 48\], config.json implies \[112, 48\]"):
        rom_fast.open_source(src)


def test_phi4_mini_partial_rotary_matches_the_float64_reference(tmp_path):
    """Phi-4-mini: the Phi-3 class with rotary embeddings on 3/4 of each head (12 of 16 dims),
    3 query heads per key/value head and a tied head."""
    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75)
    model = tiny_model("phi3", num_attention_heads=3, num_key_value_heads=1, rope_parameters=rope,
                       tie_word_embeddings=True)
    assert model.model.rotary_emb.inv_freq.numel() == 6
    calib, ranks = calibration(), every_linear(CASES["phi3"])
    ref, _ = reference_compress(copy.deepcopy(model), calib["input_ids"], calib["attention_mask"], ranks,
                                stages=CASES["phi3"].stages)
    result = rom_fast.compress(copy.deepcopy(model), calibration=calib, ranks=ranks, out=tmp_path / "rom",
                               progress=False)
    with torch.no_grad():
        a, b = result.model(probe()).logits.double(), ref(probe()).logits.double()
        loaded = rom_fast.load(tmp_path / "rom")(probe()).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    torch.testing.assert_close(loaded, result.model(probe()).logits, atol=0, rtol=0)
