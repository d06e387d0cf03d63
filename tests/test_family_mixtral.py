"""Mixtral (a routed MLP: a mixture of experts) against an independent float64 reference.

The reference works on transformers' own stacked expert weights (``MixtralExperts``), never on
rom_fast's per-expert modules: it routes the calibration tokens itself (float64 softmax, top-k
of the normed MLP input), takes each expert's tokens, and replaces every compressed weight by
its projection ``V_r^T V_r W`` (the same map as the factors ``W1 W2``), with ``V_r`` the top-r
eigenvectors of that linear's uncentred output second moment over the tokens routed to the
expert. What the tiny case is: tests/families.py.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import rom_fast
from rom_fast.adapters import adapter_for
from rom_fast.io.checkpoint import CheckpointError
from rom_fast.io.sources import DirectorySource
from rom_fast.lowrank import LowRankLinear, PrunedLinear

from conftest import saved_tensors
from families import CASES, TINY, tiny_model
from reference_rom import _block_inputs
from test_families import calibration, every_linear, probe, save_dir

CASE = CASES["mixtral"]
ROUTING_MARGIN = 1e-6      # the reference's routing must not hinge on float32 rounding (~1e-7 here)


def _projected(weight: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """``V_r^T V_r W``: V_r the top-r eigenvectors of ``Y^T Y``, ``Y = x W^T`` (float64)."""
    y = x @ weight.T
    _, vecs = torch.linalg.eigh(y.T @ y)
    v = vecs[:, -rank:]
    return v @ (v.T @ weight)


def _route(x: torch.Tensor, router: torch.Tensor, k: int):
    """Each row's top-k experts (float64 softmax) and the smallest gap between the k-th and the
    next probability (how far the choice is from a tie)."""
    probs = torch.softmax(x @ router.T, dim=-1)
    top = torch.topk(probs, k + 1, dim=-1)
    return top.indices[:, :k], float((top.values[:, k - 1] - top.values[:, k]).min().detach())


@torch.no_grad()
def reference_moe(model, input_ids, attention_mask, rank: int):
    """Every linear of every block (attention and every expert) at ``rank``, the paper's loop
    in float64 on transformers' stacked experts. Returns (model, smallest routing margin)."""
    model = copy.deepcopy(model).double().eval()
    model.set_experts_implementation("eager")       # grouped_mm takes no float64
    hidden, kwargs = _block_inputs(model, input_ids, attention_mask)
    mask, k = attention_mask.bool(), model.config.num_experts_per_tok
    margin = float("inf")
    for layer, kw in zip(model.model.layers, kwargs):
        attn, moe = layer.self_attn, layer.mlp
        normed = layer.input_layernorm(hidden)
        x = normed[mask]
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight.copy_(_projected(lin.weight, x, rank))
        seen = []
        hook = attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        attn(hidden_states=normed, position_embeddings=kw["position_embeddings"], attention_mask=kw["attention_mask"])
        hook.remove()
        attn.o_proj.weight.copy_(_projected(attn.o_proj.weight, seen[0][mask], rank))
        h = hidden + attn(hidden_states=normed, position_embeddings=kw["position_embeddings"],
                          attention_mask=kw["attention_mask"])[0]
        x = layer.post_attention_layernorm(h)[mask]
        chosen, gap = _route(x, moe.gate.weight, k)
        margin = min(margin, gap)
        experts, inter = moe.experts, model.config.intermediate_size
        for e in range(model.config.num_local_experts):
            xe = x[(chosen == e).any(-1)]
            gate, up = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
            gate.copy_(_projected(gate.clone(), xe, rank))
            up.copy_(_projected(up.clone(), xe, rank))
            act = nn.functional.silu(xe @ gate.T) * (xe @ up.T)
            experts.down_proj[e].copy_(_projected(experts.down_proj[e].clone(), act, rank))
        hidden = layer(hidden, **kw)
    return model, margin


def test_unfused_experts_give_transformers_forward():
    model = tiny_model("mixtral")
    with torch.no_grad():
        expected = model(probe()).logits
        unfused = copy.deepcopy(model)
        adapter_for(unfused)
        assert type(unfused.model.layers[0].mlp.experts).__name__ == "UnfusedExperts"
        torch.testing.assert_close(unfused(probe()).logits, expected, rtol=1e-6, atol=1e-6)


