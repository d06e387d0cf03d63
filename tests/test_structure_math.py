"""The structures' math without torch modules, against float64 numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rom_fast import kernels
from rom_fast.lowrank import lowrank_params, mlp_neuron_params
from rom_fast.structures import LOWRANK, NEURONS, STRUCTURES
from rom_fast.structures.lowrank import CORE, OUTPUT, output_route, times_widened
from rom_fast.structures.neurons import retained_energy


class _Options:
    centered, ridge, anchor, eigen_method = False, 1e-3, 0.0, "auto"


def _data(n=300, d_in=40, d_out=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in)) @ rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    return x, rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)


def test_registry_names_every_structure():
    assert STRUCTURES == {"lowrank": LOWRANK, "neurons": NEURONS}


def test_route_rule_is_the_cheaper_gram():
    assert output_route(4096, 11008) and not output_route(11008, 4096) and not output_route(576, 576)


@pytest.mark.parametrize("with_bias", [False, True])
def test_outputs_from_kept_finish_the_layer_exactly(with_bias):
    """(y @ left) @ w1.T + const, from the dense outputs y = W x + b, is the factorized layer's
    output W1 (W2 x + b2) + b1."""
    x, w, b = _data()
    bias = b if with_bias else None
    y = x @ w.T + (b if with_bias else 0.0)
    acc = kernels.GramAccumulator(w.shape[0])
    acc.update(y)
    f, anchored = LOWRANK.fit_output_route(w, bias, [acc, None], 5, _Options(), "layer")
    assert anchored is None
    left, w1, const = LOWRANK.outputs_from_kept(f, bias, None)
    got = (torch.as_tensor(y).float() @ left) @ w1.T + const
    ref = x @ (f.w1 @ f.w2).T + (0.0 if f.b2 is None else f.w1 @ f.b2) + (0.0 if f.b1 is None else f.b1)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-4, atol=2e-4)
    # the fit is the best rank-5 fit of the outputs: the eigenvalue tail of their second moment
    vals = np.linalg.eigvalsh(y.T @ y)[::-1]
    assert LOWRANK.retained_energy(f) == pytest.approx(vals[:5].sum() / vals.sum(), rel=1e-9)


def test_shared_input_fit_is_the_best_rank_r_fit_of_each_output():
    x, w, b = _data(d_out=30)
    acc = kernels.GramAccumulator(x.shape[1])
    acc.update(x)
    weights = {"a": (w[:12].copy(), None), "b": (w[12:].copy(), b[12:].copy())}
    fits = dict(LOWRANK.fit_shared_input([acc, None], ["a", "b"], weights.get, {"a": 4, "b": 6}, _Options()))
    for name, r in (("a", 4), ("b", 6)):
        wn, bn = weights[name]
        y = x @ wn.T + (0.0 if bn is None else bn)
        u, s, vt = np.linalg.svd(y, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vt[:r]
        f = fits[name]
        approx = x @ (f.w1 @ f.w2).T + (0.0 if f.b2 is None else f.w1 @ f.b2)
        assert np.linalg.norm(y - approx) == pytest.approx(np.linalg.norm(y - best), rel=1e-8)


def test_times_widened_is_the_float64_product():
    rng = np.random.default_rng(3)
    left, weight = rng.standard_normal((5, 7)), rng.standard_normal((7, 2500)).astype(np.float32)
    np.testing.assert_allclose(times_widened(left, weight, band=1000), left @ weight.astype(np.float64), rtol=1e-13)


def test_taps_say_what_each_structure_reads():
    class Sub:
        inputs, output = ("g", "u"), "d"

    class Lin:
        def __init__(self, o, i):
            self.out_features, self.in_features = o, i
    assert LOWRANK.output_tap(Sub, {"g": 3}, Lin(4, 9)) is None
    assert LOWRANK.output_tap(Sub, {"d": 3}, Lin(4, 9)) == OUTPUT
    assert LOWRANK.output_tap(Sub, {"d": 3}, Lin(9, 4)) == CORE
    assert LOWRANK.input_ranks(Sub, {"g": 3, "d": 2}) == {"g": 3}
    assert NEURONS.output_tap(Sub, 5, Lin(4, 9)) == CORE and NEURONS.input_ranks(Sub, 5) == {}


def test_planner_points():
    loss = np.array([9.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    pts = LOWRANK.planner_points(4, 6, loss)
    assert pts[0] == (24, 0.0, None)
    assert [r for _, _, r in pts[1:]] == [2, 1]         # rank 3 (30 weights) saves nothing
    assert all(p == lowrank_params(4, 6, r) and l == loss[r] for p, l, r in pts[1:])
    curve = (np.array([10, 8, 5, 1]), np.array([0.0, 1.0, 3.0, 9.0]))
    assert NEURONS.planner_points(16, 10, curve, 0.5) == [(mlp_neuron_params(16, k), 0.5 * l, k)
                                                         for k, l in ((8, 1.0), (5, 3.0), (1, 9.0))]


def test_retained_energy_of_kept_neurons():
    kept, loss = np.array([10, 6, 2]), np.array([0.0, 2.5, 8.0])
    assert retained_energy(kept, loss, 6, 10.0) == pytest.approx(0.75)
    assert retained_energy(kept, loss, 2, 4.0) == 0.0      # never negative
    assert retained_energy(kept, loss, 2, 0.0) == 1.0      # no energy: nothing lost


def test_kept_neurons_fit_refits_on_the_kept_columns():
    """The refit is the ridge least-squares optimum W H[:,S] H[S,S]^-1 for the kept set."""
    x, w, _ = _data(d_in=24, d_out=6, seed=5)
    acc = kernels.GramAccumulator(24)
    acc.update(x)
    c = x.T @ x
    sel = NEURONS.fit(w, [acc, None], 10, _Options())
    h = c + 1e-3 * np.mean(np.diag(c)) * np.eye(24)
    s = np.asarray(sel.kept)
    ref = w @ h[:, s] @ np.linalg.inv(h[np.ix_(s, s)])
    np.testing.assert_allclose(sel.weight, ref, rtol=1e-8, atol=1e-10)
