"""``rom_fast.plan()`` plans without compressing: the plan compress makes with the same
arguments (it is the same run object, stopped after its plan), for a model in memory and a
streamed directory, and what ``rom-fast plan --json`` writes."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

import rom_fast

sys.path.insert(0, os.path.dirname(__file__))
from test_streaming import KW, save_dir, tiny_model  # noqa: E402

PLAN_KW = KW       # token ids, 20 sequences, the planner on 12 of them


def same_plan(a, b):
    assert a.ranks == b.ranks and a.neurons == b.neurons
    assert a.description == b.description and a.details == b.details


def test_plan_of_a_model_in_memory_is_compress_s_plan():
    planned = rom_fast.plan(tiny_model(), budget=0.6, **PLAN_KW)
    assert isinstance(planned, rom_fast.PlanResult)
    assert planned.plan.details["kind"] == "planned" and (planned.plan.ranks or planned.plan.neurons)
    assert set(planned.spectra) == set(planned.shape.shapes)      # every compressible layer's spectrum
    same_plan(planned.plan, rom_fast.compress(tiny_model(), budget=0.6, **PLAN_KW).plan)


def test_plan_of_a_streamed_directory_is_compress_s_plan(tmp_path):
    src = save_dir(tiny_model(), tmp_path / "dense")
    planned = rom_fast.plan(src, budget=0.6, mlp_structure="lowrank", **PLAN_KW)
    result = rom_fast.compress(src, budget=0.6, mlp_structure="lowrank", out=tmp_path / "rom", **PLAN_KW)
    same_plan(planned.plan, result.plan)
    config = json.loads((tmp_path / "rom" / "config.json").read_text())
    assert config["rom_fast"]["plan"]["ranks"] == planned.plan.ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "rom"]      # plan() wrote nothing


def test_plan_without_the_planner_has_no_spectra_and_reads_no_calibration(monkeypatch):
    monkeypatch.setattr("rom_fast.api.calibration_tokens", lambda *a, **k: pytest.fail("calibration read"))
    planned = rom_fast.plan(tiny_model(), recipe="paper-50", progress=False)
    assert planned.spectra is None and planned.plan.details["kind"] != "planned"
    same_plan(planned.plan, rom_fast.plans.paper_recipe(planned.shape, "paper-50"))


def test_plan_refuses_what_compress_refuses():
    with pytest.raises(ValueError, match="ranks= fixes every layer's rank"):
        rom_fast.plan(tiny_model(), budget=0.5, ranks={}, progress=False)
    with pytest.raises(ValueError, match="budget must be a fraction"):
        rom_fast.plan(tiny_model(), budget=1.5, progress=False)
    with pytest.raises(ValueError, match="is below what rank 1 in every layer keeps"):
        rom_fast.plan(tiny_model(), budget=0.01, **PLAN_KW)


def _word_tokenizer_dir(path):
    """A word-level tokenizer (no downloads) beside the tiny model, and text in its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(150)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    rng = random.Random(0)
    text = path.parent / "calib.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(200)),
                    encoding="utf-8")
    return text


def test_cli_plan_json_is_the_plan_compress_uses(tmp_path, capsys):
    from rom_fast.cli import main

    src = save_dir(tiny_model(), tmp_path / "dense")
    text = _word_tokenizer_dir(src)
    args = ["--calibration", str(text), "--n-samples", "16", "--seq-len", "24", "--budget", "0.6"]
    assert main(["plan", str(src), "--json", str(tmp_path / "plan.json"), *args]) == 0
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "plan.json").read_text())
    result = rom_fast.compress(src, calibration=str(text), n_samples=16, seq_len=24, budget=0.6,
                               planner_samples=16, progress=False)
    assert written["ranks"] == result.plan.ranks and written["neurons"] == result.plan.neurons
    assert written["details"]["kind"] == "planned" and written["description"] == result.plan.description
    assert printed.startswith(f"{result.plan.description}: {result.plan.details['kept_params']:,} of ")
    for name in result.plan.details["retained_energy"]:
        assert name in printed
