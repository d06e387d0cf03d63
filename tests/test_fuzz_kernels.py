"""Property-based fuzzing (hypothesis) of the native kernels through their Python bindings.

Random shapes (0 and 1 included), every dtype (float16, int, bool, complex, object, big-endian),
C/Fortran/strided/transposed/unaligned numpy arrays and torch tensors, NaN/Inf, huge and
negative ranks. Every case ends in the float64 numpy answer or a ValueError/TypeError, never
a crash, another exception or wrong numbers: valid input must give the right result, invalid
input must be refused. Concurrent calls from several Python threads must give the serial
results.

Bounded and seeded in the default suite (derandomized). A longer run:
    ROM_FAST_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz_kernels.py -q --hypothesis-show-statistics
(with a number set the examples are random, not derandomized: each run explores new cases).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rom_fast
from rom_fast import kernels

_LONG = os.environ.get("ROM_FAST_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_LONG or 40), derandomize=_LONG is None, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REFUSED = (ValueError, TypeError)

DTYPES = ["float64", "float32", "float16", "int64", "int32", "uint8", "bool", "complex128", "object", ">f8", "<f4"]
LAYOUTS = ["C", "C", "C", "F", "strided", "transposed", "unaligned", "torch", "torch-strided", "list"]
POISON = [None, None, None, "nan", "inf", "-inf"]


class Case:
    """A drawn array: the values as float64 (the reference sees these) and what is passed."""

    def __init__(self, values: np.ndarray, dtype: str, layout: str, poison):
        self.values, self.dtype, self.layout, self.poison = values, dtype, layout, poison
        self.arg = _build(values, dtype, layout)

    @property
    def valid(self) -> bool:
        """What the bindings accept: a float32/float64 C-contiguous numpy array or torch CPU tensor."""
        return self.dtype in ("float64", "float32", "<f4") and _contiguous_anyway(self.arg)

    @property
    def kind(self) -> str:
        return {"<f4": "float32"}.get(self.dtype, self.dtype)

    @property
    def finite(self) -> bool:
        return self.poison is None or self.values.size == 0

    @property
    def as_f64(self) -> np.ndarray:
        """What the kernel reads, widened: float32 inputs are rounded first."""
        v = self.values.astype(np.float32) if self.dtype in ("float32", "<f4") else self.values
        return v.astype(np.float64)


def _contiguous_anyway(arg) -> bool:
    if isinstance(arg, torch.Tensor):
        return arg.is_contiguous()
    return isinstance(arg, np.ndarray) and arg.flags.c_contiguous


def _build(values: np.ndarray, dtype: str, layout: str):
    if layout == "list":
        return values.tolist()
    if layout.startswith("torch"):
        tdtype = {"float64": torch.float64, "float32": torch.float32, "<f4": torch.float32,
                  "float16": torch.float16, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
                  "bool": torch.bool, "complex128": torch.complex128}.get(dtype, torch.bfloat16)
        if layout == "torch-strided" and values.ndim == 2:
            wide = torch.zeros(values.shape[0], 2 * values.shape[1], dtype=torch.float64)
            wide[:, ::2] = torch.from_numpy(values)
            return wide[:, ::2].to(tdtype) if tdtype != torch.float64 else wide[:, ::2]
        return torch.from_numpy(np.ascontiguousarray(values)).to(tdtype)
    with np.errstate(invalid="ignore"):          # NaN/Inf cast to int: garbage, refused anyway
        a = values.astype(dtype)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "transposed":
        return np.ascontiguousarray(a.T).T
    if layout == "strided":
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype) if a.ndim else a
        if a.ndim:
            wide[..., ::2] = a
            return wide[..., ::2]
        return a
    if layout == "unaligned" and a.dtype.kind == "f" and a.dtype.isnative:
        buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
        out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
        out[...] = a
        return out
    return a


@st.composite
def cases(draw, shape):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    poison = draw(st.sampled_from(POISON)) if values.size else None
    if poison is not None:
        values.flat[draw(st.integers(0, values.size - 1))] = float(poison)
    return Case(values, draw(st.sampled_from(DTYPES)), draw(st.sampled_from(LAYOUTS)), poison)


dims = st.integers(0, 6)
ranks = st.integers(-3, 8) | st.sampled_from([-2**63, 2**62, 2**63 - 1, 2**64, 10**30])


def _expect(valid: bool, call):
    """Runs ``call``: valid input must succeed (returns the result), invalid input must be
    refused with ValueError/TypeError (returns None). Anything else fails the test."""
    if valid:
        return call()
    with pytest.raises(REFUSED):
        call()
    return None


def _close(a, b, scale, tol=1e-7):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.abs(a - b) <= tol * max(1.0, scale)), np.max(np.abs(a - b))


def _psd(case: Case):
    """A Gram-like symmetric matrix from a case's values (d x d from an n x d draw)."""
    x = case.as_f64
    return x.T @ x


