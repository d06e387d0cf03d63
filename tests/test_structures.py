"""Whole-MLP structure (kept neurons, down_proj refitted): the pipeline against an independent
float64 reference of its objective, the checkpoint type, streaming and resume, and the
planner that chooses between structures."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import pathlib

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import rom_fast
from rom_fast import plans
from rom_fast.adapters import adapter_for
from rom_fast.io.checkpoint import check_config
from rom_fast.lowrank import PrunedLinear, mlp_neuron_params
from rom_fast.io.safetensors_index import CheckpointError
from rom_fast.io.sources import ModelSource
from rom_fast.planner import LayerSpectrum, allocate, allocate_plan, collect_spectra, planned
from rom_fast.planner.allocation import _loss_curve


def _reference_compress(*args):
    """tests/reference_rom.py by file location (works under any pytest import mode)."""
    spec = importlib.util.spec_from_file_location("reference_rom", pathlib.Path(__file__).with_name("reference_rom.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_compress(*args)


CFG = dict(vocab_size=300, hidden_size=48, intermediate_size=112, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=3)


def _tiny(**over):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(transformers.LlamaConfig(**dict(CFG, **over))).eval()


def _calib(n=40, s=32, seed=1):
    ids = torch.randint(0, CFG["vocab_size"], (n, s), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[3, 20:] = 0          # padding never counts
    return ids, mask


def _ridge_objective(w, c, lam, kept, w_kept):
    """tr((W - W' E_S^T) H (W - W' E_S^T)^T), H = C + lam I."""
    h = c + lam * np.eye(c.shape[0])
    full = np.zeros_like(w)
    full[:, kept] = w_kept
    d = w - full
    return float(np.trace(d @ h @ d.T))


def _greedy_reference(w, c, lam, keep):
    """Brute-force greedy removal, one neuron at a time, each candidate scored by a direct solve."""
    h = c + lam * np.eye(c.shape[0])
    alive = list(range(c.shape[0]))

    def loss(s):
        s = np.array(s)
        w_s = np.linalg.solve(h[np.ix_(s, s)], (w @ h[:, s]).T).T
        return _ridge_objective(w, c, lam, s, w_s)
    while len(alive) > keep:
        scores = [loss([j for j in alive if j != i]) for i in alive]
        alive.pop(int(np.argmin(scores)))
    return np.array(alive)


def test_pipeline_keeps_neurons_at_the_reference_optimum():
    """Block 0 low-rank, block 1's MLP keeping 70 of 112 neurons: gate/up keep exactly those
    rows, down_proj is the exact ridge least-squares refit on the inputs of a float64
    reference of the compressed path, and the kept set is the greedy one."""
    model = _tiny()
    ids, mask = _calib()
    ranks = {f"model.layers.0.{n}": 12 for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                  "mlp.down_proj")}
    keep = 70
    dense = copy.deepcopy(model)
    result = rom_fast.compress(model, calibration={"input_ids": ids, "attention_mask": mask},
                               ranks={"ranks": ranks, "neurons": {"model.layers.1.mlp": keep}}, progress=False)
    assert result.plan.neurons == {"model.layers.1.mlp": keep}
    mlp = model.model.layers[1].mlp
    assert all(isinstance(m, PrunedLinear) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (keep,) * 3

    # Reference: the float64 compressed path (block 0 by the independent reference), block 1's
    # MLP hidden activations on the real tokens.
    ref, _ = _reference_compress(dense, ids, mask, ranks)
    acts = []
    handle = ref.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: acts.append(a[0]))
    with torch.no_grad():
        ref(input_ids=ids, attention_mask=mask)
    handle.remove()
    x = acts[0][mask.bool()].numpy()
    c = x.T @ x
    lam = 1e-3 * np.mean(np.diag(c))
    w = dense.model.layers[1].mlp.down_proj.weight.detach().double().numpy()
    dense_gate = dense.model.layers[1].mlp.gate_proj.weight.detach()
    kept = [int(i) for i in torch.nonzero((mlp.gate_proj.weight[:, None, :] == dense_gate[None]).all(-1))[:, 1]]
    assert len(kept) == keep and kept == sorted(kept)
    torch.testing.assert_close(mlp.up_proj.weight, dense.model.layers[1].mlp.up_proj.weight[kept], rtol=0, atol=0)
    h = c + lam * np.eye(c.shape[0])
    optimum = np.linalg.solve(h[np.ix_(kept, kept)], (w @ h[:, kept]).T).T
    got = mlp.down_proj.weight.detach().double().numpy()
    assert np.abs(got - optimum).max() <= 1e-4 * np.abs(optimum).max()
    # The greedy set of the reference statistics (float32 activations in the pipeline may swap
    # a near-tie): nearly the same neurons, the same objective to 1e-3.
    greedy = _greedy_reference(w, c, lam, keep)
    best = _ridge_objective(w, c, lam, greedy, np.linalg.solve(h[np.ix_(greedy, greedy)], (w @ h[:, greedy]).T).T)
    assert len(set(greedy) & set(kept)) >= keep - 2
    assert _ridge_objective(w, c, lam, np.array(kept), optimum) <= best * (1 + 1e-3) + 1e-12
    # Random changes of the refit never fit better: it is the optimum for its set.
    rng = np.random.default_rng(0)
    base = _ridge_objective(w, c, lam, np.array(kept), optimum)
    for _ in range(5):
        assert _ridge_objective(w, c, lam, np.array(kept), optimum + 1e-3 * rng.standard_normal(optimum.shape)) > base
    assert [r.route for r in result.report.layers if ".1.mlp" in r.name] == ["neurons"] * 3


def test_neuron_checkpoint_round_trips_through_load_transformers_and_param_count(tmp_path):
    model = _tiny()
    ids, mask = _calib()
    plan = {"ranks": {"model.layers.0.self_attn.q_proj": 8},
            "neurons": {"model.layers.0.mlp": 50, "model.layers.2.mlp": 31}}
    result = rom_fast.compress(model, calibration={"input_ids": ids, "attention_mask": mask}, ranks=plan,
                               out=tmp_path / "out", progress=False)
    shape = plans.ModelShape.of(adapter_for(_tiny()))
    expected = plans.kept_params(shape.total_params, shape.shapes, plan["ranks"], plan["neurons"], shape)
    assert result.summary["params_after"] == expected == plans.total_params(model)
    loaded = rom_fast.load(tmp_path / "out")
    via_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    probe = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        want = model(probe).logits
        torch.testing.assert_close(loaded(probe).logits, want)
        torch.testing.assert_close(via_hf(probe).logits, want)
    assert plans.total_params(loaded) == expected
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    spec = cfg["rom_fast"]["layers"]["model.layers.2.mlp.down_proj"]
    assert spec == {"structure": "pruned", "out_features": 48, "in_features": 31, "bias": False}


def _config_with(layers):
    cfg = transformers.LlamaConfig(**CFG).to_dict()
    cfg["model_type"] = "rom_fast_llama"
    cfg["rom_fast"] = {"layers": layers}
    return cfg


def _pruned(k, d=48, n=112):
    p = "model.layers.1.mlp."
    return {p + "gate_proj": {"structure": "pruned", "out_features": k, "in_features": d, "bias": False},
            p + "up_proj": {"structure": "pruned", "out_features": k, "in_features": d, "bias": False},
            p + "down_proj": {"structure": "pruned", "out_features": d, "in_features": k, "bias": False}}


@pytest.mark.parametrize("case, message", [
    ("partial", "whole MLP"),
    ("mismatch", "needs"),
    ("too_many", "needs"),
    ("wrong_side", "needs"),
    ("zero", "positive integer"),
    ("kind", "unknown structure"),
])
def test_untrusted_pruned_specs_are_refused_before_anything_is_built(case, message):
    layers = _pruned(40)
    if case == "partial":
        layers.pop("model.layers.1.mlp.up_proj")
    elif case == "mismatch":
        layers["model.layers.1.mlp.down_proj"]["in_features"] = 41
    elif case == "too_many":
        layers = _pruned(113)
    elif case == "wrong_side":
        layers["model.layers.1.mlp.gate_proj"]["in_features"] = 47
    elif case == "zero":
        layers = _pruned(0)
    elif case == "kind":
        layers["model.layers.1.mlp.gate_proj"]["structure"] = "sparse"
    with pytest.raises(CheckpointError, match=message):
        check_config(_config_with(layers), "config.json")
    check_config(_config_with(_pruned(40)), "config.json")


def test_neuron_plans_are_checked():
    model = _tiny()
    ids, _ = _calib(8, 16)
    bad = [({"neurons": {"model.layers.1.mlp": 112}}, "kept neurons"),
           ({"neurons": {"model.layers.9.mlp": 10}}, "not an MLP"),
           ({"neurons": {"model.layers.1.mlp": 10}, "ranks": {"model.layers.1.mlp.up_proj": 4}}, "take no rank")]
    for plan, message in bad:
        plan = dict({"ranks": {}}, **plan)
        with pytest.raises(ValueError, match=message):
            rom_fast.compress(copy.deepcopy(model), calibration=ids, ranks=plan, progress=False)
    with pytest.raises(ValueError, match="mlp_structure"):
        rom_fast.compress(model, calibration=ids, budget=0.8, mlp_structure="sparse", progress=False)
    with pytest.raises(ValueError, match="mlp_structure"):
        rom_fast.compress(model, calibration=ids, recipe="paper-80", mlp_structure="neurons", progress=False)
    biased = _tiny(mlp_bias=True)
    with pytest.raises(ValueError, match="without biases"):
        rom_fast.compress(biased, calibration=ids, ranks={"ranks": {}, "neurons": {"model.layers.0.mlp": 9}},
                          progress=False)


def test_streamed_neuron_run_matches_in_memory_and_resumes_bitwise(tmp_path, resume_check):
    """The planner choosing structures, anchored: a directory gives the in-memory plan and
    logits; interrupted after block 1 and rerun, it writes the tensors of an uninterrupted run."""
    model = _tiny()
    src = tmp_path / "dense"
    model.save_pretrained(src, max_shard_size="60KB")
    ids = torch.randint(0, 300, (24, 24), generator=torch.Generator().manual_seed(2))
    kw = dict(calibration=ids, n_samples=24, seq_len=24, budget=0.6, planner_samples=12, progress=False,
              mlp_structure="neurons", anchor=1.0)
    in_memory = rom_fast.compress(copy.deepcopy(model), **kw)
    assert in_memory.plan.neurons, "a 60% budget keeps neurons in some MLP"
    whole = rom_fast.compress(str(src), out=tmp_path / "whole", **kw)
    assert (whole.plan.ranks, whole.plan.neurons) == (in_memory.plan.ranks, in_memory.plan.neurons)
    probe = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(whole.model(probe).logits, in_memory.model(probe).logits, atol=1e-5, rtol=1e-5)

    resume_check(lambda out: rom_fast.compress(str(src), out=out, **kw), tmp_path / "rom", tmp_path / "whole")


def test_planner_neuron_curves_are_the_kernel_greedy_on_dense_statistics():
    model = _tiny()
    ids, mask = _calib(12, 16)
    spectra = collect_spectra(ModelSource(model), ids, mask, batch_size=4, neuron_curves=True)
    acts = []
    handle = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda _m, a: acts.append(a[0].detach()))
    with torch.no_grad():
        for s in range(0, 12, 4):
            model(input_ids=ids[s:s + 4], attention_mask=mask[s:s + 4])
    handle.remove()
    x = torch.cat([a[m.bool()] for a, m in zip(acts, mask.split(4))]).double().numpy()
    c = x.T @ x
    lam = 1e-3 * np.mean(np.diag(c))
    w = model.model.layers[2].mlp.down_proj.weight.detach().double().numpy()
    kept, loss = spectra["model.layers.2.mlp.down_proj"].neuron_curve
    assert kept[0] == 112 and loss[0] == 0 and kept[-1] == 1 and np.all(np.diff(loss) >= -1e-9 * loss[-1])
    # Spot-check points: the curve's loss is the objective of the greedy set with its refit,
    # which no other set of that size the reference greedy finds beats by more than rounding.
    h = c + lam * np.eye(112)
    for j in (len(kept) // 3, len(kept) // 2):
        k = int(kept[j])
        greedy = _greedy_reference(w, c, lam, k) if k >= 100 else None
        if greedy is not None:
            best = _ridge_objective(w, c, lam, greedy,
                                    np.linalg.solve(h[np.ix_(greedy, greedy)], (w @ h[:, greedy]).T).T)
            assert loss[j] <= best * (1 + 1e-3) + 1e-9
    assert "neuron_curve" in spectra["model.layers.2.mlp.down_proj"].to_json()
    assert spectra["model.layers.2.mlp.gate_proj"].neuron_curve is None


def _synthetic(rng, cheap_neurons: bool):
    """One MLP (gate, up: 6x4, down: 4x6) and one attention linear, with made-up spectra and a
    neuron curve that is either much cheaper or much dearer than low-rank."""
    spectra = {}
    for name, (d_out, d_in) in {"b.mlp.gate": (6, 4), "b.mlp.up": (6, 4), "b.mlp.down": (4, 6), "b.attn": (5, 5)}.items():
        ev = np.sort(rng.exponential(size=min(d_out, d_in)) + 0.1)[::-1]
        spectra[name] = LayerSpectrum(name, d_out, d_in, ev, float(rng.uniform(0.5, 2)))
    scale = 0.01 if cheap_neurons else 100.0
    kept = np.arange(6, 0, -1)
    loss = scale * np.concatenate([[0.0], np.cumsum(rng.uniform(0.1, 1, size=5))])
    spectra["b.mlp.down"].neuron_curve = (kept, loss)
    return spectra, {"b.mlp": (("b.mlp.gate", "b.mlp.up"), "b.mlp.down")}


def _estimated(spectra, mlps, ranks, neurons):
    loss = sum(_loss_curve(spectra[n], "fisher")[r] for n, r in ranks.items())
    for mlp, k in neurons.items():
        down = spectra[mlps[mlp][1]]
        kept, curve = down.neuron_curve
        loss += down.sensitivity * curve[int(np.flatnonzero(kept == k)[0])]
    return loss


def _kept(spectra, mlps, ranks, neurons, other):
    grouped = {n for mlp in neurons for n in mlps[mlp][0] + (mlps[mlp][1],)}
    kept = other + sum(mlp_neuron_params(spectra[mlps[m][1]].d_out, k) for m, k in neurons.items())
    for n, s in spectra.items():
        if n not in grouped:
            kept += s.d_out * s.d_in if n not in ranks else ranks[n] * (s.d_out + s.d_in)
    return kept


@pytest.mark.parametrize("seed", range(3))
def test_auto_structure_takes_the_lower_envelope(seed):
    rng = np.random.default_rng(seed)
    for cheap in (True, False):
        spectra, mlps = _synthetic(rng, cheap)
        other = 20
        total = other + sum(s.d_out * s.d_in for s in spectra.values())
        for ratio in (0.6, 0.75, 0.9):
            got = {}
            for structure in ("lowrank", "neurons", "auto"):
                ranks, neurons = allocate_plan(spectra, total, ratio, "fisher", mlps, structure)
                assert _kept(spectra, mlps, ranks, neurons, other) <= ratio * total
                got[structure] = _estimated(spectra, mlps, ranks, neurons)
                if structure == "lowrank":
                    assert not neurons and ranks == allocate(spectra, total, ratio)
            # Never worse than either structure alone, beyond one hull step of slack.
            slack = max(s.sensitivity * s.eigenvalues[0] for s in spectra.values()) + \
                spectra["b.mlp.down"].sensitivity * np.diff(spectra["b.mlp.down"].neuron_curve[1]).max()
            assert got["auto"] <= min(got["lowrank"], got["neurons"]) + slack
        ranks, neurons = allocate_plan(spectra, total, 0.75, "fisher", mlps, "auto")
        assert bool(neurons) == cheap


def test_auto_structure_against_brute_force_over_structures():
    """Tiny enough to enumerate every combination of ranks and neuron counts."""
    rng = np.random.default_rng(7)
    spectra, mlps = _synthetic(rng, cheap_neurons=True)
    spectra["b.mlp.down"].neuron_curve = (spectra["b.mlp.down"].neuron_curve[0],
                                          spectra["b.mlp.down"].neuron_curve[1] * 300)   # comparable to low-rank
    other = 20
    total = other + sum(s.d_out * s.d_in for s in spectra.values())
    names = list(spectra)
    choices = {n: [None] + list(range(1, min(spectra[n].d_out, spectra[n].d_in) + 1)) for n in names}
    for ratio in (0.6, 0.8):
        best = np.inf
        for combo in itertools.product(*(choices[n] for n in names)):
            ranks = {n: r for n, r in zip(names, combo) if r is not None
                     and r * (spectra[n].d_out + spectra[n].d_in) < spectra[n].d_out * spectra[n].d_in}
            if _kept(spectra, mlps, ranks, {}, other) <= ratio * total:
                best = min(best, _estimated(spectra, mlps, ranks, {}))
        for k in range(1, 6):
            for r in choices["b.attn"]:
                ranks = {} if r is None or r * 10 >= 25 else {"b.attn": r}
                if _kept(spectra, mlps, ranks, {"b.mlp": k}, other) <= ratio * total:
                    best = min(best, _estimated(spectra, mlps, ranks, {"b.mlp": k}))
        ranks, neurons = allocate_plan(spectra, total, ratio, "fisher", mlps, "auto")
        loss = _estimated(spectra, mlps, ranks, neurons)
        worst_step = max(max(s.sensitivity * s.eigenvalues[0] for s in spectra.values()),
                         spectra["b.mlp.down"].sensitivity * np.diff(spectra["b.mlp.down"].neuron_curve[1]).max())
        assert best - 1e-12 <= loss <= best + worst_step


def test_planned_auto_plan_fits_and_names_each_structure():
    model = _tiny()
    ids, mask = _calib(12, 16)
    spectra = collect_spectra(ModelSource(model), ids, mask, batch_size=4, neuron_curves=True)
    shape = plans.ModelShape.of(adapter_for(model))
    for ratio in (0.8, 0.6):
        plan = planned(shape, ratio, spectra, structure="auto")
        assert ratio - 0.05 < plan.details["ratio"] <= ratio
        assert plan.details["structure"] == "auto"
        for mlp in plan.neurons:
            inputs, down = shape.mlps[mlp]
            assert not any(n in plan.ranks for n in inputs + (down,))


def test_a_plan_file_with_neurons_is_read_whole(tmp_path):
    """`rom-fast plan --json` writes {ranks, neurons, ...}; compress --ranks FILE keeps both."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"ranks": {"model.layers.0.self_attn.q_proj": 8},
                                "neurons": {"model.layers.2.mlp": 40}, "description": "x", "details": {}}))
    ids, _ = _calib(8, 16)
    result = rom_fast.compress(_tiny(), calibration=ids, ranks=str(path), progress=False)
    assert result.plan.ranks == {"model.layers.0.self_attn.q_proj": 8}
    assert result.plan.neurons == {"model.layers.2.mlp": 40}
    assert "plan.json" in result.plan.description


def test_merge_plans_low_rank_and_refuses_neurons():
    """A merged checkpoint has the base architecture's one MLP width: budget= with merge=True
    plans low-rank layers only, and an explicit neuron structure or plan is refused."""
    ids, _ = _calib(12, 16)
    result = rom_fast.compress(_tiny(), calibration=ids, budget=0.6, planner_samples=12, merge=True, progress=False)
    assert not result.plan.neurons and result.plan.details["structure"] == "lowrank"
    with pytest.raises(ValueError, match="cannot be merged"):
        rom_fast.compress(_tiny(), calibration=ids, budget=0.6, merge=True, mlp_structure="neurons", progress=False)
    with pytest.raises(ValueError, match="merge=True"):
        rom_fast.compress(_tiny(), calibration=ids, ranks={"ranks": {}, "neurons": {"model.layers.0.mlp": 9}},
                          merge=True, progress=False)
