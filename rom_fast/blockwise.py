"""Running a causal LM block by block over a :class:`~rom_fast.io.sources.BlockSource`.

The model's own forward is run only up to its first block, to build what every block gets
(hidden states from the embedding, rotary embeddings, attention masks); then the blocks run one
after the other, each over all the sequences of a group, so a streamed model reads each block
from disk once per group instead of once per batch. Logits come from the final norm and head at
the end. The same code serves a model in memory, where loading a block costs nothing; the
numbers are those of the model's plain forward (same operations on the same inputs).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from rom_fast.head import Head
from rom_fast.io.sources import BlockSource

DEFAULT_ACTIVATION_BUDGET = 1 << 30   # bytes of float32 hidden states one group may hold


class _StopForward(Exception):
    pass


class _BlockCallRecorder(nn.Module):
    """Stands in for decoder block ``index`` during a capture: records the keyword arguments
    the model's forward calls it with and passes the hidden states through unchanged (the
    recorded hidden states of block 0 are the first block's inputs). The last one stops the
    forward before the final norm and head, which a streamed source has not loaded."""

    def __init__(self, block: nn.Module, index: int, calls: List[Dict], last: bool):
        super().__init__()
        # Plain attributes the model's forward may read from its blocks (e.g. attention_type).
        for key, value in vars(block).items():
            if not key.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, key, value)
        self.index, self.calls, self.last = index, calls, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls.append({"hidden": hidden, **{k: v for k, v in kwargs.items() if k != "hidden_states"}})
        if self.last:
            raise _StopForward
        return hidden


class _BlockInputs:
    """Runs the model's own forward with every block replaced by a :class:`_BlockCallRecorder`
    and returns what each block gets: the first block's hidden states and, per block, the
    keyword arguments (masks, rotary embeddings). They differ between blocks of models that
    mix attention types (sliding and global layers: Gemma-2/3); blocks of one type get the
    same tensors, so holding them per block costs no memory."""

    def __init__(self, source: BlockSource):
        self.source = source

    def __enter__(self):
        self.blocks = self.source.adapter.blocks()
        self.originals = list(self.blocks)
        self.calls: List[Dict] = []
        n = len(self.originals)
        for i, block in enumerate(self.originals):
            self.blocks[i] = _BlockCallRecorder(block, i, self.calls, last=i == n - 1)
        self.embedding = self.source.embedding()
        self.embedding.__enter__()
        return self

    def __exit__(self, *exc):
        for i, block in enumerate(self.originals):
            self.blocks[i] = block
        return self.embedding.__exit__(*exc)

    def __call__(self, **model_kwargs) -> Tuple[torch.Tensor, List[Dict]]:
        """(hidden states of the first block, [every kwarg block i was called with])."""
        del self.calls[:]
        try:
            self.source.model(**model_kwargs)
        except _StopForward:
            pass
        if len(self.calls) != len(self.originals):
            raise RuntimeError(f"the model's forward called {len(self.calls)} of its {len(self.originals)} "
                               "decoder blocks")
        calls = list(self.calls)
        del self.calls[:]
        hidden = calls[0]["hidden"].detach()
        return hidden, [{k: v for k, v in call.items() if k != "hidden"} for call in calls]


def kwargs_of_block(kwargs_list: List[List[Dict]], i: int) -> List[Dict]:
    """Block i's keyword arguments for each micro-batch of a capture."""
    return [per_block[i] for per_block in kwargs_list]


@torch.no_grad()
def capture_block_inputs(source: BlockSource, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         batch_size: int, dtype: torch.dtype = torch.float32):
    """The first block's inputs: ``(hidden, kwargs_list)`` with ``hidden`` the hidden states of
    all sequences in one buffer of ``dtype`` (many batch-sized tensors would fragment the heap;
    callers work on its micro-batch views) and ``kwargs_list`` the keyword arguments (masks,
    rotary embeddings) the model built for each block, per micro-batch of ``batch_size``
    (``kwargs_list[batch][block]``; :func:`kwargs_of_block`). ``no_grad`` rather than ``inference_mode``: the planner
    backpropagates through blocks called with these kwargs."""
    adapter = source.adapter
    buffer, kwargs_list = None, []
    with _BlockInputs(source) as first:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size]
            mask = attention_mask[start:start + batch_size]
            hidden, kwargs = first(input_ids=ids, attention_mask=mask, use_cache=False)
            if buffer is None:
                buffer = hidden.new_empty((input_ids.shape[0],) + tuple(hidden.shape[1:]), dtype=dtype)
            buffer[start:start + batch_size].copy_(hidden)
            kwargs_list.append([adapter.block_kwargs(kw) for kw in kwargs])
    return buffer, kwargs_list


def _groups(batches: Iterable, hidden_size: int, budget: int) -> Iterator[list]:
    """Consecutive batches whose float32 hidden states and attention masks fit ``budget``
    bytes (at least one batch per group)."""
    group, used = [], 0
    for b in batches:
        rows, width = b[0].shape
        size = rows * width * (hidden_size + width) * 4
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(b)
        used += size
    if group:
        yield group