# -- GramAccumulator ---------------------------------------------------------------------------
@FUZZ
@given(d=st.integers(-2, 6), chunks=st.lists(st.tuples(dims, st.integers(-1, 1)), min_size=1, max_size=3),
       data=st.data())
def test_gram_accumulator(d, chunks, data):
    if d < 1:
        with pytest.raises(REFUSED):
            rom_fast.GramAccumulator(d)
        return
    acc = rom_fast.GramAccumulator(d)
    gram, colsum, count = np.zeros((d, d)), np.zeros(d), 0
    f32 = False                       # a float32 chunk went in (it may be multiplied in float32)
    for n, width_change in chunks:
        c = data.draw(cases((n, max(0, d + width_change))))
        ok = c.valid and c.finite and width_change == 0
        _expect(ok, lambda: acc.update(c.arg))
        if ok:
            f32 = f32 or c.kind == "float32"
            x = c.as_f64
            gram, colsum, count = gram + x.T @ x, colsum + x.sum(0), count + n
        # A refused chunk commits nothing: the accumulator still holds the earlier chunks.
        scale = float(np.abs(gram).max(initial=0))
        # float32 chunks may be multiplied in float32 (GramAccumulator's precision option).
        _close(acc.gram, gram, scale, 1e-6 if f32 else 1e-10)
        _close(acc.column_sum, colsum, float(np.abs(colsum).max(initial=0)), 1e-10)
        assert acc.count == count


@FUZZ
@given(d=st.integers(1, 5), data=st.data())
def test_gram_merge_and_centered(d, data):
    a, b = rom_fast.GramAccumulator(d), rom_fast.GramAccumulator(d)
    xa = np.random.default_rng(data.draw(st.integers(0, 99))).standard_normal((data.draw(dims) + 1, d))
    xb = np.random.default_rng(data.draw(st.integers(0, 99))).standard_normal((data.draw(dims) + 1, d))
    a.update(xa)
    b.update(xb)
    a.merge(b)
    x = np.vstack([xa, xb])
    _close(a.gram, x.T @ x, float(np.abs(x.T @ x).max()), 1e-12)
    xc = x - x.mean(0)
    _close(a.centered_gram(), xc.T @ xc, float(np.abs(x.T @ x).max()), 1e-10)
    with pytest.raises(REFUSED):
        a.merge(rom_fast.GramAccumulator(d + 1))
    with pytest.raises(REFUSED):
        a.merge(np.eye(d))


# -- eigensolvers ----------------------------------------------------------------------------
@FUZZ
@given(d=dims, r=ranks, method=st.sampled_from(["auto", "stedc", "syevd", "syevr", "bogus"]), data=st.data())
def test_top_eigenpairs(d, r, method, data):
    c = data.draw(cases((d, d)))
    sym = c.as_f64 + c.as_f64.T                      # symmetric when valid (poison stays poison)
    c.values = sym
    c.arg = _build(sym, c.dtype, c.layout)
    valid = c.valid and c.finite and c.dtype not in ("float32", "<f4") and d >= 1 and 1 <= r <= d \
        and method != "bogus"
    out = _expect(valid, lambda: rom_fast.top_eigenpairs(c.arg, r, method))
    if out is None:
        return
    values, vectors = out
    ref = np.linalg.eigvalsh(sym)[::-1][:r]
    scale = float(np.abs(sym).max(initial=0))
    _close(values, ref, scale, 1e-9)
    assert vectors.shape == (r, d)
    _close(vectors @ vectors.T, np.eye(r), 1.0, 1e-8)
    _close(vectors @ sym, values[:, None] * vectors, scale, 1e-8)


@FUZZ
@given(d=dims, data=st.data())
def test_eigenvalues(d, data):
    c = data.draw(cases((d, d)))
    sym = c.as_f64 + c.as_f64.T
    c.values, c.arg = sym, _build(sym, c.dtype, c.layout)
    valid = c.valid and c.finite and c.dtype not in ("float32", "<f4") and d >= 1
    out = _expect(valid, lambda: rom_fast.eigenvalues(c.arg))
    if out is not None:
        _close(out, np.linalg.eigvalsh(sym)[::-1], float(np.abs(sym).max(initial=0)), 1e-9)


def test_non_symmetric_and_non_square_are_refused():
    for bad in (np.triu(np.ones((3, 3))), np.ones((2, 3)), np.ones(3), np.ones((1, 1, 1))):
        with pytest.raises(ValueError):
            rom_fast.eigenvalues(bad)
        with pytest.raises(ValueError):
            rom_fast.top_eigenpairs(bad, 1)


