"""Data-parallel compression: 2 gloo processes give one process's ranks, factors and logits.

Each run launches tests/distributed_worker.py as separate processes with the environment
torchrun sets (127.0.0.1, a free port), under timeouts: the group's own (ROM_FAST_DIST_TIMEOUT)
and the subprocess's, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rom_fast.distributed import Communicator

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, args: dict, expect_ok=True):
    """Runs the worker in ``n`` processes; returns their CompletedProcess-like (rc, stderr)."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                   LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   ROM_FAST_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if expect_ok:
        assert all(rc == 0 for rc, _ in results), "\n".join(
            f"process {rank} (exit {rc}):\n{err[-2500:]}" for rank, (rc, err) in enumerate(results))
    return results


def tensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def lowrank_products(state: dict) -> dict:
    """W1 W2 of every factorized layer (sign- and basis-free), and every other tensor."""
    out = {}
    for k, v in state.items():
        if k.endswith(".expand.weight"):
            base = k[: -len(".expand.weight")]
            out[base] = v.double() @ state[base + ".reduce.weight"].double()
        elif not k.endswith(".reduce.weight"):
            out[k] = v.double()
    return out


def assert_close(a: dict, b: dict, rtol: float):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(b[k].abs().max()), 1e-30)
        assert float((a[k] - b[k]).abs().max()) <= rtol * scale, k


def test_sharding_deals_whole_micro_batches_round_robin():
    c = Communicator()
    assert torch.equal(c.shard_rows(10, 3), torch.arange(10))
    c.size, c.rank = 3, 1
    assert c.shard_rows(10, 3).tolist() == [3, 4, 5]
    c.rank = 0
    assert c.shard_rows(10, 3).tolist() == [0, 1, 2, 9]     # the short last batch, whole
    with pytest.raises(ValueError, match="too few for 3 processes"):
        c.shard_rows(5, 3)


def test_two_processes_match_one_process(tmp_path):
    args = dict(model="tiny", budget=0.6, planner_samples=24, planner_grad_samples=8, batch_size=4)
    launch(1, dict(args, dump=str(tmp_path / "one"), out=str(tmp_path / "out1")))
    launch(2, dict(args, dump=str(tmp_path / "two"), out=str(tmp_path / "out2")))
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["ranks"] == one["ranks"] and len(one["ranks"]) > 4     # the planner's ranks
    assert two["summary"]["params_after"] == one["summary"]["params_after"]
    traffic = two["summary"]["traffic"]
    assert two["summary"]["processes"] == 2 and "processes" not in one["summary"]
    assert traffic["factors"]["bytes"] > 0 and traffic["planner sensitivities"]["calls"] == 1
    assert any(k.startswith("inputs of self_attn.q_proj") and v["bytes"] >= 64 * 64 * 8 * 4
               for k, v in traffic.items())    # one Gram per block, all blocks summed

    a, b = tensors(tmp_path / "one" / "rank0.safetensors"), tensors(tmp_path / "two" / "rank0.safetensors")
    dense = tensors(tmp_path / "two" / "rank1.safetensors")
    # Both processes of the 2-process run hold process 0's model bit for bit.
    assert all(torch.equal(dense[k], b[k]) for k in b)
    assert float((a["logits"] - b["logits"]).abs().max()) <= 1e-5 * float(a["logits"].abs().max())
    assert_close(lowrank_products(b), lowrank_products(a), 1e-5)
    # What was written is what the processes held.
    saved = {}
    for f in sorted((tmp_path / "out2").glob("*.safetensors")):
        saved.update(tensors(f))
    assert all(torch.equal(saved[k], b[k]) for k in saved if k in b)


def test_a_failed_process_ends_the_job_and_the_rerun_resumes(tmp_path):
    from transformers import AutoModelForCausalLM  # noqa: F401  (the worker's model, saved for streaming)
    sys.path.insert(0, str(WORKER.parent))
    from distributed_worker import tiny_model
    src = tmp_path / "dense"
    tiny_model().save_pretrained(src, max_shard_size="60KB")
    args = dict(model=str(src), budget=0.6, planner_samples=24, planner_grad_samples=8, batch_size=4)

    whole = launch(2, dict(args, dump=str(tmp_path / "whole"), out=str(tmp_path / "whole-out")))
    assert all(rc == 0 for rc, _ in whole)

    out = tmp_path / "rom"
    failed = launch(2, dict(args, dump=str(tmp_path / "x"), out=str(out), crash_after=1), expect_ok=False)
    (rc0, err0), (rc1, err1) = failed
    assert rc1 != 0 and "simulated failure of process 1" in err1
    assert rc0 != 0 and "rom-fast" not in err0 and "the exchange failed" in err0   # not a hang
    state = json.loads((tmp_path / ".rom.partial" / "rom_fast_state.json").read_text())
    assert state["blocks_done"] == 2 and state["fingerprint"]["processes"] == 2
    assert (tmp_path / ".rom.partial" / "hidden-00002.rank1.safetensors").is_file()

    # The same command on one process is refused (its hidden states are two shards) ...
    one = launch(1, dict(args, dump=str(tmp_path / "y"), out=str(out)), expect_ok=False)
    assert one[0][0] != 0 and "different command" in one[0][1] and "processes" in one[0][1]
    # ... on two it continues after block 1 and writes what the uninterrupted run wrote.
    launch(2, dict(args, dump=str(tmp_path / "resumed"), out=str(out)))
    summary = json.loads((tmp_path / "resumed" / "result.json").read_text())["summary"]
    assert summary["resumed_from_block"] == 2
    a, b = {}, {}
    for f in sorted(out.glob("*.safetensors")):
        a.update(tensors(f))
    for f in sorted((tmp_path / "whole-out").glob("*.safetensors")):
        b.update(tensors(f))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
