"""Calibration token batches: the inputs whose activations define each layer's subspace.

One entry point, :func:`calibration_tokens`, turns a text file, a JSON/JSONL file, a list
of documents, a token tensor, a named local corpus or the paper's task mix into a
fixed-shape :class:`CalibrationBatch`. Padding is always on the right and always marked
0 in ``attention_mask``, so that statistics can drop it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import pathlib
import random

import torch

from rom_fast.io import data

HUB_PREFIX = "hf:"          # the explicit opt-in for a Hugging Face dataset name
# Named local corpora: name -> file under <data_dir>/calibration_text/ (the data manifest's
# entry of the same name: ``rom-fast data download wiki``).
NAMED_TEXTS = {name: pathlib.Path(data.entry(name).path).name for name in ("wiki", "c4", "shakespeare")}

# The paper's "combination" tasks that have a train split under <data_dir>/llm-adapters/
# (manifest entries "<task>-train").
COMBINATION_FILES = {task: pathlib.Path(data.entry(f"{task}-train").path).name
                     for task in ("boolq", "arc_easy", "arc_challenge")}

# Suffixes treated as documents; every other existing file is one plain text.
_DOCUMENT_SUFFIXES = (".jsonl", ".json")


@dataclasses.dataclass(frozen=True)
class CalibrationBatch:
    """A fixed-shape calibration batch.

    Attributes:
        input_ids: LongTensor (n, seq_len) of token ids.
        attention_mask: LongTensor (n, seq_len); 1 = real token, 0 = right padding.
        description: one line saying where the tokens came from (for the model card).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: str

    @property
    def n_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.attention_mask.sum())


def default_data_dir() -> pathlib.Path:
    """The data directory: ``$ROM_FAST_DATA``, else the user's cache (see
    :func:`rom_fast.io.data.data_dir`)."""
    return data.data_dir()


def default_calibration() -> str:
    """``"wiki"`` when the local Wikipedia text is present, else ``"generated"`` (data-free)."""
    return "wiki" if data.local_path(data.entry("wiki")).is_file() else "generated"


def data_free_note(with_perplexity: bool = False) -> str:
    """The one line a run printed when it falls back to ``"generated"``: what it does instead,
    and the command that fetches what it lacks (the WikiText-2 file too, ``with_perplexity``)."""
    names = ["wiki"] + [f.name for f in data.missing([data.entry("wikitext2")]) if with_perplexity]
    return (f"rom_fast: no calibration data ({data.entry('wiki').path} is not in {data.data_dir()}): "
            f"calibrating on text sampled from the model (data-free); for real text"
            f"{' and perplexity' if len(names) > 1 else ''}: {data.fetch_command(names)}")


def calibration_files(source) -> list:
    """The data-manifest names a calibration ``source`` reads (none for files, tensors, ...)."""
    if isinstance(source, str) and source in NAMED_TEXTS:
        return [source]
    if isinstance(source, str) and source == "combination":
        return [f"{task}-train" for task in COMBINATION_FILES]
    return []