# -- factorization ---------------------------------------------------------------------------
def _reference(w, x, b, centered):
    """Eigenvalues (descending) of the output second moment the factorization diagonalizes."""
    y = x @ w.T + (0 if b is None else b)
    if centered:
        y = y - y.mean(0)
    return np.linalg.eigvalsh(y.T @ y)[::-1], y


@FUZZ
@given(d_out=dims, d_in=dims, n=st.integers(1, 12), r=ranks, with_bias=st.booleans(), centered=st.booleans(),
       route=st.sampled_from(["accumulator", "gram", "factor"]), data=st.data())
def test_factorize(d_out, d_in, n, r, with_bias, centered, route, data):
    wc = data.draw(cases((d_out, d_in)))
    bc = data.draw(cases((d_out,))) if with_bias else None
    x = np.random.default_rng(data.draw(st.integers(0, 999))).standard_normal((n, max(d_in, 1)))[:, :d_in]
    acc = rom_fast.GramAccumulator(max(d_in, 1))
    if d_in >= 1:
        acc.update(x)
    w_float = wc.kind in ("float64", "float32")
    b_ok = bc is None or (bc.valid and bc.finite and bc.kind == wc.kind)
    valid = wc.valid and wc.finite and w_float and b_ok and d_out >= 1 and d_in >= 1 and 1 <= r <= min(d_out, d_in)

    def call():
        bias = None if bc is None else bc.arg
        if route == "accumulator":
            return rom_fast.factorize(wc.arg, acc, r, bias=bias, centered=centered)
        if route == "gram":
            return rom_fast.factorize(wc.arg, acc.gram, r, bias=bias, centered=centered,
                                      colsum=acc.column_sum, count=float(acc.count))
        f = rom_fast.input_factor(acc, centered=centered, with_bias=bias is not None and not centered)
        return rom_fast.factorize(wc.arg, f, r, bias=bias, centered=centered)

    f = _expect(valid, call)
    if f is None:
        return
    w = wc.as_f64
    b = None if bc is None else bc.as_f64
    ref, y = _reference(w, x, b, centered)
    scale = float(ref[0]) if ref.size else 1.0
    tol = 1e-4 if wc.dtype != "float64" else 1e-8       # float32 factors are rounded to float32
    _close(f.eigenvalues, ref[:r], scale, tol)
    _close(f.total_energy, ref.sum(), scale, tol)
    assert f.w1.shape == (d_out, r) and f.w2.shape == (r, d_in)
    assert f.w1.dtype == f.w2.dtype == (np.float64 if wc.dtype == "float64" else np.float32)
    # The factors reproduce the fit: squared error on the tokens = total energy - kept energy.
    approx = x @ f.w2.T.astype(np.float64)
    if f.b2 is not None:
        approx = approx + f.b2
    approx = approx @ f.w1.T.astype(np.float64)
    if f.b1 is not None:
        approx = approx + f.b1
    exact = x @ w.T + (0 if b is None else b)
    err = float(((exact - approx) ** 2).sum())
    assert abs(err - (ref.sum() - ref[:r].sum())) <= 10 * tol * max(1.0, float(ref.sum()))


@FUZZ
@given(d_out=dims, d_in=dims, r=ranks, data=st.data())
def test_factorize_output_gram(d_out, d_in, r, data):
    wc = data.draw(cases((d_out, d_in)))
    gc = data.draw(cases((d_out + data.draw(st.integers(0, 1)), d_out)))
    g = _psd(gc)
    gc.values, gc.arg = g, _build(g, gc.dtype, gc.layout)
    valid = wc.valid and wc.finite and wc.dtype in ("float64", "float32", "<f4") and gc.valid and gc.finite \
        and gc.dtype == "float64" and g.shape == (d_out, d_out) and d_out >= 1 and d_in >= 1 \
        and 1 <= r <= min(d_out, d_in)
    f = _expect(valid, lambda: rom_fast.factorize_output_gram(wc.arg, gc.arg, r))
    if f is None:
        return
    ref = np.linalg.eigvalsh(g)[::-1]
    tol = 1e-4 if wc.dtype != "float64" else 1e-8
    _close(f.eigenvalues, ref[:r], float(ref[0]), tol)
    assert f.w1.shape == (d_out, r) and f.w2.shape == (r, d_in)
    _close(f.w2, f.w1.T @ wc.as_f64, float(np.abs(wc.as_f64).max()), tol)   # w2 = V_r W


