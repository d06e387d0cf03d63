"""Mixture-of-experts scale: a streamed Mixtral-8x7B-shaped directory compressed within the
memory bound, peak RSS and seconds per block.

  python bench/bench_scale_moe.py --blocks 2 --n-samples 512 --seq-len 128 --activation-dtype float16

The directory comes from bench/synth_moe.py (random bfloat16 weights, real shapes, transformers'
tensor names). The compression runs in a fresh child process (peak RSS = its VmHWM) with the
paper's 80% module budget (0.46) on every linear of every block: attention and each expert's
gate/up/down low-rank, the router dense. (Kept neurons are out of reach here: choosing 6594 of
an expert's 14336 neurons needs its 14336² float64 Gram and inverse, 3.3 GB.) The result goes
to bench/results/scale_moe_*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_scale import MODULE_BUDGET, RssTrace, module_rank  # noqa: E402
from synth_llama import random_token_ids  # noqa: E402
from synth_moe import shape_config, write_synthetic  # noqa: E402


def uniform_plan(directory: str, budget: float = MODULE_BUDGET) -> dict:
    """Every compressible linear (attention, each expert's) at the module budget's rank."""
    from rom_fast import plans
    from rom_fast.io.sources import DirectorySource

    shape = plans.ModelShape.of_source(DirectorySource(directory, read_tokenizer=False))
    return {n: module_rank(d_out, d_in, budget) for n, (d_out, d_in) in shape.shapes.items()}


def child_compress(directory: str, n_samples: int, seq_len: int, activation_dtype: str) -> None:
    """Runs in its own process; prints one JSON line (the summary, its VmHWM peak, the top
    resident-memory samples by place in rom_fast)."""
    import rom_fast
    ranks = uniform_plan(directory)
    ids = random_token_ids(n_samples, seq_len)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(directory)) as tmp, RssTrace() as tracer:
        summary = rom_fast.compress(directory, calibration=ids, ranks=ranks, out=os.path.join(tmp, "rom"),
                                    activation_dtype=activation_dtype, progress=False).summary
    summary["rss_trace_top"] = tracer.top()
    print("RESULT " + json.dumps(summary), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_compress(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mixtral-8x7b")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--n-samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--activation-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shrink", type=int, default=1, help="divide hidden/intermediate sizes (a quick check)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rom_fast_synth"))
    a = p.parse_args()
    over = {} if a.shrink == 1 else dict(hidden_size=4096 // a.shrink, intermediate_size=14336 // a.shrink,
                                         num_attention_heads=32 // a.shrink or 1, num_key_value_heads=8 // a.shrink or 1)
    directory = write_synthetic(shape_config(a.shape, a.blocks, **over),
                                os.path.join(a.workdir, f"{a.shape}-{a.blocks}{'' if a.shrink == 1 else f'-s{a.shrink}'}"))
    cmd = [sys.executable, __file__, "_child", str(directory), str(a.n_samples), str(a.seq_len), a.activation_dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    s = json.loads(lines[-1][len("RESULT "):])
    sec, n = s["seconds"], a.blocks
    products = sec.get("factorize", 0.0) - sec.get("eigensolver", 0.0)
    other = sec["total"] - sec.get("forward", 0) - sec.get("statistics", 0) - sec.get("factorize", 0)
    print("| shape | blocks | activations | peak RSS | total (s) | per block: forward | statistics | eigensolver "
          "| factor products | capture + I/O (s) |\n|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.shape}{'' if a.shrink == 1 else f' / {a.shrink}'} | {n} | {a.activation_dtype} "
          f"| {s['peak_rss_bytes'] / 2**30:.2f} GiB ({s['peak_rss_bytes'] / 1e9:.2f}·10⁹ B) | {sec['total']:.0f} "
          f"| {sec.get('forward', 0) / n:.1f} | {sec.get('statistics', 0) / n:.1f} | {sec.get('eigensolver', 0) / n:.1f} "
          f"| {products / n:.1f} | {other / n:.1f} |")
    for t in s["rss_trace_top"][:5]:
        print(f"    {t['rss_bytes'] / 2**30:.2f} GiB at {t['where']}")
    if a.shrink == 1:
        path = os.path.join(ROOT, "bench", "results",
                            f"scale_moe_{a.shape}_{n}blocks_{a.n_samples}x{a.seq_len}_{a.activation_dtype}.json")
        with open(path, "w") as f:
            json.dump({"command": "python bench/bench_scale_moe.py " + " ".join(sys.argv[1:]), "summary": s}, f,
                      indent=2)
        print(f"written {path}")


if __name__ == "__main__":
    main()
