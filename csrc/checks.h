// Argument checks shared by every device's kernels: one message per mistake, naming the
// argument, raised as ValueError / TypeError in Python (TORCH_CHECK_VALUE / _TYPE).
#pragma once

#include <torch/types.h>

#include "nm_format.h"

namespace sparsekit {

inline void check_pattern(int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(m >= 2 && m <= kMaxM, "m must be in [2, ", kMaxM, "], got ", m);
  TORCH_CHECK_VALUE(n >= 1 && n < m, "n must satisfy 0 < n < m (m = ", m, "), got ", n);
}

inline void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [rows, K], got ", t.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()) && t.element_size() >= 2,
                   name, " must be float32, float16, bfloat16 or float64, got ",
                   t.scalar_type());
}

// The compressed pair (values, metadata) must match the canonical layout for (k, n, m).
inline NMLayout check_compressed(const at::Tensor& values, const at::Tensor& metadata,
                                 int64_t k, int64_t n, int64_t m) {
  check_pattern(n, m);
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  check_float_matrix(values, "values");
  TORCH_CHECK_TYPE(metadata.scalar_type() == at::kByte, "metadata must be uint8, got ",
                   metadata.scalar_type());
  TORCH_CHECK_VALUE(metadata.dim() == 2, "metadata must be 2-D, got ", metadata.dim(), "-D");
  TORCH_CHECK_VALUE(values.device() == metadata.device(),
                    "values and metadata must be on the same device, got ", values.device(),
                    " and ", metadata.device());
  NMLayout L(k, static_cast<int>(n), static_cast<int>(m));
  TORCH_CHECK_VALUE(values.size(1) == L.values_per_row, "values must have shape [rows, ",
                    L.values_per_row, "] for k=", k, " and ", n, ":", m, ", got ",
                    values.sizes());
  TORCH_CHECK_VALUE(metadata.size(0) == values.size(0) &&
                        metadata.size(1) == L.meta_bytes_per_row,
                    "metadata must have shape [", values.size(0), ", ",
                    L.meta_bytes_per_row, "] for k=", k, " and ", n, ":", m, ", got ",
                    metadata.sizes());
  return L;
}

// Raw-bit element type for a floating tensor: the format moves bits, never arithmetic.
template <typename F>
inline void dispatch_bits(const at::Tensor& t, F&& f) {
  switch (t.element_size()) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK_TYPE(false, "unsupported element size ", t.element_size());
  }
}

// Calls f with compile-time (N, M) for the hot patterns, (0, 0) = read from the layout.
template <typename F>
inline void dispatch_pattern(int64_t n, int64_t m, F&& f) {
  if (n == 2 && m == 4) {
    f(std::integral_constant<int, 2>{}, std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
  }
}

inline std::string group_columns(int64_t g, int64_t m, int64_t k) {
  int64_t lo = g * m, hi = std::min(lo + m, k) - 1;
  return "columns " + std::to_string(lo) + ".." + std::to_string(hi);
}

}  // namespace sparsekit

namespace sparsekit {

// `bad` = row * groups + group of the first group with more than N nonzeros.
[[noreturn]] inline void raise_not_nm(const at::Tensor& dense, int64_t bad, const NMLayout& L) {
  const int64_t row = bad / L.groups, g = bad % L.groups;
  const int64_t lo = g * L.m, hi = std::min(lo + L.m, L.k);
  const int64_t count = dense.select(0, row).slice(0, lo, hi).ne(0).sum().item<int64_t>();
  TORCH_CHECK_VALUE(false, "w is not ", L.n, ":", L.m, " sparse: row ", row, ", group ", g,
                    " (", group_columns(g, L.m, L.k), ") holds ", count,
                    " nonzeros, more than ", L.n,
                    "; prune it first (sparsekit.masks.nm, or compress(..., prune=True))");
}

[[noreturn]] inline void raise_bad_metadata(int64_t bad, const NMLayout& L) {
  const int64_t row = bad / L.groups, g = bad % L.groups;
  TORCH_CHECK_VALUE(false, "metadata is corrupt at row ", row, ", group ", g, " (",
                    group_columns(g, L.m, L.k), "): kept indices must be strictly "
                    "increasing, below m=", L.m, ", point into the padding beyond k=", L.k,
                    " only in a group of fewer than n=", L.n,
                    " real columns (keeping 0..n-1), and padding must hold zeros");
}

[[noreturn]] inline void raise_nan_score(int64_t row, int64_t col) {
  TORCH_CHECK_VALUE(false, "scores contain NaN (first at row ", row, ", column ", col,
                    "); N:M selection needs comparable scores");
}

}  // namespace sparsekit
