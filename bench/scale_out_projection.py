"""Projected compression time of LLaMA-7B/13B/70B on 1, 4 and 16 machines (issue 16).

    python bench/scale_out_projection.py [--bandwidth-gbit 10]

From the measured 7B per-block stage costs (bench/README.md, issue-6 section: 512 x 128
tokens, 2 cores: forward 94 s, statistics 43 s, eigensolver 31 s, factor products 27 s),
scaled to each shape, and this model of a data-parallel block on M machines of that kind:

    T_block(M) = (forward + statistics) / M + eigensolver + products + exchange(M)

- forward and statistics are split over the machines' shards of the sequences; the
  eigensolves and products are not (every machine solves the same reduced problems);
- forward scales with the block's parameters, statistics with the squared widths of the four
  Grams (q/k/v input, o input, gate/up input, down's output: 4 d^2 per token), the
  eigensolver with the cube of each layer's eigenproblem (its smaller dimension), products
  with d_out * d_in * that dimension;
- exchange: the four float64 Grams all-reduced (ring: 2 (M-1)/M of their bytes per link)
  and the kept float32 factors broadcast from process 0 (gloo's binomial tree: ceil(log2 M)
  times their bytes), at the given link bandwidth.

Writes bench/results/scale_out_projection.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

MEASURED_7B = {"forward": 94.0, "statistics": 43.0, "eigensolver": 31.0, "products": 27.0}
SHAPES = {   # hidden, intermediate, heads, kv heads, blocks
    "LLaMA-7B": (4096, 11008, 32, 32, 32),
    "LLaMA-13B": (5120, 13824, 40, 40, 40),
    "LLaMA-70B": (8192, 28672, 64, 8, 80),
}
KEPT = 0.8    # fraction of each block's parameters kept (the factors broadcast)


def layers(d, ffn, heads, kv):
    kvd = d // heads * kv
    return [(d, d), (kvd, d), (kvd, d), (d, d), (ffn, d), (ffn, d), (d, ffn)]   # (d_out, d_in)


def costs(shape):
    d, ffn, heads, kv, _ = shape
    ls = layers(d, ffn, heads, kv)
    return {"params": sum(o * i for o, i in ls), "gram": 4 * d * d,
            "eigen": sum(min(o, i) ** 3 for o, i in ls), "products": sum(o * i * min(o, i) for o, i in ls)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bandwidth-gbit", type=float, default=10.0)
    args = p.parse_args()
    bw = args.bandwidth_gbit * 1e9 / 8
    base = costs(SHAPES["LLaMA-7B"])
    rows = []
    for name, shape in SHAPES.items():
        c = costs(shape)
        stage = {"forward": MEASURED_7B["forward"] * c["params"] / base["params"],
                 "statistics": MEASURED_7B["statistics"] * c["gram"] / base["gram"],
                 "eigensolver": MEASURED_7B["eigensolver"] * c["eigen"] / base["eigen"],
                 "products": MEASURED_7B["products"] * c["products"] / base["products"]}
        gram_bytes, factor_bytes = 8 * c["gram"], 4 * KEPT * c["params"]
        for m in (1, 4, 16):
            exchange = 0.0 if m == 1 else \
                (2 * (m - 1) / m * gram_bytes + math.ceil(math.log2(m)) * factor_bytes) / bw
            block = (stage["forward"] + stage["statistics"]) / m + stage["eigensolver"] + stage["products"] + exchange
            rows.append({"model": name, "machines": m, "blocks": shape[4],
                         "stage_seconds_per_block_1_machine": {k: round(v, 1) for k, v in stage.items()},
                         "gram_bytes_per_block": gram_bytes, "factor_bytes_per_block": int(factor_bytes),
                         "exchange_seconds_per_block": round(exchange, 2),
                         "seconds_per_block": round(block, 1), "hours": round(block * shape[4] / 3600, 2)})
    out = Path(__file__).parent / "results" / "scale_out_projection.json"
    out.write_text(json.dumps({"bandwidth_gbit": args.bandwidth_gbit, "measured_7b": MEASURED_7B,
                               "rows": rows}, indent=1) + "\n")
    print(f"| model | machines | s/block (fwd+stats / M + eig + prod + exchange) | exchange s/block | total h | speed-up |")
    print("|---|---|---|---|---|---|")
    one = {}
    for r in rows:
        one.setdefault(r["model"], r["hours"])
        s = r["stage_seconds_per_block_1_machine"]
        print(f"| {r['model']} | {r['machines']} | {r['seconds_per_block']:.0f} "
              f"({s['forward'] + s['statistics']:.0f}/{r['machines']} + {s['eigensolver']:.0f} + {s['products']:.0f}"
              f" + {r['exchange_seconds_per_block']:.1f}) | {r['exchange_seconds_per_block']:.1f} | "
              f"{r['hours']:.2f} | {one[r['model']] / r['hours']:.2f}x |")


if __name__ == "__main__":
    main()