@FUZZ
@given(d_out=dims, d_in=dims, n=st.integers(1, 12), data=st.data())
def test_output_spectrum(d_out, d_in, n, data):
    wc = data.draw(cases((d_out, d_in)))
    x = np.random.default_rng(data.draw(st.integers(0, 999))).standard_normal((n, max(d_in, 1)))
    factor = rom_fast.input_factor(x.T @ x)
    valid = wc.valid and wc.finite and wc.dtype in ("float64", "float32", "<f4") and d_out >= 1 \
        and d_in == max(d_in, 1)
    out = _expect(valid, lambda: rom_fast.output_spectrum(wc.arg, factor))
    if out is None:
        return
    ref, _ = _reference(wc.as_f64, x, None, False)
    k = len(out)
    assert 1 <= k <= d_out
    _close(out, ref[:k], float(ref[0]), 1e-4 if wc.dtype != "float64" else 1e-8)
    assert float(ref[k:].sum()) <= 1e-6 * max(1.0, float(ref.sum()))   # nothing dropped


@FUZZ
@given(n=dims, d_in=dims, d_out=dims, r=dims, with_b1=st.booleans(), data=st.data())
def test_lowrank_apply(n, d_in, d_out, r, with_b1, data):
    xc, w1c, w2c = data.draw(cases((n, d_in))), data.draw(cases((d_out, r))), data.draw(cases((r, d_in)))
    b1c = data.draw(cases((d_out,))) if with_b1 else None
    parts = [xc, w1c, w2c] + ([b1c] if b1c else [])
    kind = xc.kind
    same = all(p.kind == kind for p in parts)
    valid = all(p.valid for p in parts) and same and all(p.finite for p in parts[1:]) \
        and min(d_in, d_out, r) >= 1 and (xc.finite or n == 0)
    try:
        out = rom_fast.lowrank_apply(xc.arg, w1c.arg, w2c.arg, None if b1c is None else b1c.arg)
    except REFUSED:
        # n = 0 and a NaN in x are not errors of the kernel's contract: either is fine refused.
        assert not valid or n == 0, "valid input refused"
        return
    assert all(p.valid for p in parts) and same and min(d_in, d_out, r) >= 1, "invalid input accepted"
    ref = xc.as_f64 @ w2c.as_f64.T @ w1c.as_f64.T + (0 if b1c is None else b1c.as_f64)
    assert out.shape == (n, d_out)
    if xc.finite and all(p.finite for p in parts[1:]):
        _close(out, ref, float(np.abs(ref).max(initial=0)), 1e-4 if kind == "float32" else 1e-10)


# -- concurrency -----------------------------------------------------------------------------
def _run_threads(fn, n_threads=4):
    errors, results = [], [None] * n_threads
    barrier = threading.Barrier(n_threads)

    def body(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:      # collected and re-raised on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_calls_from_python_threads_give_the_serial_results():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((300, 48)) for _ in range(4)]
    ws = [rng.standard_normal((40, 48)) for _ in range(4)]

    def work(i):
        acc = rom_fast.GramAccumulator(48)
        for _ in range(5):
            acc.update(xs[i])
        f = rom_fast.factorize(ws[i], acc, 12)
        vals, _ = rom_fast.top_eigenpairs(acc.gram, 8)
        apply = rom_fast.lowrank_apply(xs[i], f.w1, f.w2)
        try:
            rom_fast.factorize(ws[i], acc, 1000)
        except ValueError:
            pass
        return acc.gram, f.w1, f.w2, vals, apply

    serial = [work(i) for i in range(4)]
    for _ in range(2):
        for got, want in zip(_run_threads(work), serial):
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)


def test_one_accumulator_updated_from_several_threads_counts_every_chunk():
    rng = np.random.default_rng(1)
    chunks = [rng.standard_normal((200, 32)) for _ in range(4)]
    acc = rom_fast.GramAccumulator(32)
    other = rom_fast.GramAccumulator(32)
    other.update(chunks[0])

    def work(i):
        for _ in range(10):
            acc.update(chunks[i])
            if i == 0:
                acc.merge(other)
            _ = acc.gram, acc.count

    _run_threads(work)
    x = np.vstack([c for c in chunks for _ in range(10)] + [chunks[0]] * 10)
    assert acc.count == x.shape[0]
    _close(acc.gram, x.T @ x, float(np.abs(x.T @ x).max()), 1e-12)


def test_absurd_accumulator_sizes_are_refused_without_allocating():
    for dim in (2**40, 2**62, -1, 0):
        with pytest.raises((ValueError, MemoryError)):
            kernels.GramAccumulator(dim)
    with pytest.raises(TypeError):
        kernels.GramAccumulator(2**64)


def test_tensors_with_lazy_negation_are_read_as_their_values():
    sym = torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    negated = torch._neg_view(sym)            # what some torch ops return: a negative-bit view
    np.testing.assert_allclose(rom_fast.eigenvalues(negated), [-1.0, -2.0, -3.0])
