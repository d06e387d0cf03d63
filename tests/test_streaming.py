"""One pipeline for every source: a directory streamed block by block gives what the model in
memory gives (plan, factors, summary), survives being killed, and is validated before block 0."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import rom_fast
from rom_fast import plans
from rom_fast.io.sources import DirectorySource, ModelSource

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=160, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(blocks=3, tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**TINY, num_hidden_layers=blocks, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(cfg).eval()


def token_ids(n=20, seq=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def save_dir(model, path, dtype=None):
    (model if dtype is None else copy.deepcopy(model).to(dtype)).save_pretrained(path, max_shard_size="60KB")
    return path


def saved_tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


KW = dict(calibration=token_ids(), n_samples=20, seq_len=24, progress=False, planner_samples=12)


def test_streamed_planner_gives_the_in_memory_plan_and_model(tmp_path):
    model = tiny_model()
    src = save_dir(model, tmp_path / "dense")
    in_memory = rom_fast.compress(copy.deepcopy(model), budget=0.7, **KW)
    streamed = rom_fast.compress(src, budget=0.7, out=tmp_path / "rom", **KW)
    assert in_memory.plan.details["kind"] == streamed.plan.details["kind"] == "planned"
    assert streamed.plan.ranks == in_memory.plan.ranks
    cfg = json.loads((tmp_path / "rom" / "config.json").read_text())
    assert cfg["rom_fast"]["plan"]["details"]["kind"] == "planned"
    assert (tmp_path / "rom" / "rom_fast_spectra.json").is_file()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(ids).logits, in_memory.model(ids).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_summary_counts_what_the_saved_model_holds(tmp_path, tied, merge, streamed):
    model = tiny_model(tied=tied)
    dense_params = plans.total_params(model)
    source = save_dir(model, tmp_path / "dense") if streamed else model   # in memory: compressed in place
    result = rom_fast.compress(source, budget=0.8, out=tmp_path / "rom", merge=merge, **KW)
    s = result.summary
    loaded = rom_fast.load(tmp_path / "rom")
    assert s["params_before"] == dense_params
    assert s["params_after"] == plans.total_params(loaded) == sum(t.numel() for t in saved_tensors(tmp_path / "rom").values())
    assert s["ratio"] == s["params_after"] / s["params_before"]
    if merge:
        assert s["params_after"] == s["params_before"] and s["plan_ratio"] <= 0.8
    else:
        assert 0.75 < s["ratio"] <= 0.8 and s["ratio"] == pytest.approx(s["plan_ratio"])


def test_streamed_without_out_holds_the_result_and_half_precision_models_stay_half(tmp_path):
    model = tiny_model()
    ranks = {f"model.layers.1.{n}": 8 for n in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")}
    reference = rom_fast.compress(copy.deepcopy(model), ranks=ranks, **KW).model
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    # A bfloat16 model object: computed in float32, kept in bfloat16.
    half = rom_fast.compress(copy.deepcopy(model).to(torch.bfloat16), ranks=ranks, **KW).model
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        a, b = half(ids).logits.float(), reference(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


_KILL_CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    import rom_fast
    from rom_fast.io import output
    commit = output.ResumableOutput.commit_block
    def commit_then_die(self, i, *args, **kwargs):
        commit(self, i, *args, **kwargs)
        if i + 1 == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)      # no cleanup, no flush: like the OOM killer
    output.ResumableOutput.commit_block = commit_then_die
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (20, 24), generator=g)
    rom_fast.compress(sys.argv[1], calibration=ids, budget=0.6, out=sys.argv[2], n_samples=20, seq_len=24,
                      planner_samples=12, progress=False)
""")


