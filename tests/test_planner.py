"""Rank planner: spectra and sensitivities against direct float64 computations, and the
allocation against a brute-force optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from rom_fast import plans
from rom_fast.adapters import adapter_for
from rom_fast.lowrank import lowrank_params
from rom_fast.planner import LayerSpectrum, _loss_curve, allocate, collect_spectra, planned
from rom_fast.io.sources import ModelSource

TINY = dict(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _tiny():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY["vocab_size"], (6, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return ids, mask


def test_spectra_and_sensitivities_match_a_direct_float64_computation():
    model = _tiny()
    adapter = adapter_for(model)
    ids, mask = _batch()
    spectra = collect_spectra(ModelSource(model), ids, mask, batch_size=4)
    assert all(p.requires_grad for p in model.parameters())   # restored

    # Direct: one forward and backward of the whole model per micro-batch, every linear's
    # input and output recorded on the same tokens, in float64.
    names = list(plans.ModelShape.of(adapter).shapes)
    ins, outs = {n: [] for n in names}, {n: [] for n in names}
    handles = []
    for n in names:
        def hook(_m, a, o, n=n):
            o.retain_grad()
            ins[n].append(a[0])
            outs[n].append(o)
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    grads = {n: 0.0 for n in names}
    xs = {n: [] for n in names}
    for start in range(0, ids.shape[0], 4):
        for n in names:
            ins[n].clear(), outs[n].clear()
        i, m = ids[start:start + 4], mask[start:start + 4]
        logits = model(input_ids=i, attention_mask=m).logits[:, :-1]
        target = i[:, 1:].masked_fill(m[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum")
        loss.backward()
        for n in names:
            g = outs[n][0].grad[m.bool()].double()
            grads[n] += float((g * g).sum())
            x = ins[n][0].detach()[m.bool()].double()
            xs[n].append(x)
    for h in handles:
        h.remove()
    n_tok = int(mask.sum())
    for n in names:
        w = model.get_submodule(n).weight.detach().double()
        x = torch.cat(xs[n])
        cy = (w @ (x.T @ x) @ w.T).numpy()
        ref = np.sort(np.linalg.eigvalsh(cy))[::-1]
        got = spectra[n].eigenvalues
        k = len(got)
        np.testing.assert_allclose(got, ref[:k], rtol=1e-6, atol=1e-9 * ref[0])
        assert ref[k:].sum() <= 1e-9 * ref[0] * len(ref)                     # nothing missing
        assert spectra[n].sensitivity == pytest.approx(grads[n] / n_tok / w.shape[0], rel=1e-4)


def _brute_force(spectra, allowed, weighting):
    names = list(spectra)
    choices = []
    for n in names:
        s = spectra[n]
        opts = [(s.d_out * s.d_in, 0.0, None)]
        loss = _loss_curve(s, weighting)
        for r in range(1, min(s.d_out, s.d_in) + 1):
            p = lowrank_params(s.d_out, s.d_in, r)
            if p < s.d_out * s.d_in:
                opts.append((p, loss[r], r))
        choices.append(opts)
    best = np.inf
    for combo in itertools.product(*choices):
        if sum(c[0] for c in combo) <= allowed:
            best = min(best, sum(c[1] for c in combo))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_feasible_and_near_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    shapes = [(8, 5), (7, 7), (9, 4)]
    spectra = {}
    for i, (d_out, d_in) in enumerate(shapes):
        ev = np.sort(rng.exponential(size=min(d_out, d_in)) * rng.uniform(0.1, 10))[::-1]
        spectra[f"l{i}"] = LayerSpectrum(f"l{i}", d_out, d_in, ev, float(rng.uniform(0.1, 3)))
    dense = sum(a * b for a, b in shapes)
    other = 10
    total = dense + other
    for ratio in (0.5, 0.7, 0.85):
        ranks = allocate(spectra, total, ratio)
        kept = other + sum(lowrank_params(s.d_out, s.d_in, ranks[n]) if n in ranks else s.d_out * s.d_in
                           for n, s in spectra.items())
        assert kept <= ratio * total
        loss = sum(_loss_curve(s, "fisher")[ranks[n]] for n, s in spectra.items() if n in ranks)
        best = _brute_force(spectra, ratio * total - other, "fisher")
        # Convex-hull greedy plus refill: exact on hull vertices, within one step otherwise.
        worst_step = max(s.sensitivity * s.eigenvalues[0] for s in spectra.values())
        assert best - 1e-12 <= loss <= best + worst_step


def test_allocation_errors():
    s = {"a": LayerSpectrum("a", 4, 4, np.ones(4), 1.0)}
    with pytest.raises(ValueError, match="budget"):
        allocate(s, 100, 1.5)
    with pytest.raises(ValueError, match="rank 1"):
        allocate(s, 16, 0.1)
    with pytest.raises(ValueError, match="weighting"):
        allocate(s, 100, 0.9, weighting="nope")


def test_planned_plan_meets_the_budget_and_saves_parameters_everywhere():
    model = _tiny()
    shape = plans.ModelShape.of(adapter_for(model))
    ids, mask = _batch()
    spectra = collect_spectra(ModelSource(model), ids, mask)
    for weighting in ("fisher", "energy"):
        plan = planned(shape, 0.8, spectra, weighting)
        assert plan.details["ratio"] <= 0.8 and plan.details["ratio"] > 0.75
        shapes = shape.shapes
        assert all(lowrank_params(*shapes[n], r) < shapes[n][0] * shapes[n][1] for n, r in plan.ranks.items())
