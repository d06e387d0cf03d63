"""Wall time of kernels.select_inputs (structured input pruning of down_proj) at model shapes.

  python bench/bench_neurons.py                      # SmolLM2-135M (576 x 1536, blocks 1 and 8)
  python bench/bench_neurons.py --shape 4096 11008 --keep 8806 --block 64     # LLaMA-7B
  python bench/bench_neurons.py --shape 4096 11008 --keep 5064 --block 43 --in-place

--in-place passes overwrite_gram=True (the Gram is the kernel's workspace instead of being
copied; earlier blocks get a copy, the last one the Gram itself). Each run prints the process's
resident memory before it and its peak during it (VmRSS / VmHWM of /proc/self/status, the peak
reset before each run through /proc/self/clear_refs), so compare the two modes in fresh
processes with one block each.

Synthetic statistics: W ~ N(0, 1) float32 (d x n), C = B Bᵀ + diag(s) with B n x 512 and
uneven scales s, a full-rank Gram of the decaying spectrum calibration Grams have (building
a real one costs n² N flops). One run per configuration; the load average is printed with it
because the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from rom_fast import kernels


def _stats(d: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, n), dtype=np.float32)
    b = rng.standard_normal((n, min(512, n))) * np.exp(0.5 * rng.standard_normal(n))[:, None]
    c = b @ b.T
    c[np.diag_indices(n)] += np.exp(rng.standard_normal(n))
    return w, c


def _gib(key: str) -> float:
    """VmRSS / VmHWM of this process in GiB (nan where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> None:
    """VmHWM := VmRSS (Linux >= 4.0), so that the next peak is the next run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=2, type=int, default=[576, 1536], metavar=("D", "N"))
    p.add_argument("--keep", type=int, default=None, help="kept columns (default 80%% of n)")
    p.add_argument("--block", nargs="+", type=int, default=[1, 8])
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--in-place", action="store_true", help="overwrite_gram=True (see above)")
    args = p.parse_args()
    d, n = args.shape
    keep = args.keep or round(0.8 * n)
    w, c = _stats(d, n)
    print(f"d={d} n={n} keep={keep} threads={kernels.get_num_threads()} cpus={os.cpu_count()} "
          f"in_place={args.in_place}")
    for i, block in enumerate(args.block):
        gram = (c if i == len(args.block) - 1 else c.copy()) if args.in_place else c
        load = os.getloadavg()
        _reset_peak()
        rss = _gib("VmRSS")
        t0 = time.perf_counter()
        sel = kernels.select_inputs(w, gram, keep, ridge=args.ridge, block=block, overwrite_gram=args.in_place)
        dt = time.perf_counter() - t0
        peak = _gib("VmHWM")
        del gram
        print(f"block={block:3d}  {dt:8.2f} s  steps={len(sel.curve_kept) - 1}  "
              f"loss/energy={sel.curve_loss[-1] / sel.total_energy:.4f}  "
              f"rss before={rss:.2f} GiB peak={peak:.2f} GiB (+{peak - rss:.2f})  "
              f"load average before={load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  after={os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
