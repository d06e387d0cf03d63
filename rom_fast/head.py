"""The output head in float32: the final norm, the head's linear and the family's elementwise
logit transform (:meth:`~rom_fast.adapters.ModelAdapter.logit_transform`, e.g. Gemma-2's
soft-capping), whole or by vocabulary chunks.

Evaluation, data-free sampling and the planner's loss gradient reach the head only through a
:class:`Head` (what a source's ``head()`` gives). A head whose float32 weight is under
:data:`CHUNKED_HEAD_BYTES` is widened whole and called as the model calls it
(:meth:`~rom_fast.adapters.ModelAdapter.logits`): the same operations, so the same numbers. A
bigger one (Llama-3's 128k vocabulary: 2.1 GB in float32, Gemma-2-9B's 256k: 3.7 GB) stays in
its storage precision and is computed in float32 one vocabulary chunk at a time, each chunk's
rows widened when used: logits, log-probabilities (a running log-sum-exp over the chunks) and
the loss gradient (two passes: the log-sum-exp, then per chunk softmax - one-hot
backpropagated through the transform and the chunk's matmul) equal the whole head's to
float32 round-off.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

CHUNKED_HEAD_BYTES = 1 << 30   # a float32 head this big is kept narrow and computed by chunks
CHUNK_BYTES = 32 << 20         # float32 weight rows widened at once; also one tile of logits
GROUP_TOKENS = 4096            # tokens whose norm and gradient one chunked gradient pass holds
IGNORE_INDEX = -100            # a target that contributes nothing (cross_entropy's default)


def chunked_head(head: nn.Module) -> bool:
    """True when ``head`` is a linear whose weight in float32 reaches CHUNKED_HEAD_BYTES."""
    return isinstance(head, nn.Linear) and head.weight.numel() * 4 >= CHUNKED_HEAD_BYTES


def token_log_probs(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets[j])`` at position ``(rows[j], cols[j])`` of ``logits`` [batch, seq, vocab],
    float32 (log_softmax of the picked rows, upcast first)."""
    device = logits.device
    picked = logits[rows.to(device), cols.to(device)]
    logp = torch.log_softmax(picked.float(), dim=-1)
    return logp.gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1)


