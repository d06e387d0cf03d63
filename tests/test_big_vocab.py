"""Big vocabularies (Llama-3's 128k, Gemma's 256k): a streamed embedding and head kept in their
storage precision, the head computed in float32 by vocabulary chunks (rom_fast/head.py).

The tiny models force the chunked path (CHUNKED_HEAD_BYTES 0) with chunks of a few rows, and
each chunked quantity is checked against an independent float64 computation of the whole
head: the planner's loss gradient (ignored positions and Gemma-2's soft-capping included),
the log-probabilities evaluation scores and the logits sampling draws from. Without the
forced threshold the tiny heads stay on the whole path, widened to float32 as before.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rom_fast.evaluate as ev
from rom_fast import head as head_module
from rom_fast.adapters import adapter_for
from rom_fast.blockwise import capture_block_inputs, forward_logits, sample_sequences
from rom_fast.head import Head
from rom_fast.io.sources import DirectorySource, ModelSource
from rom_fast.planner import measure

from families import TINY, tiny_model

FAMILIES = ("llama", "gemma2", "gemma3_text")
VOCAB, WIDTH = TINY["vocab_size"], TINY["hidden_size"]


@pytest.fixture
def force_chunks(monkeypatch):
    """Every head chunked, 10 vocabulary rows a chunk (97: 9 full chunks and a partial one),
    tiles of 48 tokens, gradient groups of 50 tokens (the 60 tokens of :func:`last_hidden`:
    a group of two tiles, then a group of one): every loop runs more than once."""
    monkeypatch.setattr(head_module, "CHUNKED_HEAD_BYTES", 0)
    monkeypatch.setattr(head_module, "CHUNK_BYTES", 4 * WIDTH * 10)
    monkeypatch.setattr(head_module, "GROUP_TOKENS", 50)


def bf16_directory(family: str, path):
    """A tiny model saved in bfloat16, and the float32 model of the same (rounded) weights
    (its buffers, Gemma's embedding scale among them, left as they are: a checkpoint does not
    hold them)."""
    model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    return model


def norm64(model, x: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm in float64, written out (Gemma scales by 1 + weight)."""
    norm = adapter_for(model).final_norm()
    gain = norm.weight.detach().double()
    if model.config.model_type.startswith("gemma"):
        gain = 1.0 + gain
    eps = model.config.rms_norm_eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def logits64(model, x: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of float64 last-block outputs ``x``, the whole head in float64."""
    z = norm64(model, x) @ adapter_for(model).head().weight.detach().double().T
    cap = getattr(model.config, "final_logit_softcapping", None)
    return z if cap is None else cap * torch.tanh(z / cap)


def gradient64(model, x: torch.Tensor, targets: torch.Tensor, capped: bool = True) -> torch.Tensor:
    """d(summed cross-entropy)/dx in float64, the whole head at once (``capped`` False: as if
    the model had no logit soft-capping)."""
    x = x.double().requires_grad_(True)
    z = logits64(model, x) if capped else norm64(model, x) @ adapter_for(model).head().weight.detach().double().T
    loss = nn.functional.cross_entropy(z.view(-1, VOCAB), targets.view(-1), reduction="sum")
    return torch.autograd.grad(loss, x)[0]


def next_token_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    targets = ids.roll(-1, dims=1).masked_fill(mask.roll(-1, dims=1) == 0, -100)
    targets[:, -1] = -100
    return targets


def last_hidden(n=5, seq=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, seq, WIDTH, generator=g) * 2


def token_batch(n=5, seq=12):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_the_planners_chunked_loss_gradient_is_the_whole_heads(family, tmp_path, force_chunks):
    model = bf16_directory(family, tmp_path)
    source = DirectorySource(tmp_path, read_tokenizer=False)
    hidden = last_hidden()
    ids, mask = token_batch()
    with source.head() as head:
        assert head.chunked and head.linear.weight.dtype == torch.bfloat16     # not widened whole
        assert head.norm.weight.dtype == torch.float32
    hidden = hidden.to(torch.float16)          # as the planner holds float16 activations
    got = measure._loss_gradient(source, hidden, ids, mask)

    targets = next_token_targets(ids, mask)
    want = gradient64(model, hidden, targets)
    assert got.dtype == torch.float32
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-6
    ignored = targets == -100
    assert got[ignored].abs().max() == 0 and got[~ignored].abs().min() > 0
    if getattr(model.config, "final_logit_softcapping", None) is not None:    # the cap bends the gradient
        uncapped = gradient64(model, hidden, targets, capped=False)
        assert float((uncapped - want).abs().max() / want.abs().max()) > 1000 * err


def test_the_whole_path_still_widens_a_small_head(tmp_path):
    """Without the forced threshold a tiny head is widened to float32 and the gradient is the
    one the model's own head gives (the path every model under 1 GiB of float32 head takes)."""
    model = bf16_directory("gemma2", tmp_path)
    source = DirectorySource(tmp_path, read_tokenizer=False)
    with source.head() as head:
        assert not head.chunked and head.linear.weight.dtype == torch.float32
    hidden = last_hidden()
    ids, mask = token_batch()
    got = measure._loss_gradient(source, hidden, ids, mask)
    x = hidden.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(adapter_for(model).logits(x).view(-1, VOCAB),
                                       next_token_targets(ids, mask).view(-1), reduction="sum")
    torch.testing.assert_close(got, torch.autograd.grad(loss, x)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ("llama", "gemma2"))
def test_chunked_log_probs_and_logits_are_the_whole_heads(family, force_chunks):
    model = tiny_model(family).to(torch.bfloat16)
    source = ModelSource(model)
    hidden = last_hidden()
    rows = torch.tensor([0, 0, 1, 2, 4, 4, 4])
    cols = torch.tensor([0, 11, 5, 3, 0, 6, 11])
    targets = torch.tensor([0, VOCAB - 1, 9, 10, 19, 50, 96])
    with source.head() as head:
        assert head.chunked and head.linear.weight.dtype == torch.bfloat16
        got = head.log_probs(hidden, rows, cols, targets)
        logits = head.logits(hidden)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            head.log_probs(hidden, rows[:1], cols[:1], torch.tensor([VOCAB]))
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    want = logits64(model.float(), hidden.double())
    assert logits.dtype == torch.float32 and logits.shape == (5, 12, VOCAB)
    torch.testing.assert_close(logits.double(), want, rtol=0, atol=2e-6 * float(want.abs().max()))
    want_lp = torch.log_softmax(want, dim=-1)[rows, cols, targets]
    torch.testing.assert_close(got.double(), want_lp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ("llama", "gemma3_text"))
def test_streamed_logits_and_sampling_through_a_chunked_head(family, tmp_path, force_chunks):
    """Block by block from a bfloat16 directory with the head chunked: the logits are the
    float32 model's (same weights) to float32 round-off, and sampling draws from them."""
    model = bf16_directory(family, tmp_path)
    source = DirectorySource(tmp_path, read_tokenizer=False)
    ids, mask = token_batch()
    first, last5 = forward_logits(source, [(ids[:2], mask[:2], None), (ids[2:], mask[2:], 5)])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert first.shape == (2, ids.shape[1], VOCAB) and last5.shape == (3, 5, VOCAB)
    real = mask.bool()
    torch.testing.assert_close(first[real[:2]], want[:2][real[:2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(last5[real[2:, -5:]], want[2:, -5:][real[2:, -5:]], rtol=0, atol=1e-5)
    allowed = torch.arange(3, 40)
    drawn = sample_sequences(source, torch.tensor([[1], [2]]), 6, allowed, torch.Generator().manual_seed(0))
    assert drawn.shape == (2, 6) and bool(torch.isin(drawn[:, 1:], allowed).all())


def test_streamed_evaluation_scores_the_same_with_a_chunked_head(tmp_path, monkeypatch):
    """Log-likelihoods of a bfloat16 directory, block by block, whole head vs chunked: the
    same to float32 round-off (the blocks are the same; only the head's arithmetic differs)."""
    bf16_directory("gemma2", tmp_path)
    source = DirectorySource(tmp_path, read_tokenizer=False)
    g = torch.Generator().manual_seed(5)
    requests = [(torch.randint(0, VOCAB, (n,), generator=g).tolist(), torch.randint(0, VOCAB, (k,), generator=g).tolist())
                for n, k in ((5, 3), (9, 1), (2, 7), (12, 4))]
    whole = ev.loglikelihoods_tokens(source, requests, batch_size=3)
    monkeypatch.setattr(head_module, "CHUNKED_HEAD_BYTES", 0)
    monkeypatch.setattr(head_module, "CHUNK_BYTES", 4 * WIDTH * 10)
    with source.head() as head:
        assert head.chunked
    chunked = ev.loglikelihoods_tokens(source, requests, batch_size=3)
    assert chunked == pytest.approx(whole, rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_embedding_stays_bfloat16_and_gives_the_float32_models_inputs(family, tmp_path):
    """The first block's inputs from the embedding kept in bfloat16 are those of the float32
    model with the same weights, bit for bit (Gemma's scale included: float32 lookup times a
    float32 scale, not their product in bfloat16)."""
    model = bf16_directory(family, tmp_path)
    source = DirectorySource(tmp_path, read_tokenizer=False)
    ids, mask = token_batch()
    with source.embedding() as module:
        assert module.weight.dtype == torch.bfloat16
    got, _ = capture_block_inputs(source, ids, mask, batch_size=2)
    want, _ = capture_block_inputs(ModelSource(model), ids, mask, batch_size=2)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    if family != "llama":       # the bfloat16 product would not be these numbers
        emb = adapter_for(model).embedding()
        rounded = (emb.weight.to(torch.bfloat16)[ids] * emb.embed_scale.to(torch.bfloat16)).float()
        assert not torch.equal(rounded, want)


def test_an_embedding_the_adapter_cannot_widen_is_refused():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2
    adapter = adapter_for(tiny_model("llama"))
    module = Scaled(VOCAB, WIDTH).to(torch.bfloat16)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(TypeError, match="Scaled forms its float32 output"):
        adapter.embedding_output(module, ids, module(ids))
    plain = nn.Embedding(VOCAB, WIDTH).to(torch.bfloat16)
    out = adapter.embedding_output(plain, ids, plain(ids))
    assert out.dtype == torch.float32 and torch.equal(out, plain.weight.float()[ids])
