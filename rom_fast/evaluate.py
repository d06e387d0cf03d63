r"""Model-agnostic evaluation: WikiText-2 perplexity and zero-shot multiple choice.

Every function here takes any causal language model that can be called as
``model(input_ids, attention_mask=mask)`` and returns an object with a
``.logits`` tensor of shape ``[batch, seq, vocab]`` (every transformers
``*ForCausalLM`` does), dense or compressed, plus its tokenizer.  Nothing is
modified: the model is switched to ``eval()`` for the call and its previous
train/eval mode is restored afterwards.  A streamed
:class:`~rom_fast.io.sources.BlockSource` (``rom_fast.open_source(directory)``)
is run block by block (:func:`rom_fast.blockwise.forward_logits`): batches
are grouped so that their hidden states fit a memory budget and each group
reads every block once; the numbers are those of the model's own forward.

Data
----
Files are read from a data directory, ``data_dir``, which defaults to
:func:`default_data_dir`: the ``ROM_FAST_DATA`` environment variable if set,
otherwise the user's cache (``~/.cache/rom_fast``).  Each file is an entry of
:data:`rom_fast.io.data.MANIFEST` (its path, original URL, size and sha256);
``rom-fast data download`` fetches them, and a missing one is an error that
names the command.

Perplexity (:func:`wikitext2_perplexity`)
-----------------------------------------
The whole WikiText-2 (v1, ``<unk>``-tokenized) test file is read as one string
(that is, its lines joined with ``"\n"``) and tokenized once with the
tokenizer's defaults (a LLaMA tokenizer adds one BOS at the very start).  The
token stream is cut into non-overlapping windows of ``window`` tokens (clipped
to ``config.max_position_embeddings``); the trailing partial window is dropped.
Each window is scored independently: every token but the first is predicted,
so a window contributes ``window - 1`` tokens.  Perplexity is
``exp(sum NLL / number of predicted tokens)``; logits are upcast to float32
before ``log_softmax`` and the NLL sums are accumulated in float64.  A
streamed model's big head (:mod:`rom_fast.head`) gives the same float32
log-probabilities by a log-sum-exp over vocabulary chunks, at the scored
positions only.

Zero-shot multiple choice (:func:`zero_shot`)
---------------------------------------------
Prompts follow EleutherAI lm-evaluation-harness (lm-eval) v0.4.  Each choice
is one ``(context, continuation)`` request and the continuation carries the
target delimiter, a single leading space.

::

    task           context                                    continuations               metric
    boolq          {passage}\nQuestion: {question}?\nAnswer:  " no", " yes"               acc
    piqa           Question: {goal}\nAnswer:                  " " + sol1, " " + sol2      acc
    hellaswag      the file's context line, as given          " " + ending (4)            acc_norm
    winogrande     sentence up to the blank + option (2)      " " + rest of the sentence  acc
    arc_easy       Question: {question}\nAnswer:              " " + choice (3 to 5)       acc_norm
    arc_challenge  Question: {question}\nAnswer:              " " + choice (3 to 5)       acc_norm

Sources and the choices made for each:

* **boolq** -- ``boolq/llm-foundry_boolq.jsonl`` (dev, 3270).  Its ``query`` is
  ``"Passage: {passage}\nQuestion: {question}?"``; the passage and question are
  recovered by splitting at the *last* ``"\nQuestion: "`` (one passage itself
  contains that string) and the lm-eval prompt is rebuilt from them.
* **piqa** -- ``piqa/valid.jsonl`` + ``piqa/valid-labels.lst`` (validation,
  1838), the author's original files, so ``goal``/``sol1``/``sol2`` are used
  verbatim, stray whitespace included, exactly as lm-eval sees them.
* **hellaswag** -- ``hellaswag/hellaswag_val_full.txt.bz2`` (validation, 10042;
  6 lines per item: context, gold label, 4 endings).  The context line is
  ``activity_label + ": " + ctx`` with lm-eval's bracket clean-up already
  applied, so it is used as is.  One known difference from lm-eval remains:
  lm-eval capitalises the first letter of ``ctx_b``; this file does not and
  the split point is not recoverable.
* **winogrande** -- ``winogrande/llm-foundry_winogrande.jsonl`` (dev, 1267).
  Partial scoring as in lm-eval: for option *i* the context is
  ``context_options[i]`` (the sentence up to the blank, with the option filled
  in) and the continuation is ``" " + continuation`` (the rest of the
  sentence).  The continuation is shared, so only its log-likelihood is
  compared.  Like lm-eval, the space is added even before a continuation that
  begins with ``"."`` or ``"'s"``.
* **arc_easy** / **arc_challenge** -- ``llm-adapters/arc_{easy,challenge}_test.json``
  (test, 2376 / 1172).  These keep the original 3, 4 or 5 choices (the
  llm-foundry copies pad or cut them to 4).  The question and the choices are
  parsed from ``instruction`` (``"...question: {q}\n\nAnswer1: {a} Answer2:
  {b} ...\n\nAnswer format: answer1/answer2/..."``); gold is the 1-based
  ``answerN`` field.

Scoring, as in lm-eval's ``HFLM``:

* Tokenization (:func:`encode_pair`): trailing whitespace of the context is
  moved to the front of the continuation; ``context + continuation`` and
  ``context`` are encoded without special tokens (lm-eval's default for
  causal LMs: no BOS), and the continuation tokens are the tokens of the whole
  beyond the length of the context encoding.  An empty context is replaced by
  the BOS (else EOS) token.
* The log-likelihood of a request is the sum of the log-probabilities of its
  continuation tokens; the model input is ``(context + continuation)[:-1]``.
* ``acc``: the choice with the largest summed log-likelihood.  ``acc_norm``:
  the largest log-likelihood divided by the length in characters of the
  choice text without the delimiter space (lm-eval's ``len(choice)``; the
  same as bytes for these mostly-ASCII sets).  Ties go to the first choice.
  lm-eval reports only ``acc`` for boolq and winogrande, so ``acc_norm`` is
  ``None`` there.
* The per-task ``metric`` follows the LLM-Pruner / LLM-ROM tables, which use
  lm-eval: ``acc`` for BoolQ, PIQA and WinoGrande, ``acc_norm`` for HellaSwag,
  ARC-e and ARC-c.  ``"average"`` is the unweighted mean of those per-task
  scores.
* Too long for the model: a request longer than the model's context
  (``config.max_position_embeddings``, else ``n_positions``/``n_ctx``) has its
  context *left-truncated*, as lm-eval does, and one ``UserWarning`` per call
  says how many were cut.  A continuation that alone does not fit raises
  ``ValueError``.

Batching: requests are encoded, requests with identical model inputs share
one row (BoolQ's one-token answers ``" no"``/``" yes"`` thus cost a single
forward), rows are sorted by length, longest first, and packed into
right-padded batches of ``batch_size`` rows; one forward per batch.  Right
padding keeps every real token's position and causal context unchanged.
Where the model's ``forward`` accepts ``logits_to_keep`` (transformers
``*ForCausalLM``) only the last positions that hold continuation tokens are
projected to the vocabulary.
"""

