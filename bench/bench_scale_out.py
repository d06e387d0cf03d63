"""Scale-out (issue 16): the same SmolLM2 compression by N processes x T threads.

    OMP_NUM_THREADS=2 python bench/bench_scale_out.py --tag 1x2
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/bench_scale_out.py --tag 2x1

Every process runs this script; rom_fast.compress joins torchrun's process group itself.
Process 0 adds one entry per tag to bench/results/scale_out.json: perplexity before and after
(full precision), the plan's ranks, wall time per stage and the exchanges' bytes and seconds
per kind.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import rom_fast

RESULTS = Path(__file__).parent / "results" / "scale_out.json"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    rom_fast.set_num_threads(threads)
    t0 = time.perf_counter()
    result = rom_fast.compress("smollm2", calibration="wiki", budget=args.budget, n_samples=args.n_samples,
                               eval_windows=args.eval_windows, progress=False)
    wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:
        return
    s = result.summary
    entry = {"tag": args.tag, "processes": s.get("processes", 1), "threads_per_process": threads,
             "n_samples": args.n_samples, "seq_len": 128, "eval_windows": args.eval_windows,
             "budget": args.budget, "wall_seconds": wall, "perplexity": s["perplexity"],
             "params_after": s["params_after"], "ranks": result.plan.ranks,
             "seconds": s["seconds"], "traffic": s.get("traffic", {}),
             "peak_rss_bytes_process0": s["peak_rss_bytes"]}
    path = Path(args.results)
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries = [e for e in entries if e["tag"] != args.tag] + [entry]
    path.write_text(json.dumps(entries, indent=1) + "\n")
    print(json.dumps({k: entry[k] for k in ("tag", "wall_seconds", "perplexity", "params_after")}))


if __name__ == "__main__":
    main()