def test_logits_match_the_float64_reference_with_tokens_routed_per_expert():
    model, calib = tiny_model("mixtral"), calibration()
    ranks = every_linear(CASE)
    ref, margin = reference_moe(model, calib["input_ids"], calib["attention_mask"], rank=10)
    assert margin > ROUTING_MARGIN, f"a calibration token's routing is a near tie ({margin:.2e}): pick another seed"
    ours = rom_fast.compress(copy.deepcopy(model), calibration=calib, ranks=ranks, progress=False).model
    assert all(isinstance(ours.get_submodule(n), LowRankLinear) for n in ranks)
    assert type(ours.get_submodule("model.layers.0.mlp.gate")).__name__ == "MixtralTopKRouter"   # left dense
    with torch.no_grad():
        a, b, dense = (m(probe()).logits.double() for m in (ours, ref, model))
    assert (dense - b).abs().max() > 1e-2 * b.abs().max()       # the compression did something
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_an_experts_kept_neurons_are_the_ridge_optimum_on_its_routed_tokens():
    """Block 1's expert 1 keeps 70 neurons: gate/up keep exactly those rows, down_proj is the
    ridge least-squares optimum on the float64 hidden activations of the tokens routed to it."""
    model, calib, keep, mlp = tiny_model("mixtral"), calibration(n=24), 70, "model.layers.1.mlp.experts.1"
    dense = copy.deepcopy(model).double()
    dense.set_experts_implementation("eager")       # grouped_mm takes no float64
    result = rom_fast.compress(model, calibration=calib, ranks={"ranks": {}, "neurons": {mlp: keep}}, progress=False)
    assert result.plan.neurons == {mlp: keep}
    ours = model.get_submodule(mlp)
    assert all(isinstance(m, PrunedLinear) for m in (ours.gate_proj, ours.up_proj, ours.down_proj))
    layer, inter = dense.model.layers[1], TINY["intermediate_size"]
    inputs = []
    handle = layer.mlp.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    with torch.no_grad():
        dense(**calib)
    handle.remove()
    x = inputs[0][calib["attention_mask"].bool()]
    chosen, margin = _route(x, layer.mlp.gate.weight, 2)
    assert margin > ROUTING_MARGIN
    x = x[(chosen == 1).any(-1)]
    gate, up = layer.mlp.experts.gate_up_proj[1, :inter], layer.mlp.experts.gate_up_proj[1, inter:]
    down = layer.mlp.experts.down_proj[1]
    acts = (nn.functional.silu(x @ gate.T) * (x @ up.T)).detach().numpy()
    kept = sorted(int(torch.nonzero((gate.float() == row).all(-1))[0]) for row in ours.gate_proj.weight.detach())
    assert len(set(kept)) == keep
    torch.testing.assert_close(ours.up_proj.weight.detach().double(), up.detach()[kept], rtol=0, atol=1e-7)
    c = acts.T @ acts
    h = c + 1e-3 * np.mean(np.diag(c)) * np.eye(inter)
    w = down.detach().numpy()
    optimum = np.linalg.solve(h[np.ix_(kept, kept)], (w @ h[:, kept]).T).T
    got = ours.down_proj.weight.detach().double().numpy()
    assert np.abs(got - optimum).max() <= 1e-4 * np.abs(optimum).max()


def test_an_expert_no_calibration_token_reaches_stays_dense_and_is_reported():
    """One sequence of 3 real tokens (5 padding), top-1 of 8 experts: most experts of block 0
    see no real token (padding routed to one does not count). Those keep their dense weights
    and are reported, whatever the plan asked; the others are compressed."""
    model = tiny_model("mixtral", num_local_experts=8, num_experts_per_tok=1)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])
    routed = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _a, out: routed.append(out[2]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    hit = {int(e) for e in routed[0][:3].reshape(-1)}
    missed = sorted(set(range(8)) - hit)
    assert missed and hit
    dense = copy.deepcopy(model)
    adapter_for(dense)
    ranks = {f"model.layers.0.mlp.experts.{e}.{n}": 2 for e in range(8) if e != missed[0]
             for n in ("gate_proj", "up_proj", "down_proj")}
    plan = {"ranks": ranks, "neurons": {f"model.layers.0.mlp.experts.{missed[0]}": 40}}
    with pytest.warns(UserWarning, match="no calibration token"):
        result = rom_fast.compress(model, calibration={"input_ids": ids, "attention_mask": mask}, ranks=plan,
                                   progress=False)
    left = {f"model.layers.0.mlp.experts.{e}.{n}" for e in missed for n in ("gate_proj", "up_proj", "down_proj")}
    assert set(result.summary["left_dense_no_tokens"]) == left
    for name in left:
        assert type(model.get_submodule(name)) is nn.Linear
        assert torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight)
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in ranks if n not in left)
    with torch.no_grad():
        assert torch.isfinite(model(probe()).logits).all()