from __future__ import annotations

import bz2
import inspect
import json
import math
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rom_fast.head import token_log_probs
from rom_fast.io import data

__all__ = [
    "TASKS",
    "PAPER_METRIC",
    "MCItem",
    "default_data_dir",
    "TASK_FILES",
    "PERPLEXITY_FILE",
    "require_task_files",
    "wikitext2_perplexity",
    "load_task",
    "encode_pair",
    "loglikelihoods",
    "loglikelihoods_tokens",
    "mc_predictions",
    "zero_shot",
]

#: Tasks :func:`zero_shot` knows, in the order of the papers' tables.
TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")

#: The metric each task contributes to the paper-style average.
PAPER_METRIC = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
}

# lm-eval reports acc only for these, so acc_norm is None for them.
_ACC_ONLY = ("boolq", "winogrande")

_ARC_HEAD = "Please choose the correct answer to the question: "


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item.

    ``requests[i]`` is the ``(context, continuation)`` pair scored for choice
    ``i``; ``choices[i]`` is the bare choice text whose length normalises
    ``acc_norm``; ``gold`` is the 0-based index of the right choice.
    """

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int


# ----------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------


def default_data_dir() -> str:
    """The data directory (:func:`rom_fast.io.data.data_dir`), as a string."""
    return str(data.data_dir())


def _data_file(data_dir: str | None, name: str) -> str:
    """The path of manifest entry ``name`` under ``data_dir``; missing: one line naming the
    file and the command that fetches it."""
    return str(data.require([name], data_dir)[0])


#: The data-manifest entries each task reads.
TASK_FILES = {"boolq": ("boolq",), "piqa": ("piqa", "piqa-labels"), "hellaswag": ("hellaswag",),
              "winogrande": ("winogrande",), "arc_easy": ("arc_easy",), "arc_challenge": ("arc_challenge",)}

#: The data-manifest entry :func:`wikitext2_perplexity` reads by default.
PERPLEXITY_FILE = "wikitext2"


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_boolq(data_dir: str | None) -> list[MCItem]:
    path = _data_file(data_dir, "boolq")
    items = []
    for row in _read_jsonl(path):
        query = row["query"]
        # rpartition: one passage itself contains "\nQuestion: ".
        passage, sep, question = query.rpartition("\nQuestion: ")
        if not sep or not passage.startswith("Passage: "):
            raise ValueError(f"{path}: unexpected BoolQ query format: {query[:80]!r}")
        passage = passage[len("Passage: "):]
        question = question[:-1] if question.endswith("?") else question
        context = f"{passage}\nQuestion: {question}?\nAnswer:"
        choices = ("no", "yes")
        items.append(
            MCItem(tuple((context, " " + c) for c in choices), choices, int(row["gold"]))
        )
    return items


def _load_piqa(data_dir: str | None) -> list[MCItem]:
    path = _data_file(data_dir, "piqa")
    labels_path = _data_file(data_dir, "piqa-labels")
    rows = _read_jsonl(path)
    with open(labels_path, encoding="utf-8") as f:
        labels = [int(x) for x in f.read().split()]
    if len(labels) != len(rows):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(rows)} PIQA items")
    items = []
    for row, label in zip(rows, labels):
        context = f"Question: {row['goal']}\nAnswer:"
        choices = (row["sol1"], row["sol2"])
        items.append(MCItem(tuple((context, " " + c) for c in choices), choices, label))
    return items


def _load_hellaswag(data_dir: str | None) -> list[MCItem]:
    path = _data_file(data_dir, "hellaswag")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6")
    items = []
    for i in range(0, len(lines), 6):
        context, gold = lines[i], int(lines[i + 1])
        choices = tuple(lines[i + 2 : i + 6])
        items.append(MCItem(tuple((context, " " + c) for c in choices), choices, gold))
    return items


def _load_winogrande(data_dir: str | None) -> list[MCItem]:
    path = _data_file(data_dir, "winogrande")
    items = []
    for row in _read_jsonl(path):
        continuation = " " + row["continuation"].strip()
        contexts = tuple(row["context_options"])
        items.append(
            MCItem(tuple((c, continuation) for c in contexts), contexts, int(row["gold"]))
        )
    return items


def _load_arc(data_dir: str | None, name: str) -> list[MCItem]:
    path = _data_file(data_dir, name)
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    items = []
    for row in rows:
        text = row["instruction"]
        head, _, rest = text.partition("\n\n")
        body, _, fmt = rest.rpartition("\n\n")
        if not head.startswith(_ARC_HEAD) or not fmt.startswith("Answer format: "):
            raise ValueError(f"{path}: unexpected ARC instruction format: {text[:80]!r}")
        question = head[len(_ARC_HEAD):]
        n_choices = len(fmt[len("Answer format: "):].split("/"))
        # Walk the "Answer1: a Answer2: b ..." body marker by marker.
        choices = []
        if not body.startswith("Answer1: "):
            raise ValueError(f"{path}: unexpected ARC choice list: {body[:80]!r}")
        rest = body[len("Answer1: "):]
        for k in range(2, n_choices + 1):
            choice, sep, rest = rest.partition(f" Answer{k}: ")
            if not sep:
                raise ValueError(f"{path}: missing Answer{k} in {body[:80]!r}")
            choices.append(choice)
        choices.append(rest)
        gold = int(row["answer"][len("answer"):]) - 1
        if not 0 <= gold < n_choices:
            raise ValueError(f"{path}: answer {row['answer']!r} outside {n_choices} choices")
        context = f"Question: {question}\nAnswer:"
        items.append(MCItem(tuple((context, " " + c) for c in choices), tuple(choices), gold))
    return items


def require_task_files(tasks, data_dir: str | None = None) -> None:
    """Raises one FileNotFoundError naming every missing file of ``tasks`` and the one
    command that fetches them all."""
    data.require([name for task in tasks for name in TASK_FILES[task]], data_dir)


def load_task(task: str, data_dir: str | None = None) -> list[MCItem]:
    """Parse one task's evaluation split into :class:`MCItem` objects.

    Raises ``ValueError`` for an unknown task and ``FileNotFoundError`` when
    a data file is missing.
    """
    if task == "boolq":
        return _load_boolq(data_dir)
    if task == "piqa":
        return _load_piqa(data_dir)
    if task == "hellaswag":
        return _load_hellaswag(data_dir)
    if task == "winogrande":
        return _load_winogrande(data_dir)
    if task in ("arc_easy", "arc_challenge"):
        return _load_arc(data_dir, task)
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


# ----------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------


def _max_length(model) -> int | None:
    """The model's context length from its config, or None if it states none."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class _Forward:
    """Calls the model for logits, passing optional kwargs only if accepted."""

    def __new__(cls, model):
        from rom_fast.io.sources import BlockSource
        if isinstance(model, BlockSource) and model.streamed:
            return _BlockwiseForward(model)
        return super().__new__(cls)

    def __init__(self, model):
        from rom_fast.io.sources import BlockSource
        if isinstance(model, BlockSource):   # in memory: its own forward, batch by batch
            model = model.model
        self.model = model
        self.device = _device(model)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.use_cache = "use_cache" in params
        self.logits_to_keep = "logits_to_keep" in params

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 keep: int | None = None) -> torch.Tensor:
        """Logits ``[batch, k, vocab]`` for the last ``k`` positions.

        ``k`` is ``keep`` when the model honours ``logits_to_keep``, else the
        full sequence length; callers index from the end either way.
        """
        kwargs = {"attention_mask": attention_mask.to(self.device)}
        if self.use_cache:
            kwargs["use_cache"] = False  # no KV cache to build and discard
        if keep is not None and self.logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids.to(self.device), **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    def log_probs(self, batches):
        """For each ``(input_ids, attention_mask, keep, rows, cols, targets)`` batch, in order: the
        float32 ``log p(targets[j])`` at position ``(rows[j], cols[j])`` of the sequences."""
        for ids, mask, keep, rows, cols, targets in batches:
            logits = self(ids, mask, keep)
            yield token_log_probs(logits, rows, cols - (ids.shape[1] - logits.shape[1]), targets)


