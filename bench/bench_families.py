"""Every family at its real 7-9B shape: one streamed block's peak memory and seconds by stage.

  python bench/bench_families.py llama3-8b qwen3-8b phi3-medium --blocks 1
  python bench/bench_families.py qwen3-8b --plan neurons      # MLPs keep whole neurons instead

Each shape's directory comes from bench/synth_model.py (random weights, real shapes, bfloat16,
one shard per block); each compression runs in a fresh child process (peak RSS = its VmHWM)
through ``rom_fast.compress`` on random token ids (512 x 128 by default, float16 activations),
with the paper's 80% module budget on every linear of every block: low-rank at rank
0.46 d_out d_in / (d_out + d_in), or with ``--plan neurons`` the MLPs keeping 46% of their
neurons. Results go to bench/results/families_<plan>_<n>x<len>.json.
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
from synth_llama import random_token_ids  # noqa: E402
from synth_model import SHAPES, shape_config, write_synthetic  # noqa: E402

MODULE_BUDGET = 0.46


def uniform_plan(directory: str, plan: str) -> dict:
    """The paper's module budget on every linear (or, ``neurons``, every MLP keeping 46%)."""
    from rom_fast import plans
    from rom_fast.io.sources import DirectorySource
    shape = plans.ModelShape.of_source(DirectorySource(directory))
    in_mlp = {n for mlp in shape.mlps for n in shape.mlp_linears(mlp)} if plan == "neurons" else set()
    ranks = {n: int(MODULE_BUDGET * o * i / (o + i)) for n, (o, i) in shape.shapes.items() if n not in in_mlp}
    neurons = {mlp: int(MODULE_BUDGET * shape.mlp_size(mlp)[1]) for mlp in shape.mlps} if plan == "neurons" else {}
    return {"ranks": ranks, "neurons": neurons}


def child(directory: str, n_samples: int, seq_len: int, plan: str) -> None:
    import rom_fast
    vocab = json.loads(open(os.path.join(directory, "config.json")).read())["vocab_size"]
    ids = random_token_ids(n_samples, seq_len, vocab_size=vocab)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(directory)) as tmp:
        summary = rom_fast.compress(directory, calibration=ids, ranks=uniform_plan(directory, plan),
                                    out=os.path.join(tmp, "rom"), activation_dtype="float16",
                                    progress=False).summary
    print("RESULT " + json.dumps(summary, default=str), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--n-samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--plan", choices=["lowrank", "neurons"], default="lowrank")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rom_fast_synth"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic directories")
    a = p.parse_args()
    rows = []
    print("| shape | blocks | peak RSS (GiB) | total (s) | per block: forward | statistics | factorize (eigensolver) "
          "| load + capture + write (s) |\n|---|---|---|---|---|---|---|---|")
    for name in a.shapes:
        directory = os.path.join(a.workdir, f"{name}-{a.blocks}")
        write_synthetic(shape_config(name, a.blocks), directory)
        proc = subprocess.run([sys.executable, __file__, "_child", directory, str(a.n_samples), str(a.seq_len),
                               a.plan], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{name}: child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        s = json.loads(lines[-1][len("RESULT "):])
        sec, n = s["seconds"], a.blocks
        other = sec["total"] - sec.get("forward", 0) - sec.get("statistics", 0) - sec.get("factorize", 0)
        rows.append({"shape": name, "blocks": n, "plan": a.plan, "n_samples": a.n_samples, "seq_len": a.seq_len,
                     "peak_rss_bytes": s["peak_rss_bytes"], "seconds": sec,
                     "params_before": s["params_before"], "params_after": s["params_after"]})
        print(f"| {name} | {n} | {s['peak_rss_bytes'] / 2**30:.2f} | {sec['total']:.0f} | {sec.get('forward', 0) / n:.1f} "
              f"| {sec.get('statistics', 0) / n:.1f} | {sec.get('factorize', 0) / n:.1f} "
              f"({sec.get('eigensolver', 0) / n:.1f}) | {other / n:.1f} |", flush=True)
        if not a.keep:
            import shutil
            shutil.rmtree(directory, ignore_errors=True)
    path = os.path.join(ROOT, "bench", "results", f"families_{a.plan}_{a.n_samples}x{a.seq_len}.json")
    with open(path, "w") as f:
        json.dump({"command": "python bench/bench_families.py " + " ".join(sys.argv[1:]), "rows": rows}, f, indent=2)
    print(f"written {path}")


if __name__ == "__main__":
    main()
