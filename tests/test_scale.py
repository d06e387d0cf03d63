"""LLaMA-7B shapes: a streamed compression of synthetic blocks stays within a bounded memory.

The full measurements (512 x 128 calibration tokens, 2/4/8 blocks) are bench/bench_scale.py;
here one block (two with -m slow) at a small calibration, each in a fresh process so its peak
RSS is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
from bench_scale import SHAPES, module_rank  # noqa: E402
from synth_llama import write_llama7b_shaped  # noqa: E402

GIB = 2 ** 30


def compress_in_child(directory, n_samples=8, seq_len=128) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_scale.py"), "_child", str(directory),
                           str(n_samples), str(seq_len), "float16"], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_one_7b_shaped_block_streams_under_4_gib(tmp_path):
    directory = write_llama7b_shaped(tmp_path / "llama7b-1", 1)
    cfg = json.loads((directory / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["vocab_size"]) == \
        (4096, 11008, 32, 32000)
    s = compress_in_child(directory)
    dense_block = sum(a * b for a, b in SHAPES.values())
    factored = sum(module_rank(a, b) * (a + b) for a, b in SHAPES.values())
    assert s["params_before"] - s["params_after"] == dense_block - factored
    # The bf16 checkpoint alone is 0.93 GiB; float32 embedding + head would be 1 GiB more.
    assert s["peak_rss_bytes"] < 4 * GIB, s["peak_rss_bytes"] / GIB
    assert s["seconds"]["eigensolver"] > 0


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(tmp_path):
    peaks = [compress_in_child(write_llama7b_shaped(tmp_path / f"llama7b-{n}", n))["peak_rss_bytes"]
             for n in (1, 2)]
    assert peaks[1] < 1.1 * peaks[0], [p / GIB for p in peaks]