class _BlockwiseForward:
    """The same for a :class:`~rom_fast.io.sources.BlockSource`: batches are run block by block,
    in groups whose hidden states fit a memory budget (a streamed model reads each block once
    per group), with exactly the logits the model's own forward gives; a big head scores only
    the asked positions, by vocabulary chunks (:meth:`rom_fast.head.Head.log_probs`)."""

    logits_to_keep = True

    def __init__(self, source):
        self.source = source

    def log_probs(self, batches):
        from rom_fast.blockwise import forward_final_hidden
        batches = list(batches)
        finals = forward_final_hidden(self.source, [b[:3] for b in batches], progress="rom_fast eval (blocks)")
        for (ids, _, _, rows, cols, targets), (head, hidden) in zip(batches, finals):
            yield head.log_probs(hidden, rows, cols - (ids.shape[1] - hidden.shape[1]), targets)


@contextmanager
def _eval_mode(model):
    """Eval mode for the block (no dropout); the caller's mode comes back after."""
    from rom_fast.io.sources import BlockSource
    if isinstance(model, BlockSource):
        model = model.model
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------


def wikitext2_perplexity(model, tokenizer, path: str | None = None, window: int = 2048,
                         max_windows: int | None = None, batch_size: int = 1, progress: bool = False,
                         comm=None) -> dict:
    """Perplexity over non-overlapping windows of a text file.

    Args:
        model: causal LM returning ``.logits``.
        tokenizer: its tokenizer; called once on the whole text with defaults.
        path: text file; default ``<data_dir>/wikitext2/tokenized/test.txt``.
        window: tokens per window, clipped to ``config.max_position_embeddings``.
        max_windows: keep only the first this many full windows.
        batch_size: windows per forward.
        comm: a :class:`rom_fast.distributed.Communicator`: each process scores its share of the
            windows and the NLL sums are all-reduced (float64), so every process returns the
            whole text's perplexity.

    Returns:
        ``{"perplexity", "nll" (mean NLL per predicted token, nats),
        "n_tokens" (predicted tokens: window - 1 per window), "n_windows",
        "window"}``.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    if path is None:
        path = _data_file(None, PERPLEXITY_FILE)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"perplexity text file not found: {path}")
    limit = _max_length(model)
    if limit is not None:
        window = min(window, limit)

    with open(path, encoding="utf-8") as f:
        text = f.read()  # the lines joined with "\n"
    ids = torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)
    n_windows = ids.numel() // window  # the last partial window is dropped
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"{path}: {ids.numel()} tokens do not fill one window of {window}")
    windows = ids[: n_windows * window].view(n_windows, window)

    forward = _Forward(model)
    batches = [windows[start : start + batch_size] for start in range(0, n_windows, batch_size)]
    if comm is not None:
        batches = comm.shard_list(batches)
    nll_sum = 0.0  # a Python float is float64
    with _eval_mode(model), torch.inference_mode():
        scored = forward.log_probs(_every_next_token(b) for b in batches)
        if progress and isinstance(forward, _Forward):     # a block source shows its own bar
            from tqdm.auto import tqdm
            scored = tqdm(scored, total=len(batches), desc="WikiText-2 perplexity", unit="batch")
        for logp in scored:
            nll_sum += (-logp).double().sum().item()
            del logp   # before the next window's forward allocates its own
    if comm is not None:
        nll_sum = comm.all_reduce_scalar(nll_sum, "perplexity")
    n_tokens = n_windows * (window - 1)
    mean_nll = nll_sum / n_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "n_tokens": n_tokens,
        "n_windows": n_windows,
        "window": window,
    }


def _every_next_token(windows: torch.Tensor):
    """A batch of windows scored at every position but the last, on the next token (the
    :meth:`_Forward.log_probs` form, rows and columns in row-major order)."""
    n, width = windows.shape
    rows = torch.arange(n).repeat_interleave(width - 1)
    cols = torch.arange(width - 1).repeat(n)
    return windows, torch.ones_like(windows), None, rows, cols, windows[:, 1:].reshape(-1)


# ----------------------------------------------------------------------------
# Log-likelihood of continuations
# ----------------------------------------------------------------------------


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _prefix_token(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ValueError("empty context needs a BOS or EOS token, and the tokenizer has neither")


def _encode_pairs(tokenizer, requests) -> list[tuple[list[int], list[int]]]:
    """Batched :func:`encode_pair` (one tokenizer call per list, same result)."""
    contexts, wholes, empty = [], [], []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        empty.append(context == "")
        contexts.append(context)
        wholes.append(context + continuation)
    context_ids = _encode(tokenizer, contexts)
    whole_ids = _encode(tokenizer, wholes)
    pairs = []
    for ctx, whole, is_empty in zip(context_ids, whole_ids, empty):
        if is_empty:
            # lm-eval conditions an empty context on a single prefix token.
            pairs.append(([_prefix_token(tokenizer)], list(whole)))
        else:
            pairs.append((list(ctx), list(whole[len(ctx):])))
    return pairs


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids ``(context, continuation)`` the way lm-eval's ``HFLM`` makes them.

    Trailing whitespace of the context moves to the continuation; the
    continuation ids are those of ``encode(context + continuation)`` past
    ``len(encode(context))``; no special tokens are added.
    """
    return _encode_pairs(tokenizer, [(context, continuation)])[0]


