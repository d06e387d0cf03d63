"""WikiText-2 perplexity and speed of GGUF files in llama.cpp (llama-cpp-python).

    python bench/bench_gguf.py dense-f32.gguf rom80-f32.gguf rom80-q4_0.gguf --windows 40 --threads 2

For each file: its size, WikiText-2 perplexity over the first ``--windows`` non-overlapping
512-token windows (tokenized by the file's own tokenizer in llama.cpp, no BOS, as
``rom_fast.evaluate`` scores them with transformers), prompt processing speed (one 512-token
window, best of ``--repeat``) and generation speed (``--new`` greedy tokens one at a time after a
16-token prompt, best of ``--repeat``). The KV cache is float32 so that f32 files score as in
transformers. Needs ``pip install llama-cpp-python`` and the WikiText-2 file (``rom-fast data
download perplexity``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def open_llama(path: str, n_ctx: int, threads: int):
    import llama_cpp
    return llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                           n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0)


def perplexity(llm, ids: np.ndarray, window: int, n_windows: int) -> float:
    nll, count = 0.0, 0
    for w in ids[: window * n_windows].reshape(-1, window):
        llm.reset()
        llm.eval(w.tolist())
        logits = np.array(llm.scores[: window - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(window - 1), w[1:]].sum()
        count += window - 1
    return float(np.exp(nll / count))


def prompt_speed(llm, ids: np.ndarray, window: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:window].tolist())
        best = min(best, time.perf_counter() - t0)
    return window / best


def generation_speed(llm, ids: np.ndarray, new: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        llm.reset()
        llm.eval(ids[:16].tolist())
        t0 = time.perf_counter()
        for _ in range(new):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        best = min(best, time.perf_counter() - t0)
    return new / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=128, help="generated tokens timed")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    from rom_fast.io import data
    text = data.require(["wikitext2"])[0].read_text(encoding="utf-8")
    rows = []
    for path in args.files:
        llm = open_llama(path, max(args.window, 16 + args.new), args.threads)
        ids = np.array(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        row = {"file": Path(path).name, "MiB": os.path.getsize(path) / 2**20,
               "perplexity": perplexity(llm, ids, args.window, args.windows),
               "prompt_tok_s": prompt_speed(llm, ids, args.window, args.repeat),
               "gen_tok_s": generation_speed(llm, ids, args.new, args.repeat)}
        rows.append(row)
        print(f"{row['file']:28s} {row['MiB']:8.1f} MiB  ppl {row['perplexity']:8.3f}  "
              f"prompt {row['prompt_tok_s']:8.1f} tok/s  generation {row['gen_tok_s']:7.1f} tok/s", flush=True)
        del llm
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
