"""The guarantees every supported family gets, on its tiny random model (tests/families.py):
the paper's loop against an independent float64 reference, kept neurons at their float64
optimum, streamed and resumed bit for bit, two processes, the saved checkpoint loading both
ways with the summary's parameter count, and a damaged directory refused before block 0."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import rom_fast
from rom_fast import plans
from rom_fast.io.sources import DirectorySource
from rom_fast.lowrank import LowRankLinear, PrunedLinear

from families import CASES, TINY, tiny_model
from reference_rom import reference_compress

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import launch, saved, assert_close, lowrank_products  # noqa: E402
from distributed_worker import calibration as worker_calibration  # noqa: E402

FAMILIES = sorted(CASES)
# A mixture of experts gets its own versions of the tests built on the dense MLP's float64
# reference (tests/test_family_mixtral.py): the reference hooks read a (batch x seq)
# activation where an expert sees routed rows.
ROUTED_SKIP = "routed MLP: its own version in tests/test_family_mixtral.py"


def dense_mlp(family):
    if CASES[family].routed:
        pytest.skip(ROUTED_SKIP)


def calibration(n=16, seq=20, seed=1):
    ids = torch.randint(0, TINY["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[2, 13:] = 0           # padding never counts
    return {"input_ids": ids, "attention_mask": mask}


def probe():
    return torch.randint(0, TINY["vocab_size"], (3, 18), generator=torch.Generator().manual_seed(5))


def every_linear(case, blocks=range(TINY["num_hidden_layers"]), rank=10):
    return {f"model.layers.{i}.{n}": rank for i in blocks for n in case.linears}


def save_dir(model, path):
    model.save_pretrained(path, max_shard_size="40KB")
    return path


def budget_cutting(model, fraction: float = 0.3) -> float:
    """The budget (a share of the whole model) that removes ``fraction`` of the blocks' linear
    weights: a fixed share would be out of reach where a 128k vocabulary's embeddings dominate."""
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    return 1 - fraction * linears / plans.total_params(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_the_float64_reference_of_the_papers_loop(family):
    dense_mlp(family)
    case, model = CASES[family], tiny_model(family)
    calib, ranks = calibration(), every_linear(CASES[family])
    ref, _ = reference_compress(copy.deepcopy(model), calib["input_ids"], calib["attention_mask"], ranks,
                                stages=case.stages)
    ours = rom_fast.compress(copy.deepcopy(model), calibration=calib, ranks=ranks, progress=False).model
    assert all(isinstance(ours.get_submodule(n), LowRankLinear) for n in ranks)
    with torch.no_grad():
        a, b, dense = (m(probe()).logits.double() for m in (ours, ref, model))
    assert (dense - b).abs().max() > 1e-2 * b.abs().max()       # the compression did something
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_neurons_are_the_float64_ridge_optimum(family):
    """Block 1's MLP keeps 70 neurons (block 0 dense): each input linear keeps exactly the rows
    of those neurons, and down_proj is the ridge least-squares optimum for them on the dense
    model's float64 hidden activations."""
    dense_mlp(family)
    case, model = CASES[family], tiny_model(family)
    dense = copy.deepcopy(model).double()
    calib, keep, mlp = calibration(n=24), 70, f"model.layers.1.{case.mlp}"
    result = rom_fast.compress(model, calibration=calib, ranks={"ranks": {}, "neurons": {mlp: keep}}, progress=False)
    assert result.plan.neurons == {mlp: keep}
    ours, ref = model.get_submodule(mlp), dense.get_submodule(mlp)
    *inputs, down = [n for stage in case.stages[2:] for n in stage]
    inputs = [n[len(case.mlp) + 1:] for n in inputs]
    down = down[len(case.mlp) + 1:]
    assert all(isinstance(ours.get_submodule(n), PrunedLinear) for n in inputs + [down])
    acts = []
    handle = ref.get_submodule(down).register_forward_pre_hook(lambda _m, a: acts.append(a[0]))
    with torch.no_grad():
        dense(**calib)
    handle.remove()
    x = acts[0][calib["attention_mask"].bool()].numpy()
    c = x.T @ x
    lam = 1e-3 * np.mean(np.diag(c))
    w = ref.get_submodule(down).weight.detach().numpy()
    inter = w.shape[1]
    # The kept neurons, read off the first input linear's rows (neuron j owns neuron_rows(j)).
    first = ref.get_submodule(inputs[0]).weight.detach().float()
    matches = {int(torch.nonzero((first == row).all(-1))[0]) for row in ours.get_submodule(inputs[0]).weight.detach()}
    kept = [j for j in range(inter) if set(case.neuron_rows(inputs[0], [j], inter)) <= matches]
    assert len(kept) == keep
    for name in inputs:
        rows = case.neuron_rows(name, kept, inter)
        torch.testing.assert_close(ours.get_submodule(name).weight.detach().double(),
                                   ref.get_submodule(name).weight.detach()[rows], rtol=0, atol=1e-7)
    h = c + lam * np.eye(inter)
    optimum = np.linalg.solve(h[np.ix_(kept, kept)], (w @ h[:, kept]).T).T
    got = ours.get_submodule(down).weight.detach().double().numpy()
    assert np.abs(got - optimum).max() <= 1e-4 * np.abs(optimum).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_gives_the_in_memory_model_and_resumes_bitwise(family, tmp_path, resume_check):
    model = tiny_model(family, num_hidden_layers=3)
    src = save_dir(model, tmp_path / "dense")
    kw = dict(calibration=calibration(), budget=budget_cutting(model), planner_samples=8, progress=False)
    in_memory = rom_fast.compress(copy.deepcopy(model), **kw)
    whole = rom_fast.compress(str(src), out=tmp_path / "whole", **kw)
    assert (whole.plan.ranks, whole.plan.neurons) == (in_memory.plan.ranks, in_memory.plan.neurons)
    assert whole.plan.ranks or whole.plan.neurons
    with torch.no_grad():
        torch.testing.assert_close(whole.model(probe()).logits, in_memory.model(probe()).logits,
                                   atol=1e-5, rtol=1e-5)
    resume_check(lambda out: rom_fast.compress(str(src), out=out, **kw), tmp_path / "rom", tmp_path / "whole")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every family's tiny 3-block directory compressed streamed by 2 processes, all in one
    launch (the processes' start-up is most of a tiny run's time)."""
    tmp = tmp_path_factory.mktemp("two-processes")
    jobs = []
    for family in FAMILIES:
        src = save_dir(tiny_model(family, num_hidden_layers=3), tmp / family / "dense")
        jobs.append(dict(ranks=every_linear(CASES[family], blocks=range(3)), model=str(src),
                         dump=str(tmp / family / "two"), out=str(tmp / family / "two-out")))
    launch(2, jobs)
    return tmp


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_match_one(family, two_processes, tmp_path):
    src = two_processes / family / "dense"
    calib = worker_calibration(vocab=CASES[family].build_config().vocab_size)
    rom_fast.compress(str(src), calibration=calib, n_samples=40, seq_len=24, progress=False,
                      ranks=every_linear(CASES[family], blocks=range(3)), out=tmp_path / "one-out")
    assert_close(lowrank_products(saved(two_processes / family / "two-out")),
                 lowrank_products(saved(tmp_path / "one-out")), 1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_checkpoint_loads_both_ways_with_the_summarys_parameter_count(family, tmp_path):
    case = CASES[family]
    model = tiny_model(family)
    plan = {"ranks": every_linear(case, blocks=[0]), "neurons": {f"model.layers.1.{case.mlp}": 50}}
    result = rom_fast.compress(model, calibration=calibration(), ranks=plan, out=tmp_path / "rom", progress=False)
    cfg = json.loads((tmp_path / "rom" / "config.json").read_text())
    assert cfg["model_type"] == f"rom_fast_{case.model_type}"
    with torch.no_grad():
        expected = result.model(probe()).logits
        loaded = rom_fast.load(tmp_path / "rom")
        auto = AutoModelForCausalLM.from_pretrained(tmp_path / "rom")
        for other in (loaded, auto):
            torch.testing.assert_close(other(probe()).logits, expected, atol=0, rtol=0)
            assert plans.total_params(other) == result.summary["params_after"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_directory_missing_a_block_tensor_is_refused_before_block_0(family, tmp_path, monkeypatch):
    case = CASES[family]
    src = save_dir(tiny_model(family, num_hidden_layers=3), tmp_path / "dense")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = case.stored(f"model.layers.2.{case.stages[-1][0]}.weight")
    del index["weight_map"][victim]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    calls = []
    monkeypatch.setattr(DirectorySource, "load_block", lambda self, i: calls.append(i))
    with pytest.raises(ValueError, match="lacks tensor") as err:
        rom_fast.compress(src, calibration=calibration(), budget=0.8, out=tmp_path / "rom", progress=False)
    assert victim in str(err.value) and calls == []
