"""Rank planner vs the paper's last-k recipe (k searched) at the same kept-parameter count.

  python bench/bench_planner.py --ratio 0.8 --k 12 16 20 24 30
  python bench/bench_planner.py --ratio 0.5 --k 20 24 27 30

SmolLM2-135M; calibration and perplexity as in shared/FINDINGS.md (first 128 windows of 128
tokens of the local Wikipedia text; first 40 WikiText-2 windows of 512 tokens). Every row
compresses a fresh copy of the same dense model with the same calibration tokens; the
planner's spectra come from one forward+backward pass over those tokens. Writes
bench/results/planner_<ratio>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--k", type=int, nargs="*", default=[], help="last-k recipes to search")
    p.add_argument("--weightings", nargs="*", default=["fisher", "energy"])
    p.add_argument("--centered", action="store_true", help="also run the best planner row centred")
    p.add_argument("--zero-shot", type=int, default=0, metavar="LIMIT",
                   help="also score the six zero-shot tasks on LIMIT seeded items each")
    p.add_argument("--tag", default="", help="suffix of the results file (planner_<ratio><tag>.json)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--grad-samples", type=int, default=None,
                   help="sequences the planner's sensitivities use (default: all --n-samples)")
    a = p.parse_args()

    import torch
    import transformers

    import rom_fast
    from rom_fast import plans
    from rom_fast.adapters import adapter_for
    from rom_fast.calibration import calibration_tokens
    from rom_fast.evaluate import wikitext2_perplexity, zero_shot
    from rom_fast.io.models import load_model
    from rom_fast.planner import collect_spectra, planned
    from rom_fast.io.sources import ModelSource

    transformers.logging.set_verbosity_error()
    dense, tok = load_model("smollm2")
    shape = plans.ModelShape.of(adapter_for(dense))
    calib = calibration_tokens("wiki", tok, n_samples=a.n_samples, seq_len=128, seed=None)
    batch = {"input_ids": calib.input_ids, "attention_mask": calib.attention_mask}

    rows = []

    def run(label, plan, centered=False):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rom_fast.compress(model, calibration=batch, ranks=plan.ranks, progress=False, centered=centered)
        seconds = time.perf_counter() - t0
        ppl = wikitext2_perplexity(model, tok, window=512, max_windows=a.windows)["perplexity"]
        avg = None
        if a.zero_shot:
            avg = zero_shot(model, tok, limit=a.zero_shot, seed=0, batch_size=16)["average"]["score"]
        rows.append({"label": label, "plan": plan.description, "ratio": plan.details["ratio"],
                     "kept_params": plan.details["kept_params"], "perplexity": ppl, "zero_shot_average": avg,
                     "compress_seconds": seconds, "centered": centered, "ranks": plan.ranks})
        print(f"| {label} | {plan.details['kept_params']:,} | {plan.details['ratio']:.4f} | {ppl:.2f} | "
              + ("" if avg is None else f"{100 * avg:.1f} |"), flush=True)
        return ppl

    print("| plan | kept params | ratio | WikiText-2 ppl |" + (" six-task avg |" if a.zero_shot else "") + "\n|---|---|---|---|" + ("---|" if a.zero_shot else ""), flush=True)
    for k in a.k:
        run(f"last {k}", plans.last_k_plan(shape, a.ratio, k))
    t0 = time.perf_counter()
    spectra = collect_spectra(ModelSource(dense), calib.input_ids, calib.attention_mask,
                              grad_samples=a.grad_samples)
    spectra_seconds = time.perf_counter() - t0
    best = None
    for w in a.weightings:
        plan = planned(shape, a.ratio, spectra, w)
        ppl = run(f"planner ({w})", plan)
        if best is None or ppl < best[0]:
            best = (ppl, plan, w)
    if a.centered and best is not None:
        run(f"planner ({best[2]}), centred", best[1], centered=True)
    out = os.path.join(ROOT, "bench", "results", f"planner_{a.ratio:.2f}{a.tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": "python bench/bench_planner.py " + " ".join(
                       [f"--ratio {a.ratio}"] + ([f"--k {' '.join(map(str, a.k))}"] if a.k else [])
                       + ([f"--weightings {' '.join(a.weightings)}"]) + (["--centered"] if a.centered else [])
                       + ([f"--zero-shot {a.zero_shot}"] if a.zero_shot else []) + ([f"--tag {a.tag}"] if a.tag else [])
                       + ([f"--grad-samples {a.grad_samples}"] if a.grad_samples else [])),
                   "calibration": calib.description, "spectra_seconds": spectra_seconds, "rows": rows},
                  f, indent=2)
    print(f"spectra: {spectra_seconds:.1f} s; written {out}")


if __name__ == "__main__":
    main()