def calibration_tokens(
    source, tokenizer, n_samples: int = 512, seq_len: int = 128, seed: int | None = 0,
    model=None,
) -> CalibrationBatch:
    """Build an (n_samples, seq_len) calibration batch from ``source``.

    Sources:
        - a path to a text file (any suffix but .jsonl/.json): the whole text is tokenized as
          one string (tokenizer defaults) and cut into non-overlapping seq_len windows;
          ``seed`` int: n_samples windows drawn without replacement with
          ``random.Random(seed)`` (kept in text order); ``seed=None``: the first n_samples
          consecutive windows. Too few windows is a ValueError.
        - a ``.jsonl`` file (one JSON object per line) or ``.json`` file (one JSON array):
          each item is a document, its ``"text"`` field, or its only string value, or the
          item itself if it is a string.
        - a list of strings: each string is a document.
        - ``"wiki"``, ``"c4"``, ``"shakespeare"``: the text files of
          ``<data_dir>/calibration_text/`` (see :data:`NAMED_TEXTS`), text-file rule.
        - ``"combination"``: the paper's task mix, see :func:`_combination_batch`.
        - ``"generated"``: data-free, sequences sampled from ``model`` itself, see
          :func:`generated_tokens`.
        - a LongTensor (n, s) of token ids, a dict / tuple ``(input_ids, attention_mask)`` or a
          CalibrationBatch:
          used as is: rows past n_samples are dropped, a batch with fewer rows is kept
          whole, columns past seq_len are dropped, a shorter s is kept; a bare tensor
          gets an all-ones mask.
        - ``"hf:NAME"``: the Hugging Face dataset NAME (``"text"`` column of the train
          split), only with ``datasets`` installed and ``HF_HUB_OFFLINE`` not ``"1"``; the
          only source that may download, and only when asked by that prefix. Any other
          string that is neither a file nor a named corpus is a ValueError.

    Documents (JSON/JSONL, list, dataset) are tokenized one by one (tokenizer defaults);
    empty ones are dropped. ``seed`` int: n_samples documents drawn with
    ``random.Random(seed)``, without replacement, or with replacement when there are
    fewer documents than n_samples; a longer document gives one random window of seq_len
    tokens; ``seed=None``: the first n_samples documents and the first window of each
    (fewer documents is a ValueError). Documents shorter than seq_len are right-padded with
    ``tokenizer.pad_token_id`` (eos if none) and masked 0 there.

    Args:
        source: see above.
        tokenizer: a Hugging Face tokenizer (unused for token tensors; may be None there).
        n_samples: number of rows, >= 1.
        seq_len: tokens per row, >= 2.
        seed: int for a seeded random draw, None for "the first ones in order".
        model: only for ``"generated"``.

    Returns:
        CalibrationBatch with LongTensors (n, seq_len).

    Raises:
        ValueError: bad n_samples / seq_len / seed, too little data, malformed content,
            or a name that is neither a file nor a reachable dataset.
        FileNotFoundError: a path (a ``pathlib.Path``, or a string that looks like a file
            name) that does not exist, or a missing local data directory.
        TypeError: ``source`` of an unsupported type.
    """
    _check_int("n_samples", n_samples, 1)
    _check_int("seq_len", seq_len, 2)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")

    if isinstance(source, CalibrationBatch):
        source = (source.input_ids, source.attention_mask)
    if isinstance(source, (torch.Tensor, dict, tuple)):
        return _tensor_batch(source, n_samples, seq_len)
    if isinstance(source, list):
        return _documents_batch(
            _check_documents(source, "source list"), "list of strings",
            tokenizer, n_samples, seq_len, seed,
        )
    if isinstance(source, str) and source == "generated":
        if model is None:
            raise ValueError("calibration 'generated' samples from the model: pass model=")
        return generated_tokens(model, tokenizer, n_samples, seq_len, seed)
    if isinstance(source, str) and source == "combination":
        return _combination_batch(tokenizer, n_samples, seq_len, seed)
    if isinstance(source, str) and source in NAMED_TEXTS:
        path, = data.require([source])
        return _text_batch(path, tokenizer, n_samples, seq_len, seed)
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source).expanduser()
        if path.is_file():
            if path.suffix.lower() in _DOCUMENT_SUFFIXES:
                docs = _read_json_documents(path)
                return _documents_batch(docs, path.name, tokenizer, n_samples, seq_len, seed)
            return _text_batch(path, tokenizer, n_samples, seq_len, seed)
        if path.exists():
            raise ValueError(f"source {str(source)!r} exists but is not a file")
        if isinstance(source, str) and source.startswith(HUB_PREFIX):
            return _dataset_batch(source[len(HUB_PREFIX):], tokenizer, n_samples, seq_len, seed)
        if isinstance(source, os.PathLike) or _looks_like_path(source):
            raise FileNotFoundError(f"source file {str(source)!r} does not exist")
        # Never sent to the hub unasked: a typo must not turn into a download.
        names = [*NAMED_TEXTS, "combination", "generated"]
        close = difflib.get_close_matches(source, names, n=1)
        raise ValueError(f"calibration {source!r} is not an existing file or a named corpus "
                         f"({', '.join(names)})" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f"; a Hugging Face dataset is opted into as '{HUB_PREFIX}{source}'")
    raise TypeError(
        f"source must be a path, a named corpus, 'combination', a list of strings, a token "
        f"tensor or (input_ids, attention_mask); got {type(source).__name__}"
    )


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _looks_like_path(name: str) -> bool:
    """True for strings meant as file names rather than Hugging Face dataset ids."""
    p = pathlib.Path(name)
    return (
        p.is_absolute()
        or name.startswith((".", "~"))
        or p.suffix.lower() in (".txt", ".utf8", ".jsonl", ".json", ".text", ".md")
    )


