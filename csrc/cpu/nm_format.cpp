// CPU kernels of the N:M format: mask selection, compress, decompress.
// Parallel over byte-aligned chunks of rows (at::parallel_for runs on torch's OpenMP pool,
// so torch.set_num_threads governs these kernels too).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

#include "../checks.h"

namespace sparsekit {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

void atomic_min(std::atomic<int64_t>& target, int64_t v) {
  int64_t cur = target.load(std::memory_order_relaxed);
  while (v < cur && !target.compare_exchange_weak(cur, v)) {
  }
}

// Grain: enough chunks per task that scheduling costs little next to the memory traffic.
int64_t grain_for(int64_t chunk_groups, int64_t m) {
  return std::max<int64_t>(1, 32768 / (chunk_groups * m));
}

std::tuple<at::Tensor, at::Tensor> nm_compress_cpu(const at::Tensor& dense_in, int64_t n,
                                                   int64_t m) {
  check_pattern(n, m);
  check_float_matrix(dense_in, "w");
  const at::Tensor dense = dense_in.contiguous();
  const int64_t rows = dense.size(0);
  const NMLayout L(dense.size(1), static_cast<int>(n), static_cast<int>(m));
  at::Tensor values = at::empty({rows, L.values_per_row}, dense.options());
  at::Tensor metadata = at::empty({rows, L.meta_bytes_per_row}, dense.options().dtype(at::kByte));
  std::atomic<int64_t> bad{kNone};
  dispatch_bits(dense, [&](auto zero_bits) {
    using Bits = decltype(zero_bits);
    const Bits* src = static_cast<const Bits*>(dense.const_data_ptr());
    Bits* vals = static_cast<Bits*>(values.data_ptr());
    uint8_t* meta = metadata.data_ptr<uint8_t>();
    dispatch_pattern(n, m, [&](auto kN, auto kM) {
      const int64_t total = rows * L.chunks_per_row;
      at::parallel_for(0, total, grain_for(L.chunk_groups, m), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const int64_t r = c / L.chunks_per_row, chunk = c % L.chunks_per_row;
          const int64_t g = compress_chunk<Bits, kN.value, kM.value>(
              src + r * L.k, vals + r * L.values_per_row, meta + r * L.meta_bytes_per_row, L,
              chunk);
          if (g >= 0) {
            atomic_min(bad, r * L.groups + g);
            return;
          }
        }
      });
    });
  });
  if (bad.load() != kNone) raise_not_nm(dense, bad.load(), L);
  return {values, metadata};
}

at::Tensor nm_decompress_cpu(const at::Tensor& values_in, const at::Tensor& metadata_in,
                             int64_t k, int64_t n, int64_t m) {
  const NMLayout L = check_compressed(values_in, metadata_in, k, n, m);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor metadata = metadata_in.contiguous();
  const int64_t rows = values.size(0);
  at::Tensor dense = at::empty({rows, k}, values.options());
  std::atomic<int64_t> bad{kNone};
  dispatch_bits(values, [&](auto zero_bits) {
    using Bits = decltype(zero_bits);
    const Bits* vals = static_cast<const Bits*>(values.const_data_ptr());
    const uint8_t* meta = metadata.const_data_ptr<uint8_t>();
    Bits* dst = static_cast<Bits*>(dense.data_ptr());
    dispatch_pattern(n, m, [&](auto kN, auto kM) {
      const int64_t total = rows * L.chunks_per_row;
      at::parallel_for(0, total, grain_for(L.chunk_groups, m), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const int64_t r = c / L.chunks_per_row, chunk = c % L.chunks_per_row;
          const int64_t g = decompress_chunk<Bits, kN.value, kM.value>(
              vals + r * L.values_per_row, meta + r * L.meta_bytes_per_row, dst + r * L.k, L,
              chunk);
          if (g >= 0) {
            atomic_min(bad, r * L.groups + g);
            return;
          }
        }
      });
    });
  });
  if (bad.load() != kNone) raise_bad_metadata(bad.load(), L);
  return dense;
}

at::Tensor nm_mask_cpu(const at::Tensor& scores_in, int64_t n, int64_t m) {
  check_pattern(n, m);
  check_float_matrix(scores_in, "scores");
  const at::Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0), k = scores.size(1);
  const int64_t groups = (k + m - 1) / m;
  at::Tensor mask = at::empty({rows, k}, scores.options().dtype(at::kBool));
  std::atomic<int64_t> nan_at{kNone};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "nm_mask", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = scores.const_data_ptr<scalar_t>();
    bool* dst = mask.data_ptr<bool>();
    at::parallel_for(0, rows * groups, grain_for(1, m), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / groups, col = (i % groups) * m;
        const int width = static_cast<int>(std::min(m, k - col));
        const int at =
            nm_mask_group<scalar_t, acc_t>(src + r * k + col, dst + r * k + col, width,
                                           static_cast<int>(n));
        if (at >= 0) {
          atomic_min(nan_at, r * k + col + at);
          return;
        }
      }
    });
  });
  if (nan_at.load() != kNone) raise_nan_score(nan_at.load() / k, nan_at.load() % k);
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, lib) {
  lib.impl("nm_mask", &nm_mask_cpu);
  lib.impl("nm_compress", &nm_compress_cpu);
  lib.impl("nm_decompress", &nm_decompress_cpu);
}

}  // namespace sparsekit
