// Structured input pruning: keep k of a linear layer's n input columns (an MLP's intermediate
// neurons, read by down_proj) and refit the layer on the kept ones.
//
// A layer W (d x n) sees inputs X (N x n) with Gram C = X^T X. With the ridge
//     H = C + lambda I,   lambda = ridge * mean(diag C)   (ridge itself when diag C is all 0),
// the error of keeping the column set S (|S| = k) with refitted weight W' (d x k) is
//     L(S, W') = tr((W - W' E_S^T) H (W - W' E_S^T)^T),    E_S the n x k column selector,
// minimised for a given S by W'_S = W H[:,S] H[S,S]^-1, where
//     L(S) = tr(W H W^T) - tr(W H[:,S] H[S,S]^-1 H[S,:] W^T).
// S is chosen by greedy removal, optimal-brain-surgeon style: with R the remaining columns,
// Hinv = (H[R,R])^-1 and W_R = W'_R, removing column i costs exactly
//     Delta_i = ||W_R[:,i]||^2 / Hinv_ii,
// and removing a group B costs tr(W_R[:,B] Hinv[B,B]^-1 W_R[:,B]^T), after which
//     W_R  <- W_R  - W_R[:,B] Hinv[B,B]^-1 Hinv[B,:]
//     Hinv <- Hinv - Hinv[:,B] Hinv[B,B]^-1 Hinv[B,:]
// are the exact refit and inverse on R \ B. Each step removes the `block` remaining columns
// of smallest Delta (the last group before `keep`, and the last one overall, may be smaller).
#pragma once

#include <optional>
#include <vector>

#include "rom_fast/common.hpp"
#include "rom_fast/gram.hpp"

namespace rom_fast {

struct SelectionOptions {
  /// lambda = ridge * mean(diag C); > 0 and finite. H = C + lambda I is then positive
  /// definite for any Gram, so rank-deficient statistics (N < n tokens, dead neurons) are fine.
  double ridge = 1e-3;
  /// Columns removed per greedy step (>= 1). 1 is the exact one-at-a-time greedy; larger
  /// groups take the `block` smallest scores at once and are rank-`block` BLAS-3 updates
  /// (n = 11008 with block 64 is compute-bound; block 1 is memory-bound, ~n^2 per column).
  index_t block = 1;
  /// The greedy continues down to this many kept columns (1 <= curve_to <= keep; default
  /// keep), so one call gives the loss curve for every smaller k too.
  std::optional<index_t> curve_to;
};

/// The greedy selection and the exact refit for `keep` columns.
struct InputSelection {
  index_t rows = 0;   ///< d
  index_t cols = 0;   ///< n
  /// The keep kept columns, ascending: every column but the first n - keep removed ones (the
  /// greedy sets are nested, and no group straddles n - keep removals).
  std::vector<index_t> kept;
  /// The n - curve_to removed columns in removal order (within a group: ascending Delta,
  /// then index).
  std::vector<index_t> removed;
  /// After each step (starting before the first): the number of kept columns (n first) and
  /// L of the greedy set (0 first), the sum of the steps' exact loss increases.
  std::vector<index_t> curve_kept;
  std::vector<double> curve_loss;
  /// W'_S for S = kept: d x keep, row-major, columns in `kept` order. Recomputed at the end
  /// from the original W and H (a Cholesky solve of H[S,S]), not the incremental W_R.
  std::vector<double> weight;
  /// tr(W C W^T), the layer's output energy on the calibration inputs (C, not H), from
  /// tr(W H W^T) - lambda ||W||_F^2: absolute error ~ n eps tr(W H W^T).
  double total_energy = 0.0;
  double lambda = 0.0;   ///< the ridge added to diag C
};

/// Greedy input selection for W (d x n, row-major; float32 is widened exactly, all arithmetic
/// is float64) on the Gram `gram` (n x n, row-major, symmetric positive semidefinite), which
/// is left unchanged (these entry points work on a private copy of it; see
/// select_inputs_in_place for the variant without that copy).
/// Ties between equal scores go to the lower column index (deterministic).
/// Throws std::invalid_argument for d or n < 1, keep outside [1, n], curve_to outside
/// [1, keep], block < 1, ridge not > 0 and finite, a non-finite weight, a non-finite or
/// non-symmetric Gram, or d x n / n x n sizes that overflow; LapackError if H is not
/// positive definite (e.g. a Gram that is not PSD) or the updated inverse loses
/// definiteness (raise the ridge).
/// Memory: 8 n^2 bytes (the copy) plus select_inputs_in_place's greedy, then (the copy freed,
/// the refit reading `gram`) its refit: at d = 4096, n = 11008, keep = 5064, 1.33 GB then
/// 0.77 GB. The accumulator overloads keep their copy through the refit. Flops: n^3 (inverse) +
/// d n^2 (energy) + at most (n^2 + 2 d n) (n - curve_to) (greedy) + keep^3 / 3 +
/// 2 keep (keep min(d, n - keep) + d (n - keep)) (refit): ~3 Tflop there at keep = 8806.
InputSelection select_inputs(const float* weight, index_t d, index_t n, const double* gram,
                             index_t keep, const SelectionOptions& options = {});
InputSelection select_inputs(const double* weight, index_t d, index_t n, const double* gram,
                             index_t keep, const SelectionOptions& options = {});
/// The same with the Gram of an accumulator (n = gram.dim()); the copy is GramAccumulator::gram().
InputSelection select_inputs(const float* weight, index_t d, const GramAccumulator& gram,
                             index_t keep, const SelectionOptions& options = {});
InputSelection select_inputs(const double* weight, index_t d, const GramAccumulator& gram,
                             index_t keep, const SelectionOptions& options = {});

/// select_inputs with the caller's Gram as its workspace: CONSUMES `gram` (n x n, row-major,
/// symmetric PSD, as above). The result is bitwise the copying entry points'. On return, and
/// after a LapackError, the contents of `gram` are unspecified; a std::invalid_argument is
/// thrown before anything is written (the checks above, and `weight` overlapping `gram`).
/// How: H is factored and inverted, and the greedy updates the inverse, in the lower triangle
/// of the buffer's column-major view (LAPACK/BLAS "L"; row-major gram[i * n + j], j >= i);
/// the rest, gram[i * n + j] with j < i, is never written and keeps C for the refit, and
/// diag C is saved first (8 n bytes).
/// Memory: allocates no n x n buffer: 8 d n bytes (W_R, float64) during the greedy, then the
/// refit's 8 d keep (the result) plus, with r = n - keep, at most 8 max(keep^2 + keep r,
/// keep r + r d) when r <= d, else 8 max(keep r + r d + keep d, keep d + keep^2): at
/// d = 4096, n = 11008, keep = 5064, 0.36 GB, then 0.77 GB (measured: a 0.80 GB peak over
/// the inputs, bench/bench_neurons.py --in-place).
InputSelection select_inputs_in_place(const float* weight, index_t d, index_t n, double* gram,
                                      index_t keep, const SelectionOptions& options = {});
InputSelection select_inputs_in_place(const double* weight, index_t d, index_t n, double* gram,
                                      index_t keep, const SelectionOptions& options = {});

}  // namespace rom_fast