def test_a_dense_directory_stores_transformers_layout_and_streams_like_the_model(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=3)
    src = save_dir(model, tmp_path / "dense")
    stored = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    unfused = copy.deepcopy(model)
    adapter_for(unfused)
    assert set(stored) == {CASE.stored(n) for n, _ in unfused.named_parameters()}
    plan = {"ranks": every_linear(CASE, blocks=[0, 2], rank=8), "neurons": {"model.layers.1.mlp.experts.2": 60}}
    kw = dict(calibration=calibration(), ranks=plan, progress=False)
    in_memory = rom_fast.compress(copy.deepcopy(model), **kw)
    streamed = rom_fast.compress(str(src), out=tmp_path / "rom", **kw)
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(probe()).logits, in_memory.model(probe()).logits,
                                   atol=1e-5, rtol=1e-5)


def test_streamed_resumes_bitwise(tmp_path, resume_check):
    src = save_dir(tiny_model("mixtral", num_hidden_layers=3), tmp_path / "dense")
    plan = {"ranks": every_linear(CASE, blocks=[0, 2], rank=8), "neurons": {"model.layers.1.mlp.experts.2": 60}}
    kw = dict(calibration=calibration(), ranks=plan, progress=False)
    rom_fast.compress(str(src), out=tmp_path / "whole", **kw)
    resume_check(lambda out: rom_fast.compress(str(src), out=out, **kw), tmp_path / "rom", tmp_path / "whole",
                 after_block=0)
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in saved_tensors(tmp_path / "rom")


def _expert_reference(model, input_ids, attention_mask):
    """``{expert linear: (eigenvalues of its output second moment, descending; sensitivity)}``
    in float64 on transformers' stacked experts, and the smallest routing margin. One forward
    and backward of the whole model (summed next-token loss); each block's MLP input rows
    (real tokens) routed by a float64 softmax top-k; an expert's linears' outputs on its
    tokens recomputed, their gradients by autograd from the MLP output's gradient scaled by
    the token's routing weight."""
    model = copy.deepcopy(model).double()
    model.set_experts_implementation("eager")       # grouped_mm takes no float64
    seen = []

    def keep(_m, args, out):
        out.retain_grad()
        seen.append((args[0].detach(), out))
    handles = [layer.mlp.register_forward_hook(keep) for layer in model.model.layers]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    for h in handles:
        h.remove()
    target = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").backward()
    mask, k, inter = attention_mask.bool(), model.config.num_experts_per_tok, model.config.intermediate_size
    ref, margin = {}, float("inf")
    for i, (layer, (normed, out)) in enumerate(zip(model.model.layers, seen)):
        x, g = normed[mask], out.grad[mask]
        chosen, gap = _route(x, layer.mlp.gate.weight.detach(), k)
        margin = min(margin, gap)
        top = torch.topk(torch.softmax(x @ layer.mlp.gate.weight.detach().T, -1), k, dim=-1).values
        weights = top / top.sum(-1, keepdim=True)
        experts = layer.mlp.experts
        for e in range(model.config.num_local_experts):
            hit = chosen == e
            rows = hit.any(-1)
            xe, ge = x[rows], (weights * hit)[rows].sum(-1, keepdim=True) * g[rows]
            wg, wu = experts.gate_up_proj[e, :inter].detach(), experts.gate_up_proj[e, inter:].detach()
            gate, up = (xe @ wg.T).requires_grad_(True), (xe @ wu.T).requires_grad_(True)
            down = nn.functional.silu(gate) * up @ experts.down_proj[e].detach().T
            g_gate, g_up = torch.autograd.grad(down, [gate, up], ge)
            prefix = f"model.layers.{i}.mlp.experts.{e}."
            for name, y, gy in (("gate_proj", gate, g_gate), ("up_proj", up, g_up), ("down_proj", down, ge)):
                y = y.detach()
                vals = torch.linalg.eigvalsh(y.T @ y).flip(0).numpy()
                ref[prefix + name] = (vals, float((gy * gy).sum()) / len(xe) / y.shape[1])
    return ref, margin


