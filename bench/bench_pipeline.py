"""End-to-end: rom_fast.compress vs a straightforward PyTorch implementation of the paper's loop.

  python bench/bench_pipeline.py --n-samples 512 --seq-len 128 --recipe paper-80

Each method runs in its own process (so peak RSS is its own), on SmolLM2-135M with the same
calibration tokens and plan; the baseline is tests/reference_rom.py (hooks that re-run the
block for every stage, torch.linalg.eigh of each output covariance, float64 as in
shared/FINDINGS.md). Prints wall time, peak RSS, WikiText-2 perplexity and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_bytes(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(method: str, n_samples: int, seq_len: int, recipe: str, windows: int) -> dict:
    import torch

    import rom_fast
    from rom_fast import plans
    from rom_fast.adapters import adapter_for
    from rom_fast.calibration import calibration_tokens
    from rom_fast.evaluate import wikitext2_perplexity
    from rom_fast.io.models import load_model

    torch.set_num_threads(2)
    model, tok = load_model("smollm2")
    shape = plans.ModelShape.of(adapter_for(model))
    plan = plans.paper_recipe(shape, recipe) if recipe.startswith("paper") else \
        plans.last_k_plan(shape, 0.8, int(recipe.split("-")[1]))
    calib = calibration_tokens("wiki", tok, n_samples=n_samples, seq_len=seq_len, seed=0)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_before = _status_bytes("VmRSS")
    _reset_peak_rss()      # from here VmHWM is the peak of the compression itself
    t0 = time.perf_counter()
    if method == "rom_fast":
        out = rom_fast.compress(model, calibration={"input_ids": calib.input_ids,
                                                    "attention_mask": calib.attention_mask},
                                ranks=plan.ranks, n_samples=n_samples, seq_len=seq_len, progress=False)
        stages = out.summary["seconds"]
        out = out.model
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from reference_rom import reference_compress
        out, _ = reference_compress(model, calib.input_ids, calib.attention_mask, plan.ranks)
        out = out.float()
        stages = {}
    seconds = time.perf_counter() - t0
    compress_peak = _status_bytes("VmHWM")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ppl = wikitext2_perplexity(out, tok, window=512, max_windows=windows)["perplexity"]
    return {"method": method, "seconds": seconds, "stages": stages, "peak_rss_bytes": peak,
            "load_peak_rss_bytes": load_peak, "rss_before_compress_bytes": rss_before,
            "compress_peak_rss_bytes": compress_peak, "perplexity": ppl, "plan": plan.description,
            "ratio": plan.details["ratio"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--recipe", default="paper-80", help="paper-90/80/50 or last-K (80%% budget)")
    p.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 512 tokens")
    p.add_argument("--methods", nargs="+", default=["rom_fast", "reference"])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.n_samples, a.seq_len, a.recipe, a.windows)))
        return
    results = []
    for method in a.methods:
        cmd = [sys.executable, __file__, "--one", method, "--n-samples", str(a.n_samples),
               "--seq-len", str(a.seq_len), "--recipe", a.recipe, "--windows", str(a.windows)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print("\n| method | wall (s) | process peak RSS (GiB) | RSS before compress (GiB) | peak during compress (GiB) "
          "| WikiText-2 ppl |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} "
              f"| {r['rss_before_compress_bytes'] / 2**30:.2f} | {r['compress_peak_rss_bytes'] / 2**30:.2f} "
              f"| {r['perplexity']:.2f} |")
    if len(results) == 2:
        a_, b_ = results
        print(f"\nspeed-up {b_['seconds'] / a_['seconds']:.1f}x, perplexity difference "
              f"{abs(a_['perplexity'] - b_['perplexity']) / b_['perplexity']:.3%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
