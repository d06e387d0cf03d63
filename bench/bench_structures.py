"""Ablation of the quality levers at several budgets on SmolLM2-135M (issue 14).

  python bench/bench_structures.py --ratios 0.9 0.8 0.5 --rows lowrank:0 lowrank:1 neurons:0 auto:0 auto:1

Each row is ``STRUCTURE:ALPHA``: the rank planner with MLP structure STRUCTURE ("lowrank": every
linear low-rank, today's planner; "neurons": every MLP it compresses keeps whole neurons,
attention low-rank; "auto": the planner picks per MLP from both curves) and dense-anchored
targets of weight ALPHA (0: the paper's objective). One planner pass over the dense model
(spectra, sensitivities and neuron curves are budget-independent) serves every row.

FINDINGS setup: calibration = the first 128 windows of 128 tokens of the local Wikipedia
text; perplexity on WikiText-2 test (first 40 x 512 tokens, the tuning text) and on held-out
text never tuned on: WikiText-2 validation, the C4 sample, Tiny Shakespeare (first 16 x 512
tokens each). Writes bench/results/structures<tag>.json and prints a markdown table.
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
    p.add_argument("--ratios", type=float, nargs="+", default=[0.8])
    p.add_argument("--rows", nargs="+", default=["lowrank:0", "auto:0", "auto:1"])
    p.add_argument("--cells", nargs="+", default=None, metavar="RATIO/STRUCTURE:ALPHA",
                   help="run exactly these cells, in order, instead of every ratio x row "
                        "(e.g. 0.9/auto:0 0.5/neurons:0): fills gaps of an earlier run")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--windows", type=int, default=40, help="512-token windows of WikiText-2 test (FINDINGS: 40)")
    p.add_argument("--heldout-windows", type=int, default=16, help="512-token windows of each held-out text")
    p.add_argument("--corpora", nargs="+", default=list(CORPORA))
    p.add_argument("--tag", default="")
    p.add_argument("--time-planner", action="store_true",
                   help="only time the planner pass without, then with, the neuron curves (same run) and exit")
    a = p.parse_args()
    cells = ([_cell(c) for c in a.cells] if a.cells
             else [(ratio, spec) for ratio in a.ratios for spec in a.rows])

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
    if a.time_planner:
        _time_planner(a, ModelSource(dense), calib, collect_spectra)
        return
    t0 = time.perf_counter()
    spectra = collect_spectra(ModelSource(dense), calib.input_ids, calib.attention_mask, neuron_curves=True)
    planner_seconds = time.perf_counter() - t0
    print(f"planner pass (spectra, sensitivities, neuron curves): {planner_seconds:.1f} s", flush=True)

    results = []
    print("| kept | MLP structure | anchor | MLPs on neurons | " + " | ".join(a.corpora)
          + " | compress s |\n|---|---|---|---|" + "---|" * (len(a.corpora) + 1), flush=True)
    for ratio, spec in cells:
        structure, _, alpha = spec.partition(":")
        alpha = float(alpha or 0)
        plan = planned(shape, ratio, spectra, structure=structure)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rom_fast.compress(model, calibration=batch, ranks={"ranks": plan.ranks, "neurons": plan.neurons},
                          progress=False, anchor=alpha)
        seconds = time.perf_counter() - t0
        ppl = {c: wikitext2_perplexity(model, tok, path=os.path.join(data, CORPORA[c]), window=512,
                                       max_windows=a.windows if c == "wikitext2-test" else a.heldout_windows,
                                       batch_size=4)["perplexity"] for c in a.corpora}
        kept = plans.total_params(model)
        results.append({"ratio": ratio, "structure": structure, "anchor": alpha, "kept_params": kept,
                        "kept_ratio": kept / shape.total_params, "plan": plan.description,
                        "ranks": plan.ranks, "neurons": plan.neurons, "perplexity": ppl,
                        "compress_seconds": seconds})
        print(f"| {kept / shape.total_params:.3f} | {structure} | {alpha:g} | {len(plan.neurons)} | "
              + " | ".join(f"{ppl[c]:.2f}" for c in a.corpora) + f" | {seconds:.1f} |", flush=True)
        del model
        _write(a, calib, planner_seconds, results)     # after every row: a stopped run keeps its rows


def _time_planner(a, source, calib, collect_spectra) -> None:
    """What the neuron curves add to the planner pass: both passes on the same tokens, in turn."""
    seconds = {}
    for curves in (False, True):
        t0 = time.perf_counter()
        collect_spectra(source, calib.input_ids, calib.attention_mask, neuron_curves=curves)
        seconds["with_neuron_curves" if curves else "lowrank_only"] = time.perf_counter() - t0
        print(f"planner pass, neuron curves {'on' if curves else 'off'}: "
              f"{seconds['with_neuron_curves' if curves else 'lowrank_only']:.1f} s", flush=True)
    ratio = seconds["with_neuron_curves"] / seconds["lowrank_only"]
    print(f"ratio: {ratio:.2f}x", flush=True)
    out = os.path.join(ROOT, "bench", "results", f"structures_planner_time{a.tag}.json")
    with open(out, "w") as f:
        json.dump({"command": f"python bench/bench_structures.py --time-planner --n-samples {a.n_samples}",
                   "calibration": calib.description, "seconds": seconds, "ratio": ratio}, f, indent=2)
    print(f"written {out}", flush=True)


def _cell(text: str):
    ratio, sep, spec = text.partition("/")
    if not sep or not spec:
        raise SystemExit(f"--cells: {text!r} is not RATIO/STRUCTURE:ALPHA (e.g. 0.9/auto:0)")
    return float(ratio), spec


def _write(a, calib, planner_seconds: float, results: list) -> None:
    out = os.path.join(ROOT, "bench", "results", f"structures{a.tag}.json")
    with open(out, "w") as f:
        json.dump({"command": "python bench/bench_structures.py " + " ".join(
            (["--cells " + " ".join(a.cells)] if a.cells
             else ["--ratios " + " ".join(map(str, a.ratios)), "--rows " + " ".join(a.rows)])
            + ([f"--tag {a.tag}"] if a.tag else [])),
            "calibration": calib.description, "planner_seconds": planner_seconds, "rows": results}, f, indent=2)
    print(f"written {out}", flush=True)


if __name__ == "__main__":
    main()