def test_killed_run_resumes_with_only_the_remaining_blocks_and_identical_tensors(tmp_path, monkeypatch):
    src = save_dir(tiny_model(blocks=4), tmp_path / "dense")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (20, 24), generator=g)
    kw = dict(calibration=ids, budget=0.6, n_samples=20, seq_len=24, planner_samples=12, progress=False)
    whole = rom_fast.compress(src, out=tmp_path / "whole", **kw)
    assert whole.plan.details["kind"] == "planned"

    out = tmp_path / "rom"
    proc = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(src), str(out), "2"], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((tmp_path / ".rom.partial" / "rom_fast_state.json").read_text())
    assert state["blocks_done"] == 2 and not out.exists()

    # A different command on the same output is refused, naming what differs.
    with pytest.raises(ValueError, match="different command.*plan"):
        rom_fast.compress(src, out=out, **dict(kw, budget=0.7))

    loaded = []
    load_block = DirectorySource.load_block
    monkeypatch.setattr(DirectorySource, "load_block", lambda self, i: loaded.append(i) or load_block(self, i))
    resumed = rom_fast.compress(src, out=out, **kw)
    assert loaded == [2, 3]                 # no planner pass, no block redone
    assert resumed.summary["resumed_from_block"] == 2
    assert resumed.plan.ranks == whole.plan.ranks
    a, b = saved_tensors(out), saved_tensors(tmp_path / "whole")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((out / "config.json").read_text())["rom_fast"]["layers"] == \
        json.loads((tmp_path / "whole" / "config.json").read_text())["rom_fast"]["layers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "rom", "whole"]


def test_leftovers_are_reported_and_cleaned(tmp_path, capsys):
    from rom_fast.cli import main
    src = save_dir(tiny_model(), tmp_path / "dense")
    (tmp_path / ".rom.old-123").mkdir()
    (tmp_path / ".rom.old-123" / "x").write_bytes(b"0" * 1000)
    ranks = {"model.layers.0.mlp.up_proj": 8}
    rom_fast.compress(src, ranks=ranks, out=tmp_path / "rom", **{k: v for k, v in KW.items() if k != "planner_samples"})
    assert "leftover" in capsys.readouterr().err
    assert main(["clean", str(tmp_path / "rom")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "rom"]


def test_overwrite_only_replaces_a_model_directory(tmp_path):
    src = save_dir(tiny_model(), tmp_path / "dense")
    kw = {k: v for k, v in KW.items() if k != "planner_samples"}
    ranks = {"model.layers.0.mlp.up_proj": 8}
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    for model in (src, tiny_model()):              # streamed and in memory
        with pytest.raises(FileExistsError, match="not a model directory"):
            rom_fast.compress(model, ranks=ranks, out=home, overwrite=True, **kw)
    assert [p.name for p in home.iterdir()] == ["thesis.tex"]
    with pytest.raises(ValueError, match="is the model being compressed"):
        rom_fast.compress(src, ranks=ranks, out=src, overwrite=True, **kw)
    rom_fast.compress(src, ranks=ranks, out=tmp_path / "rom", **kw)
    (tmp_path / "rom" / "stale.bin").write_bytes(b"x")
    rom_fast.compress(src, ranks=ranks, out=tmp_path / "rom", overwrite=True, **kw)   # a model dir: replaced
    assert not (tmp_path / "rom" / "stale.bin").exists() and (tmp_path / "rom" / "config.json").is_file()


# -- validation before block 0 -----------------------------------------------------------------
def _corrupt(src, how):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard_of_block3 = src / index["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    if how == "truncated":
        data = shard_of_block3.read_bytes()
        shard_of_block3.write_bytes(data[: len(data) - 100])
        return str(shard_of_block3.name), "truncated"
    if how == "missing tensor":
        del index["weight_map"]["model.layers.3.mlp.down_proj.weight"]
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        return "model.layers.3.mlp.down_proj.weight", "lacks tensor"
    if how == "traversal":
        index["weight_map"]["model.layers.3.mlp.down_proj.weight"] = "../outside.safetensors"
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        return "outside", "outside the model directory"
    if how == "wrong shape":
        cfg = json.loads((src / "config.json").read_text())
        cfg["intermediate_size"] = 192
        (src / "config.json").write_text(json.dumps(cfg))
        return "shape", "config.json implies"
    if how == "pickle only":
        for f in src.glob("*.safetensors*"):
            f.unlink()
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
        return "", "no \\*.safetensors"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "missing tensor", "traversal", "wrong shape", "pickle only"])
def test_a_bad_checkpoint_is_refused_before_any_block(tmp_path, monkeypatch, how):
    src = save_dir(tiny_model(blocks=4), tmp_path / "dense")
    named, message = _corrupt(src, how)
    calls = []
    monkeypatch.setattr(DirectorySource, "load_block", lambda self, i: calls.append(i))
    with pytest.raises(ValueError, match=message) as err:
        rom_fast.compress(src, budget=0.8, out=tmp_path / "rom", **KW)
    assert named in str(err.value)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_unsupported_architecture_in_a_directory_is_refused_before_loading(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        rom_fast.compress(tmp_path / "gpt", budget=0.8, **KW)


def test_option_conflicts_are_refused_before_any_work(tmp_path):
    model = tiny_model()
    for bad, match in [(dict(budget=0.8, recipe="paper-80"), "fixes its own budget"),
                       (dict(budget=0.8, ranks={"model.layers.0.mlp.up_proj": 4}), "without budget"),
                       (dict(last_k=2), "needs budget"),
                       (dict(budget=1.5), "budget must be"),
                       (dict(recipe="paper", budget=0.8, last_k=2), "last_k")]:
        with pytest.raises(ValueError, match=match):
            rom_fast.compress(model, **bad, **KW)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        rom_fast.compress(model, budget=0.8, out=tmp_path / "out", **KW)
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("proj"))


def test_generated_calibration_streams_and_matches_in_memory(tmp_path):
    from rom_fast.calibration import generated_tokens

    class WordTokenizer:   # ids 0..2 special, the rest ordinary
        all_special_ids = [0, 1, 2]
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return TINY["vocab_size"]

    model = tiny_model()
    src = save_dir(model, tmp_path / "dense")
    a = generated_tokens(model, WordTokenizer(), n_samples=5, seq_len=9, seed=3, batch_size=2)
    b = generated_tokens(DirectorySource(src), WordTokenizer(), n_samples=5, seq_len=9, seed=3, batch_size=2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.input_ids.shape == (5, 9) and bool((a.input_ids[:, 0] == 1).all())
    assert bool((a.input_ids[:, 1:] >= 3).all())       # never a special token after BOS
    # One step with the KV cache gives what a full forward of the prefix gives.
    with torch.no_grad():
        full = model(a.input_ids[:, :8]).logits[:, -1]
    assert torch.isfinite(full).all()


def test_streaming_safetensors_writer_round_trips_through_the_library(tmp_path):
    from rom_fast.io.safetensors_index import read_header, write_safetensors
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).view(2, 3), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6, generator=g)[:, ::2]}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    write_safetensors(tmp_path / "h.safetensors", tensors, dtype=torch.float16)
    assert set(read_header(tmp_path / "x.safetensors")) == set(tensors)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    with safe_open(str(tmp_path / "h.safetensors"), framework="pt") as f:
        for k, v in tensors.items():
            want = v.to(torch.float16) if v.dtype.is_floating_point else v
            assert f.get_tensor(k).dtype == want.dtype and torch.equal(f.get_tensor(k), want), k
