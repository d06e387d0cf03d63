// Applying a factorized layer: what a C++ server that embeds the core calls.
#pragma once

#include "rom_fast/common.hpp"

namespace rom_fast {

/// Y = X W2^T W1^T (+ b1), i.e. y = W1 (W2 x) + b1 for every row x of X.
///   x  : n x d_in   (row-major; tokens are rows)
///   w1 : d_out x r
///   w2 : r x d_in
///   b1 : d_out or null
///   y  : n x d_out  (output, must not alias x)
///   scratch : n * r elements of workspace
/// Two GEMMs, r (d_in + d_out) multiply-adds per token instead of d_in d_out.
/// Throws std::invalid_argument on bad sizes.
void lowrank_apply(const float* x, index_t n, index_t d_in, const float* w1, const float* w2,
                   index_t d_out, index_t r, const float* b1, float* y, float* scratch);
void lowrank_apply(const double* x, index_t n, index_t d_in, const double* w1, const double* w2,
                   index_t d_out, index_t r, const double* b1, double* y, double* scratch);

}  // namespace rom_fast
