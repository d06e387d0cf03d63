"""Kernel benchmarks, every ratio measured against its baseline in the same run.

  python bench/bench_kernels.py gram          # Gram accumulation vs numpy / torch X.T @ X
  python bench/bench_kernels.py factorize     # one layer's ROM vs the direct route (slow: minutes)
  python bench/bench_kernels.py eigen         # syevr / syevd / stedc for top-r (sets EigenMethod::Auto)

Prints a markdown table (paste into bench/README.md with the command).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import rom_fast


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_gram(tokens: int, repeat: int) -> None:
    print(f"| d | input | rom_fast (s) | numpy X.T@X (s) | torch X.T@X (s) | rom_fast GFLOP/s | vs numpy | vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for d in (576, 1536, 4096):
        for dtype in (np.float64, np.float32):
            x = rng.standard_normal((tokens, d)).astype(dtype)
            xt = torch.from_numpy(x)

            def ours():
                acc = rom_fast.GramAccumulator(d)
                acc.update(x)
                return acc

            t_ours = best_of(ours, repeat)
            t_np = best_of(lambda: x.T @ x, repeat)
            t_torch = best_of(lambda: xt.T @ xt, repeat)
            gflops = tokens * d * d / t_ours / 1e9    # n d^2 multiply-adds = the symmetric product's work
            print(f"| {d} | {np.dtype(dtype).name} | {t_ours:.3f} | {t_np:.3f} | {t_torch:.3f} | {gflops:.1f} "
                  f"| {t_np / t_ours:.2f}x | {t_torch / t_ours:.2f}x |")


def direct_route(w: np.ndarray, gram: np.ndarray, rank: int):
    """The paper code's route: float64 C_y = W C_x W^T, then a full eigh in d_out dimensions."""
    wt = torch.from_numpy(w.astype(np.float64))
    cy = wt @ torch.from_numpy(gram) @ wt.T
    vals, vecs = torch.linalg.eigh(cy)
    v = vecs[:, -rank:].flip(1).T            # top-r, rows
    return (v.T).numpy(), (v @ wt).numpy()


def rel_recon_error(w, gram, w1, w2):
    """||W X - W1 W2 X||_F^2 / ||W X||_F^2 computed from the Gram (no X needed)."""
    d = w.astype(np.float64) - w1.astype(np.float64) @ w2.astype(np.float64)
    w = w.astype(np.float64)
    return float(np.sum((d @ gram) * d) / np.sum((w @ gram) * w))   # BLAS products, not einsum loops


def bench_factorize(tokens: int, layers, direct: bool) -> None:
    rng = np.random.default_rng(1)
    print("| layer | W (d_out x d_in) | rank | rom_fast (s) | direct: W C Wᵀ + torch eigh (s) | scipy eigh route (s) "
          "| speed-up vs torch | rel. error rom_fast | rel. error direct |")
    print("|---|---|---|---|---|---|---|---|---|")
    import scipy.linalg
    shapes = {"gate_proj": (11008, 4096), "q_proj": (4096, 4096), "down_proj": (4096, 11008)}
    for name in layers:
        d_out, d_in = shapes[name]
        x = rng.standard_normal((tokens, d_in)) / np.sqrt(1 + np.arange(d_in))
        acc = rom_fast.GramAccumulator(d_in)
        acc.update(x)
        gram = acc.gram
        del x
        w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
        rank = int(0.46 * d_out * d_in / (d_out + d_in))
        t0 = time.perf_counter()
        f = rom_fast.factorize(w, gram, rank)
        t_ours = time.perf_counter() - t0
        e_ours = rel_recon_error(w, gram, f.w1, f.w2)
        if d_in > d_out:
            # The pipeline's route for down_proj: the output Gram Y^T Y comes from the forward pass
            # (d_out^2 per token instead of d_in^2), so only the d_out eigenproblem is timed here.
            w64 = w.astype(np.float64)
            gram_out = w64 @ gram @ w64.T
            t0 = time.perf_counter()
            fo = rom_fast.factorize_output_gram(w, gram_out, rank)
            t_out = time.perf_counter() - t0
            print(f"| {name} (output Gram given) | {d_out} x {d_in} | {rank} | {t_out:.1f} | - | - | - "
                  f"| {rel_recon_error(w, gram, fo.w1, fo.w2):.9f} | - |", flush=True)
            del w64, gram_out
        if not direct:
            print(f"| {name} | {d_out} x {d_in} | {rank} | {t_ours:.1f} | - | - | - | {e_ours:.9f} | - |", flush=True)
            continue
        t0 = time.perf_counter()
        w1_d, w2_d = direct_route(w, gram, rank)
        t_direct = time.perf_counter() - t0
        t0 = time.perf_counter()
        w64 = w.astype(np.float64)
        cy = w64 @ gram @ w64.T
        scipy.linalg.eigh(cy, subset_by_index=[d_out - rank, d_out - 1], driver="evr")
        t_scipy = time.perf_counter() - t0
        e_direct = rel_recon_error(w, gram, w1_d, w2_d)
        print(f"| {name} | {d_out} x {d_in} | {rank} | {t_ours:.1f} | {t_direct:.1f} | {t_scipy:.1f} "
              f"| {t_direct / t_ours:.1f}x | {e_ours:.9f} | {e_direct:.9f} |", flush=True)


def bench_eigen(repeat: int) -> None:
    rng = np.random.default_rng(2)
    print("| d | r | syevr (s) | syevd (s) | stedc, r vectors back-transformed (s) | syevd / stedc | syevr / stedc |")
    print("|---|---|---|---|---|---|---|")
    for d in (576, 1536, 4096):
        x = rng.standard_normal((2 * d, d)) / np.sqrt(1 + np.arange(d))
        a = x.T @ x
        for frac in (0.02, 0.1, 0.23, 0.34, 0.5, 0.95):
            r = max(1, int(frac * d))
            t_r = best_of(lambda: rom_fast.top_eigenpairs(a, r, method="syevr"), repeat)
            t_d = best_of(lambda: rom_fast.top_eigenpairs(a, r, method="syevd"), repeat)
            t_s = best_of(lambda: rom_fast.top_eigenpairs(a, r, method="stedc"), repeat)
            print(f"| {d} | {r} | {t_r:.3f} | {t_d:.3f} | {t_s:.3f} | {t_d / t_s:.2f} | {t_r / t_s:.2f} |",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["gram", "factorize", "eigen"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layers", nargs="+", default=["gate_proj", "q_proj", "down_proj"])
    p.add_argument("--no-direct", action="store_true", help="time rom_fast only (the direct route takes >15 min for gate_proj)")
    a = p.parse_args()
    torch.set_num_threads(2)
    {"gram": lambda: bench_gram(a.tokens, a.repeat), "factorize": lambda: bench_factorize(a.tokens, a.layers, not a.no_direct),
     "eigen": lambda: bench_eigen(a.repeat)}[a.what]()


if __name__ == "__main__":
    main()