def _check_documents(docs, where: str) -> list[str]:
    if not docs:
        raise ValueError(f"{where} holds no documents")
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise ValueError(f"{where}: item {i} is a {type(doc).__name__}, expected str")
    return list(docs)


# ----------------------------------------------------------------------------- tokenizing


def _encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    if tokenizer is None:
        raise ValueError("tokenizer is required to tokenize text sources")
    # verbose=False: a long text exceeding model_max_length is intended here (we cut it).
    return list(
        tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    )


def _pad_id(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    raise ValueError("tokenizer has neither pad_token_id nor eos_token_id to pad with")


def _windows_batch(
    ids: list[int], n_samples: int, seq_len: int, seed: int | None, what: str
) -> CalibrationBatch:
    """Non-overlapping seq_len windows of one token stream (no padding)."""
    n_windows = len(ids) // seq_len
    if n_windows < n_samples:
        raise ValueError(
            f"{what} has {len(ids)} tokens, i.e. {n_windows} non-overlapping windows of "
            f"seq_len={seq_len}; n_samples={n_samples} were asked for"
        )
    if seed is None:
        starts = range(n_samples)
        how = f"first {n_samples} consecutive"
    else:
        starts = sorted(random.Random(seed).sample(range(n_windows), n_samples))
        how = f"{n_samples} random (seed {seed}) of {n_windows}"
    flat = torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    input_ids = flat[list(starts)].clone()
    return CalibrationBatch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        description=f"{what}: {how} non-overlapping windows of {seq_len} tokens",
    )


def _text_batch(path, tokenizer, n_samples, seq_len, seed) -> CalibrationBatch:
    text = pathlib.Path(path).read_text(encoding="utf-8")
    return _windows_batch(_encode(tokenizer, text), n_samples, seq_len, seed, pathlib.Path(path).name)


# ----------------------------------------------------------------------------- documents