def test_planner_spectra_and_sensitivities_of_each_expert_are_float64_on_its_routed_tokens():
    from rom_fast.io.sources import ModelSource
    from rom_fast.planner import collect_spectra

    model, calib = tiny_model("mixtral"), calibration()
    spectra = collect_spectra(ModelSource(copy.deepcopy(model)), calib["input_ids"], calib["attention_mask"],
                              batch_size=4)
    ref, margin = _expert_reference(model, calib["input_ids"], calib["attention_mask"])
    assert margin > ROUTING_MARGIN
    assert set(ref) <= set(spectra) and "model.layers.0.mlp.gate" not in spectra     # the router: not planned
    for name, (vals, sensitivity) in ref.items():
        got = spectra[name].eigenvalues
        np.testing.assert_allclose(got, vals[:len(got)], rtol=1e-5, atol=1e-9 * vals[0])
        assert vals[len(got):].sum() <= 1e-9 * vals[0] * len(vals)                    # nothing missing
        assert spectra[name].sensitivity == pytest.approx(sensitivity, rel=1e-4)
    # Experts differ: the statistics are each expert's own, not the MLP's.
    tails = {n: spectra[n].eigenvalues[0] for n in ref if n.endswith("down_proj")}
    assert len(set(np.round(list(tails.values()), 6))) == len(tails)


@pytest.mark.parametrize("structure", ["lowrank", "auto"])
def test_the_planner_allocates_over_experts_within_the_budget(structure):
    model = tiny_model("mixtral")
    result = rom_fast.compress(model, calibration=calibration(), budget=0.6, mlp_structure=structure,
                               planner_samples=8, progress=False)
    plan = result.plan
    assert 0.55 < plan.details["ratio"] <= 0.6
    assert result.summary["params_after"] <= 0.6 * result.summary["params_before"]
    units = {n.rsplit(".", 1)[0] for n in plan.ranks if ".experts." in n} | set(plan.neurons)
    assert len(units) == TINY["num_hidden_layers"] * 4                  # every expert is a unit of its own
    assert all(".experts." in n for n in plan.neurons)
    assert not any(n.endswith("mlp.gate") for n in plan.ranks)          # the router stays dense
    if structure == "lowrank":
        assert not plan.neurons
    assert type(model.get_submodule("model.layers.0.mlp.gate")).__name__ == "MixtralTopKRouter"


def test_the_planner_leaves_an_expert_no_calibration_token_reaches_out_of_the_plan():
    from rom_fast.io.sources import ModelSource
    from rom_fast.planner import collect_spectra

    model = tiny_model("mixtral", num_local_experts=8, num_experts_per_tok=1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0] * 8])
    routed = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _a, out: routed.append(out[2]))
    with torch.no_grad():
        model(input_ids=ids[:1], attention_mask=mask[:1])
    handle.remove()
    hit = {int(e) for e in routed[0][:3].reshape(-1)}
    spectra = collect_spectra(ModelSource(model), ids, mask, batch_size=1)
    planned = {int(n.split(".")[5]) for n in spectra if n.startswith("model.layers.0.mlp.experts.")}
    assert planned == hit and len(hit) < 8
    assert all(spectra[f"model.layers.0.mlp.experts.{e}.down_proj"].sensitivity > 0 for e in hit)


def _anchored_fit(xc, xd, w, alpha: float, rank: int, ridge: float = 1e-3):
    """The rank-r ``B`` minimising ``||W X_c - B X_c||^2 + alpha ||W X_d - B X_c||^2`` (ridge
    ``ridge`` times the mean eigenvalue of ``X_c^T X_c`` on the regression; tests/test_anchor.py's
    reference): reduced-rank regression of the mixed target on ``X_c``."""
    f = 1.0 if math.isinf(alpha) else alpha / (1 + alpha)
    c = xc.T @ xc
    b_ls = w + f * w @ (xd.T @ xc - c) @ np.linalg.inv(c + ridge * np.trace(c) / len(c) * np.eye(len(c)))
    u, _, _ = np.linalg.svd((xc @ b_ls.T).T, full_matrices=False)
    return u[:, :rank] @ (u[:, :rank].T @ b_ls)


