"""Native kernels against independent float64 numpy/scipy references."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.linalg

import rom_fast

torch = pytest.importorskip("torch")

# Real shapes: SmolLM2-135M (hidden 576, kv 192, mlp 1536) and LLaMA-7B (4096, 11008).
SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]   # (d_out, d_in)


def activations(rng, n, d, dead=()):
    """Anisotropic float64 activations with a few outlier channels, like an LLM's."""
    x = rng.standard_normal((n, d)) * (1.0 / np.sqrt(1.0 + np.arange(d)))
    x[:, : max(1, d // 100)] *= 20.0
    x[:, list(dead)] = 0.0
    return x


def optimum_error(y, r):
    """Eckart–Young: the best rank-r approximation error of y in Frobenius norm."""
    s = np.linalg.svd(y, compute_uv=False)
    return float(np.sqrt(np.sum(s[r:] ** 2)))


# ------------------------------------------------------------------ Gram accumulation
U32, U64 = 2.0 ** -24, 2.0 ** -53


def float32_gram_tolerance(x64, block_rows, blocks):
    """The documented per-element bound of precision="float32": (B u32 + m u64) Σ|x_i||x_j|."""
    ax = np.abs(x64)
    return (block_rows * U32 + blocks * U64) * (ax.T @ ax)


@pytest.mark.parametrize("d", [1, 7, 192, 576, 1536, pytest.param(4096, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype,precision", [(np.float32, "float32"), (np.float32, "float64"),
                                             (np.float64, "float32")])
def test_gram_matches_numpy(d, dtype, precision):
    rng = np.random.default_rng(d)
    n = 3000 if d < 1536 else 1200      # several float32 blocks, the last one partial
    x = rng.standard_normal((n, d)).astype(dtype)
    acc = rom_fast.GramAccumulator(d, precision=precision)
    assert acc.precision == precision and acc.block_rows == rom_fast.GramAccumulator.DEFAULT_BLOCK_ROWS
    acc.update(x)
    x64 = x.astype(np.float64)
    ref = x64.T @ x64
    assert acc.count == n
    if dtype == np.float32 and precision == "float32":
        b = acc.block_rows
        err = np.abs(acc.gram - ref)
        assert np.all(err <= float32_gram_tolerance(x64, b, -(-n // b)))
        assert err.max() > 0          # float32 products really were used
    else:                             # float64 arithmetic (float64 input ignores precision)
        np.testing.assert_allclose(acc.gram, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(acc.column_sum, x64.sum(0), rtol=1e-12, atol=1e-12 * n)
    np.testing.assert_array_equal(acc.gram, acc.gram.T)
    cen = x64 - x64.mean(0)
    np.testing.assert_allclose(acc.centered_gram(), cen.T @ cen, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_float32_gram_bound_is_tight_enough_to_catch_float32_accumulation():
    """Identical rows make float32 rounding systematic. Over 64-row blocks the bound holds;
    numpy's float32 X.T @ X (one float32 sum over all rows: the too-loose implementation)
    breaks the same bound."""
    n, d, b = 262144, 8, 64
    v = (1.0 + 0.37 * np.arange(d) / d + 1e-3 * np.sin(np.arange(d))).astype(np.float32)
    x = np.broadcast_to(v, (n, d)).copy()
    exact = n * np.outer(v.astype(np.float64), v.astype(np.float64))
    tol = (b * U32 + (n // b) * U64) * exact
    acc = rom_fast.GramAccumulator(d, precision="float32", block_rows=b)
    acc.update(x)
    assert np.all(np.abs(acc.gram - exact) <= tol)
    through = (x.T @ x).astype(np.float64)
    assert np.any(np.abs(through - exact) > tol)


def test_gram_chunking_merge_and_threads_do_not_matter():
    """float64 arithmetic: any chunking or thread count; float32 blocks: any split into whole
    chunks (blocks never straddle chunks, as across processes), and a thread count that
    changes the rounding only within the bound."""
    rng = np.random.default_rng(0)
    n, d = 5000, 576
    x = rng.standard_normal((n, d)).astype(np.float32)
    for precision in ("float64", "float32"):
        whole = rom_fast.GramAccumulator(d, precision=precision)
        chunked = rom_fast.GramAccumulator(d, precision=precision)
        if precision == "float64":
            whole.update(x)
            bounds = np.unique(np.concatenate([[0, 1, 2, 3, 700, 701, 4000], rng.integers(0, n, 20), [n]]))
            for a, b in zip(bounds[:-1], bounds[1:]):  # chunks of 1 and of thousands
                chunked.update(x[a:b])
        else:
            bounds = np.arange(0, n + 1, 1000)         # the pipeline's micro-batch chunks
            for a, b in zip(bounds[:-1], bounds[1:]):
                whole.update(x[a:b])
            chunked = rom_fast.GramAccumulator(d, precision=precision)
            for a, b in zip(bounds[:-1][::-1], bounds[1:][::-1]):   # other order
                chunked.update(x[a:b])
        parts = [rom_fast.GramAccumulator(d, precision=precision) for _ in range(3)]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            parts[i % 3].update(x[a:b])
        parts[0].merge(parts[1])
        parts[0].merge(parts[2])
        ref = whole.gram
        scale = np.abs(ref).max()
        for other in (chunked, parts[0]):
            assert other.count == n
            np.testing.assert_allclose(other.gram, ref, rtol=0, atol=1e-13 * scale)
        before = rom_fast.get_num_threads()
        try:
            rom_fast.set_num_threads(1)
            single = rom_fast.GramAccumulator(d, precision=precision)
            for a, b in zip(bounds[:-1], bounds[1:]):
                single.update(x[a:b])
        finally:
            rom_fast.set_num_threads(before)
        if precision == "float64":
            np.testing.assert_allclose(single.gram, ref, rtol=0, atol=1e-13 * scale)
        else:   # OpenBLAS splits ssyrk's sums by thread count: both sides within the bound
            x64 = x.astype(np.float64)
            assert np.all(np.abs(single.gram - ref) <= 2 * float32_gram_tolerance(x64, 1000, 5))


def test_gram_accepts_torch_tensors_without_copy_semantics_change():
    x = torch.randn(100, 64)
    acc_t, acc_n = rom_fast.GramAccumulator(64), rom_fast.GramAccumulator(64)
    acc_t.update(x)
    acc_n.update(x.numpy())
    np.testing.assert_array_equal(acc_t.gram, acc_n.gram)
    acc_t.update(torch.randn(10, 64, dtype=torch.float64, requires_grad=True))
    assert acc_t.count == 110


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_take_gram_hands_over_the_accumulators_own_buffer(precision):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 23)).astype(np.float32)
    acc = rom_fast.GramAccumulator(23, precision=precision)
    acc.update(x)
    expected = acc.gram
    g = acc.take_gram()
    np.testing.assert_array_equal(g, expected)
    np.testing.assert_allclose(g, x.astype(np.float64).T @ x.astype(np.float64), rtol=1e-5, atol=1e-4)
    assert g.flags.writeable and g.flags.c_contiguous and g.dtype == np.float64
    assert acc.taken and acc.count == 50
    np.testing.assert_allclose(acc.column_sum, x.astype(np.float64).sum(0), rtol=1e-12)
    del acc                    # the array owns the buffer: it outlives the accumulator
    g += 1.0
    np.testing.assert_array_equal(g, expected + 1.0)


def test_gram_bad_inputs():
    acc = rom_fast.GramAccumulator(8)
    assert acc.precision == "float64"     # the default keeps the float64 accuracy contract
    with pytest.raises(ValueError, match="dim"):
        rom_fast.GramAccumulator(0)
    with pytest.raises(ValueError, match="precision must be 'float32' or 'float64'"):
        rom_fast.GramAccumulator(8, precision="bfloat16")
    with pytest.raises(ValueError, match="block_rows"):
        rom_fast.GramAccumulator(8, block_rows=0)
    with pytest.raises(TypeError, match="x must have dtype"):
        acc.update(np.ones((3, 8), dtype=np.int64))
    with pytest.raises(TypeError, match="x must have dtype"):
        acc.update(np.ones((3, 8), dtype=np.float16))
    with pytest.raises(TypeError, match="x must have dtype"):
        acc.update(torch.ones(3, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="numpy array or torch"):
        acc.update([[1.0] * 8])
    with pytest.raises(ValueError, match="2-D"):
        acc.update(np.ones(8))
    with pytest.raises(ValueError, match="8 columns"):
        acc.update(np.ones((3, 9)))
    with pytest.raises(ValueError, match="C-contiguous"):
        acc.update(np.ones((8, 6)).T)
    with pytest.raises(ValueError, match="dim mismatch"):
        acc.merge(rom_fast.GramAccumulator(9))
    with pytest.raises(ValueError, match="no tokens"):
        acc.centered_gram()


def test_non_finite_raised_from_openmp_region_leaves_state_unchanged():
    acc = rom_fast.GramAccumulator(16)
    good = np.random.default_rng(1).standard_normal((4000, 16))
    acc.update(good)
    before = acc.gram.copy()
    for bad_value in (np.nan, np.inf):
        bad = good.copy()
        bad[3217, 5] = bad_value  # found by a worker thread of the parallel check
        with pytest.raises(ValueError, match="non-finite value at row 3217, column 5"):
            acc.update(bad)
    assert acc.count == 4000
    np.testing.assert_array_equal(acc.gram, before)


def test_long_chunk_is_checked_whole_before_any_of_it_counts():
    # A long chunk (several float32 staging blocks at d = 576); the bad row is in its last one.
    d = 576
    x = np.random.default_rng(3).standard_normal((15000, d)).astype(np.float32)
    acc = rom_fast.GramAccumulator(d)
    acc.update(x[:10])
    before = acc.gram.copy()
    bad = x.copy()
    bad[14999, 17] = np.nan
    with pytest.raises(ValueError, match="non-finite value at row 14999, column 17"):
        acc.update(bad)
    assert acc.count == 10
    np.testing.assert_array_equal(acc.gram, before)
    acc.update(x)
    x64 = np.concatenate([x[:10], x]).astype(np.float64)
    ref = x64.T @ x64
    b = acc.block_rows
    tol = float32_gram_tolerance(x64, b, 1 + -(-len(x) // b))
    assert np.all(np.abs(acc.gram - ref) <= tol)
    np.testing.assert_allclose(acc.column_sum, x64.sum(0), rtol=1e-12, atol=1e-9)


def test_gil_is_released_during_native_work():
    x = np.random.default_rng(2).standard_normal((20000, 1024))
    acc = rom_fast.GramAccumulator(1024)
    ticks = 0
    done = threading.Event()

    def work():
        acc.update(x)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():  # this loop can only run while the worker has dropped the GIL
        ticks += 1
        time.sleep(0.001)
    t.join()
    assert ticks > 20


# ------------------------------------------------------------------ eigensolver
def sym_with_decay(rng, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.geomspace(1e3, 1e-3, d) * (1 + 0.01 * rng.random(d))
    return (q * lam) @ q.T


@pytest.mark.parametrize("d", [5, 192, 576, 1536])
@pytest.mark.parametrize("method", ["auto", "stedc", "syevd", "syevr"])
def test_top_eigenpairs_match_scipy(d, method):
    rng = np.random.default_rng(d)
    a = sym_with_decay(rng, d)
    a = (a + a.T) / 2
    ref_vals, ref_vecs = scipy.linalg.eigh(a)
    ref_vals, ref_vecs = ref_vals[::-1], ref_vecs[:, ::-1]
    for r in sorted({1, max(1, d // 4), d}):
        vals, vecs = rom_fast.top_eigenpairs(a, r, method=method)
        assert vals.shape == (r,) and vecs.shape == (r, d)
        assert np.all(np.diff(vals) <= 0)
        np.testing.assert_allclose(vals, ref_vals[:r], rtol=1e-10, atol=1e-12 * ref_vals[0])
        np.testing.assert_allclose(vecs @ vecs.T, np.eye(r), atol=1e-10)
        if r < d:
            angles = scipy.linalg.subspace_angles(vecs.T, ref_vecs[:, :r])
            assert angles.max() < 1e-8


@pytest.mark.slow
def test_top_eigenpairs_llama_shape():
    rng = np.random.default_rng(4096)
    d, r = 4096, 512
    x = rng.standard_normal((2 * d, d)) / np.sqrt(1 + np.arange(d))
    a = x.T @ x
    vals, vecs = rom_fast.top_eigenpairs(a, r)
    ref_vals, ref_vecs = scipy.linalg.eigh(a, subset_by_index=[d - r, d - 1])
    np.testing.assert_allclose(vals, ref_vals[::-1], rtol=1e-10)
    assert scipy.linalg.subspace_angles(vecs.T, ref_vecs).max() < 1e-7
    np.testing.assert_allclose(rom_fast.eigenvalues(a)[:r], ref_vals[::-1], rtol=1e-10)


def test_eigen_bad_inputs():
    a = np.eye(4)
    with pytest.raises(ValueError, match="r must be"):
        rom_fast.top_eigenpairs(a, 0)
    with pytest.raises(ValueError, match="r must be"):
        rom_fast.top_eigenpairs(a, 5)
    with pytest.raises(TypeError, match="float64"):
        rom_fast.top_eigenpairs(a.astype(np.float32), 2)
    with pytest.raises(ValueError, match="square"):
        rom_fast.top_eigenpairs(np.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="not symmetric"):
        rom_fast.top_eigenpairs(np.triu(np.ones((4, 4))), 2)
    bad = np.eye(4)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        rom_fast.top_eigenpairs(bad, 2)
    with pytest.raises(ValueError, match="method"):
        rom_fast.top_eigenpairs(a, 2, method="jacobi")
    with pytest.raises(TypeError):
        rom_fast.top_eigenpairs(a, 2.5)


# ------------------------------------------------------------------ factorization
def check_optimal(w, x, f, r, bias=None, centered=False):
    y = x @ w.T + (0 if bias is None else bias)
    approx = (x @ f.w2.T + (0 if f.b2 is None else f.b2)) @ f.w1.T + (0 if f.b1 is None else f.b1)
    err = np.linalg.norm(y - approx)
    target = y - y.mean(0) if centered else y
    opt = optimum_error(target, r)
    assert abs(err - opt) <= 1e-6 * opt, (err, opt)
    # The reported energies agree with the error.
    np.testing.assert_allclose(np.sqrt(max(f.residual_energy, 0.0)), opt, rtol=1e-6)
    return err


@pytest.mark.parametrize("d_out,d_in", SMOL)
def test_factorize_reaches_eckart_young_smollm_shapes(d_out, d_in):
    rng = np.random.default_rng(d_out * 7 + d_in)
    x = activations(rng, 2 * max(d_in, d_out) + 100, d_in)
    w = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    acc = rom_fast.GramAccumulator(d_in)
    acc.update(x)
    r = int(0.46 * d_out * d_in / (d_out + d_in))
    f = rom_fast.factorize(w, acc.gram, r)
    check_optimal(w, x, f, r)
    w1, w2 = f                             # plain layers unpack as (w1, w2)
    assert w1.shape == (d_out, r) and w2.shape == (r, d_in)
    np.testing.assert_allclose(w1.T @ w1, np.eye(r), atol=1e-8)  # W1 = V_rᵀ: orthonormal
    np.testing.assert_allclose(w2, w1.T @ w, atol=1e-10)         # W2 = V_r W
    # The output-Gram route (down_proj's) reaches the same optimum.
    y = x @ w.T
    g = rom_fast.factorize_output_gram(w, y.T @ y, r)
    check_optimal(w, x, g, r)
    np.testing.assert_allclose(g.eigenvalues, f.eigenvalues, rtol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("d_out,d_in,n", [(4096, 4096, 1500), (11008, 4096, 1200), (4096, 11008, 1200)])
def test_factorize_llama7b_shapes_fewer_tokens_than_inputs(d_out, d_in, n):
    """Real 7B shapes; with n < d_in the input Gram is rank-deficient (plain Cholesky fails)."""
    rng = np.random.default_rng(n)
    x = activations(rng, n, d_in)
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    acc = rom_fast.GramAccumulator(d_in)
    acc.update(x)
    r = 600
    f = rom_fast.factorize(w, acc, r)
    assert f.w1.dtype == np.float32 and f.w2.dtype == np.float32
    exact = rom_fast.factorize(w.astype(np.float64), acc, r)
    check_optimal(w.astype(np.float64), x, exact, r)
    # The float32 result is the float64 one rounded.
    np.testing.assert_allclose(f.w2, exact.w2, rtol=0, atol=1e-6 * np.abs(exact.w2).max())


def test_float32_weight_widened_in_row_bands_matches_float64():
    """d_out = 2500 spans three 1024-row widening bands (the last one partial), both routes."""
    rng = np.random.default_rng(11)
    d_out, d_in, r = 2500, 48, 20
    x = activations(rng, 300, d_in)
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    w64 = w.astype(np.float64)
    acc = rom_fast.GramAccumulator(d_in)
    acc.update(x)
    y = x @ w64.T
    for f32, f64 in [(rom_fast.factorize(w, acc, r), rom_fast.factorize(w64, acc, r)),
                     (rom_fast.factorize_output_gram(w, y.T @ y, r),
                      rom_fast.factorize_output_gram(w64, y.T @ y, r))]:
        np.testing.assert_allclose(f32.w2, f64.w2, rtol=0, atol=1e-6 * np.abs(f64.w2).max())
        np.testing.assert_allclose(f32.w1, f64.w1, rtol=0, atol=1e-6 * np.abs(f64.w1).max())


def test_factorize_dead_channels_and_rank_above_data_rank():
    rng = np.random.default_rng(3)
    d_in, d_out = 64, 96
    x = activations(rng, 40, d_in, dead=range(10, 30))   # rank 40 data, 20 dead channels
    w = rng.standard_normal((d_out, d_in))
    acc = rom_fast.GramAccumulator(d_in)
    acc.update(x)
    f = rom_fast.factorize(w, acc, 20)
    check_optimal(w, x, f, 20)
    # More rank than the data has: the fit is exact on the data.
    g = rom_fast.factorize(w, acc, 50)
    y = x @ w.T
    assert np.linalg.norm(y - x @ g.w2.T @ g.w1.T) <= 1e-9 * np.linalg.norm(y)
    # All-zero inputs: nothing to fit, zero factors, no crash.
    z = rom_fast.GramAccumulator(d_in)
    z.update(np.zeros((5, d_in)))
    h = rom_fast.factorize(w, z, 8)
    assert h.total_energy == 0 and not np.any(h.w1)


def test_factorize_bias_is_fitted_exactly():
    rng = np.random.default_rng(5)
    d_in, d_out, r = 48, 32, 8
    x = activations(rng, 500, d_in) + 0.5
    w, b = rng.standard_normal((d_out, d_in)), 3.0 * rng.standard_normal(d_out)
    acc = rom_fast.GramAccumulator(d_in)
    acc.update(x)
    f = rom_fast.factorize(w, acc, r, bias=b)
    assert f.b1 is None and f.b2.shape == (r,)
    check_optimal(w, x, f, r, bias=b)
    with pytest.raises(TypeError, match="biases"):
        w1, w2 = f
    y = x @ w.T + b
    g = rom_fast.factorize_output_gram(w, y.T @ y, r, bias=b)
    check_optimal(w, x, g, r, bias=b)


@pytest.mark.parametrize("with_bias", [False, True])
def test_centered_is_the_optimal_affine_fit(with_bias):
    rng = np.random.default_rng(6)
    d_in, d_out, r = 40, 56, 10
    x = activations(rng, 800, d_in) + rng.standard_normal(d_in)
    w = rng.standard_normal((d_out, d_in))
    b = rng.standard_normal(d_out) if with_bias else None
    acc = rom_fast.GramAccumulator(d_in)
    acc.update(x)
    f = rom_fast.factorize(w, acc, r, centered=True, bias=b)
    assert f.b1.shape == (d_out,) and f.b2 is None
    check_optimal(w, x, f, r, bias=b, centered=True)
    y = x @ w.T + (0 if b is None else b)
    out = rom_fast.GramAccumulator(d_out)
    out.update(y)
    g = rom_fast.factorize_output_gram(w, out, r, centered=True, bias=b)
    check_optimal(w, x, g, r, bias=b, centered=True)


def test_shared_input_factor_and_spectrum():
    rng = np.random.default_rng(7)
    d_in = 96
    x = activations(rng, 1000, d_in)
    acc = rom_fast.GramAccumulator(d_in)
    acc.update(x)
    factor = rom_fast.input_factor(acc)
    assert factor.rank == d_in and factor.dim == d_in
    for d_out in (32, 96, 200):   # q/k/v-like layers sharing one factor
        w = rng.standard_normal((d_out, d_in))
        f = rom_fast.factorize(w, factor, 16)
        check_optimal(w, x, f, 16)
        spec = rom_fast.output_spectrum(w, factor)
        ref = np.linalg.svd(x @ w.T, compute_uv=False) ** 2
        np.testing.assert_allclose(spec, ref[: spec.size], rtol=1e-8, atol=1e-10 * ref[0])
        # A float32 weight is read as it is: the spectrum of exactly that weight, in float64.
        w32 = w.astype(np.float32)
        spec32 = rom_fast.output_spectrum(w32, factor)
        ref32 = np.linalg.svd(x @ w32.astype(np.float64).T, compute_uv=False) ** 2
        np.testing.assert_allclose(spec32, ref32[: spec32.size], rtol=1e-8, atol=1e-10 * ref32[0])
    with pytest.raises(ValueError, match="centered"):
        rom_fast.factorize(w, factor, 4, centered=True)


def test_factorize_bad_inputs():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 5))
    g = np.eye(5)
    with pytest.raises(ValueError, match="rank must be"):
        rom_fast.factorize(w, g, 0)
    with pytest.raises(ValueError, match="rank must be"):
        rom_fast.factorize(w, g, 6)
    with pytest.raises(ValueError, match="does not match"):
        rom_fast.factorize(w, np.eye(4), 2)
    with pytest.raises(TypeError, match="weight must have dtype"):
        rom_fast.factorize(w.astype(np.int32), g, 2)
    with pytest.raises(TypeError, match="gram must have dtype float64"):
        rom_fast.factorize(w, g.astype(np.float32), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        rom_fast.factorize(np.asfortranarray(w), g, 2)
    with pytest.raises(ValueError, match="not symmetric"):
        rom_fast.factorize(w, np.triu(np.ones((5, 5))), 2)
    bad = w.copy()
    bad[2, 2] = np.inf
    with pytest.raises(ValueError, match="weight has a non-finite"):
        rom_fast.factorize(bad, g, 2)
    with pytest.raises(ValueError, match="colsum and count"):
        rom_fast.factorize(w, g, 2, bias=np.zeros(6))
    with pytest.raises(ValueError, match="bias must have length 6"):
        rom_fast.factorize(w, g, 2, bias=np.zeros(5), colsum=np.zeros(5), count=3)
    with pytest.raises(TypeError, match="bias must have dtype float64"):
        rom_fast.factorize(w, g, 2, bias=np.zeros(6, np.float32), colsum=np.zeros(5), count=3)
    with pytest.raises(ValueError, match="gram_out must be"):
        rom_fast.factorize_output_gram(w, np.eye(5), 2)
    with pytest.raises(TypeError, match="CPU"):
        rom_fast.factorize(torch.zeros(6, 5, device="meta"), g, 2)


# ------------------------------------------------------------------ low-rank apply
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_lowrank_apply_matches_numpy(dtype, tol):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((33, 576)).astype(dtype)
    w1 = rng.standard_normal((1536, 64)).astype(dtype)
    w2 = rng.standard_normal((64, 576)).astype(dtype)
    b1 = rng.standard_normal(1536).astype(dtype)
    ref = (x.astype(np.float64) @ w2.T.astype(np.float64)) @ w1.T.astype(np.float64) + b1
    y = rom_fast.lowrank_apply(x, w1, w2, b1)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol * np.abs(ref).max())
    y0 = rom_fast.lowrank_apply(torch.from_numpy(x), w1, w2)
    np.testing.assert_allclose(y0, ref - b1, rtol=0, atol=tol * np.abs(ref).max())
    with pytest.raises(TypeError, match="w1 must have dtype"):
        rom_fast.lowrank_apply(x, w1.astype(np.float16), w2)
    with pytest.raises(ValueError, match="w2 must be"):
        rom_fast.lowrank_apply(x, w1, w2[:, :10].copy())