def _document_text(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "text" in item:
            if not isinstance(item["text"], str):
                raise ValueError(f"{where}: field 'text' is not a string")
            return item["text"]
        strings = [k for k, v in item.items() if isinstance(v, str)]
        if len(strings) == 1:
            return item[strings[0]]
        raise ValueError(
            f"{where}: no 'text' field and {len(strings)} string fields {strings}; "
            f"cannot tell which one is the document"
        )
    raise ValueError(f"{where}: expected an object or a string, got {type(item).__name__}")


def _read_json_documents(path: pathlib.Path) -> list[str]:
    """Documents of a .jsonl (one value per line) or .json (one array) file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path.name} line {lineno}: invalid JSON ({err.msg})") from None
            docs.append(_document_text(item, f"{path.name} line {lineno}"))
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path.name}: invalid JSON ({err.msg})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path.name}: expected a JSON array of documents")
        docs = [_document_text(item, f"{path.name} item {i}") for i, item in enumerate(items)]
    return _check_documents(docs, path.name)


def _documents_batch(docs, what, tokenizer, n_samples, seq_len, seed) -> CalibrationBatch:
    """One seq_len row per drawn document; short documents right-padded and masked."""
    encoded = [ids for ids in (_encode(tokenizer, d) for d in docs) if ids]
    if not encoded:
        raise ValueError(f"{what}: every document tokenizes to zero tokens")
    if seed is None:
        if len(encoded) < n_samples:
            raise ValueError(
                f"{what} has {len(encoded)} non-empty documents; n_samples={n_samples} were "
                f"asked for with seed=None (pass an int seed to draw with replacement)"
            )
        rng = None
        chosen = range(n_samples)
        how = f"first {n_samples} documents"
    else:
        rng = random.Random(seed)
        if len(encoded) >= n_samples:
            chosen = rng.sample(range(len(encoded)), n_samples)
            how = f"{n_samples} documents drawn without replacement (seed {seed})"
        else:
            chosen = rng.choices(range(len(encoded)), k=n_samples)
            how = (
                f"{n_samples} draws with replacement from {len(encoded)} documents "
                f"(seed {seed})"
            )

    input_ids = torch.empty(n_samples, seq_len, dtype=torch.long)
    attention_mask = torch.zeros(n_samples, seq_len, dtype=torch.long)
    pad = None
    for row, k in enumerate(chosen):
        ids = encoded[k]
        if len(ids) >= seq_len:
            start = 0 if rng is None else rng.randrange(len(ids) - seq_len + 1)
            input_ids[row] = torch.tensor(ids[start : start + seq_len])
            attention_mask[row] = 1
        else:
            pad = _pad_id(tokenizer) if pad is None else pad
            input_ids[row, : len(ids)] = torch.tensor(ids)
            input_ids[row, len(ids) :] = pad
            attention_mask[row, : len(ids)] = 1
    return CalibrationBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        description=f"{what}: {how}, one window of up to {seq_len} tokens each, right-padded",
    )


def _combination_batch(tokenizer, n_samples, seq_len, seed) -> CalibrationBatch:
    """The paper's "combination" calibration set, from the train splits available here.

    The paper mixes prompts of six tasks (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e,
    ARC-c). Only BoolQ, ARC-Easy and ARC-Challenge have a train split under
    ``<data_dir>/llm-adapters/`` (see :data:`COMBINATION_FILES`); PIQA, HellaSwag and
    WinoGrande have none, so the mix uses the three available tasks. Each item gives the
    document ``instruction + "\\n" + output``.

    ``seed`` int: each draw picks a task uniformly, then an item of it uniformly (with
    replacement), with ``random.Random(seed)``; ``seed=None``: round-robin over the tasks,
    items in file order. Like the paper, samples are concatenated rather than padded:
    documents are tokenized without special tokens, joined by the tokenizer's eos into
    one stream, and the stream is cut into the first n_samples windows of seq_len.
    """
    tasks = []
    paths = data.require(calibration_files("combination"))
    for (task, name), path in zip(COMBINATION_FILES.items(), paths):
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list) or not items:
            raise ValueError(f"{name}: expected a non-empty JSON array")
        tasks.append((task, items))
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    if eos is None:
        raise ValueError("the 'combination' source needs a tokenizer with eos_token_id")

    rng = None if seed is None else random.Random(seed)
    needed = n_samples * seq_len
    stream: list[int] = []
    draw = 0
    while len(stream) < needed:
        if rng is None:
            _, items = tasks[draw % len(tasks)]
            k = draw // len(tasks)
            if k >= len(items):
                raise ValueError(
                    f"'combination' with seed=None ran out of items after {draw} documents "
                    f"({len(stream)} tokens); n_samples={n_samples} x seq_len={seq_len} "
                    f"needs more (pass an int seed to draw with replacement)"
                )
            item = items[k]
        else:
            _, items = tasks[rng.randrange(len(tasks))]
            item = items[rng.randrange(len(items))]
        try:
            doc = item["instruction"] + "\n" + item["output"]
        except (KeyError, TypeError):
            raise ValueError("llm-adapters item lacks string 'instruction'/'output'") from None
        if stream:
            stream.append(int(eos))
        stream.extend(_encode(tokenizer, doc, add_special_tokens=False))
        draw += 1

    batch = _windows_batch(stream, n_samples, seq_len, None, "combination")
    how = "round-robin, file order" if seed is None else f"seed {seed}"
    names = "+".join(COMBINATION_FILES)
    return dataclasses.replace(
        batch,
        description=(
            f"combination of {names} train prompts ({draw} documents, {how}), eos-joined, "
            f"{n_samples} windows of {seq_len} tokens"
        ),
    )


def _dataset_batch(name, tokenizer, n_samples, seq_len, seed) -> CalibrationBatch:
    online = os.environ.get("HF_HUB_OFFLINE", "") != "1"
    if importlib.util.find_spec("datasets") is None or not online:
        raise ValueError(
            f"calibration '{HUB_PREFIX}{name}' (a Hugging Face dataset) needs "
            f"the 'datasets' package and network access (HF_HUB_OFFLINE not 1)"
        )
    from datasets import load_dataset  # pragma: no cover

    texts = load_dataset(name, split="train")["text"]  # pragma: no cover
    docs = _check_documents(list(texts), f"dataset {name!r}")  # pragma: no cover
    return _documents_batch(docs, name, tokenizer, n_samples, seq_len, seed)  # pragma: no cover


# ----------------------------------------------------------------------------- data-free


def generated_tokens(model, tokenizer, n_samples: int = 512, seq_len: int = 128,
                     seed: int | None = 0, batch_size: int = 64) -> CalibrationBatch:
    """Data-free calibration: token sequences sampled from the model itself.

    Each row starts with BOS (when the tokenizer has one) and one token drawn uniformly from
    the ordinary vocabulary, then continues by sampling the model's own next-token
    distribution (temperature 1, no truncation) over the ordinary vocabulary (special tokens,
    end-of-sequence included, are never drawn), so every row has exactly ``seq_len`` real
    tokens (the LLM-QAT recipe for data-free statistics). Used when no calibration data is
    available; real text calibrates better (see README).

    ``model``: a model object or a :class:`~rom_fast.io.sources.BlockSource`; a streamed
    directory is sampled block by block (:func:`rom_fast.blockwise.sample_sequences`), in
    bounded memory, at the cost of reading every block once per generated token and group of
    ``batch_size`` rows. Deterministic for a given ``seed`` (None means 0) on a given machine.
    """
    from rom_fast.blockwise import sample_sequences
    from rom_fast.io.sources import BlockSource, ModelSource

    _check_int("n_samples", n_samples, 1)
    _check_int("seq_len", seq_len, 2)
    _check_int("batch_size", batch_size, 1)
    if tokenizer is None:
        raise ValueError("generated calibration needs the model's tokenizer")
    source = model if isinstance(model, BlockSource) else ModelSource(model, tokenizer)
    vocab = source.config.vocab_size
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), vocab)) if i not in special])
    if len(ordinary) == 0:
        raise ValueError("the tokenizer has no ordinary (non-special) token to sample")
    bos = tokenizer.bos_token_id
    seed = 0 if seed is None else seed
    generator = torch.Generator().manual_seed(seed)
    first = ordinary[torch.randint(len(ordinary), (n_samples, 1), generator=generator)]
    if bos is not None:
        first = torch.cat([torch.full((n_samples, 1), bos), first], dim=1)
    rows = []
    for start in range(0, n_samples, batch_size):
        rows.append(sample_sequences(source, first[start:start + batch_size, :seq_len], seq_len, ordinary,
                                     generator))
    input_ids = torch.cat(rows).long()
    return CalibrationBatch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        description=f"generated: {n_samples} sequences of {seq_len} tokens sampled from the "
                    f"model (seed {seed})",
    )


# ----------------------------------------------------------------------------- tensors


def _tensor_batch(source, n_samples, seq_len) -> CalibrationBatch:
    if isinstance(source, torch.Tensor):
        input_ids, attention_mask = source, None
    elif isinstance(source, dict):
        if "input_ids" not in source:
            raise ValueError("source dict must have 'input_ids' (and optionally 'attention_mask')")
        input_ids, attention_mask = source["input_ids"], source.get("attention_mask")
    else:
        if len(source) != 2:
            raise ValueError("source tuple must be (input_ids, attention_mask)")
        input_ids, attention_mask = source

    input_ids = _check_token_tensor("input_ids", input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        attention_mask = _check_token_tensor("attention_mask", attention_mask, allow_bool=True)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                f"shape {tuple(input_ids.shape)}"
            )
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")

    input_ids = input_ids[:n_samples, :seq_len].clone()
    attention_mask = attention_mask[:n_samples, :seq_len].clone()
    n, s = input_ids.shape
    return CalibrationBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        description=f"given token tensor: {n} rows of {s} tokens",
    )


def _check_token_tensor(name: str, t, allow_bool: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or (t.dtype == torch.bool and not allow_bool):
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D (n, seq) and non-empty, got {tuple(t.shape)}")
    # Integer widening is lossless; the batch promises int64.
    return t.detach().cpu().to(torch.long)
