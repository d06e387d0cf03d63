"""Python face of the native core: statistics, eigensolvers and layer factorization.

Every function accepts numpy arrays or torch CPU tensors (viewed without a copy) and refuses
wrong dtypes, shapes or non-contiguous memory with a TypeError/ValueError naming the argument.
Native work runs with the GIL released.
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from rom_fast._arrays import as_array, as_optional
from rom_fast._native import _core

LapackError = _core.LapackError
InputFactor = _core.InputFactor
AnchorCorrection = _core.AnchorCorrection
set_num_threads = _core.set_num_threads
get_num_threads = _core.get_num_threads

# Grams at least this wide multiply float32 activations in float32 blocks (ssyrk, accumulated in
# float64; error <= ~6e-5 of sum|x_i||x_j| per element, measured ~1e-7): 1.56x/1.95x/1.70x
# torch's float32 X^T X at d = 1536/4096/11008, but 0.62x at 576 (bench/README.md, "Gram").
FLOAT32_GRAM_MIN_DIM = 1536
GRAM_PRECISIONS = ("auto", "float32", "float64")


def resolve_gram_precision(precision: str, dim: int) -> str:
    """The GramAccumulator precision of a ``dim``-column Gram under a ``gram_precision`` option:
    "auto" is "float32" from FLOAT32_GRAM_MIN_DIM columns up and "float64" below; "float32"
    and "float64" are taken as they are."""
    if precision not in GRAM_PRECISIONS:
        raise ValueError(f"gram_precision must be 'auto', 'float32' or 'float64', got {precision!r}")
    if precision == "auto":
        return "float32" if dim >= FLOAT32_GRAM_MIN_DIM else "float64"
    return precision


class GramAccumulator(_core.GramAccumulator):
    """Streaming ``XᵀX`` (float64), column sum and token count over row-major chunks.

    ``update(x)`` takes an ``n × dim`` float32/float64 array or tensor; ``merge(other)`` adds
    another accumulator; ``gram``, ``column_sum``, ``count`` and ``centered_gram()`` read it.
    ``precision`` is how float32 chunks are multiplied: "float64" (default; widened exactly,
    ``dsyrk``) or "float32" (``ssyrk`` over blocks of at most ``block_rows`` rows of one chunk,
    each block added into the float64 Gram: per element
    ``|error| <= (block_rows·2⁻²⁴ + blocks·2⁻⁵³)·Σ|x_i||x_j|``; 1.6-2× torch's float32
    ``X.T @ X`` at d >= 1536, bench/README.md). float64 chunks, column sums and the finiteness
    check are always exact float64.
    """

    def __init__(self, dim: int, label: str = "", *, precision: str = "float64",
                 block_rows: int = _core.GramAccumulator.DEFAULT_BLOCK_ROWS):
        super().__init__(dim, precision, block_rows)
        self.label = label    # what the rows are, e.g. "outputs of model.layers.5.mlp.down_proj"
        # The core releases the GIL and one accumulator is not safe to update from two threads
        # at once: calls on one object from several Python threads are serialized here.
        self._lock = threading.RLock()

    def update(self, x) -> None:
        with self._lock:
            try:
                super().update(as_array(x, "x"))
            except ValueError as exc:
                if not self.label or "non-finite" not in str(exc):
                    raise
                # Name the layer, not just a row of one chunk: which block overflowed is the clue.
                raise ValueError(f"{self.label}: {exc} (the activations overflowed or the weights hold "
                                 "NaN/Inf; with float16 activations try bfloat16 or float32)") from None

    def merge(self, other) -> None:
        locks = sorted({id(self): self._lock, id(other): getattr(other, "_lock", self._lock)}.items())
        with contextlib.ExitStack() as stack:        # both objects, in one global order: no deadlock
            for _, lock in locks:
                stack.enter_context(lock)
            super().merge(other)

    def reset(self) -> None:
        with self._lock:
            super().reset()

    def centered_gram(self) -> np.ndarray:
        with self._lock:
            return super().centered_gram()

    @property
    def gram(self) -> np.ndarray:
        with self._lock:
            return _core.GramAccumulator.gram.__get__(self)

    def take_gram(self) -> np.ndarray:
        """The full Gram, handed over without a copy (the accumulator's own buffer: the caller
        then holds the only d x d). The accumulator is spent: updating or reading its Gram
        again raises RuntimeError until ``reset()``; ``count`` and ``column_sum`` stay."""
        with self._lock:
            return super().take_gram()

    @property
    def column_sum(self) -> np.ndarray:
        with self._lock:
            return _core.GramAccumulator.column_sum.__get__(self)

    @property
    def count(self) -> int:
        with self._lock:
            return _core.GramAccumulator.count.__get__(self)


def top_eigenpairs(sym, r: int, method: str = "auto"):
    """The ``r`` largest eigenpairs of a symmetric float64 matrix.

    Returns ``(values, vectors)``: values descending (r,), vectors ``r × dim`` (row i is the
    unit eigenvector of values[i]). ``method``: "auto", "stedc" (divide and conquer,
    back-transforming only the r kept vectors), "syevd" (LAPACK's driver, all vectors) or
    "syevr" (LAPACK's subset driver).
    """
    return _core.top_eigenpairs(as_array(sym, "sym"), r, method)


def eigenvalues(sym) -> np.ndarray:
    """All eigenvalues of a symmetric float64 matrix, descending."""
    return _core.eigenvalues(as_array(sym, "sym"))


@dataclass(frozen=True)
class Factorization:
    """A layer ``y = W x (+ b)`` replaced by ``y ≈ w1 (w2 x + b2) + b1``.

    ``w1`` is ``d_out × r`` (= V_rᵀ), ``w2`` is ``r × d_in`` (= V_r W); ``b2`` (= V_r b) comes
    from an uncentred layer with a bias, ``b1`` from centred statistics. ``eigenvalues`` are the
    r kept eigenvalues of the output second moment, ``total_energy`` its trace: the squared fit
    error on the calibration tokens is ``total_energy - eigenvalues.sum()``. ``eigen_seconds``
    is the wall time the call spent in the eigensolver (the rest is matrix products).
    Unpacks as ``w1, w2 = f`` only when there is no bias to lose.
    """

    w1: np.ndarray
    w2: np.ndarray
    b1: Optional[np.ndarray]
    b2: Optional[np.ndarray]
    eigenvalues: np.ndarray
    total_energy: float
    eigen_seconds: float = 0.0

    @property
    def rank(self) -> int:
        return self.w2.shape[0]

    def astype(self, dtype) -> "Factorization":
        """The same factors (and biases) in the numpy ``dtype``; the spectrum stays float64."""
        cast = lambda a: None if a is None else a.astype(dtype, copy=False)  # noqa: E731
        return dataclasses.replace(self, w1=cast(self.w1), w2=cast(self.w2), b1=cast(self.b1), b2=cast(self.b2))

    @property
    def residual_energy(self) -> float:
        return float(self.total_energy - self.eigenvalues.sum())

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.b1 is not None or self.b2 is not None:
            raise TypeError("this factorization has biases: read .w1, .w2, .b1, .b2 instead of unpacking")
        return iter((self.w1, self.w2))


def _result(raw: dict, dtype) -> Factorization:
    return Factorization(raw["w1"], raw["w2"], raw["b1"], raw["b2"], raw["eigenvalues"],
                         float(raw["total_energy"]), float(raw["eigen_seconds"])).astype(dtype)


def input_factor(stats, *, centered: bool = False, with_bias: bool = False,
                 colsum=None, count: Optional[float] = None) -> InputFactor:
    """Factor of a layer input's statistics, computed once and shared by the layers reading it.

    ``stats`` is a GramAccumulator (which carries colsum and count) or a float64 Gram matrix
    (then ``colsum`` and ``count`` are needed for centred or biased layers).
    """
    if isinstance(stats, _core.GramAccumulator):
        gram, colsum, count = stats.gram, stats.column_sum, float(stats.count)
    else:
        gram = as_array(stats, "gram_in")
        colsum = as_optional(colsum, "colsum")
        if (centered or with_bias) and (colsum is None or count is None):
            raise ValueError("centred or biased factorization needs colsum and count "
                             "(or pass a GramAccumulator)")
    return InputFactor(gram, colsum, 0.0 if count is None else float(count), centered, with_bias)


def factorize(weight, gram_in: Union[np.ndarray, GramAccumulator, InputFactor], rank: int, *,
              centered: bool = False, bias=None, colsum=None, count: Optional[float] = None,
              method: str = "auto") -> Factorization:
    """Best rank-``rank`` replacement of the linear layer ``weight`` (d_out × d_in).

    ``gram_in``: the layer inputs' Gram ``XᵀX`` (float64 d_in × d_in), a GramAccumulator, or a
    precomputed :func:`input_factor` (shared by q/k/v or gate/up). Uncentred (default) gives
    the optimal rank-r linear fit of ``W X``; ``centered=True`` the optimal affine fit (its
    constant goes into ``b1``). A layer ``bias`` is fitted exactly (it becomes ``b2``).
    Factors come back in the weight's dtype.
    """
    w = as_array(weight, "weight")
    b = as_optional(bias, "bias")
    if isinstance(gram_in, InputFactor):
        factor = gram_in
        if factor.centered != centered:
            raise ValueError(f"the input factor was built with centered={factor.centered}, "
                             f"but centered={centered} was asked")
    else:
        factor = input_factor(gram_in, centered=centered, with_bias=b is not None and not centered,
                              colsum=colsum, count=count)
    raw = _core.factorize_layer(w, factor, rank, b, method)
    return _result(raw, w.dtype)


def factorize_output_gram(weight, gram_out, rank: int, *, centered: bool = False, bias=None,
                          colsum_out=None, count: Optional[float] = None,
                          method: str = "auto") -> Factorization:
    """The same fit from the Gram of the layer's outputs ``YᵀY`` (d_out × d_out).

    The cheap route when d_in > d_out (down_proj): the output Gram is accumulated from the
    forward pass that is run anyway. ``gram_out`` may be a GramAccumulator over the outputs.
    """
    w = as_array(weight, "weight")
    if isinstance(gram_out, _core.GramAccumulator):
        gram, colsum_out, count = gram_out.gram, gram_out.column_sum, float(gram_out.count)
    else:
        gram = as_array(gram_out, "gram_out")
        colsum_out = as_optional(colsum_out, "colsum_out")
        if centered and (colsum_out is None or count is None):
            raise ValueError("centred factorization needs colsum_out and count (or pass a GramAccumulator)")
    raw = _core.factorize_layer_output_gram(w, gram, rank, as_optional(bias, "bias"), colsum_out,
                                            0.0 if count is None else float(count), centered, method)
    return _result(raw, w.dtype)


def output_spectrum(weight, factor: InputFactor, bias=None) -> np.ndarray:
    """All nonzero-capable eigenvalues of the layer's output second moment, descending.

    ``sum(values[r:])`` is the exact squared error of the rank-r fit: what a rank planner needs.
    ``weight`` (and ``bias``) float32 or float64; the arithmetic is float64 either way.
    """
    return _core.output_spectrum(as_array(weight, "weight"), factor, as_optional(bias, "bias"))


def lowrank_apply(x, w1, w2, b1=None) -> np.ndarray:
    """``y = w1 (w2 x) + b1`` for every row x of ``x`` (n × d_in), as a C++ server runs it."""
    return _core.lowrank_apply(as_array(x, "x"), as_array(w1, "w1"), as_array(w2, "w2"),
                               as_optional(b1, "b1"))


class CrossGramAccumulator(_core.CrossGramAccumulator):
    """Streaming cross moment ``X_dᵀ X_c`` (float64) of row-aligned chunks: row t of
    ``x_dense`` and of ``x_comp`` are one token on the dense and on the compressed path.

    ``update(x_dense, x_comp)`` takes ``n × dim_dense`` and ``n × dim_comp`` arrays of one
    dtype (float32/float64); ``cross``, ``dense_column_sum`` and ``count`` read it.
    """

    def __init__(self, dim_dense: int, dim_comp: int, label: str = ""):
        super().__init__(dim_dense, dim_comp)
        self.label = label

    def update(self, x_dense, x_comp) -> None:
        try:
            super().update(as_array(x_dense, "x_dense"), as_array(x_comp, "x_comp"))
        except ValueError as exc:
            if not self.label or "non-finite" not in str(exc):
                raise
            raise ValueError(f"{self.label} (dense path): {exc}") from None


def anchor_correction(comp: GramAccumulator, cross: CrossGramAccumulator, *, ridge: float = 1e-3,
                      with_bias: bool = False) -> AnchorCorrection:
    """The drift correction ``M = (C_dc − C_cc)(C_cc + λI)⁻¹`` of one stage's inputs
    (``λ = ridge · mean diag C_cc``), shared by the layers reading them; ``with_bias`` adds the
    constant feature a layer bias needs. See :func:`anchored_target`."""
    if comp.dim != cross.dim_dense or comp.dim != cross.dim_comp:
        raise ValueError(f"the Gram is {comp.dim}-dimensional, the cross moment "
                         f"{cross.dim_dense} x {cross.dim_comp}")
    if comp.count != cross.count:
        raise ValueError(f"the Gram and the cross moment count different tokens ({comp.count} vs {cross.count})")
    # Read through the Python properties: a data-parallel accumulator sums over processes there.
    return AnchorCorrection(comp.gram, comp.column_sum, cross.cross, cross.dense_column_sum,
                            float(comp.count), float(ridge), bool(with_bias))


def anchored_target(correction: AnchorCorrection, weight, alpha: float, bias=None):
    """``(W_eff, b_eff)`` (float64) with ``W_eff = W C_mix C_cc⁻¹``,
    ``C_mix = (C_cc + α C_dc)/(1 + α)``: :func:`factorize` of ``W_eff`` on the compressed
    inputs' Gram minimises ``‖W X_c − B X_c‖² + α‖W X_d − B X_c‖²`` over rank-r ``B``.
    ``alpha=0`` returns ``W``; ``float("inf")`` fits only the dense outputs."""
    return correction.apply(as_array(weight, "weight"), as_optional(bias, "bias"), float(alpha))


@dataclass(frozen=True)
class InputSelection:
    """Which ``keep`` of a linear layer's ``n`` input columns to keep, and the refit layer.

    ``kept`` (int64, ascending, ``keep``) are the kept columns and ``weight`` (float64,
    ``d × keep``, columns in ``kept`` order) the exact optimum ``W H[:,S] H[S,S]⁻¹`` for them,
    ``H = C + λI``. ``removed`` (int64) lists the greedy's removals in order, down to
    ``curve_to`` kept columns; ``kept`` is every column but its first ``n − keep``.
    ``curve_kept`` (int64) and ``curve_loss`` (float64) give, before the first step and after
    each, the kept count and ``L(S) = tr((W − W'E_Sᵀ) H (W − W'E_Sᵀ)ᵀ)`` of the greedy set
    (``n`` and 0 first). ``total_energy = tr(W C Wᵀ)``, the layer's output energy on the
    calibration inputs; ``lambda_`` the ridge λ added to diag C.
    """

    kept: np.ndarray
    removed: np.ndarray
    curve_kept: np.ndarray
    curve_loss: np.ndarray
    weight: np.ndarray
    total_energy: float
    lambda_: float

    @property
    def keep(self) -> int:
        return int(self.kept.shape[0])


def _integer(value, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def _gram_is_fresh(acc) -> bool:
    """Whether ``acc.gram`` builds a new array on every read (the core accumulator's does), so
    that the kernel may consume it; a subclass that overrides the property may share one
    (ReducedGramAccumulator keeps its reduced Gram)."""
    return type(acc).gram in (GramAccumulator.__dict__["gram"], _core.GramAccumulator.gram)


def _check_selection_args(w: np.ndarray, n: int, keep: int, ridge: float, block: int,
                          curve_to: Optional[int]) -> None:
    """The core's argument checks, made before an accumulator is spent on the call."""
    if w.dtype not in (np.float32, np.float64):
        raise TypeError(f"select_inputs: weight must be float32 or float64, got {w.dtype}")
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"select_inputs: weight {tuple(w.shape)} does not read the gram's {n} inputs")
    if not 1 <= keep <= n:
        raise ValueError(f"select_inputs: keep must be in [1, {n}], got {keep}")
    if curve_to is not None and not 1 <= curve_to <= keep:
        raise ValueError(f"select_inputs: curve_to must be in [1, keep = {keep}], got {curve_to}")
    if block < 1:
        raise ValueError(f"select_inputs: block must be >= 1, got {block}")
    if not (math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"select_inputs: ridge must be finite and > 0, got {ridge}")


def select_inputs(weight, gram, keep: int, *, ridge: float = 1e-3, block: int = 1,
                  curve_to: Optional[int] = None, overwrite_gram: bool = False) -> InputSelection:
    """Structured input pruning of ``weight`` (d × n, float32/float64): keep ``keep`` of its n
    input columns (an MLP's intermediate neurons, read by down_proj) and refit it on them.

    ``gram`` is the inputs' Gram ``XᵀX`` (float64 n × n) or a GramAccumulator over them. The
    columns are removed greedily, optimal-brain-surgeon style, ``block`` at a time (the
    remaining ones of smallest ``‖W_R[:,i]‖² / (H_R⁻¹)_ii``, ties to the lower index), on
    ``H = C + λI`` with ``λ = ridge · mean diag C``; removal continues down to ``curve_to``
    kept columns (default ``keep``) for the loss curve. See :class:`InputSelection`.

    The kernel factors and inverts H in an n × n float64 workspace (0.97 GB at n = 11008). By
    default that is a copy and ``gram`` is left unchanged. ``overwrite_gram=True`` makes a
    ``gram`` array the workspace: it must be a writable, C-contiguous float64 numpy array (or a
    torch CPU tensor viewing one) and holds unspecified values afterwards; the result is bitwise
    the same. A read-only or non-contiguous array is refused (ValueError), another dtype too
    (TypeError), before anything is written: it is never copied behind the caller's back.
    An accumulator is left unchanged by default (its ``gram`` is read: a fresh copy, which the
    kernel consumes, for a plain GramAccumulator; a copy of the shared reduced Gram for a
    data-parallel one). With ``overwrite_gram=True`` it is spent instead: its own buffer becomes
    the workspace (``take_gram()``), so the call holds one n × n, not two; the arguments are
    checked before that, so a refused call leaves the accumulator usable.
    """
    w = as_array(weight, "weight")
    if isinstance(gram, _core.GramAccumulator):
        keep, block = _integer(keep, "keep"), _integer(block, "block")
        curve_to = None if curve_to is None else _integer(curve_to, "curve_to")
        if overwrite_gram:
            _check_selection_args(w, gram.dim, keep, float(ridge), block, curve_to)
            g = gram.take_gram()   # a data-parallel accumulator hands over its reduced sums
            consume = True
        else:
            g = gram.gram
            consume = _gram_is_fresh(gram)
    else:
        g = as_array(gram, "gram")
        consume = bool(overwrite_gram)
    raw = _core.select_inputs(w, g, _integer(keep, "keep"), float(ridge), _integer(block, "block"),
                              None if curve_to is None else _integer(curve_to, "curve_to"), consume)
    del g
    return InputSelection(raw["kept"], raw["removed"], raw["curve_kept"], raw["curve_loss"],
                          raw["weight"], float(raw["total_energy"]), float(raw["lambda"]))


__all__ = [
    "AnchorCorrection", "CrossGramAccumulator", "Factorization", "GramAccumulator", "InputFactor",
    "InputSelection", "LapackError", "anchor_correction", "anchored_target", "eigenvalues",
    "factorize", "factorize_output_gram", "get_num_threads", "input_factor", "lowrank_apply",
    "output_spectrum", "select_inputs", "set_num_threads", "top_eigenpairs",
]
