"""CPU inference speed of compressed models: prefill and decode tokens/s, dense vs factorized.

  python bench/bench_inference.py smollm2
  python bench/bench_inference.py llama7b --blocks 4

Timing needs ranks, not trained factors, so factorized layers are built from the plans with
random factors: SmolLM2-135M with the rank planner's 80% and 50% plans (bench/results/
planner_*.json), the 7B-shaped model (bench/synth_llama.py) with the paper's module budgets on
every block (0.46 and 0.33 of each layer's weights). Every variant runs in the same process:
"two linears" keeps every factorized layer as W2 then W1; "chosen" runs
rom_fast.choose_execution (per shape: two linears or the dense merge, whichever is measured
faster for one decoding row). float32, batch 1, greedy decoding with the KV cache.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def factorized(model, ranks: dict, neurons: dict = None):
    """A copy with the plan's structure and random weights in the compressed layers: low-rank
    ``ranks`` and, for ``neurons`` ({MLP name: k}), MLPs keeping k neurons."""
    from rom_fast.lowrank import apply_structure
    model = copy.deepcopy(model)
    layers = {n: {"rank": r} for n, r in ranks.items()}
    for mlp, k in (neurons or {}).items():
        d = model.get_submodule(mlp + ".down_proj").out_features
        for n in ("gate_proj", "up_proj"):
            layers[f"{mlp}.{n}"] = {"structure": "pruned", "out_features": k, "in_features": d}
        layers[f"{mlp}.down_proj"] = {"structure": "pruned", "out_features": d, "in_features": k}
    apply_structure(model, layers)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, spec in layers.items():
            m = model.get_submodule(n)
            for lin in ((m,) if spec.get("structure") == "pruned" else (m.reduce, m.expand)):
                lin.weight.normal_(0, lin.in_features ** -0.5, generator=gen)
    return model.eval()


@torch.inference_mode()
def speed(model, vocab: int, prompt: int, new: int, repeat: int) -> tuple:
    ids = torch.randint(3, vocab, (1, prompt), generator=torch.Generator().manual_seed(1))
    model(ids[:, :8], use_cache=False)                       # warm-up
    prefill = min(_time(lambda: model(ids, use_cache=False)) for _ in range(repeat))
    decode = []
    for _ in range(repeat):
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode.append(time.perf_counter() - t0)
    return prompt / prefill, new / min(decode)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["smollm2", "llama7b"])
    p.add_argument("--blocks", type=int, default=4, help="7B-shaped blocks")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--structures", help="SmolLM2: also time every plan of this bench_structures.py result "
                                        "(e.g. bench/results/structures.json), MLPs keeping neurons included")
    a = p.parse_args()

    import transformers

    import rom_fast
    from rom_fast import plans
    transformers.logging.set_verbosity_error()
    if a.model == "smollm2":
        from rom_fast.io.models import load_model
        dense, _ = load_model("smollm2")
        variants = {}
        for ratio in ("0.80", "0.50"):
            rows = json.load(open(os.path.join(ROOT, "bench", "results", f"planner_{ratio}.json")))["rows"]
            variants[f"{float(ratio):.0%} (planner)"] = (next(r for r in rows if r["label"] == "planner (fisher)")["ranks"], {})
        if a.structures:
            for r in json.load(open(a.structures))["rows"]:
                if r["anchor"] == 0:      # the weights do not matter for speed, the structure does
                    variants[f"{r['ratio']:.0%} ({r['structure']} MLPs)"] = (r["ranks"], r["neurons"])
    else:
        from bench_scale import SHAPES, module_rank
        from synth_llama import LLAMA_7B
        cfg = transformers.LlamaConfig(**LLAMA_7B, num_hidden_layers=a.blocks)
        torch.manual_seed(0)
        dense = transformers.LlamaForCausalLM(cfg).eval()
        variants = {f"linears at {b:.0%}": ({f"model.layers.{i}.{n}": module_rank(*s, budget=b)
                                            for i in range(a.blocks) for n, s in SHAPES.items()}, {})
                    for b in (0.46, 0.33)}
    vocab = dense.config.vocab_size
    print(f"| model | variant | params | prefill tok/s ({a.prompt}) | decode tok/s | prefill vs dense | decode vs dense |")
    print("|---|---|---|---|---|---|---|")
    rows = []

    def report(label, model):
        pre, dec = speed(model, vocab, a.prompt, a.new, a.repeat)
        rows.append({"variant": label, "params": plans.total_params(model), "prefill_tok_s": pre, "decode_tok_s": dec})
        base = rows[0]
        print(f"| {a.model} | {label} | {rows[-1]['params']:,} | {pre:.1f} | {dec:.2f} | "
              f"{pre / base['prefill_tok_s']:.2f}x | {dec / base['decode_tok_s']:.2f}x |", flush=True)

    report("dense", dense)
    for label, (ranks, neurons) in variants.items():
        model = factorized(dense, ranks, neurons)
        report(f"{label}, two linears", model)
        chosen = rom_fast.choose_execution(model, tokens=1)
        merged = sum(c == "merged" for c in chosen.values())
        report(f"{label}, chosen ({merged}/{len(chosen)} merged)", model)
        del model
    name = f"inference_{a.model}" + (f"_{a.blocks}blocks" if a.model == "llama7b" else "") + ".json"
    path = os.path.join(ROOT, "bench", "results", name)
    with open(path, "w") as f:
        json.dump({"command": "python bench/bench_inference.py " + " ".join(sys.argv[1:]),
                   "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    print(f"written {path}")


if __name__ == "__main__":
    main()
