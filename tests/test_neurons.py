"""Structured input pruning (kernels.select_inputs) against an independent float64 numpy
reference.

Keeping the column set S of a layer W (d x n) whose inputs have Gram C costs
    L(S) = min_{W'} tr((W - W' E_S^T) H (W - W' E_S^T)^T),   H = C + lambda I,
solved by W'_S = W H[:,S] H[S,S]^-1. The reference knows nothing of the core's inverse
updates: it evaluates L of every candidate set by solving those normal equations directly and
runs the greedy by brute force (one removal at a time, the cheapest, lowest index on ties).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rom_fast import kernels


def _problem(n, d, seed, tokens=None, zero_column=None):
    rng = np.random.default_rng(seed)
    tokens = 3 * n if tokens is None else tokens
    x = rng.standard_normal((tokens, n)) * np.exp(0.7 * rng.standard_normal(n))   # uneven scales
    if zero_column is not None:
        x[:, zero_column] = 0.0            # a dead neuron: a zero row and column of C
    w = rng.standard_normal((d, n))
    return x, w, x.T @ x


def _ridged(c, ridge):
    mean = np.trace(c) / c.shape[0]
    lam = ridge * (mean if mean > 0 else 1.0)
    return c + lam * np.eye(c.shape[0]), lam


def _refit(w, h, kept):
    s = np.asarray(kept, dtype=np.int64)
    if s.size == 0:
        return np.zeros((w.shape[0], 0))
    # W' H[S,S] = W H[:,S]  (H[S,S] symmetric)
    return np.linalg.solve(h[np.ix_(s, s)], (w @ h[:, s]).T).T


def _loss(w, h, kept, wk=None):
    s = np.asarray(kept, dtype=np.int64)
    wk = _refit(w, h, s) if wk is None else wk
    diff = w.copy()
    diff[:, s] -= wk
    return float(np.trace(diff @ h @ diff.T))


def _greedy(w, h, stop):
    """Brute force: removal order and the loss curve, one column at a time."""
    remaining, order, curve = list(range(w.shape[1])), [], [0.0]
    while len(remaining) > stop:
        losses = [_loss(w, h, [j for j in remaining if j != i]) for i in remaining]
        best = min(range(len(remaining)), key=lambda t: (losses[t], remaining[t]))
        order.append(remaining.pop(best))
        curve.append(losses[best])
    return order, curve


def _without(n, removed):
    gone = set(int(i) for i in removed)
    return [i for i in range(n) if i not in gone]


CASES = [   # n, d, seed, tokens, zero column
    (10, 3, 0, None, None),
    (16, 5, 1, None, None),
    (24, 7, 2, None, None),
    (18, 4, 3, 7, None),       # N < n: C singular (rank 7)
    (14, 6, 4, None, 5),       # a zero column
    (20, 3, 5, 9, 0),          # both
]


@pytest.mark.parametrize("n,d,seed,tokens,zero", CASES)
def test_block1_matches_brute_force_greedy(n, d, seed, tokens, zero):
    x, w, c = _problem(n, d, seed, tokens, zero)
    ridge = 1e-3
    h, lam = _ridged(c, ridge)
    keep, curve_to = (2 * n) // 3, 2
    sel = kernels.select_inputs(w, c, keep, ridge=ridge, curve_to=curve_to)
    order, curve = _greedy(w, h, curve_to)

    assert sel.lambda_ == pytest.approx(lam, rel=1e-15)
    assert sel.total_energy == pytest.approx(float(np.trace(w @ c @ w.T)), rel=1e-10)
    assert sel.removed.dtype == np.int64 and sel.kept.dtype == np.int64
    np.testing.assert_array_equal(sel.removed, order)
    np.testing.assert_array_equal(sel.curve_kept, np.arange(n, curve_to - 1, -1))
    np.testing.assert_allclose(sel.curve_loss, curve, rtol=1e-9, atol=1e-12 * curve[-1])

    np.testing.assert_array_equal(sel.kept, _without(n, order[: n - keep]))
    ref = _refit(w, h, sel.kept)
    assert sel.weight.shape == (d, keep) and sel.weight.dtype == np.float64
    np.testing.assert_allclose(sel.weight, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())

    # The refit is the optimum: no perturbation lowers the loss.
    best = _loss(w, h, sel.kept, sel.weight)
    assert best == pytest.approx(curve[n - keep], rel=1e-9)
    rng = np.random.default_rng(100 + seed)
    scale = 1e-3 * np.abs(sel.weight).max()
    for _ in range(20):
        assert _loss(w, h, sel.kept, sel.weight + scale * rng.standard_normal(sel.weight.shape)) > best


@pytest.mark.parametrize("n,d,seed,tokens,zero", CASES[1:5])
@pytest.mark.parametrize("block", [3, 4])
def test_blocks_follow_the_obs_scores(n, d, seed, tokens, zero, block):
    x, w, c = _problem(n, d, seed, tokens, zero)
    ridge = 1e-3
    h, _ = _ridged(c, ridge)
    keep, curve_to = n - 5, 3          # 5 removals to keep: the last group before it is smaller
    sel = kernels.select_inputs(w, c, keep, ridge=ridge, block=block, curve_to=curve_to)

    sizes = [min(block, left) for left in range(5, 0, -block)]
    sizes += [min(block, left) for left in range(keep - curve_to, 0, -block)]
    np.testing.assert_array_equal(sel.curve_kept, n - np.concatenate([[0], np.cumsum(sizes)]))
    assert keep in sel.curve_kept      # a group boundary at keep: the kept set is on the curve
    assert len(sel.removed) == n - curve_to and len(set(sel.removed.tolist())) == n - curve_to

    for t in range(1, len(sel.curve_kept)):
        before = _without(n, sel.removed[: n - sel.curve_kept[t - 1]])
        group = sel.removed[n - sel.curve_kept[t - 1]: n - sel.curve_kept[t]]
        # The group is the smallest OBS scores Delta_i = L(R \ {i}) - L(R) of the set before it.
        base = _loss(w, h, before)
        delta = {i: _loss(w, h, [j for j in before if j != i]) - base for i in before}
        smallest = sorted(before, key=lambda i: (delta[i], i))[: len(group)]
        assert sorted(group.tolist()) == sorted(smallest)
        after = _without(n, sel.removed[: n - sel.curve_kept[t]])
        assert sel.curve_loss[t] == pytest.approx(_loss(w, h, after), rel=1e-9)

    np.testing.assert_array_equal(sel.kept, _without(n, sel.removed[: n - keep]))
    ref = _refit(w, h, sel.kept)
    np.testing.assert_allclose(sel.weight, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    # The curve at keep is the loss of the returned (recomputed, not incremental) refit.
    assert sel.curve_loss[list(sel.curve_kept).index(keep)] == pytest.approx(
        _loss(w, h, sel.kept, sel.weight), rel=1e-9)


def test_ties_go_to_the_lower_index():
    n, d = 9, 3
    c = np.eye(n)                      # every column scores exactly the same
    w = np.ones((d, n))
    for block in (1, 2):
        sel = kernels.select_inputs(w, c, 5, block=block, curve_to=2)
        np.testing.assert_array_equal(sel.removed, np.arange(n - 2))
        np.testing.assert_array_equal(sel.kept, np.arange(4, 9))


def test_keep_all_returns_the_weight():
    _, w, c = _problem(8, 3, 7)
    sel = kernels.select_inputs(w, c, 8)
    np.testing.assert_array_equal(sel.kept, np.arange(8))
    assert sel.removed.size == 0 and sel.curve_kept.tolist() == [8] and sel.curve_loss.tolist() == [0.0]
    np.testing.assert_array_equal(sel.weight, w)


def test_float32_weight_torch_and_accumulator_inputs():
    x, w, c = _problem(15, 4, 8)
    w32 = w.astype(np.float32)
    a = kernels.select_inputs(w32, c, 9, block=2, curve_to=4)
    b = kernels.select_inputs(w32.astype(np.float64), c, 9, block=2, curve_to=4)
    np.testing.assert_array_equal(a.removed, b.removed)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert a.weight.dtype == np.float64

    t = kernels.select_inputs(torch.from_numpy(w32), torch.from_numpy(c), 9, block=2, curve_to=4)
    np.testing.assert_array_equal(t.weight, a.weight)

    acc = kernels.GramAccumulator(15)
    acc.update(x[:20])
    acc.update(x[20:])
    s = kernels.select_inputs(w, acc, 9, curve_to=4)
    r = kernels.select_inputs(w, acc.gram, 9, curve_to=4)
    np.testing.assert_array_equal(s.removed, r.removed)
    np.testing.assert_array_equal(s.weight, r.weight)
    assert s.keep == 9


def test_bad_inputs_are_refused():
    _, w, c = _problem(6, 2, 9)
    sel = kernels.select_inputs

    for keep in (0, 7, -1):
        with pytest.raises(ValueError, match="keep"):
            sel(w, c, keep)
    for curve_to in (0, 5):
        with pytest.raises(ValueError, match="curve_to"):
            sel(w, c, 4, curve_to=curve_to)
    with pytest.raises(ValueError, match="block"):
        sel(w, c, 4, block=0)
    for ridge in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge"):
            sel(w, c, 4, ridge=ridge)
    bad = w.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="weight.*non-finite"):
        sel(bad, c, 4)
    bad = c.copy()
    bad[2, 2] = np.inf
    with pytest.raises(ValueError, match="gram.*non-finite"):
        sel(w, bad, 4)
    bad = c.copy()
    bad[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        sel(w, bad, 4)

    with pytest.raises(ValueError, match="square"):
        sel(w, np.zeros((6, 7)), 4)
    with pytest.raises(ValueError, match="gram must be n x n"):
        sel(w, np.eye(7), 4)
    with pytest.raises(ValueError, match="gram must be 2-D"):
        sel(w, np.zeros((6, 6, 1)), 4)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        sel(w[0], c, 4)
    with pytest.raises(ValueError, match="at least 1 x 1"):
        sel(np.zeros((0, 6)), c, 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        sel(np.asfortranarray(w), c, 4)
    with pytest.raises(TypeError, match="gram must have dtype float64"):
        sel(w, c.astype(np.float32), 4)
    with pytest.raises(TypeError, match="weight must have dtype"):
        sel(w.astype(np.int64), c, 4)
    with pytest.raises(TypeError, match="weight must be a numpy array"):
        sel(w.tolist(), c, 4)
    with pytest.raises(TypeError, match="keep must be an integer"):
        sel(w, c, 2.5)
    with pytest.raises(TypeError, match="curve_to must be an integer"):
        sel(w, c, 4, curve_to=2.0)
    # A "Gram" that is not PSD makes H indefinite: refused by LAPACK, not answered.
    with pytest.raises(kernels.LapackError, match="dpotrf"):
        sel(w, -np.eye(6), 4)


def _same_selection(a, b):
    for field in ("kept", "removed", "curve_kept", "curve_loss", "weight"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        np.testing.assert_array_equal(x, y, err_msg=field)
    assert a.total_energy == b.total_energy and a.lambda_ == b.lambda_


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block,keep,curve_to", [(1, 30, 12), (3, 17, 5), (8, 40, 1), (5, 40, None)])
@pytest.mark.parametrize("d", [4, 30])     # n - keep above and below d: both refit branches
def test_overwrite_gram_is_bitwise_the_copy(dtype, block, keep, curve_to, d):
    n = 40
    _, w, c = _problem(n, d, 20 + d, tokens=25)      # singular C
    w = w.astype(dtype)
    original = c.copy()
    ref = kernels.select_inputs(w, c, keep, block=block, curve_to=curve_to)
    np.testing.assert_array_equal(c, original)         # the copying call leaves it alone
    work = c.copy()
    got = kernels.select_inputs(w, work, keep, block=block, curve_to=curve_to, overwrite_gram=True)
    _same_selection(ref, got)
    assert not np.array_equal(work, original)         # consumed: it was the workspace

    t = torch.from_numpy(c.copy())                     # a tensor is consumed through its view
    _same_selection(ref, kernels.select_inputs(torch.from_numpy(w), t, keep, block=block,
                                               curve_to=curve_to, overwrite_gram=True))
    assert not torch.equal(t, torch.from_numpy(original))


def test_overwrite_gram_with_accumulators():
    x, w, c = _problem(15, 4, 21)
    acc = kernels.GramAccumulator(15)
    acc.update(x)
    before = acc.gram
    ref = kernels.select_inputs(w, before.copy(), 9, curve_to=4)
    _same_selection(ref, kernels.select_inputs(w, acc, 9, curve_to=4))
    np.testing.assert_array_equal(acc.gram, before)               # read: left unchanged
    _same_selection(ref, kernels.select_inputs(w, acc, 9, curve_to=4, overwrite_gram=True))
    # Spent: its own buffer was the workspace (take_gram), so its Gram is gone, not stale.
    assert acc.taken and acc.count == x.shape[0]
    with pytest.raises(RuntimeError, match="take_gram"):
        acc.gram
    with pytest.raises(RuntimeError, match="take_gram"):
        acc.update(x)
    with pytest.raises(RuntimeError, match="take_gram"):
        kernels.select_inputs(w, acc, 9)
    acc.reset()                                                   # reusable after a reset
    acc.update(x)
    np.testing.assert_array_equal(acc.gram, before)


def test_overwrite_gram_refuses_bad_arguments_before_spending_an_accumulator():
    x, w, _ = _problem(12, 3, 23)
    acc = kernels.GramAccumulator(12)
    acc.update(x)
    before = acc.gram
    bad = [((w, 0), {}, ValueError, "keep"), ((w, 13), {}, ValueError, "keep"),
           ((w[:, :11], 5), {}, ValueError, "does not read"), ((w, 5), {"curve_to": 6}, ValueError, "curve_to"),
           ((w, 5), {"block": 0}, ValueError, "block"), ((w, 5), {"ridge": 0.0}, ValueError, "ridge"),
           ((w.astype(np.float16), 5), {}, TypeError, "float32 or float64")]
    for (weight, keep), extra, error, match in bad:
        with pytest.raises(error, match=match):
            kernels.select_inputs(weight, acc, keep, overwrite_gram=True, **extra)
        assert not acc.taken
    np.testing.assert_array_equal(acc.gram, before)


class _TwoEqualProcesses:
    """A communicator whose all-reduce sums two identical processes' arrays (in place)."""

    def all_reduce(self, array, kind):
        array *= 2.0
        return array


