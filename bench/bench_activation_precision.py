"""Storage precision of the calibration activations: perplexity and activation memory.

  python bench/bench_activation_precision.py

SmolLM2-135M, the shared/FINDINGS.md setup (first 128 windows of 128 tokens of the local
Wikipedia text; last 20 of 30 blocks at 80% of all parameters; first 40 WikiText-2 windows of
512 tokens). Each row compresses a fresh copy with the same plan and tokens, storing block
inputs and per-block scratch in the given dtype (arithmetic stays float32).
"""

from __future__ import annotations

import copy
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import torch
    import transformers

    import rom_fast
    from rom_fast import plans
    from rom_fast.adapters import adapter_for
    from rom_fast.calibration import calibration_tokens
    from rom_fast.evaluate import wikitext2_perplexity
    from rom_fast.io.models import load_model

    transformers.logging.set_verbosity_error()
    dense, tok = load_model("smollm2")
    calib = calibration_tokens("wiki", tok, n_samples=128, seq_len=128, seed=None)
    plan = plans.last_k_plan(plans.ModelShape.of(adapter_for(dense)), 0.8, 20)
    rows = []
    print("| activations | bytes per activation value | WikiText-2 ppl | vs float32 |\n|---|---|---|---|")
    for name in ("float32", "float16", "bfloat16"):
        model = copy.deepcopy(dense)
        rom_fast.compress(model, calibration={"input_ids": calib.input_ids, "attention_mask": calib.attention_mask},
                          ranks=plan.ranks, activation_dtype=name, progress=False)
        ppl = wikitext2_perplexity(model, tok, window=512, max_windows=40)["perplexity"]
        rows.append({"activation_dtype": name, "perplexity": ppl})
        size = torch.empty(0, dtype=getattr(torch, name)).element_size()
        print(f"| {name} | {size} | {ppl:.2f} | {ppl / rows[0]['perplexity'] - 1:+.2%} |", flush=True)
    path = os.path.join(ROOT, "bench", "results", "activation_precision.json")
    with open(path, "w") as f:
        json.dump({"command": "python bench/bench_activation_precision.py", "plan": plan.description,
                   "calibration": calib.description, "rows": rows}, f, indent=2)
    print(f"written {path}")


if __name__ == "__main__":
    main()
