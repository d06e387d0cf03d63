"""Dense-anchored targets against an independent float64 numpy reference of their objective.

The anchored fit of a layer W on compressed inputs X_c, with the dense model's inputs X_d at
the same tokens, is  min_{rank B <= r} ||W X_c - B X_c||^2 + alpha ||W X_d - B X_c||^2
(+ the ridge). numpy solves it directly as reduced-rank regression of the mixed target
T = (W X_c + alpha W X_d) / (1 + alpha) on X_c (SVD of the least-squares fit); rom_fast
goes through the core's cross moment, its drift correction and the ordinary ROM factorization.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rom_fast import kernels


def _data(n=400, d_in=24, d_out=16, drift=0.3, seed=0, deficient=False):
    rng = np.random.default_rng(seed)
    xc = rng.standard_normal((n, d_in)) * (1.0 / (1.0 + np.arange(d_in)))   # anisotropic
    if deficient:
        xc[:, 1] = xc[:, 0]            # a duplicated feature: C_cc is singular
    xd = xc + drift * rng.standard_normal((n, d_in)) * (1.0 / (1.0 + np.arange(d_in)))
    w = rng.standard_normal((d_out, d_in))
    b = rng.standard_normal(d_out)
    return xc, xd, w, b


def _reference(xc, xd, w, b, alpha, r, lam):
    """Rank-r optimum of the anchored objective (ridge lam on the regression), numpy float64."""
    f = 1.0 if math.isinf(alpha) else alpha / (1 + alpha)
    aug = b is not None
    xc1 = np.hstack([xc, np.ones((len(xc), 1))]) if aug else xc
    xd1 = np.hstack([xd, np.ones((len(xd), 1))]) if aug else xd
    w1 = np.hstack([w, b[:, None]]) if aug else w
    target = (1 - f) * xc1 @ w1.T + f * xd1 @ w1.T            # n x d_out
    # Ridge-regularised least squares of the target on X_c (the drift part only, as the core):
    # B_ls = W + f W (C_dc - C)(C + lam I)^-1, i.e. normal equations of the mixed target.
    c = xc1.T @ xc1
    b_ls = w1 + f * w1 @ (xd1.T @ xc1 - c) @ np.linalg.inv(c + lam * np.eye(len(c)))
    fitted = xc1 @ b_ls.T
    u, _, _ = np.linalg.svd(fitted.T, full_matrices=False)
    p = u[:, :r] @ u[:, :r].T
    best = p @ b_ls
    return best, target, xc1


def _stats(xc, xd):
    acc = kernels.GramAccumulator(xc.shape[1], precision="float64")
    cross = kernels.CrossGramAccumulator(xd.shape[1], xc.shape[1])
    for lo in range(0, len(xc), 150):            # chunked, as the pipeline feeds them
        acc.update(np.ascontiguousarray(xc[lo:lo + 150]))
        cross.update(np.ascontiguousarray(xd[lo:lo + 150]), np.ascontiguousarray(xc[lo:lo + 150]))
    return acc, cross


@pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0, math.inf])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("deficient", [False, True])
def test_anchored_factorization_reaches_the_reference_optimum(alpha, with_bias, deficient):
    xc, xd, w, b = _data(deficient=deficient)
    b = b if with_bias else None
    r, ridge = 5, 1e-4
    acc, cross = _stats(xc, xd)
    corr = kernels.anchor_correction(acc, cross, ridge=ridge, with_bias=with_bias)
    lam = corr.ridge_lambda
    assert lam == pytest.approx(ridge * np.trace(xc.T @ xc) / xc.shape[1], rel=1e-12)
    w_eff, b_eff = kernels.anchored_target(corr, w, alpha, bias=b)
    f = kernels.factorize(w_eff, acc, r, bias=b_eff)
    best, target, xc1 = _reference(xc, xd, w, b, alpha, r, lam)
    got = f.w1 @ f.w2
    if with_bias:
        got = np.hstack([got, (f.w1 @ f.b2)[:, None]])
    # Same fitted outputs on the calibration tokens (the factors are unique up to rotation).
    np.testing.assert_allclose(xc1 @ got.T, xc1 @ best.T, rtol=0, atol=1e-8 * np.abs(xc1 @ best.T).max())
    if alpha == 0.0:
        np.testing.assert_array_equal(w_eff, w)


def test_anchoring_lowers_the_dense_error_and_reduces_to_rom_without_drift():
    xc, _, w, _ = _data()
    # A systematic drift (a linear distortion of the inputs) is what anchoring can undo.
    xd = xc + 0.5 * xc @ np.random.default_rng(7).standard_normal((xc.shape[1], xc.shape[1]))
    r = 4
    acc, cross = _stats(xc, xd)
    corr = kernels.anchor_correction(acc, cross, ridge=1e-6)
    dense_err = {}
    for alpha in (0.0, math.inf):
        w_eff, _ = kernels.anchored_target(corr, w, alpha)
        f = kernels.factorize(w_eff, acc, r)
        dense_err[alpha] = np.linalg.norm(xd @ w.T - xc @ (f.w1 @ f.w2).T)
    assert dense_err[math.inf] < 0.9 * dense_err[0.0]
    # No drift (X_d = X_c): the anchored target is W itself, up to the ridge's shrinkage.
    acc2, cross2 = _stats(xc, xc)
    w_same, _ = kernels.anchored_target(kernels.anchor_correction(acc2, cross2, ridge=1e-6), w, math.inf)
    np.testing.assert_allclose(w_same, w, rtol=0, atol=1e-12 * np.abs(w).max())


def test_cross_moment_matches_numpy_for_float32_and_float64():
    rng = np.random.default_rng(3)
    xd = rng.standard_normal((1000, 9)).astype(np.float32)
    xc = rng.standard_normal((1000, 6)).astype(np.float32)
    c = kernels.CrossGramAccumulator(9, 6)
    c.update(xd[:300], xc[:300])
    c.update(torch.from_numpy(xd[300:]), torch.from_numpy(xc[300:]))
    ref = xd.astype(np.float64).T @ xc.astype(np.float64)
    np.testing.assert_allclose(c.cross, ref, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(c.dense_column_sum, xd.astype(np.float64).sum(0), rtol=1e-13)
    assert c.count == 1000


@pytest.mark.parametrize("case,exc", [
    (lambda c: c.update(np.zeros((3, 9)), np.zeros((4, 6))), ValueError),            # rows differ
    (lambda c: c.update(np.zeros((3, 8)), np.zeros((3, 6))), ValueError),            # columns
    (lambda c: c.update(np.zeros((3, 9), np.float32), np.zeros((3, 6))), TypeError),  # dtypes differ
    (lambda c: c.update(np.zeros((3, 9), np.int64), np.zeros((3, 6), np.int64)), TypeError),
    (lambda c: c.update(np.full((3, 9), np.nan), np.zeros((3, 6))), ValueError),     # non-finite
    (lambda c: c.update(np.zeros((9, 3)).T, np.zeros((3, 6))), ValueError),          # not C-contiguous
])
def test_cross_moment_refuses_bad_inputs(case, exc):
    c = kernels.CrossGramAccumulator(9, 6, label="inputs of model.layers.3.mlp.gate_proj")
    with pytest.raises(exc):
        case(c)
    assert c.count == 0


def test_correction_refuses_mismatched_statistics():
    xc, xd, w, _ = _data()
    acc, cross = _stats(xc, xd)
    short = kernels.CrossGramAccumulator(xc.shape[1], xc.shape[1])
    short.update(xd[:10], xc[:10])
    with pytest.raises(ValueError, match="different tokens"):
        kernels.anchor_correction(acc, short)
    with pytest.raises(ValueError, match="ridge"):
        kernels.anchor_correction(acc, cross, ridge=0.0)
    corr = kernels.anchor_correction(acc, cross)
    with pytest.raises(ValueError, match="columns"):
        kernels.anchored_target(corr, np.ascontiguousarray(w[:, :5]), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        kernels.anchored_target(corr, w, -1.0)
    with pytest.raises(ValueError, match="with_bias"):
        kernels.anchored_target(corr, w, 1.0, bias=np.zeros(w.shape[0]))


def _tiny(model_type="llama"):
    import transformers
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    cfg = cls(vocab_size=300, hidden_size=48, intermediate_size=112, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=3)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_anchored_pipeline_tracks_the_dense_model(model_type):
    """Compressing every layer, anchored targets keep the logits closer to the dense model's on
    held-out tokens than the paper's objective (same ranks), and anchor=0 is today's result."""
    import rom_fast
    dense = _tiny(model_type)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (48, 32), generator=g)
    held_out = torch.randint(0, 300, (8, 32), generator=g)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    ranks = {f"model.layers.{i}.{n}": 10 for i in range(3) for n in names}
    calib = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = dense(held_out).logits
    err, models = {}, {}
    for alpha in (0.0, math.inf):
        m = copy.deepcopy(dense)
        result = rom_fast.compress(m, calibration=calib, ranks=ranks, progress=False, anchor=alpha)
        with torch.no_grad():
            err[alpha] = float((m(held_out).logits - ref).norm() / ref.norm())
        models[alpha] = m
        routes = {r.route for r in result.report.layers}
        assert all(r.endswith("+anchored") for r in routes) == (alpha > 0), routes
    if model_type == "llama":     # (random Qwen2 weights: no measurable gain either way; its biases run)
        assert err[math.inf] < 0.95 * err[0.0], err
    plain = copy.deepcopy(dense)
    rom_fast.compress(plain, calibration=calib, ranks=ranks, progress=False)
    for p, q in zip(plain.parameters(), models[0.0].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_anchor_options_are_checked():
    import rom_fast
    with pytest.raises(ValueError, match="anchor"):
        rom_fast.compress(_tiny(), calibration=torch.randint(0, 300, (8, 16)), budget=0.8, anchor=-1)
    with pytest.raises(ValueError, match="centered"):
        rom_fast.compress(_tiny(), calibration=torch.randint(0, 300, (8, 16)), budget=0.8, anchor=1,
                          centered=True)


def test_anchored_streamed_run_matches_in_memory_and_resumes_bitwise(tmp_path, resume_check):
    """A directory compressed with anchored targets gives the in-memory result; interrupted
    after block 1 and rerun, it continues from the saved [compressed, dense] hidden states and
    writes the tensors of an uninterrupted run."""
    import rom_fast
    model = _tiny()
    src = tmp_path / "dense"
    model.save_pretrained(src, max_shard_size="60KB")
    ids = torch.randint(0, 300, (24, 24), generator=torch.Generator().manual_seed(2))
    kw = dict(calibration=ids, n_samples=24, seq_len=24, budget=0.6, planner_samples=12, progress=False,
              anchor=2.0)
    in_memory = rom_fast.compress(copy.deepcopy(model), **kw)
    whole = rom_fast.compress(str(src), out=tmp_path / "whole", **kw)
    assert whole.plan.ranks == in_memory.plan.ranks
    probe = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(whole.model(probe).logits, in_memory.model(probe).logits, atol=1e-5, rtol=1e-5)

    def refused():
        with pytest.raises(ValueError, match="different command"):
            rom_fast.compress(str(src), out=tmp_path / "rom", **dict(kw, anchor=1.0))
    resume_check(lambda out: rom_fast.compress(str(src), out=out, **kw), tmp_path / "rom", tmp_path / "whole",
                 before_rerun=refused)
