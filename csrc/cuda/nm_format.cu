// CUDA kernels of the N:M format: mask selection, compress, decompress. One thread per
// byte-aligned chunk (nm_format.h), so no two threads write the same metadata byte.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"

namespace sparsekit {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

int64_t blocks_for(int64_t work) { return std::max<int64_t>(1, (work + kThreads - 1) / kThreads); }

__device__ void record_first(unsigned long long* flag, int64_t v) {
  atomicMin(flag, static_cast<unsigned long long>(v));
}

// The first failing group (or NaN) across the grid, read back once after the kernel.
at::Tensor new_flag(const at::Tensor& like) {
  return at::full({1}, kNone, like.options().dtype(at::kLong));
}

template <typename Bits, int kN, int kM>
__global__ void compress_kernel(const Bits* __restrict__ src, Bits* __restrict__ vals,
                                uint8_t* __restrict__ meta, NMLayout L, int64_t rows,
                                unsigned long long* bad) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= rows * L.chunks_per_row) return;
  const int64_t r = c / L.chunks_per_row, chunk = c % L.chunks_per_row;
  const int64_t g = compress_chunk<Bits, kN, kM>(src + r * L.k, vals + r * L.values_per_row,
                                                 meta + r * L.meta_bytes_per_row, L, chunk);
  if (g >= 0) record_first(bad, r * L.groups + g);
}

template <typename Bits, int kN, int kM>
__global__ void decompress_kernel(const Bits* __restrict__ vals, const uint8_t* __restrict__ meta,
                                  Bits* __restrict__ dst, NMLayout L, int64_t rows,
                                  unsigned long long* bad) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= rows * L.chunks_per_row) return;
  const int64_t r = c / L.chunks_per_row, chunk = c % L.chunks_per_row;
  const int64_t g = decompress_chunk<Bits, kN, kM>(vals + r * L.values_per_row,
                                                   meta + r * L.meta_bytes_per_row,
                                                   dst + r * L.k, L, chunk);
  if (g >= 0) record_first(bad, r * L.groups + g);
}

template <typename T, typename Acc>
__global__ void nm_mask_kernel(const T* __restrict__ scores, bool* __restrict__ mask,
                               int64_t rows, int64_t k, int n, int m, bool absolute,
                               unsigned long long* nan_at) {
  const int64_t groups = (k + m - 1) / m;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * groups) return;
  const int64_t r = i / groups, col = (i % groups) * m;
  const int width = static_cast<int>(min(static_cast<int64_t>(m), k - col));
  const int at =
      nm_mask_group<T, Acc>(scores + r * k + col, mask + r * k + col, width, n, absolute);
  if (at >= 0) record_first(nan_at, r * k + col + at);
}

int64_t read_flag(const at::Tensor& flag) { return flag.item<int64_t>(); }

std::tuple<at::Tensor, at::Tensor> nm_compress_cuda(const at::Tensor& dense_in, int64_t n,
                                                    int64_t m) {
  check_pattern(n, m);
  check_float_matrix(dense_in, "w");
  const c10::cuda::CUDAGuard guard(dense_in.device());
  const at::Tensor dense = dense_in.contiguous();
  const int64_t rows = dense.size(0);
  const NMLayout L(dense.size(1), static_cast<int>(n), static_cast<int>(m));
  at::Tensor values = at::empty({rows, L.values_per_row}, dense.options());
  at::Tensor metadata = at::empty({rows, L.meta_bytes_per_row}, dense.options().dtype(at::kByte));
  const int64_t work = rows * L.chunks_per_row;
  if (work == 0) return {values, metadata};
  at::Tensor bad = new_flag(dense);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_bits(dense, [&](auto zero_bits) {
    using Bits = decltype(zero_bits);
    dispatch_pattern(n, m, [&](auto kN, auto kM) {
      compress_kernel<Bits, kN.value, kM.value><<<blocks_for(work), kThreads, 0, stream>>>(
          static_cast<const Bits*>(dense.const_data_ptr()), static_cast<Bits*>(values.data_ptr()),
          metadata.data_ptr<uint8_t>(), L, rows,
          reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const int64_t first = read_flag(bad);
  if (first != kNone) raise_not_nm(dense, first, L);
  return {values, metadata};
}

at::Tensor nm_decompress_cuda(const at::Tensor& values_in, const at::Tensor& metadata_in,
                              int64_t k, int64_t n, int64_t m) {
  const NMLayout L = check_compressed(values_in, metadata_in, k, n, m);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous();
  const at::Tensor metadata = metadata_in.contiguous();
  const int64_t rows = values.size(0);
  at::Tensor dense = at::empty({rows, k}, values.options());
  const int64_t work = rows * L.chunks_per_row;
  if (work == 0) return dense;
  at::Tensor bad = new_flag(values);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_bits(values, [&](auto zero_bits) {
    using Bits = decltype(zero_bits);
    dispatch_pattern(n, m, [&](auto kN, auto kM) {
      decompress_kernel<Bits, kN.value, kM.value><<<blocks_for(work), kThreads, 0, stream>>>(
          static_cast<const Bits*>(values.const_data_ptr()), metadata.const_data_ptr<uint8_t>(),
          static_cast<Bits*>(dense.data_ptr()), L, rows,
          reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const int64_t first = read_flag(bad);
  if (first != kNone) raise_bad_metadata(first, L);
  return dense;
}

at::Tensor nm_mask_cuda(const at::Tensor& scores_in, int64_t n, int64_t m, bool absolute) {
  check_pattern(n, m);
  check_float_matrix(scores_in, "scores");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0), k = scores.size(1);
  at::Tensor mask = at::empty({rows, k}, scores.options().dtype(at::kBool));
  const int64_t work = rows * ((k + m - 1) / m);
  if (work == 0) return mask;
  at::Tensor nan_at = new_flag(scores);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "nm_mask", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    nm_mask_kernel<scalar_t, acc_t><<<blocks_for(work), kThreads, 0, stream>>>(
        scores.const_data_ptr<scalar_t>(), mask.data_ptr<bool>(), rows, k,
        static_cast<int>(n), static_cast<int>(m), absolute,
        reinterpret_cast<unsigned long long*>(nan_at.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t first = read_flag(nan_at);
  if (first != kNone) raise_nan_score(first / k, first % k);
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CUDA, lib) {
  lib.impl("nm_mask", &nm_mask_cuda);
  lib.impl("nm_compress", &nm_compress_cuda);
  lib.impl("nm_decompress", &nm_decompress_cuda);
}

}  // namespace sparsekit