class Head:
    """The final norm and head of ``adapter``'s model, in memory, applied in float32;
    ``chunked``: by vocabulary chunks of a weight kept in its storage precision (the norm is
    float32 either way)."""

    def __init__(self, adapter, chunked: bool):
        self.adapter, self.chunked = adapter, chunked
        self.norm, self.linear = adapter.final_norm(), adapter.head()
        if chunked:
            self.vocab, width = self.linear.weight.shape
            self.rows = max(1, CHUNK_BYTES // (4 * width))         # vocabulary rows per chunk
            self.tokens = max(1, CHUNK_BYTES // (4 * self.rows))   # tokens per tile of logits

    # -- what callers use -------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the last block's outputs ``hidden`` [..., d] (float32 when chunked)."""
        if not self.chunked:
            return self.adapter.logits(hidden)
        normed = self._normed(hidden.reshape(-1, hidden.shape[-1]))
        out = torch.empty(normed.shape[0], self.vocab, dtype=torch.float32)
        for start, w, b in self._chunks():
            for t in self._tiles(normed.shape[0]):
                out[t, start:start + w.shape[0]] = self._tile(normed[t], w, b)
        return out.view(*hidden.shape[:-1], self.vocab)

    def log_probs(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
        """``log p(targets[j])`` at position ``(rows[j], cols[j])`` of ``hidden`` [batch, seq, d],
        float32. Whole: the logits of every position, then :func:`token_log_probs`; chunked:
        only the picked positions, by a running log-sum-exp (no vocabulary-wide row is held)."""
        if not self.chunked:
            return token_log_probs(self.logits(hidden), rows, cols, targets)
        self._check_targets(targets, allow_ignored=False)
        lse, target = self._log_sum_exp(self._normed(hidden[rows, cols]), targets)
        return target - lse

    def loss_gradient(self, hidden: torch.Tensor, targets: torch.Tensor, token_chunk: int) -> torch.Tensor:
        """d(summed next-token cross-entropy)/d(hidden), float32, for ``hidden`` [..., d] and
        ``targets`` [...] (IGNORE_INDEX: no loss there). Whole: autograd through the model's
        head ``token_chunk`` tokens at a time; chunked: GROUP_TOKENS at a time, exactly
        (:meth:`_chunked_gradient`). The caller freezes the parameters."""
        grads = torch.empty(hidden.shape, dtype=torch.float32)
        flat_hidden = hidden.view(-1, hidden.shape[-1])
        flat_grads, flat_targets = grads.view(-1, grads.shape[-1]), targets.reshape(-1)
        step = GROUP_TOKENS if self.chunked else token_chunk
        if self.chunked:
            self._check_targets(flat_targets, allow_ignored=True)
        with torch.enable_grad():
            for start in range(0, flat_hidden.shape[0], step):
                rows = slice(start, start + step)
                x = flat_hidden[rows].to(torch.float32, copy=True).requires_grad_(True)
                if self.chunked:
                    gx = self._chunked_gradient(x, flat_targets[rows])
                else:
                    loss = nn.functional.cross_entropy(self.adapter.logits(x).float(), flat_targets[rows],
                                                       reduction="sum")
                    (gx,) = torch.autograd.grad(loss, x)
                    del loss
                flat_grads[rows].copy_(gx)
                del gx, x
        return grads

    # -- the chunked computation -----------------------------------------------------------------
    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden.to(torch.float32))

    def _chunks(self) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
        """(first vocabulary row, float32 weight rows, float32 bias rows or None) of each chunk."""
        weight, bias = self.linear.weight.detach(), self.linear.bias
        for start in range(0, self.vocab, self.rows):
            end = start + self.rows
            yield start, weight[start:end].to(torch.float32), \
                None if bias is None else bias.detach()[start:end].to(torch.float32)

    def _tiles(self, n_tokens: int) -> Iterator[slice]:
        return (slice(t, t + self.tokens) for t in range(0, n_tokens, self.tokens))

    def _tile(self, normed: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        """The transformed logits of one tile: the family's elementwise transform of the matmul."""
        return self.adapter.logit_transform(nn.functional.linear(normed, w, b))

    def _log_sum_exp(self, normed: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """(log-sum-exp over the vocabulary, logit of ``targets`` or None) of every row of
        ``normed`` [n, d], one chunk at a time (each widened once)."""
        n = normed.shape[0]
        lse = torch.full((n,), -torch.inf, dtype=torch.float32)
        picked = None if targets is None else torch.zeros(n, dtype=torch.float32)
        with torch.no_grad():
            for start, w, b in self._chunks():
                for t in self._tiles(n):
                    z = self._tile(normed[t], w, b)
                    lse[t] = torch.logaddexp(lse[t], torch.logsumexp(z, dim=-1))
                    if picked is not None:
                        hit, cols = self._in_chunk(targets[t], start, z.shape[1])
                        picked[t][hit] = z[hit, cols]
        return lse, picked

    def _chunked_gradient(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """d(summed cross-entropy)/dx for float32 ``x`` [n, d] (requiring grad), exactly: pass 1
        the log-sum-exp of every row; pass 2 per chunk the gradient of the transformed logits,
        softmax - one-hot (0 on ignored rows), backpropagated through the transform and
        summed through the chunk's matmul into d(normed); then autograd through the norm."""
        normed = self._normed(x)
        base = normed.detach()
        lse, _ = self._log_sum_exp(base)
        ignored = targets == IGNORE_INDEX
        g_normed = torch.zeros_like(base)
        for start, w, b in self._chunks():
            for t in self._tiles(base.shape[0]):
                z = nn.functional.linear(base[t], w, b).requires_grad_(True)
                out = self.adapter.logit_transform(z)
                g = torch.exp(out.detach() - lse[t, None])
                hit, cols = self._in_chunk(targets[t], start, z.shape[1])
                g[hit, cols] -= 1.0
                g[ignored[t]] = 0.0
                (gz,) = torch.autograd.grad(out, z, g) if out is not z else (g,)
                g_normed[t].addmm_(gz, w)
        (gx,) = torch.autograd.grad(normed, x, g_normed)
        return gx

    @staticmethod
    def _in_chunk(targets: torch.Tensor, start: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows whose target lies in the chunk [start, start + size), its column there)."""
        local = targets - start
        hit = (local >= 0) & (local < size)
        return hit, local[hit]

    def _check_targets(self, targets: torch.Tensor, allow_ignored: bool) -> None:
        bad = (targets < 0) | (targets >= self.vocab)
        if allow_ignored:
            bad &= targets != IGNORE_INDEX
        if bool(bad.any()):
            raise ValueError(f"target token id {int(targets[bad][0])} outside the vocabulary of {self.vocab}")