def _mlp_inputs(model, calib, layer: int) -> torch.Tensor:
    """Block ``layer``'s normed MLP inputs on the real tokens, float64."""
    model = copy.deepcopy(model).double()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**calib)
    handle.remove()
    return seen[0][calib["attention_mask"].bool()]


@pytest.mark.parametrize("alpha", [2.0, math.inf])
def test_an_anchored_experts_fit_is_the_float64_optimum_on_its_routed_tokens(alpha):
    """Block 1's attention and its expert 1 compressed with dense-anchored targets (block 0
    dense): gate/up are the anchored optimum on the compressed path's inputs X_c and the dense
    path's X_d at the tokens the compressed path routes to the expert; down_proj (output route)
    the anchored optimum of the dense outputs on the compressed ones in its output space."""
    model, calib, e, rank = tiny_model("mixtral"), calibration(), 1, 8
    unit = f"model.layers.1.mlp.experts.{e}"
    ranks = {f"model.layers.1.self_attn.{n}": 10 for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    ranks.update({f"{unit}.{n}": rank for n in ("gate_proj", "up_proj", "down_proj")})
    xd = _mlp_inputs(model, calib, 1)
    dense = copy.deepcopy(model)
    adapter_for(dense)
    result = rom_fast.compress(model, calibration=calib, ranks=ranks, anchor=alpha, progress=False)
    assert {r.name: r.route.endswith("+anchored") for r in result.report.layers} == {n: True for n in ranks}
    xc = _mlp_inputs(model, calib, 1)
    chosen, margin = _route(xc, model.get_submodule("model.layers.1.mlp.gate").weight.detach().double(), 2)
    assert margin > ROUTING_MARGIN
    rows = (chosen == e).any(-1)
    xc, xd = xc[rows].numpy(), xd[rows].numpy()
    weight = {n: dense.get_submodule(f"{unit}.{n}").weight.detach().double().numpy()
              for n in ("gate_proj", "up_proj", "down_proj")}
    ours = {n: model.get_submodule(f"{unit}.{n}").merged_weight().detach().double().numpy() for n in weight}
    for name in ("gate_proj", "up_proj"):
        want = xc @ _anchored_fit(xc, xd, weight[name], alpha, rank).T
        assert np.abs(xc @ ours[name].T - want).max() <= 1e-4 * np.abs(want).max(), name
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    core_c = silu(xc @ ours["gate_proj"].T) * (xc @ ours["up_proj"].T)
    core_d = silu(xd @ weight["gate_proj"].T) * (xd @ weight["up_proj"].T)
    yc, yd = core_c @ weight["down_proj"].T, core_d @ weight["down_proj"].T
    want = yc @ _anchored_fit(yc, yd, np.eye(len(yc.T)), alpha, rank).T
    assert np.abs(core_c @ ours["down_proj"].T - want).max() <= 1e-4 * np.abs(want).max()
    # The anchor moved the fit: the paper's objective (alpha 0) gives another gate_proj.
    plain = xc @ _anchored_fit(xc, xc, weight["gate_proj"], 0.0, rank).T
    assert np.abs(xc @ ours["gate_proj"].T - plain).max() > 1e-3 * np.abs(plain).max()


def test_an_anchored_streamed_run_is_the_in_memory_run(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=3)
    src = save_dir(model, tmp_path / "dense")
    plan = {"ranks": every_linear(CASE, blocks=[0, 2], rank=8), "neurons": {"model.layers.1.mlp.experts.2": 60}}
    kw = dict(calibration=calibration(), ranks=plan, anchor=1.0, progress=False)
    in_memory = rom_fast.compress(copy.deepcopy(model), **kw)
    streamed = rom_fast.compress(str(src), out=tmp_path / "rom", **kw)
    assert all(r.route.endswith("+anchored") for r in streamed.report.layers)
    plain = rom_fast.compress(copy.deepcopy(model), **dict(kw, anchor=0.0))
    with torch.no_grad():
        a, b, c = (r.model(probe()).logits for r in (streamed, in_memory, plain))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (b - c).abs().max() > 1e-3 * c.abs().max()


def test_what_routed_sublayers_do_not_take_yet_is_refused_before_any_work(tmp_path):
    calib = calibration()
    with pytest.raises(ValueError, match="merge=True"):
        rom_fast.compress(tiny_model("mixtral"), calibration=calib, ranks=every_linear(CASE), merge=True,
                          out=tmp_path / "merged", progress=False)


def test_untrusted_expert_sizes_and_half_pruned_experts_are_refused(tmp_path):
    model = tiny_model("mixtral")
    plan = {"ranks": {}, "neurons": {"model.layers.1.mlp.experts.0": 50}}
    rom_fast.compress(model, calibration=calibration(), ranks=plan, out=tmp_path / "rom", progress=False)
    config_file = tmp_path / "rom" / "config.json"
    good = json.loads(config_file.read_text())
    for edit, message in ((lambda c: c.update(num_local_experts=1 << 30), "num_local_experts"),
                          (lambda c: c.update(num_experts_per_tok=9), "num_experts_per_tok"),
                          (lambda c: c["rom_fast"]["layers"].pop("model.layers.1.mlp.experts.0.up_proj"),
                           "whole MLPs")):
        bad = copy.deepcopy(good)
        edit(bad)
        config_file.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message):
            DirectorySource(tmp_path / "rom")
    config_file.write_text(json.dumps(good))
    assert isinstance(rom_fast.load(tmp_path / "rom").get_submodule("model.layers.1.mlp.experts.0.gate_proj"),
                      PrunedLinear)