def test_overwrite_gram_with_a_data_parallel_accumulator():
    from rom_fast.distributed import ReducedGramAccumulator

    x, w, _ = _problem(15, 4, 24)
    red = ReducedGramAccumulator(15, "inputs of a test layer", _TwoEqualProcesses())
    red.update(x)
    local = kernels.GramAccumulator(15)
    local.update(x)
    ref = kernels.select_inputs(w, 2.0 * local.gram, 9, curve_to=4)
    _same_selection(ref, kernels.select_inputs(w, red, 9, curve_to=4))
    np.testing.assert_array_equal(red.gram, 2.0 * local.gram)     # copied: the shared sums stay
    _same_selection(ref, kernels.select_inputs(w, red, 9, curve_to=4, overwrite_gram=True))
    assert red.count == 2 * x.shape[0]
    with pytest.raises(RuntimeError, match="handed over"):        # consumed, so not readable
        red.gram
    with pytest.raises(RuntimeError, match="all-reduced"):
        red.update(x)


def test_overwrite_gram_refuses_what_it_cannot_consume():
    _, w, c = _problem(6, 2, 22)
    sel = kernels.select_inputs

    ro = c.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="gram must be writable"):
        sel(w, ro, 4, overwrite_gram=True)
    sel(w, ro, 4)                                   # reading it is fine
    fortran = np.asfortranarray(c)
    with pytest.raises(ValueError, match="gram must be C-contiguous"):
        sel(w, fortran, 4, overwrite_gram=True)
    np.testing.assert_array_equal(fortran, c)
    with pytest.raises(TypeError, match="gram must have dtype float64"):
        sel(w, c.astype(np.float32), 4, overwrite_gram=True)
    big = np.zeros((12, 6))                         # not a view onto a contiguous n x n block
    big[::2] = c
    with pytest.raises(ValueError, match="C-contiguous"):
        sel(w, big[::2], 4, overwrite_gram=True)
    np.testing.assert_array_equal(big[::2], c)

    # A bad argument is refused before anything is written.
    work = c.copy()
    with pytest.raises(ValueError, match="keep"):
        sel(w, work, 0, overwrite_gram=True)
    np.testing.assert_array_equal(work, c)
    # The weight must not live in the Gram it overwrites (the kernel reads the weight again).
    with pytest.raises(ValueError, match="overlap"):
        sel(work[:2], work, 4, overwrite_gram=True)
    np.testing.assert_array_equal(work, c)
