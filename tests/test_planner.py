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
from rom_fast.io.sources import ModelSource
from rom_fast.planner import LayerSpectrum, allocate, collect_spectra, planned
from rom_fast.planner.allocation import _linear_hull, _loss_curve

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


def _inline_hull_options(s, weighting):
    """The planner's former per-linear hull (its own monotone chain, before there was one hull
    routine), kept as the reference: [(params, loss, rank or None for dense)]."""
    loss = _loss_curve(s, weighting)
    dense = s.d_out * s.d_in
    points = [(dense, 0.0, None)]
    r_max = min(len(s.eigenvalues), s.d_out, s.d_in)
    for r in range(r_max, 0, -1):
        p = lowrank_params(s.d_out, s.d_in, r)
        if p < dense:
            points.append((p, float(loss[r]), r))
    hull = []
    for pt in points:   # params strictly decreasing: monotone-chain lower hull
        while len(hull) >= 2:
            (p1, l1, _), (p2, l2, _) = hull[-2], hull[-1]
            if (l2 - l1) * (p1 - pt[0]) >= (pt[1] - l1) * (p1 - p2):
                hull.pop()
            else:
                break
        hull.append(pt)
    return hull


def _random_spectrum(rng):
    d_out, d_in = (int(v) for v in rng.integers(1, 48, size=2))
    n = int(rng.integers(0, min(d_out, d_in) + 3))
    kind = rng.integers(5)
    if kind == 0:
        ev = rng.exponential(size=n)
    elif kind == 1:       # repeated values and exact zeros: collinear hull points
        ev = rng.choice([0.0, 1.0, 2.0, 0.5], size=n)
    elif kind == 2:       # integer-valued, many equal slopes
        ev = rng.integers(0, 4, size=n).astype(np.float64)
    elif kind == 3:       # wide dynamic range
        ev = 10.0 ** rng.uniform(-12, 8, size=n)
    else:
        ev = np.zeros(n)
    sensitivity = float(rng.choice([0.0, rng.uniform(1e-6, 10)]))
    return LayerSpectrum("x", d_out, d_in, np.sort(ev)[::-1] * rng.uniform(0.01, 100), sensitivity)


def test_one_hull_routine_gives_the_former_inline_hull_exactly():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        s = _random_spectrum(rng)
        for weighting in ("fisher", "energy", "tail"):
            got = [(o.params, repr(o.loss), dict(o.ranks).get("x"), o.neurons, len(o.ranks))
                   for o in _linear_hull("x", s, weighting)]
            ref = [(p, repr(l), r, None, 0 if r is None else 1) for p, l, r in _inline_hull_options(s, weighting)]
            assert got == ref, (s, weighting)
            assert all(type(o.params) is int and type(o.loss) is float for o in _linear_hull("x", s, weighting))


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


def test_spectra_grams_follow_gram_precision(monkeypatch):
    """Every planner Gram (q/k/v, o_proj and gate/up inputs, down_proj outputs: 8 wide; down_proj
    inputs for the neuron curve: 1536) takes the precision the pipeline's option resolves to for
    its width (kernels.resolve_gram_precision): "auto" keeps the narrow ones float64 and makes the
    1536-wide neuron Gram float32, as before; float32/float64 apply to all of them."""
    from rom_fast import kernels
    from rom_fast.distributed import Communicator
    made = []
    create = Communicator.gram_accumulator

    def recording(self, dim, label="", **options):
        made.append((dim, options.get("precision")))
        return create(self, dim, label, **options)
    monkeypatch.setattr(Communicator, "gram_accumulator", recording)
    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        **dict(TINY, hidden_size=8, intermediate_size=kernels.FLOAT32_GRAM_MIN_DIM, num_hidden_layers=1))).eval()
    ids, mask = _batch()
    ids = ids % wide.config.vocab_size
    results = {}
    for precision in ("auto", "float32", "float64"):
        made.clear()
        results[precision] = collect_spectra(ModelSource(wide), ids, mask, batch_size=4, neuron_curves=True,
                                             gram_precision=precision)
        expected = {"auto": lambda d: "float32" if d >= 1536 else "float64"}.get(precision, lambda d: precision)
        assert sorted(made) == sorted((d, expected(d)) for d in (8, 8, 8, 8, 1536)), (precision, made)
    for name, s in results["auto"].items():      # the neuron curve is the float32 one; spectra the float64 ones
        np.testing.assert_array_equal(s.eigenvalues, results["float64"][name].eigenvalues)
        if s.neuron_curve is not None:
            np.testing.assert_array_equal(s.neuron_curve[1], results["float32"][name].neuron_curve[1])
    with pytest.raises(ValueError, match="gram_precision"):
        collect_spectra(ModelSource(wide), ids, mask, gram_precision="half")