def test_a_streamed_blocks_experts_are_read_one_at_a_time_and_kept_in_their_storage_dtype(tmp_path, monkeypatch):
    """bfloat16 directory: when expert e's turn comes, the experts before it hold their
    compressed weights in bfloat16 and the ones after it are not read yet; the result is the
    in-memory model's (which widens whole blocks) up to the bfloat16 rounding of the factors
    the next block's inputs see, and a model returned without ``out`` is plain float32."""
    from rom_fast.io import units

    model = tiny_model("mixtral", num_hidden_layers=3).to(torch.bfloat16)
    src = save_dir(model, tmp_path / "dense")
    seen = []
    materialize = units.materialize

    def spy(module):        # the last 4 experts parked are the current block's, in order
        seen.append([{(p.device.type, p.dtype) for p in ex.parameters()} for ex in list(units._LOADERS)[-4:]])
        materialize(module)
    monkeypatch.setattr(units, "materialize", spy)
    plan = {"ranks": every_linear(CASE, blocks=[0, 2], rank=8), "neurons": {"model.layers.1.mlp.experts.2": 60}}
    kw = dict(calibration=calibration(), ranks=plan, progress=False)
    streamed = rom_fast.compress(str(src), out=tmp_path / "rom", **kw)
    compressed, unread = {("cpu", torch.bfloat16)}, {("meta", torch.float32)}
    assert seen[:4] == [[compressed] * e + [unread] * (4 - e) for e in range(4)]       # block 0, experts 0..3
    in_memory = rom_fast.compress(copy.deepcopy(model), **kw)
    with torch.no_grad():
        a, b = streamed.model(probe()).logits.float(), in_memory.model(probe()).logits.float()
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    returned = rom_fast.compress(str(src), **kw).model
    expert = returned.get_submodule("model.layers.1.mlp.experts.0")
    assert not expert._forward_pre_hooks and {p.dtype for p in returned.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(returned(probe()).logits, a, rtol=0, atol=2e-2 * b.abs().max().item())


def test_the_planner_on_a_streamed_bfloat16_directory_is_the_in_memory_planner(tmp_path):
    from rom_fast.io.sources import ModelSource
    from rom_fast.planner import collect_spectra

    model = tiny_model("mixtral").to(torch.bfloat16)
    src = save_dir(model, tmp_path / "dense")
    calib = calibration()
    streamed = collect_spectra(DirectorySource(src), calib["input_ids"], calib["attention_mask"], neuron_curves=True)
    in_memory = collect_spectra(ModelSource(model), calib["input_ids"], calib["attention_mask"], neuron_curves=True)
    assert streamed.keys() == in_memory.keys()
    # (Not bit for bit: a bfloat16 model in memory and its directory differ by ~1e-4 in the
    # attention's sensitivities for LLaMA too, before any expert is involved.)
    for name, s in streamed.items():
        np.testing.assert_allclose(s.eigenvalues, in_memory[name].eigenvalues, rtol=1e-5, atol=1e-6 * s.eigenvalues[0])
        assert s.sensitivity == pytest.approx(in_memory[name].sensitivity, rel=1e-3)
        if s.neuron_curve is not None:
            np.testing.assert_allclose(s.neuron_curve[1], in_memory[name].neuron_curve[1], rtol=1e-5,
                                       atol=1e-6 * s.neuron_curve[1].max())
