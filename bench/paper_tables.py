"""The paper's Table 1 and ablations (Tables 2-4) on SmolLM2-135M, one JSON per row.

  python bench/paper_tables.py                      # every row not yet in bench/results/
  python bench/paper_tables.py --rows dense rom-80  # some rows
  python bench/paper_tables.py --table              # print the README tables from the JSONs
  python bench/paper_tables.py --plot bench/results/paper_plot.png

Each row compresses a fresh copy of the model (or not, for "dense"), then measures WikiText-2
perplexity and the six zero-shot tasks with the same settings for every row, and writes
bench/results/table_<row>.json with the exact command. Rows already written are skipped, so
an interrupted run resumes. "Last k of 32 blocks" is scaled to SmolLM2's 30 blocks as
round(k * 30 / 32), with the module budget solved so the whole model keeps the stated share.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

# row -> (method, recipe (or budget, for the planner), calibration, n_samples, seq_len)
MAIN = "combination"
ROWS = {
    "dense": ("dense", None, None, 0, 0),
    "rom-90": ("rom", "paper-90", MAIN, 512, 128),
    "rom-80": ("rom", "paper-80", MAIN, 512, 128),
    "rom-50": ("rom", "paper-50", MAIN, 512, 128),
    # rom_fast's default: budget alone, ranks from the planner (rom_fast.planner).
    "planner-80": ("planner", 0.8, MAIN, 512, 128),
    "planner-50": ("planner", 0.5, MAIN, 512, 128),
    "svd-90": ("svd", "paper-90", None, 0, 0),
    "svd-80": ("svd", "paper-80", None, 0, 0),
    "svd-50": ("svd", "paper-50", None, 0, 0),
    # Table 2: calibration batch size (sequences of 128 tokens).
    "rom-80-batch32": ("rom", "paper-80", MAIN, 32, 128),
    "rom-80-batch128": ("rom", "paper-80", MAIN, 128, 128),
    # Table 3: sequence length (512 sequences).
    "rom-80-seq32": ("rom", "paper-80", MAIN, 512, 32),
    "rom-80-seq64": ("rom", "paper-80", MAIN, 512, 64),
    # Table 4: calibration data.
    "rom-80-wiki": ("rom", "paper-80", "wiki", 512, 128),
    "rom-80-c4": ("rom", "paper-80", "c4", 512, 128),
    "rom-80-shakespeare": ("rom", "paper-80", "shakespeare", 512, 128),
}
TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]


def linear_macs(model) -> int:
    """Multiply-accumulates per token of every Linear (lm_head included); attention scores
    and norms are excluded, so dense and compressed models are counted alike."""
    from torch import nn
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def run_row(row: str, args) -> dict:
    import torch

    import rom_fast
    from rom_fast import plans
    from rom_fast.adapters import adapter_for
    from rom_fast.baselines import svd_compress
    from rom_fast.evaluate import wikitext2_perplexity, zero_shot
    from rom_fast.io.models import load_model

    torch.manual_seed(0)
    method, recipe, calibration, n_samples, seq_len = ROWS[row]
    model, tok = load_model("smollm2")
    t0 = time.perf_counter()
    plan = None
    if method in ("rom", "svd"):
        plan = plans.paper_recipe(plans.ModelShape.of(adapter_for(model)), recipe)
    if method == "planner":
        result = rom_fast.compress(model, calibration=calibration, budget=recipe, tokenizer=tok,
                                   n_samples=n_samples, seq_len=seq_len, seed=0, progress=False)
        model, plan = result.model, result.plan
    elif method == "rom":
        model = rom_fast.compress(model, calibration=calibration, ranks=plan.ranks, tokenizer=tok,
                                  n_samples=n_samples, seq_len=seq_len, seed=0, progress=False).model
    elif method == "svd":
        svd_compress(model, plan.ranks)
    compress_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = wikitext2_perplexity(model, tok, window=args.window, max_windows=args.windows)
    zs = zero_shot(model, tok, tasks=TASKS, limit=args.limit, seed=0, batch_size=16)
    return {
        "row": row, "method": method, "recipe": recipe, "plan": plan.description if plan else "dense",
        "calibration": calibration, "n_samples": n_samples, "seq_len": seq_len,
        "params": sum(p.numel() for p in model.parameters()), "linear_macs_per_token": linear_macs(model),
        "wikitext2": ppl, "zero_shot": zs, "compress_seconds": compress_s,
        "eval_seconds": time.perf_counter() - t0,
        "command": "python bench/paper_tables.py --rows " + row + f" --limit {args.limit} "
                   f"--windows {args.windows} --window {args.window}",
    }


def load_rows() -> dict:
    """{row: result} for every row with a JSON in bench/results, in table order."""
    rows = {}
    for row in ROWS:
        path = os.path.join(RESULTS, f"table_{row}.json")
        if os.path.exists(path):
            with open(path) as f:
                rows[row] = json.load(f)
    return rows


def print_tables() -> None:
    rows = load_rows()
    if not rows:
        print("no results yet")
        return
    any_row = next(iter(rows.values()))
    n = any_row["zero_shot"]["boolq"]["n"]
    print(f"Zero-shot: {n} seeded items per task (lm-eval prompts; metric per task as in the paper: "
          + ", ".join(f"{t} {any_row['zero_shot'][t]['metric']}" for t in TASKS) + ").")
    print("WikiText-2: " + f"{any_row['wikitext2']['n_tokens']:,} tokens in windows of "
          f"{any_row['wikitext2'].get('window', '?')}.\n")
    head = "| Method | #Params | #MACs/token | " + " | ".join(
        ["BoolQ", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c"]) + " | Average | WikiText-2 ppl |"
    print(head)
    print("|" + "---|" * 11)
    for row, r in rows.items():
        z = r["zero_shot"]
        cells = " | ".join(f"{100 * z[t]['score']:.1f}" for t in TASKS)
        print(f"| {row} | {r['params'] / 1e6:.1f}M | {r['linear_macs_per_token'] / 1e6:.1f}M | {cells} "
              f"| {100 * z['average']['score']:.1f} | {r['wikitext2']['perplexity']:.2f} |")


def plot(path: str) -> None:
    """Six-task average and WikiText-2 perplexity against kept parameters, a line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows()
    dense = rows["dense"]
    lines = {"LLM-ROM, paper's last-k recipe": "rom", "rom_fast planner (default)": "planner",
             "truncated SVD (data-free)": "svd"}
    fig, (acc_ax, ppl_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, prefix in lines.items():
        pts = sorted((r["params"] / dense["params"], 100 * r["zero_shot"]["average"]["score"],
                      r["wikitext2"]["perplexity"])
                     for name, r in rows.items() if name in (f"{prefix}-90", f"{prefix}-80", f"{prefix}-50"))
        pts.append((1.0, 100 * dense["zero_shot"]["average"]["score"], dense["wikitext2"]["perplexity"]))
        x, acc, ppl = zip(*pts)
        acc_ax.plot(x, acc, marker="o", label=label)
        ppl_ax.plot(x, ppl, marker="o", label=label)
    # Uniform guessing: 2 choices for BoolQ, PIQA, WinoGrande; 4 for HellaSwag and (nearly all) ARC.
    chance = 100 * sum([1 / 2, 1 / 2, 1 / 4, 1 / 2, 1 / 4, 1 / 4]) / 6
    acc_ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.1f}%)")
    acc_ax.set_ylabel("six-task average (%)")
    ppl_ax.set_ylabel("WikiText-2 perplexity (log)")
    ppl_ax.set_yscale("log")
    for ax in (acc_ax, ppl_ax):
        ax.set_xlabel("kept parameters (fraction of SmolLM2-135M)")
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: calibration 512 x 128 task mix; zero-shot 100 items per task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"written {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--limit", type=int, default=100, help="zero-shot items per task (seeded subset)")
    p.add_argument("--windows", type=int, default=20, help="WikiText-2 windows")
    p.add_argument("--window", type=int, default=2048, help="WikiText-2 window length")
    p.add_argument("--force", action="store_true", help="recompute rows that already have a JSON")
    p.add_argument("--table", action="store_true", help="only print the tables")
    p.add_argument("--plot", help="only draw the accuracy/perplexity plot to this PNG")
    a = p.parse_args()
    if a.table:
        print_tables()
        return
    if a.plot:
        plot(a.plot)
        return
    os.makedirs(RESULTS, exist_ok=True)
    for row in a.rows:
        path = os.path.join(RESULTS, f"table_{row}.json")
        if os.path.exists(path) and not a.force:
            continue
        result = run_row(row, a)
        with open(path, "w") as f:
            json.dump(result, f, indent=2, default=float)
        z = result["zero_shot"]["average"]["score"]
        print(f"{row}: ppl {result['wikitext2']['perplexity']:.2f}, average {100 * z:.1f}, "
              f"compress {result['compress_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