@torch.inference_mode()
def forward_final_hidden(source: BlockSource, batches: Iterable[Tuple[torch.Tensor, torch.Tensor, Optional[int]]],
                         activation_budget: int = DEFAULT_ACTIVATION_BUDGET,
                         progress: Optional[str] = None) -> Iterator[Tuple[Head, torch.Tensor]]:
    """``(head, hidden)`` for each ``(input_ids, attention_mask, keep)`` batch, in order: the last
    block's outputs ``[batch, k, d]`` at the last ``k = keep`` positions (all positions when
    ``keep`` is None) and the source's :class:`~rom_fast.head.Head`, loaded while they are scored.

    Batches are grouped so a group's hidden states fit ``activation_budget`` bytes; each group
    runs every block once. ``progress``: a tqdm description for a bar over the blocks.
    """
    adapter = source.adapter
    hidden_size = source.config.hidden_size
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc=progress, unit="block", total=0)
    try:
        for group in _groups(batches, hidden_size, activation_budget):
            hiddens, kwargs_list = [], []
            with _BlockInputs(source) as first:
                for ids, mask, _ in group:
                    h, kw = first(input_ids=ids, attention_mask=mask, use_cache=False)
                    hiddens.append(h)
                    kwargs_list.append([adapter.block_kwargs(k) for k in kw])
            if bar is not None:
                bar.total += source.n_blocks
                bar.refresh()
            for i in range(source.n_blocks):
                block = source.load_block(i)
                try:
                    for j, (h, kw) in enumerate(zip(hiddens, kwargs_list)):
                        hiddens[j] = adapter.block_forward(block, h, kw[i])
                finally:
                    source.release_block(i)
                if bar is not None:
                    bar.update(1)
            with source.head() as head:
                for (ids, mask, keep), h in zip(group, hiddens):
                    yield head, (h if keep is None else h[:, -keep:])
    finally:
        if bar is not None:
            bar.close()


@torch.inference_mode()
def forward_logits(source: BlockSource, batches: Iterable[Tuple[torch.Tensor, torch.Tensor, Optional[int]]],
                   activation_budget: int = DEFAULT_ACTIVATION_BUDGET,
                   progress: Optional[str] = None) -> Iterator[torch.Tensor]:
    """Logits for each ``(input_ids, attention_mask, keep)`` batch, in order: ``[batch, k, vocab]``
    for the last ``k = keep`` positions (:func:`forward_final_hidden`; a big head's by chunks)."""
    for head, hidden in forward_final_hidden(source, batches, activation_budget, progress):
        yield head.logits(hidden)


# -- data-free calibration: sampling from the model, block by block ---------------------------
def _cache_kwarg(model) -> str:
    """transformers 5 renamed the forward's ``past_key_values`` to ``cache``."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _kv_bytes_per_sequence(config, seq_len: int) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * seq_len * heads * head_dim * 4


@torch.inference_mode()
def sample_sequences(source: BlockSource, first_tokens: torch.Tensor, seq_len: int, allowed: torch.Tensor,
                     generator: torch.Generator, kv_budget: int = DEFAULT_ACTIVATION_BUDGET,
                     progress: Optional[str] = None) -> torch.Tensor:
    """Continues each row of ``first_tokens`` (n × p) to ``seq_len`` tokens by sampling the
    model's next-token distribution (temperature 1, no truncation) restricted to the token ids
    ``allowed``. Rows are sampled in groups whose KV cache fits ``kv_budget`` bytes; every
    generated token of a group runs the blocks once, so a streamed model reads each block once
    per token and group (slow for large models: real calibration text is the better choice)."""
    from transformers import DynamicCache

    n, prefix = first_tokens.shape
    config = source.config
    group = max(1, min(n, kv_budget // max(1, _kv_bytes_per_sequence(config, seq_len))))
    adapter = source.adapter
    mask_out = torch.full((config.vocab_size,), -math.inf)
    mask_out[allowed] = 0.0
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=math.ceil(n / group) * (seq_len - prefix), desc=progress, unit="token")
    try:
        for start in range(0, n, group):
            ids = first_tokens[start:start + group]
            cache = DynamicCache(config=config)
            step_ids = ids
            while ids.shape[1] < seq_len:
                mask = torch.ones(ids.shape, dtype=torch.long)
                positions = torch.arange(ids.shape[1] - step_ids.shape[1], ids.shape[1]).unsqueeze(0)
                with _BlockInputs(source) as first:
                    hidden, kw = first(input_ids=step_ids, attention_mask=mask, use_cache=True,
                                       position_ids=positions, **{_cache_kwarg(source.model): cache})
                for i in range(source.n_blocks):
                    block = source.load_block(i)
                    try:
                        hidden = adapter.block_forward(block, hidden, kw[i])
                    finally:
                        source.release_block(i)
                with source.head() as head:
                    logits = head.logits(hidden[:, -1:]).float()[:, 0] + mask_out
                probs = torch.softmax(logits, dim=-1)
                step_ids = torch.multinomial(probs, 1, generator=generator)
                ids = torch.cat([ids, step_ids], dim=1)
                if bar is not None:
                    bar.update(1)
            rows.append(ids)
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(rows)
