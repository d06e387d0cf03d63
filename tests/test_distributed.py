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

import rom_fast
from rom_fast.distributed import Communicator

WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import calibration, tiny_model  # noqa: E402
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


ARGS = dict(budget=0.6, planner_samples=24, planner_grad_samples=8, batch_size=4)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A streamed tiny LLaMA compressed by 2 processes (every process reads the directory)."""
    tmp = tmp_path_factory.mktemp("distributed")
    tiny_model().save_pretrained(tmp / "dense", max_shard_size="60KB")
    launch(2, dict(ARGS, model=str(tmp / "dense"), dump=str(tmp / "two"), out=str(tmp / "two-out")))
    return tmp


def saved(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(tensors(f))
    return out


def test_two_processes_match_one_process(two_processes, tmp_path):
    tmp = two_processes
    one = rom_fast.compress(tiny_model(), calibration=calibration(), n_samples=40, seq_len=24, progress=False,
                            out=tmp_path / "one-out", **ARGS)
    two = json.loads((tmp / "two" / "result.json").read_text())
    assert two["ranks"] == one.plan.ranks and len(one.plan.ranks) > 4     # the planner's ranks
    assert two["summary"]["params_after"] == one.summary["params_after"]
    assert two["summary"]["processes"] == 2 and "processes" not in one.summary
    traffic = two["summary"]["traffic"]
    assert traffic["factors"]["bytes"] > 0 and traffic["planner sensitivities"]["calls"] == 1
    # The planner's q/k/v Gram, then column sum and count, in each of the 4 blocks.
    planner_qkv = traffic["inputs of self_attn.q_proj (planner)"]
    assert planner_qkv["calls"] == 2 * 4 and planner_qkv["bytes"] == 4 * (64 * 64 + 64 + 1) * 8

    test_ids = torch.randint(0, 211, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = one.model(test_ids).logits
    b = tensors(tmp / "two" / "rank0.safetensors")
    assert float((b["logits"] - logits).abs().max()) <= 1e-5 * float(logits.abs().max())
    assert_close(lowrank_products(saved(tmp / "two-out")), lowrank_products(saved(tmp_path / "one-out")), 1e-5)


def test_a_failed_process_ends_the_job_and_the_rerun_resumes(two_processes, tmp_path):
    args = dict(ARGS, model=str(two_processes / "dense"))
    out = tmp_path / "rom"
    failed = launch(2, dict(args, dump=str(tmp_path / "x"), out=str(out), crash_after=1), expect_ok=False)
    (rc0, err0), (rc1, err1) = failed
    assert rc1 != 0 and "simulated failure of process 1" in err1
    assert rc0 != 0 and "the exchange failed" in err0        # process 0 stopped too: no hang
    state = json.loads((tmp_path / ".rom.partial" / "rom_fast_state.json").read_text())
    assert state["blocks_done"] == 2 and state["fingerprint"]["processes"] == 2
    assert (tmp_path / ".rom.partial" / "hidden-00002.rank1.safetensors").is_file()

    # The same command in one process is refused (the saved hidden states are two shards) ...
    with pytest.raises(ValueError, match="different command.*processes"):
        rom_fast.compress(str(two_processes / "dense"), calibration=calibration(), n_samples=40, seq_len=24,
                          progress=False, out=out, **ARGS)
    # ... in two it continues after block 1 and writes what the uninterrupted run wrote.
    launch(2, dict(args, dump=str(tmp_path / "resumed"), out=str(out)))
    summary = json.loads((tmp_path / "resumed" / "result.json").read_text())["summary"]
    assert summary["resumed_from_block"] == 2
    a, b = saved(out), saved(two_processes / "two-out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_anchored_targets_two_processes_match_one(tmp_path):
    """Dense-anchored statistics (the cross moments) are all-reduced like the Grams: 2 processes
    give one process's anchored model."""
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    ranks = {f"model.layers.{i}.{n}": 9 for i in (1, 2, 3) for n in names}
    args = dict(ranks=ranks, batch_size=4, anchor=float("inf"))
    launch(2, dict(args, model="tiny", dump=str(tmp_path / "two")))
    one = rom_fast.compress(tiny_model(), calibration=calibration(), n_samples=40, seq_len=24, progress=False,
                            **args)
    test_ids = torch.randint(0, 211, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = one.model(test_ids).logits
        dense = tiny_model()(test_ids).logits
    b = tensors(tmp_path / "two" / "rank0.safetensors")
    assert float((dense - logits).abs().max()) > 1e-3              # it compressed
    assert float((b["logits"] - logits).abs().max()) <= 1e-5 * float(logits.abs().max())
    traffic = json.loads((tmp_path / "two" / "result.json").read_text())["summary"]["traffic"]
    assert any(k.endswith("(anchor)") for k in traffic), sorted(traffic)
