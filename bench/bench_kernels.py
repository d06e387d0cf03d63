"""Kernel benchmarks, every ratio measured against its baseline in the same run.

  python bench/bench_kernels.py gram          # Gram accumulation (float32, 1024-row chunks) vs numpy / torch X.T @ X
  python bench/bench_kernels.py stage         # a 7B block's statistics stage (4 Grams, 64 chunks each), both precisions
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


def bench_gram(tokens: int, repeat: int, chunk: int, dims, json_path) -> None:
    """float32 activations fed as the pipeline does (one update per micro-batch of `chunk`
    rows) against one float32/float64 X.T @ X over all rows in numpy and torch."""
    print(f"tokens {tokens}, rom_fast updates of {chunk} rows; block_rows "
          f"{rom_fast.GramAccumulator.DEFAULT_BLOCK_ROWS}; best of {repeat}")
    print("| d | rom_fast float32 (s) | rom_fast float64 (s) | numpy f32 X.T@X (s) | numpy f64 X.T@X (s) "
          "| torch f32 X.T@X (s) | rom_fast f32 GFLOP/s | f32 vs torch f32 | f32 vs numpy f32 | f32 vs numpy f64 "
          "| f64 option vs torch f32 | max rel. error f32 vs f64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    rows = []
    for d in dims:
        x = rng.standard_normal((tokens, d), dtype=np.float32)
        x64 = x.astype(np.float64)
        xt = torch.from_numpy(x)

        def ours(precision):
            acc = rom_fast.GramAccumulator(d, precision=precision)
            for s in range(0, tokens, chunk):
                acc.update(x[s:s + chunk])
            return acc

        t = {"rom_fast_f32": best_of(lambda: ours("float32"), repeat),
             "rom_fast_f64": best_of(lambda: ours("float64"), repeat),
             "numpy_f32": best_of(lambda: x.T @ x, repeat),
             "numpy_f64": best_of(lambda: x64.T @ x64, repeat),
             "torch_f32": best_of(lambda: xt.T @ xt, repeat)}
        g32, g64 = ours("float32").gram, ours("float64").gram
        err = float(np.abs(g32 - g64).max() / np.abs(g64).max())
        del g32, g64, x64
        gflops = tokens * d * d / t["rom_fast_f32"] / 1e9  # n d^2 multiply-adds = the symmetric product's work
        f = t["rom_fast_f32"]
        print(f"| {d} | {f:.3f} | {t['rom_fast_f64']:.3f} | {t['numpy_f32']:.3f} | {t['numpy_f64']:.3f} "
              f"| {t['torch_f32']:.3f} | {gflops:.1f} | {t['torch_f32'] / f:.2f}x | {t['numpy_f32'] / f:.2f}x "
              f"| {t['numpy_f64'] / f:.2f}x | {t['torch_f32'] / t['rom_fast_f64']:.2f}x | {err:.1e} |", flush=True)
        rows.append({"d": d, "seconds": t, "rel_error_f32_vs_f64": err})
    if json_path:
        import json
        import os
        meta = {"tokens": tokens, "chunk": chunk, "repeat": repeat,
                "block_rows": rom_fast.GramAccumulator.DEFAULT_BLOCK_ROWS,
                "loadavg_at_end": os.getloadavg()}
        with open(json_path, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def bench_stage(chunks: int, chunk: int, d: int, stages: int, repeat: int) -> None:
    """The statistics stage of one 7B block at 512 x 128 tokens as the pipeline runs it: four
    d = 4096 Grams (q/k/v and gate/up inputs, o_proj input, down_proj output), each fed
    64 float32 chunks of 8 x 128 rows. Only update() is timed, as the pipeline's timer does."""
    rng = np.random.default_rng(3)
    pool = [rng.standard_normal((chunk, d), dtype=np.float32) for _ in range(8)]

    def stage(precision):
        for _ in range(stages):
            acc = rom_fast.GramAccumulator(d, precision=precision)
            for i in range(chunks):
                acc.update(pool[i % len(pool)])

    t = {p: best_of(lambda: stage(p), repeat) for p in ("float64", "float32")}
    print(f"| {stages} Grams x {chunks} chunks of {chunk} x {d} | float64 {t['float64']:.1f} s "
          f"| float32 {t['float32']:.1f} s | float32 / float64 = {t['float32'] / t['float64']:.2f} |", flush=True)


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
    shapes = {"gate_proj": (11008, 4096), "q_proj": (4096, 4096), "down_proj": (4096, 11008),
              "gate_proj_1b": (2816, 1024), "gate_proj_3b": (8192, 2048)}   # TinyLlama-1.1B, LLaMA-3.2-3B-like
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
        factor = rom_fast.input_factor(gram)     # pivoted Cholesky of C_x
        t_chol = time.perf_counter() - t0
        f = rom_fast.factorize(w, factor, rank)
        t_ours = time.perf_counter() - t0
        # Where the time goes: Cholesky, eigensolver, and the rest (products, copies, threads).
        print(f"  {name}: cholesky {t_chol:.2f} s, eigensolver {f.eigen_seconds:.2f} s, "
              f"products and the rest {t_ours - t_chol - f.eigen_seconds:.2f} s", flush=True)
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
    p.add_argument("what", choices=["gram", "stage", "factorize", "eigen"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=1024, help="rows per GramAccumulator.update (gram; the "
                   "pipeline's micro-batch: 8 sequences x 128 tokens)")
    p.add_argument("--dims", type=int, nargs="+", default=[576, 1536, 4096, 11008], help="gram dimensions")
    p.add_argument("--json", help="gram: also write the timings here")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layers", nargs="+", default=["gate_proj", "q_proj", "down_proj"])
    p.add_argument("--no-direct", action="store_true", help="time rom_fast only (the direct route takes >15 min for gate_proj)")
    a = p.parse_args()
    torch.set_num_threads(2)
    {"gram": lambda: bench_gram(a.tokens, a.repeat, a.chunk, a.dims, a.json), "factorize": lambda: bench_factorize(a.tokens, a.layers, not a.no_direct),
     "eigen": lambda: bench_eigen(a.repeat),
     "stage": lambda: bench_stage(64, a.chunk, 4096, 4, a.repeat)}[a.what]()


if __name__ == "__main__":
    main()