def loglikelihoods_tokens(model, requests, batch_size: int = 16,
                          max_length: int | None = None) -> list[float]:
    """Summed log-probability of each continuation given its context, on token ids.

    Args:
        model: causal LM returning ``.logits``.
        requests: sequence of ``(context_ids, continuation_ids)``; the context
            must be non-empty (see :func:`encode_pair` for the empty case).
        batch_size: rows per forward.
        max_length: model context; default from the model config.  Longer
            requests are left-truncated with one ``UserWarning``.

    Returns:
        one float per request, in request order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_length is None:
        max_length = _max_length(model)

    # Group requests by their model input, (context + continuation)[:-1].
    rows: dict[tuple[int, ...], list[int]] = {}
    spans: list[tuple[int, list[int]]] = []  # (first scored position, target ids)
    n_truncated = 0
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx:
            raise ValueError(f"request {i}: empty context (use encode_pair to get a prefix token)")
        if not cont:
            raise ValueError(f"request {i}: the continuation encodes to zero tokens")
        full = ctx + cont
        if max_length is not None and len(full) - 1 > max_length:
            if len(cont) > max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens does not fit the "
                    f"model context of {max_length} tokens"
                )
            full = full[-(max_length + 1):]  # drop the oldest context tokens
            n_truncated += 1
        inp = tuple(full[:-1])
        rows.setdefault(inp, []).append(i)
        spans.append((len(inp) - len(cont), cont))
    if n_truncated:
        warnings.warn(
            f"{n_truncated} request(s) longer than the model context ({max_length} tokens) "
            f"had their context left-truncated",
            UserWarning,
            stacklevel=2,
        )

    # Longest first: the largest batch runs first, so out-of-memory shows early.
    order = sorted(rows, key=len, reverse=True)
    batches = []  # (ids, mask, keep, b_idx, p_idx, targets, owner) per batch
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(chunk[0])
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        b_idx, p_idx, targets, owner = [], [], [], []
        for b, inp in enumerate(chunk):
            ids[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[b, : len(inp)] = 1
            for r in rows[inp]:
                first, cont = spans[r]
                b_idx.extend([b] * len(cont))
                p_idx.extend(range(first, first + len(cont)))
                targets.extend(cont)
                owner.extend([r] * len(cont))
        # Only positions from the earliest scored one onwards need logits.
        batches.append((ids, mask, width - min(p_idx), b_idx, p_idx, targets, owner))
    forward = _Forward(model)
    results = [0.0] * len(spans)
    with _eval_mode(model), torch.inference_mode():
        stream = forward.log_probs((ids, mask, keep, torch.tensor(b_idx), torch.tensor(p_idx), torch.tensor(targets))
                                   for ids, mask, keep, b_idx, p_idx, targets, _ in batches)
        for (*_, owner), tok_lp in zip(batches, stream):
            # Sum each request's token log-probs in float64.
            members = sorted(set(owner))
            local = {r: j for j, r in enumerate(members)}
            sums = torch.zeros(len(members), dtype=torch.float64)
            sums.index_add_(0, torch.tensor([local[r] for r in owner]), tok_lp.double().cpu())
            for r, value in zip(members, sums.tolist()):
                results[r] = value
            del tok_lp   # before the next batch's forward allocates its own
    return results


def loglikelihoods(model, tokenizer, requests, batch_size: int = 16) -> list[float]:
    """Summed log-probability of each ``(context, continuation)`` string pair.

    Tokenized with :func:`encode_pair`, scored with
    :func:`loglikelihoods_tokens` in right-padded batches of ``batch_size``.
    """
    return loglikelihoods_tokens(model, _encode_pairs(tokenizer, list(requests)), batch_size)


def mc_predictions(lls, choice_lengths) -> tuple[int, int]:
    """``(acc prediction, acc_norm prediction)`` for one item.

    ``acc`` takes the largest log-likelihood; ``acc_norm`` the largest
    log-likelihood per character of the choice.  Ties go to the first choice.
    """
    if len(lls) != len(choice_lengths) or not lls:
        raise ValueError("need one log-likelihood per choice and at least one choice")
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    # max(len, 1): an empty choice text must not divide by zero.
    normed = [ll / max(n, 1) for ll, n in zip(lls, choice_lengths)]
    pred_norm = max(range(len(lls)), key=lambda i: (normed[i], -i))
    return pred, pred_norm


# ----------------------------------------------------------------------------
# Zero-shot tasks
# ----------------------------------------------------------------------------


def zero_shot(model, tokenizer, tasks=TASKS, limit: int | None = None, seed: int = 0,
              batch_size: int = 16, data_dir: str | None = None, progress: bool = False) -> dict:
    """Zero-shot multiple-choice accuracy, lm-eval style (see the module doc).

    Args:
        model: causal LM returning ``.logits``.
        tokenizer: its tokenizer.
        tasks: names from :data:`TASKS`.
        limit: evaluate a subset of this many items per task, drawn with
            ``random.Random(seed)`` (the same items for every model).
        seed: seed of that draw.
        batch_size: rows per forward.
        data_dir: data directory; default :func:`default_data_dir`.

    Returns:
        ``{task: {"acc", "acc_norm" (None for boolq and winogrande), "n",
        "metric" (name of the paper metric), "score" (its value)}, ...,
        "average": {"score" (unweighted mean of the task scores), "metric":
        "mean", "tasks"}}``.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
    if not tasks:
        raise ValueError(f"no tasks given; valid tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive or None, got {limit}")
    require_task_files(tasks, data_dir)      # every missing file named before any task runs

    results = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tasks), desc="zero-shot tasks", unit="task")
    for task in tasks:
        if bar is not None:
            bar.set_postfix_str(task)
            bar.update(0)
        items = load_task(task, data_dir)
        if limit is not None and limit < len(items):
            picked = sorted(random.Random(seed).sample(range(len(items)), limit))
            items = [items[i] for i in picked]
        requests = [req for item in items for req in item.requests]
        lls = loglikelihoods(model, tokenizer, requests, batch_size)
        correct = correct_norm = 0
        pos = 0
        for item in items:
            k = len(item.requests)
            pred, pred_norm = mc_predictions(lls[pos : pos + k], [len(c) for c in item.choices])
            pos += k
            correct += pred == item.gold
            correct_norm += pred_norm == item.gold
        acc = correct / len(items)
        acc_norm = None if task in _ACC_ONLY else correct_norm / len(items)
        metric = PAPER_METRIC[task]
        results[task] = {
            "acc": acc,
            "acc_norm": acc_norm,
            "n": len(items),
            "metric": metric,
            "score": acc if metric == "acc" else acc_norm,
        }
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    results["average"] = {
        "score": sum(results[t]["score"] for t in tasks) / len(tasks),
        "metric": "mean",
        "tasks": tasks,
    }
    return results
