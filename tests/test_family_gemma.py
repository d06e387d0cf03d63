"""Gemma-2 and text-only Gemma-3: what the generic family guarantees (tests/test_families.py)
do not look at. Soft-capped logits; a mask per block that follows its attention type (windows
shorter than the sequences); Gemma-3's two rotary bases; block-by-block forwards, in memory and
streamed, equal to the model's own; data-free sampling through the sliding caches; the anchored
dense path through post-norm blocks; all four norms of a block known to validation; the tied
checkpoint with its gelu-tanh MLP."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import rom_fast
from rom_fast.adapters import adapter_for
from rom_fast.blockwise import capture_block_inputs, forward_logits, kwargs_of_block, sample_sequences
from rom_fast.io.safetensors_index import CheckpointError, write_safetensors
from rom_fast.io.sources import DirectorySource, ModelSource
from rom_fast.lowrank import LowRankLinear
from rom_fast.pipeline import BlockCompressor, CompressionOptions, CompressionReport
from rom_fast.util import StageTimer

from families import TINY, tiny_model

GEMMAS = ("gemma2", "gemma3_text")
SEQ = 20                     # > sliding_window (8): the sliding masks cut into every sequence


def tokens(n=3):
    ids = torch.randint(0, TINY["vocab_size"], (n, SEQ), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    return ids, mask


def attends(mask: torch.Tensor) -> torch.Tensor:
    """(batch, query, key) booleans of a 4-d mask, boolean (True: attends) or additive (0: attends)."""
    mask = mask[:, 0]
    return mask if mask.dtype == torch.bool else mask == 0


@pytest.mark.parametrize("family", GEMMAS)
def test_logits_are_soft_capped_as_the_models_own(family):
    model = tiny_model(family)
    adapter, cap = adapter_for(model), model.config.final_logit_softcapping
    ids, mask = tokens()
    last = []
    handle = adapter.blocks()[-1].register_forward_hook(lambda _m, _a, out: last.append(out))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        handle.remove()
        ours = adapter.logits(last[0])
        plain = adapter.head()(adapter.final_norm()(last[0])).double()
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours.double(), cap * torch.tanh(plain / cap), rtol=0, atol=1e-6)
    assert (plain - ours).abs().max() > 0.1 * cap           # the cap bends these logits
    assert ours.abs().max() < cap


@pytest.mark.parametrize("family", GEMMAS)
def test_each_block_gets_the_mask_of_its_attention_type(family):
    """Sliding blocks attend to the last ``sliding_window`` real tokens, full ones to every
    earlier real token; and running every block with block 0's arguments would change the
    outputs (the per-block capture is what makes them right)."""
    model = tiny_model(family, num_hidden_layers=3)
    cfg, adapter = model.config, adapter_for(model)
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    ids, mask = tokens()
    hidden, kwargs = capture_block_inputs(ModelSource(model), ids, mask, batch_size=3)
    q, k = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    for kind, kw in zip(cfg.layer_types, kwargs[0]):
        window = cfg.sliding_window if kind == "sliding_attention" else SEQ
        expected = (k <= q) & (q - k < window) & mask.bool()[:, None, :]
        assert torch.equal(attends(kw["attention_mask"]), expected), kind
    own, first = hidden.clone(), hidden.clone()
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks()):
            own = adapter.block_forward(block, own, kwargs[0][i])
            first = adapter.block_forward(block, first, kwargs[0][0])
    assert (own - first).abs().max() > 1e-2 * own.abs().max()


def test_gemma3_sliding_and_full_blocks_get_their_own_rotary_base():
    model = tiny_model("gemma3_text")
    cfg = model.config
    thetas = {kind: cfg.rope_parameters[kind]["rope_theta"] for kind in cfg.layer_types}
    assert thetas["sliding_attention"] != thetas["full_attention"]
    ids, mask = tokens()
    _, kwargs = capture_block_inputs(ModelSource(model), ids, mask, batch_size=3)
    d = cfg.head_dim
    for kind, kw in zip(cfg.layer_types, kwargs[0]):
        angles = torch.arange(SEQ, dtype=torch.float64)[:, None] \
            / thetas[kind] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = kw["position_embeddings"]
        torch.testing.assert_close(cos[0].double(), angles.cos(), rtol=0, atol=1e-5)
        torch.testing.assert_close(sin[0].double(), angles.sin(), rtol=0, atol=1e-5)
    assert (kwargs[0][0]["position_embeddings"][0] - kwargs[0][1]["position_embeddings"][0]).abs().max() > 0.1


@pytest.mark.parametrize("family", GEMMAS)
def test_block_by_block_logits_are_the_models_own_in_memory_and_streamed(family, tmp_path):
    model = tiny_model(family, num_hidden_layers=3)
    ids, mask = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    real = mask.bool()
    for source in (ModelSource(model), DirectorySource(tmp_path)):
        for _ in range(2):      # twice: a streamed embedding (its scale buffer) loaded and released again
            got = torch.cat(list(forward_logits(source, [(ids[:2], mask[:2], None), (ids[2:], mask[2:], None)])))
            torch.testing.assert_close(got[real], expected[real], rtol=0, atol=0)


@pytest.mark.parametrize("family", GEMMAS)
def test_data_free_sampling_through_the_sliding_caches_sees_the_models_own_logits(family):
    """Sampling block by block with a KV cache past the window (16 tokens, window 8): the
    logits each token was drawn from are those of the model's forward on the whole sequence."""
    model = tiny_model(family)
    source = ModelSource(model)
    drawn_from, head = [], source.adapter.logits
    source.adapter.logits = lambda h: drawn_from.append(head(h)) or drawn_from[-1]
    ids = sample_sequences(source, torch.tensor([[1], [2]]), 16, torch.arange(TINY["vocab_size"]),
                           torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
    steps = torch.cat([step[:, -1:] for step in drawn_from], dim=1)
    torch.testing.assert_close(steps, full[:, :15], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", GEMMAS)
def test_the_anchored_dense_path_is_the_dense_block(family):
    """Dense-anchored targets: while block 0 is compressed, the dense path beside it advances
    its hidden states to exactly the dense block's outputs (both norms of each sublayer), and
    the compressed block's outputs are not those."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids, mask = tokens(n=4)
    hidden, kwargs = capture_block_inputs(ModelSource(model), ids, mask, batch_size=2)
    with torch.no_grad():
        expected = [adapter.block_forward(adapter.blocks()[0], h, kw[0]) for h, kw in zip(hidden.split(2), kwargs)]
    hiddens, dense = list(hidden.clone().split(2)), list(hidden.clone().split(2))
    ranks = {n: 6 for n in adapter.linear_names()}
    compressor = BlockCompressor(adapter, CompressionOptions(anchor=math.inf), CompressionReport(), StageTimer({}))
    compressor.compress(adapter.blocks()[0], adapter.block_prefix(0), hiddens, kwargs_of_block(kwargs, 0),
                        [m.bool() for m in mask.split(2)], ranks, dense_hiddens=dense)
    assert all(isinstance(adapter.blocks()[0].get_submodule(n), LowRankLinear) for n in ranks)
    for ours, theirs, compressed in zip(dense, expected, hiddens):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert (compressed - theirs).abs().max() > 1e-2 * theirs.abs().max()


@pytest.mark.parametrize("family", GEMMAS)
def test_a_directory_missing_any_of_a_blocks_norms_is_refused(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}    # not views of the file rewritten below
    norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    norms += ["self_attn.q_norm", "self_attn.k_norm"] if family == "gemma3_text" else []
    for norm in norms:
        victim = f"model.layers.1.{norm}.weight"
        assert victim in tensors
        write_safetensors(shard, {k: v for k, v in tensors.items() if k != victim})
        with pytest.raises(CheckpointError, match="lacks tensor") as err:
            DirectorySource(tmp_path, read_tokenizer=False)
        assert victim in str(err.value)


@pytest.mark.parametrize("family", GEMMAS)
def test_the_tied_checkpoint_with_factorized_q_and_k_keeps_heads_norms_and_activation(family, tmp_path):
    """q_proj and k_proj factorized keep their whole outputs (Gemma-3's per-head q/k norms read
    them); the saved directory stores the embedding once and loads with the head tied to it and
    the gelu-tanh MLP."""
    model = tiny_model(family)
    cfg = model.config
    ranks = {f"model.layers.0.self_attn.{n}": 6 for n in ("q_proj", "k_proj")}
    ids, mask = tokens()
    result = rom_fast.compress(model, calibration={"input_ids": ids, "attention_mask": mask}, ranks=ranks,
                               out=tmp_path / "rom", progress=False)
    attn = result.model.model.layers[0].self_attn
    for name, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
        layer = getattr(attn, name)
        assert isinstance(layer, LowRankLinear) and layer.rank == 6 and layer.out_features == heads * cfg.head_dim
    stored = set()
    for path in (tmp_path / "rom").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            stored |= set(f.keys())
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    saved = json.loads((tmp_path / "rom" / "config.json").read_text())
    assert saved["hidden_activation"] == "gelu_pytorch_tanh" and saved["tie_word_embeddings"]
    loaded = rom_fast.load(tmp_path / "rom")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    x = torch.linspace(-4, 4, 41, dtype=torch.float64)
    gelu_tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(loaded.model.layers[1].mlp.act_fn(x), gelu_tanh, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=0, atol=0)
