"""LLaMA-7B-shaped scale: streamed memory and time per block, and one block's ROM math vs the
direct route. Synthetic checkpoints come from bench/synth_llama.py (random weights, real shapes).

  python bench/bench_scale.py memory --blocks 2 4 8 --n-samples 512 --seq-len 128
  python bench/bench_scale.py block-math          # statistics given -> factors of all 7 linears

`memory` runs every compression in a fresh child process (so each peak RSS is its own) with
the paper's 80% module budget (0.46) on *every* block, and reports peak RSS and seconds per
block by stage. `block-math` times rom_fast's factorization of one block (3 input factors
shared by q/k/v, o and gate/up; the output Gram for down) against the paper code's route
(`torch.linalg.eigh` of each layer's float64 output covariance in its own dimension, then
V_r W), on the same statistics in the same run. Results go to bench/results/scale_*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from synth_llama import LLAMA_7B, random_token_ids, write_llama7b_shaped  # noqa: E402

MODULE_BUDGET = 0.46   # the paper's 80% setting: each factorized layer keeps 46% of its weights
SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
          "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
          "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096), "mlp.down_proj": (4096, 11008)}


def module_rank(d_out: int, d_in: int, budget: float = MODULE_BUDGET) -> int:
    return int(budget * d_out * d_in / (d_out + d_in))


def uniform_ranks(n_blocks: int, mlp_neurons: int = 0) -> dict:
    """The uniform plan; with ``mlp_neurons`` every MLP keeps that many whole neurons instead."""
    ranks = {f"model.layers.{i}.{n}": module_rank(*s) for i in range(n_blocks) for n, s in SHAPES.items()
             if not (mlp_neurons and n.startswith("mlp."))}
    neurons = {f"model.layers.{i}.mlp": mlp_neurons for i in range(n_blocks)} if mlp_neurons else {}
    return {"ranks": ranks, "neurons": neurons}


# -- memory and time per block ------------------------------------------------------------
class RssTrace:
    """Samples the process's resident memory every ``interval`` s with where the main thread is
    in rom_fast (its innermost three frames), to say which step a peak belongs to."""

    def __init__(self, interval: float = 0.1):
        import threading
        self.interval, self.peaks, self._stop = interval, {}, threading.Event()
        self._main = threading.get_ident()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import traceback
        while not self._stop.is_set():
            frame = sys._current_frames().get(self._main)
            inner = [f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}" for f in traceback.extract_stack(frame)
                     if f"{os.sep}rom_fast{os.sep}" in f.filename][-3:]
            where = " < ".join(reversed(inner))
            rss = _status_bytes("VmRSS")
            if rss > self.peaks.get(where, 0):
                self.peaks[where] = rss
            self._stop.wait(self.interval)

    def top(self, n: int = 8) -> list:
        return [{"rss_bytes": r, "where": w} for w, r in sorted(self.peaks.items(), key=lambda kv: -kv[1])[:n]]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child_compress(directory: str, n_samples: int, seq_len: int, activation_dtype: str, anchor: float = 0.0,
                   gram_precision: str = "auto", mlp_neurons: int = 0, trace: bool = False) -> None:
    """Runs in its own process; prints one JSON line (its peak_rss_bytes: VmHWM, its own; with
    ``trace``, the highest resident memory seen at each place in rom_fast, sampled)."""
    import rom_fast
    n_blocks = json.loads(open(os.path.join(directory, "config.json")).read())["num_hidden_layers"]
    ids = random_token_ids(n_samples, seq_len)
    tracer = RssTrace() if trace else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(directory)) as tmp, tracer:
        out = os.path.join(tmp, "rom")
        summary = rom_fast.compress(directory, calibration=ids, ranks=uniform_ranks(n_blocks, mlp_neurons), out=out,
                                    activation_dtype=activation_dtype, progress=False, anchor=anchor,
                                    gram_precision=gram_precision).summary
    if trace:
        summary["rss_trace_top"] = tracer.top()
    print("RESULT " + json.dumps(summary), flush=True)


def bench_memory(a) -> None:
    rows = []
    print("| blocks | activations | peak RSS (GiB) | total (s) | per block: forward | statistics | "
          "eigensolver | factor products | capture + I/O (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in a.blocks:
        directory = write_llama7b_shaped(os.path.join(a.workdir, f"llama7b-{n}"), n)
        cmd = [sys.executable, __file__, "_child", str(directory), str(a.n_samples), str(a.seq_len),
               a.activation_dtype, str(a.anchor), a.gram_precision, str(a.mlp_neurons), str(int(a.trace))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        s = json.loads(lines[-1][len("RESULT "):])
        sec = s["seconds"]
        products = sec.get("factorize", 0.0) - sec.get("eigensolver", 0.0)
        other = sec["total"] - sec.get("forward", 0) - sec.get("statistics", 0) - sec.get("factorize", 0)
        row = {"blocks": n, "n_samples": a.n_samples, "seq_len": a.seq_len, "anchor": a.anchor,
               "gram_precision": a.gram_precision, "mlp_neurons": a.mlp_neurons,
               "activation_dtype": a.activation_dtype, "peak_rss_bytes": s["peak_rss_bytes"],
               "seconds": sec, "params_before": s["params_before"], "params_after": s["params_after"]}
        if a.trace:
            row["rss_trace_top"] = s["rss_trace_top"]
        rows.append(row)
        print(f"| {n} | {a.activation_dtype} | {s['peak_rss_bytes'] / 2**30:.2f} | {sec['total']:.0f} "
              f"| {sec.get('forward', 0) / n:.1f} | {sec.get('statistics', 0) / n:.1f} "
              f"| {sec.get('eigensolver', 0) / n:.1f} | {products / n:.1f} | {other / n:.1f} |", flush=True)
        for t in row.get("rss_trace_top", [])[:5]:
            print(f"    {t['rss_bytes'] / 2**30:.2f} GiB at {t['where']}", flush=True)
    _write(f"scale_memory_{a.n_samples}x{a.seq_len}_{a.activation_dtype}{'_anchor' if a.anchor else ''}"
           f"{'' if a.gram_precision == 'auto' else '_gram' + a.gram_precision}"
           f"{f'_neurons{a.mlp_neurons}' if a.mlp_neurons else ''}{a.tag}.json",
           {"command": "python bench/bench_scale.py " + " ".join(sys.argv[1:]), "rows": rows})


# -- one block's ROM math vs the direct route ------------------------------------------------
def bench_block_math(a) -> None:
    import numpy as np
    import torch

    import rom_fast
    from rom_fast import kernels

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    weights = {n: (torch.empty(s).normal_(0, 0.02, generator=gen)).numpy() for n, s in SHAPES.items()}

    def gram(d: int) -> "kernels.GramAccumulator":
        # Inputs with a decaying spectrum, like real activations; more tokens than dimensions.
        acc = rom_fast.GramAccumulator(d)
        scale = (1.0 + np.arange(d)) ** -0.5
        for _ in range(a.tokens // 4096):
            acc.update(rng.standard_normal((4096, d)) * scale)
        return acc

    t0 = time.perf_counter()
    stats = {"attn_in": gram(4096), "attn_out": gram(4096), "mlp_in": gram(4096)}
    hidden = gram(11008)    # the down_proj input; its output Gram is W C_x W^T
    wd = weights["mlp.down_proj"].astype(np.float64)
    down_out = wd @ hidden.gram @ wd.T
    del hidden
    source = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
              "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in"}
    print(f"statistics prepared in {time.perf_counter() - t0:.0f} s", flush=True)

    # rom_fast: one factor per shared input, then every layer of the block.
    t0 = time.perf_counter()
    eig = 0.0
    factors, ours = {}, {}
    for key in ("attn_in", "attn_out", "mlp_in"):
        factors[key] = kernels.input_factor(stats[key])
    for name, src in source.items():
        f = kernels.factorize(weights[name], factors[src], module_rank(*SHAPES[name]))
        ours[name], eig = f, eig + f.eigen_seconds
    f = kernels.factorize_output_gram(weights["mlp.down_proj"], down_out, module_rank(*SHAPES["mlp.down_proj"]))
    ours["mlp.down_proj"], eig = f, eig + f.eigen_seconds
    t_ours = time.perf_counter() - t0
    print(f"rom_fast: {t_ours:.1f} s (eigensolver {eig:.1f} s)", flush=True)

    # Direct route: the output covariance of each layer in its own dimension (given, as the
    # paper's code accumulates it from the outputs), full eigh, then V_r W.
    t_direct, t_direct_eig, rows = 0.0, 0.0, []
    for name, (d_out, d_in) in SHAPES.items():
        w = torch.from_numpy(weights[name].astype(np.float64))
        if name == "mlp.down_proj":
            cy = torch.from_numpy(down_out)
        else:
            cy = w @ torch.from_numpy(stats[source[name]].gram) @ w.T    # not timed: "statistics"
        r = module_rank(d_out, d_in)
        t0 = time.perf_counter()
        vals, vecs = torch.linalg.eigh(cy)
        t_e = time.perf_counter() - t0
        v = vecs[:, -r:].flip(1).T.contiguous()
        w2 = v @ w
        dt = time.perf_counter() - t0
        del cy, vecs
        t_direct += dt
        t_direct_eig += t_e
        kept_direct = float(vals[-r:].sum())
        kept_ours = float(ours[name].eigenvalues.sum())
        rows.append({"layer": name, "rank": r, "direct_seconds": dt, "direct_eigh_seconds": t_e,
                     "kept_energy_rel_diff": abs(kept_ours - kept_direct) / kept_direct})
        print(f"  direct {name}: {dt:.1f} s (eigh {t_e:.1f} s); kept energy agrees to "
              f"{rows[-1]['kept_energy_rel_diff']:.1e}", flush=True)
        del w2
    print(f"\n| one 7B block, statistics given | rom_fast (s) | direct route (s) | speed-up |\n|---|---|---|---|\n"
          f"| factors of all 7 linears (eigensolver part) | {t_ours:.1f} ({eig:.1f}) | {t_direct:.1f} "
          f"({t_direct_eig:.1f}) | {t_direct / t_ours:.1f}x |")
    _write("scale_block_math.json", {"command": "python bench/bench_scale.py " + " ".join(sys.argv[1:]),
                                     "tokens": a.tokens, "module_budget": MODULE_BUDGET,
                                     "rom_fast_seconds": t_ours, "rom_fast_eigen_seconds": eig,
                                     "direct_seconds": t_direct, "direct_eigen_seconds": t_direct_eig,
                                     "layers": rows})


def _write(name: str, payload: dict) -> None:
    path = os.path.join(ROOT, "bench", "results", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"written {path}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_compress(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
                       float(sys.argv[6]) if len(sys.argv) > 6 else 0.0, sys.argv[7] if len(sys.argv) > 7 else "auto",
                       int(sys.argv[8]) if len(sys.argv) > 8 else 0, len(sys.argv) > 9 and sys.argv[9] == "1")
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    m.add_argument("--n-samples", type=int, default=512)
    m.add_argument("--seq-len", type=int, default=128)
    m.add_argument("--activation-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    m.add_argument("--anchor", type=float, default=0.0, help="dense-anchored targets (compress's anchor=)")
    m.add_argument("--gram-precision", default="auto", choices=["auto", "float32", "float64"])
    m.add_argument("--mlp-neurons", type=int, default=0,
                   help="every MLP keeps this many whole neurons instead of low-rank linears (80%%: 5064 of 11008)")
    m.add_argument("--trace", action="store_true",
                   help="sample resident memory by pipeline location (the peak's step, in the JSON)")
    m.add_argument("--tag", default="", help="suffix of the result file")
    m.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rom_fast_synth"))
    b = sub.add_parser("block-math")
    b.add_argument("--tokens", type=int, default=16384, help="tokens behind each synthetic Gram")
    a = p.parse_args()
    {"memory": bench_memory, "block-math": bench_block_math}[a.cmd](a)


if __name__ == "__main__":
    assert LLAMA_7B["hidden_size"] == 4096
    main()
