"""Nothing half-written: the output follows the umask, an overwrite keeps the old directory
until the new one is complete, a full disk is one clear error that leaves the previous output
untouched, and an existing ``out`` is refused before any work."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import rom_fast
from rom_fast.io import output

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=2, tie_word_embeddings=True)
RANKS = {"model.layers.0.mlp.up_proj": 6, "model.layers.1.self_attn.q_proj": 5}


def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).eval()


def kw():
    g = torch.Generator().manual_seed(1)
    return dict(calibration={"input_ids": torch.randint(0, TINY["vocab_size"], (8, 16), generator=g),
                             "attention_mask": torch.ones(8, 16, dtype=torch.long)},
                ranks=RANKS, progress=False)


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def previous(tmp_path):
    """A finished output (rank 4 on one layer) that later runs try to replace."""
    out = tmp_path / "out"
    rom_fast.compress(tiny_model(), out=out, **dict(kw(), ranks={"model.layers.0.mlp.up_proj": 4}))
    return out, snapshot(out)


def test_output_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        rom_fast.compress(tiny_model(), out=tmp_path / "out", **kw())
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes


def test_overwrite_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path, previous, monkeypatch):
    out, old = previous
    seen = []
    replace = os.replace

    def watched(src, dst):
        # At every rename, a complete old output is on disk (as out, or renamed aside) and the
        # new one is complete before it takes out's name.
        aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
        holders = ([out] if out.exists() else []) + aside
        seen.append((Path(src).name, Path(dst).name))
        if Path(dst) == out:
            assert (Path(src) / "config.json").is_file() and (Path(src) / output.INDEX_FILE).is_file()
        if Path(src).name.startswith(".out.partial") or Path(src) == out:
            assert any(snapshot(h) == old for h in holders), "old output incomplete during the swap"
        return replace(src, dst)

    monkeypatch.setattr(output.os, "replace", watched)
    rom_fast.compress(tiny_model(), out=out, overwrite=True, **kw())
    assert ("out", next(d for s, d in seen if s == "out")) in seen        # the old one was moved aside
    assert (".out.partial", "out") in seen
    assert snapshot(out) != old and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {m.rank for m in rom_fast.load(out).modules() if hasattr(m, "rank")} == set(RANKS.values())


def test_a_failure_before_the_swap_leaves_the_old_output_untouched(tmp_path, previous, monkeypatch):
    out, old = previous

    def fail(*args, **kwargs):
        assert snapshot(out) == old        # the new directory is complete but not yet in place
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rom_fast.api.write_metadata", fail)
    with pytest.raises(OSError, match="No space left"):
        rom_fast.compress(tiny_model(), out=out, overwrite=True, **kw())
    assert snapshot(out) == old


_FULL_DISK_CHILD = textwrap.dedent("""
    import resource, signal, sys
    import torch, transformers
    from transformers import AutoModelForCausalLM
    import rom_fast
    from rom_fast.cli import _one_line
    cfg, out, ranks, limit = eval(sys.argv[1]), sys.argv[2], eval(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(1)
    calib = {"input_ids": torch.randint(0, cfg["vocab_size"], (8, 16), generator=g),
             "attention_mask": torch.ones(8, 16, dtype=torch.long)}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        rom_fast.compress(model, calibration=calib, ranks=ranks, out=out, overwrite=True, progress=False)
    except Exception as exc:
        print("ERROR", _one_line(exc))
        sys.exit(2)
    print("OK")
""")


@pytest.mark.parametrize("limit", [28_500])       # block 0 is written, block 1's shard hits the limit
def test_a_full_disk_is_one_clear_error_and_leaves_the_previous_output(tmp_path, previous, limit):
    out, old = previous
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, repr(TINY), str(out), repr(RANKS), str(limit)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR ") and "File too large" in line and str(tmp_path) in line, line
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == old
    # What is left beside out is at most the resumable partial state, which `rom-fast clean` removes.
    assert {p.name for p in tmp_path.iterdir()} <= {"out", ".out.partial"}
    output.clean(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_in_memory_path_refuses_an_existing_out_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    monkeypatch.setattr("rom_fast.api.open_source", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr("rom_fast.api.calibration_tokens", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(FileExistsError, match="already exists"):
        rom_fast.compress(model, out=tmp_path / "out", **kw())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_objects_compute_in_float32_and_save_their_own_dtype(tmp_path, dtype):
    from safetensors import safe_open
    reference = rom_fast.compress(tiny_model(), **kw()).model                   # float32 throughout
    half = tiny_model().to(dtype)
    result = rom_fast.compress(half, out=tmp_path / "out", **kw())
    assert {p.dtype for p in result.model.parameters()} == {dtype}              # kept in its precision
    stored = set()
    for f in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            stored |= {st.get_tensor(k).dtype for k in st.keys()}
    assert stored == {dtype}
    assert json_dtype(tmp_path / "out") in (str(dtype).split(".")[1], None)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        a = rom_fast.load(tmp_path / "out")(ids).logits
        b = reference(ids).logits
    # Same factors up to the half-precision rounding of the weights (float32 arithmetic).
    assert torch.isfinite(a).all() and (a - b).abs().max() < 0.05 * b.abs().max()


def json_dtype(directory: Path):
    import json
    cfg = json.loads((directory / "config.json").read_text())
    return cfg.get("dtype", cfg.get("torch_dtype"))
