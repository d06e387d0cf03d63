"""compress(): every adapter against the independent float64 reference, checkpoints, plans."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

import rom_fast
from rom_fast import plans
from rom_fast.adapters import adapter_for
from rom_fast.lowrank import LowRankLinear

sys.path.insert(0, os.path.dirname(__file__))
from reference_rom import reference_compress  # noqa: E402

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=True)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**TINY, sliding_window=None)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, use_sliding_window=False)
    else:
        raise AssertionError(kind)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Trained models have non-trivial biases; random init leaves them zero.
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.5)
    return model


def calibration(n=20, seq=24, vocab=211):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    mask[7, 5:] = 0
    return ids, mask


def all_ranks(blocks=(1, 2), rank=12):
    return {f"model.layers.{i}.{n}": rank for i in blocks for n in LINEARS}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_adapter_contract_matches_float64_reference(kind):
    model = tiny_model(kind)
    ids, mask = calibration()
    ranks = all_ranks()
    ref, subspaces = reference_compress(copy.deepcopy(model), ids, mask, ranks)
    ours = rom_fast.compress(copy.deepcopy(model), calibration={"input_ids": ids, "attention_mask": mask},
                             ranks=ranks, n_samples=ids.shape[0], seq_len=ids.shape[1], batch_size=6,
                             progress=False).model
    test_ids = torch.randint(0, 211, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ours(test_ids).logits.double()
        b = ref(test_ids).logits.double()
        dense = model(test_ids).logits.double()
    assert (dense - b).abs().max() > 1e-2          # the compression did something
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    for name, v_ref in subspaces.items():
        layer = ours.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        w1 = layer.expand.weight.detach().double().numpy()     # V_rᵀ
        angles = scipy.linalg.subspace_angles(w1, v_ref.T.numpy() if hasattr(v_ref, "numpy") else v_ref.T)
        assert angles.max() < 1e-3, (name, angles.max())
    assert plans.total_params(ours) < plans.total_params(model)


def test_padding_never_enters_statistics():
    model = tiny_model("llama")
    ids, mask = calibration()
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 17) % 211       # different garbage under the padding
    kw = dict(ranks=all_ranks(), n_samples=ids.shape[0], seq_len=ids.shape[1], progress=False)
    a = rom_fast.compress(copy.deepcopy(model), calibration={"input_ids": ids, "attention_mask": mask}, **kw).model
    b = rom_fast.compress(copy.deepcopy(model), calibration={"input_ids": other, "attention_mask": mask}, **kw).model
    for name in all_ranks():
        torch.testing.assert_close(a.get_submodule(name).expand.weight, b.get_submodule(name).expand.weight,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_checkpoint_round_trip_and_transformers_loading(tmp_path, kind):
    model = tiny_model(kind)
    ids, mask = calibration()
    out = tmp_path / "rom"
    ours = rom_fast.compress(model, calibration={"input_ids": ids, "attention_mask": mask}, ranks=all_ranks(),
                             n_samples=ids.shape[0], seq_len=ids.shape[1], out=out, progress=False,
                             command="test").model
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == f"rom_fast_{kind}"
    assert set(cfg["rom_fast"]["layers"]) == set(all_ranks())
    assert cfg["rom_fast"]["plan"]["ranks"] == all_ranks()
    assert (out / "README.md").read_text().count("Command: `test`") == 1
    test_ids = torch.randint(0, 211, (2, 16))
    with torch.no_grad():
        expected = ours(test_ids).logits
        loaded = rom_fast.load(out)
        torch.testing.assert_close(loaded(test_ids).logits, expected, atol=0, rtol=0)
        auto = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(auto(test_ids).logits, expected, atol=0, rtol=0)
    assert plans.total_params(loaded) == plans.total_params(ours)
    assert not list(tmp_path.glob(".*partial*"))


def test_merged_export_is_dense_and_equivalent(tmp_path):
    model = tiny_model("qwen2")
    ids, mask = calibration()
    kw = dict(calibration={"input_ids": ids, "attention_mask": mask}, ranks=all_ranks(),
              n_samples=ids.shape[0], seq_len=ids.shape[1], progress=False)
    factored = rom_fast.compress(copy.deepcopy(model), **kw).model
    rom_fast.compress(copy.deepcopy(model), out=tmp_path / "m", merge=True, **kw)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    test_ids = torch.randint(0, 211, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(test_ids).logits, factored(test_ids).logits, atol=1e-4, rtol=1e-4)


def test_failed_write_keeps_the_resume_state_and_never_a_half_written_out(tmp_path):
    model = tiny_model("llama")
    ids, mask = calibration()
    kw = dict(calibration={"input_ids": ids, "attention_mask": mask}, ranks=all_ranks(),
              n_samples=ids.shape[0], seq_len=ids.shape[1], out=tmp_path / "out", progress=False)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            (tmp_path / "seen").write_text(str(path))
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rom_fast.compress(copy.deepcopy(model), tokenizer=BrokenTokenizer(), **kw)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "seen"]
    # The same call again finishes from the saved blocks (all of them here) and cleans up.
    again = rom_fast.compress(copy.deepcopy(model), **kw)
    assert again.summary["resumed_from_block"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "seen"]
    reference = rom_fast.compress(copy.deepcopy(model), **dict(kw, out=None)).model
    test_ids = torch.randint(0, 211, (2, 16))
    with torch.no_grad():
        expected = reference(test_ids).logits
        torch.testing.assert_close(again.model(test_ids).logits, expected, atol=0, rtol=0)  # restored blocks
        torch.testing.assert_close(rom_fast.load(tmp_path / "out")(test_ids).logits, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="already compressed"):   # compress() works in place
        rom_fast.compress(again.model, **dict(kw, out=None))
    with pytest.raises(FileExistsError):
        rom_fast.compress(tiny_model("llama"), **kw)


def test_plans():
    model = tiny_model("llama")
    shape = plans.ModelShape.of(adapter_for(model))
    total = plans.total_params(model)
    assert shape.total_params == total
    plan = plans.last_k_plan(shape, 0.8, 2)
    assert abs(plan.details["ratio"] - 0.8) < 0.02
    assert all(shape.block_of[n] >= 1 for n in plan.ranks)
    for name, r in plan.ranks.items():
        lin = model.get_submodule(name)
        assert r * (lin.in_features + lin.out_features) < lin.in_features * lin.out_features
    recipe = plans.paper_recipe(shape, "paper-50")
    assert abs(recipe.details["kept_params"] / total - 0.5) < 0.05
    with pytest.raises(ValueError, match="unknown recipe"):
        plans.paper_recipe(shape, "paper-70")
    with pytest.raises(ValueError, match="k must be"):
        plans.last_k_plan(shape, 0.8, 9)


def test_ranks_file_errors(tmp_path):
    shape = plans.ModelShape.of(adapter_for(tiny_model("llama")))
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"model.layers.0.mlp.up_proj": 8}))
    assert plans.ranks_from_file(shape, f).ranks == {"model.layers.0.mlp.up_proj": 8}
    f.write_text(json.dumps({"model.layers.9.mlp.up_proj": 8}))
    with pytest.raises(ValueError, match="not a compressible linear"):
        plans.ranks_from_file(shape, f)
    f.write_text(json.dumps({"model.layers.0.mlp.up_proj": 60}))
    with pytest.raises(ValueError, match="would not save parameters"):
        plans.ranks_from_file(shape, f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match=f"ranks file {f}: not valid JSON"):
        plans.ranks_from_file(shape, f)


def test_unsupported_architecture_is_a_clear_error():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        rom_fast.compress(model, calibration=torch.zeros(4, 8, dtype=torch.long), budget=0.8, progress=False)


def test_cli_help_lists_every_option(capsys):
    from rom_fast.cli import main
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = capsys.readouterr().out
    for opt in ("--calibration", "--budget", "--recipe", "--ranks", "--last-k", "--out", "--merge",
                "--n-samples", "--seq-len", "--seed", "--centered", "--overwrite"):
        assert opt in text


def test_cli_version_is_the_installed_one(capsys):
    from rom_fast.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rom-fast {rom_fast.__version__}"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_streamed_directory_equals_in_memory(tmp_path, kind):
    model = tiny_model(kind)
    src = tmp_path / "dense"
    model.save_pretrained(src, max_shard_size="100KB")      # several shards
    assert len(list(src.glob("*.safetensors"))) > 1
    ids, mask = calibration()
    ranks = {f"model.layers.1.{n}": 10 for n in LINEARS}    # block 0 dense before, block 2 after
    kw = dict(calibration={"input_ids": ids, "attention_mask": mask}, ranks=ranks,
              n_samples=ids.shape[0], seq_len=ids.shape[1], progress=False)
    in_memory = rom_fast.compress(copy.deepcopy(model), **kw).model
    result = rom_fast.compress(src, out=tmp_path / "rom", **kw)
    assert result.summary["streamed"] and result._model is None      # nothing loaded yet
    streamed = result.model
    test_ids = torch.randint(0, 211, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(streamed(test_ids).logits, in_memory(test_ids).logits, atol=1e-5, rtol=1e-5)
    assert plans.total_params(streamed) == plans.total_params(in_memory) == result.summary["params_after"]
    # Without out, a directory is still streamed block by block; the result is held in memory.
    held = rom_fast.compress(src, **kw).model
    with torch.no_grad():
        torch.testing.assert_close(held(test_ids).logits, in_memory(test_ids).logits, atol=1e-5, rtol=1e-5)


def test_streamed_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    from safetensors import safe_open
    model = tiny_model("llama")
    src = tmp_path / "dense"
    model.to(torch.bfloat16).save_pretrained(src)
    ids, mask = calibration()
    ranks = {f"model.layers.1.{n}": 10 for n in LINEARS}
    kw = dict(calibration={"input_ids": ids, "attention_mask": mask}, ranks=ranks, progress=False)
    streamed = rom_fast.compress(src, out=tmp_path / "rom", **kw).model
    with safe_open(str(next((tmp_path / "rom").glob("*.safetensors"))), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    # Same factors as compressing the bfloat16 weights in memory in float32, up to bf16 rounding.
    in_memory = rom_fast.compress(copy.deepcopy(model).float(), **kw).model
    test_ids = torch.randint(0, 211, (2, 16))
    with torch.no_grad():
        a, b = streamed(test_ids).logits, in_memory(test_ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_activations_change_little_and_bad_names_are_refused(dtype):
    model = tiny_model("qwen2")
    ids, mask = calibration()
    ranks = {f"model.layers.{b}.{n}": 10 for b in (0, 1, 2) for n in LINEARS}
    kw = dict(calibration={"input_ids": ids, "attention_mask": mask}, ranks=ranks, progress=False)
    ref = rom_fast.compress(copy.deepcopy(model), **kw).model
    low = rom_fast.compress(copy.deepcopy(model), activation_dtype=dtype, **kw)
    assert low.summary["activation_dtype"] == dtype
    with torch.no_grad():
        a, b = low.model(ids).logits, ref(ids).logits
    err = float((a - b).norm() / b.norm())
    assert 0 < err < (3e-3 if dtype == "bfloat16" else 5e-4)   # rounded, not ignored, and small (measured 2.8e-4, 3.7e-5)
    with pytest.raises(ValueError, match="activation_dtype"):
        rom_fast.compress(copy.deepcopy(model), activation_dtype="int8", **kw)


def test_svd_baseline_is_the_eckart_young_fit_of_w():
    from rom_fast.baselines import svd_compress
    torch.manual_seed(0)
    lin = nn.Linear(12, 9, bias=True).double()
    model = nn.Sequential(lin)
    w = lin.weight.detach().numpy().copy()
    b = lin.bias.detach().numpy().copy()
    svd_compress(model, {"0": 4})
    x = torch.randn(5, 12, dtype=torch.float64)
    w_r = model[0].expand.weight.detach().numpy() @ model[0].reduce.weight.detach().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    assert np.linalg.norm(w - w_r) == pytest.approx(np.sqrt((s[4:] ** 2).sum()), rel=1e-10)
    np.testing.assert_allclose(model(x).detach().numpy(), x.numpy() @ w_r.T + b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not a dense"):
        svd_compress(model, {"0": 2})
    with pytest.raises(ValueError, match="rank of 0"):
        svd_compress(nn.Sequential(nn.Linear(3, 3)), {"0": 4})


@pytest.mark.parametrize("centered", [False, True])
def test_block_outputs_reuse_the_dense_down_outputs_exactly(centered):
    """The block's outputs are finished from y = down(act) (no second gate/up pass); they must
    equal a plain forward of the compressed block, biases and centring included."""
    from rom_fast.blockwise import capture_block_inputs, kwargs_of_block
    from rom_fast.pipeline import BlockCompressor, CompressionOptions, CompressionReport
    from rom_fast.util import StageTimer
    from rom_fast.io.sources import ModelSource
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY, mlp_bias=True, attention_bias=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.5)
    adapter = adapter_for(model)
    ids, mask = calibration()
    hidden, kwargs_list = capture_block_inputs(ModelSource(model), ids, mask, batch_size=8)
    kwargs_list = kwargs_of_block(kwargs_list, 0)
    hiddens = list(hidden.split(8))
    inputs = [h.clone() for h in hiddens]
    report = CompressionReport()
    compressor = BlockCompressor(adapter, CompressionOptions(centered=centered, batch_size=8), report,
                                 StageTimer(report.seconds))
    block = adapter.blocks()[0]
    ranks = {n: 12 for n in LINEARS}
    compressor.compress(block, "model.layers.0.", hiddens, kwargs_list, [m.bool() for m in mask.split(8)], ranks)
    out = hiddens
    assert [r.route for r in report.layers][-1] == "output-gram"
    with torch.inference_mode():
        for h, kw, o in zip(inputs, kwargs_list, out):
            ref = block(h, **kw)
            ref = ref[0] if isinstance(ref, tuple) else ref
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_choose_execution_keeps_the_function_and_only_merges_by_measurement():
    model = tiny_model("llama")
    ids, mask = calibration()
    ranks = {f"model.layers.{b}.{n}": 8 for b in (0, 1) for n in LINEARS}
    rom_fast.compress(model, calibration={"input_ids": ids, "attention_mask": mask}, ranks=ranks, progress=False)
    with torch.no_grad():
        before = model(ids).logits
    chosen = rom_fast.choose_execution(model, tokens=1, repeat=3)
    assert set(chosen) == set(ranks) and set(chosen.values()) <= {"two-linears", "merged"}
    for name, how in chosen.items():
        assert isinstance(model.get_submodule(name), LowRankLinear if how == "two-linears" else nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_source_tree_without_native_core_says_so(tmp_path):
    # What a user gets who imports rom_fast from a checkout that shadows the installed package.
    import shutil
    import subprocess
    pkg = Path(rom_fast.__file__).parent
    shutil.copytree(pkg, tmp_path / "rom_fast", ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    # An editable install's import hook would find the real package first: drop it.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Redirect' not in type(f).__name__]; "
            f"sys.path.insert(0, {str(tmp_path)!r}); import rom_fast")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "native core (_core) is not built" in proc.stderr and "partially initialized" not in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("exc", [MemoryError(), KeyError("x"), RuntimeError("lapack failed\nat step 3")])
def test_cli_errors_are_one_line(monkeypatch, capsys, exc):
    from rom_fast import cli

    def fail(_args):
        raise exc
    monkeypatch.setattr(cli, "run_eval", fail)
    assert cli.main(["eval", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rom-fast: error: ") and "Traceback" not in err
    with pytest.raises(type(exc)):
        cli.main(["--debug", "eval", "somewhere"])


def test_non_finite_activations_name_the_block_and_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("inf")
    ids, mask = calibration()
    kw = dict(calibration={"input_ids": ids, "attention_mask": mask}, n_samples=ids.shape[0],
              seq_len=ids.shape[1], progress=False)
    stage = r"inputs of model\.layers\.1\.mlp\.gate_proj, model\.layers\.1\.mlp\.up_proj"
    with pytest.raises(ValueError, match=stage + ": .*non-finite"):
        rom_fast.compress(copy.deepcopy(model), ranks={f"model.layers.1.{n}": 10 for n in LINEARS}, **kw)
    with pytest.raises(ValueError, match=r"inputs of model\.layers\.1\.mlp\.gate_proj \(planner\): .*non-finite"):
        rom_fast.compress(copy.deepcopy(model), budget=0.8, **kw)


def test_float32_gram_blocks_stay_close_to_the_float64_reference():
    """gram_precision='float32' (the 'auto' choice from 1536 columns up, i.e. every 7B Gram)
    forced on a tiny model: its statistics carry ~1e-7 relative rounding, so the compressed
    logits stay within 1e-3 of the float64 reference's (float64 Grams: 1e-4, above); 'auto'
    keeps these narrow Grams in float64, bit for bit."""
    model = tiny_model("llama")
    ids, mask = calibration()
    ranks = all_ranks()
    ref, _ = reference_compress(copy.deepcopy(model), ids, mask, ranks)
    kw = dict(calibration={"input_ids": ids, "attention_mask": mask}, ranks=ranks, n_samples=ids.shape[0],
              seq_len=ids.shape[1], batch_size=6, progress=False)
    f32 = rom_fast.compress(copy.deepcopy(model), gram_precision="float32", **kw).model
    auto = rom_fast.compress(copy.deepcopy(model), **kw).model
    f64 = rom_fast.compress(copy.deepcopy(model), gram_precision="float64", **kw).model
    test_ids = torch.randint(0, 211, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        b = ref(test_ids).logits.double()
        assert (f32(test_ids).logits.double() - b).abs().max() <= 1e-3 * b.abs().max()
        assert torch.equal(auto(test_ids).logits, f64(test_ids).logits)
    with pytest.raises(ValueError, match="gram_precision"):
        rom_fast.compress(copy.deepcopy(model), gram_precision="half", **kw)
