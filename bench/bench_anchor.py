"""Dense-anchored targets against the paper's objective, at the same ranks (issue 14).

  python bench/bench_anchor.py --ratio 0.8 --anchor 0 1 inf
  python bench/bench_anchor.py --ratio 0.5 --anchor 0 inf --plan last-27

SmolLM2-135M in the FINDINGS setup (calibration: the first 128 windows of 128 tokens of the
local Wikipedia text). Every row compresses a fresh copy of the dense model with the same
tokens and the same ranks (the planner's, or a last-k recipe), and scores perplexity on the
tuning text (WikiText-2 test, first 40 × 512 tokens) and on held-out text never tuned on:
WikiText-2 validation, the C4 sample and Tiny Shakespeare (first 16 × 512 tokens each).
Writes bench/results/anchor_<ratio><tag>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPORA = {"wikitext2-test": "wikitext2/tokenized/test.txt", "wikitext2-valid": "wikitext2/tokenized/valid.txt",
           "c4": "calibration_text/exllamav2_c4.utf8", "shakespeare": "calibration_text/tinyshakespeare_input.txt"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--anchor", nargs="+", default=["0", "inf"], help="anchor weights alpha to compare")
    p.add_argument("--ridge", type=float, nargs="+", default=[1e-3])
    p.add_argument("--plan", default="planner",
                   help="'planner', 'last-K', or 'saved' (the fisher planner row of bench/results/planner_<ratio>.json)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--windows", type=int, default=40, help="512-token windows of WikiText-2 test (FINDINGS: 40)")
    p.add_argument("--heldout-windows", type=int, default=16, help="512-token windows of each held-out text")
    p.add_argument("--corpora", nargs="+", default=list(CORPORA))
    p.add_argument("--tag", default="")
    a = p.parse_args()

    import torch  # noqa: F401
    import transformers

    import rom_fast
    from rom_fast import plans
    from rom_fast.adapters import adapter_for
    from rom_fast.calibration import calibration_tokens, default_data_dir
    from rom_fast.evaluate import wikitext2_perplexity
    from rom_fast.io.models import load_model
    from rom_fast.planner import collect_spectra, planned
    from rom_fast.io.sources import ModelSource

    transformers.logging.set_verbosity_error()
    dense, tok = load_model("smollm2")
    shape = plans.ModelShape.of(adapter_for(dense))
    calib = calibration_tokens("wiki", tok, n_samples=a.n_samples, seq_len=128, seed=None)
    batch = {"input_ids": calib.input_ids, "attention_mask": calib.attention_mask}
    data = default_data_dir()
    if a.plan == "planner":
        plan = planned(shape, a.ratio, collect_spectra(ModelSource(dense), calib.input_ids, calib.attention_mask))
    elif a.plan == "saved":
        with open(os.path.join(ROOT, "bench", "results", f"planner_{a.ratio:.2f}.json")) as f:
            row = next(r for r in json.load(f)["rows"] if r["label"] == "planner (fisher)")
        plan = plans.RankPlan(ranks=row["ranks"], description=row["plan"],
                              details={"kept_params": row["kept_params"], "ratio": row["ratio"]})
    else:
        plan = plans.last_k_plan(shape, a.ratio, int(a.plan.split("-")[1]))
    print(f"plan: {plan.description}; kept {plan.details['kept_params']:,} ({plan.details['ratio']:.4f})")

    rows = []
    print("| anchor | ridge | " + " | ".join(a.corpora) + " | compress s |\n|---|---|" + "---|" * (len(a.corpora) + 1),
          flush=True)
    for anchor in a.anchor:
        for ridge in (a.ridge if float(anchor) else a.ridge[:1]):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            rom_fast.compress(model, calibration=batch, ranks=plan.ranks, progress=False,
                              anchor=float(anchor), ridge=ridge)
            seconds = time.perf_counter() - t0
            ppl = {c: wikitext2_perplexity(model, tok, path=os.path.join(data, CORPORA[c]), window=512,
                                           max_windows=a.windows if c == "wikitext2-test" else a.heldout_windows,
                                           batch_size=4)["perplexity"] for c in a.corpora}
            rows.append({"anchor": float(anchor), "ridge": ridge, "perplexity": ppl, "compress_seconds": seconds})
            print(f"| {anchor} | {ridge:g} | " + " | ".join(f"{ppl[c]:.2f}" for c in a.corpora)
                  + f" | {seconds:.1f} |", flush=True)
            del model
    out = os.path.join(ROOT, "bench", "results", f"anchor_{a.ratio:.2f}{a.tag}.json")
    with open(out, "w") as f:
        json.dump({"command": "python bench/bench_anchor.py " + " ".join(
            [f"--ratio {a.ratio}", "--anchor " + " ".join(a.anchor), "--ridge " + " ".join(map(str, a.ridge)),
             f"--plan {a.plan}"] + ([f"--tag {a.tag}"] if a.tag else [])),
            "calibration": calib.description, "plan": plan.description, "ranks": plan.ranks,
            "rows": rows}, f, indent=2)
    print(f"written {out}")


if __name__ == "__main__":
    main()
