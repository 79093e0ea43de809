// CPU implementations of the N:M products: nm_linear (y = x @ W^T + b), its input gradient
// (gx = gy @ W) and nm_sddmm (gy^T @ x sampled at W's kept positions, in the values layout).
//
// The wrapper validates, transposes a batch tile of activations into fp32 xT[Kp, ld]
// (batch as the vector dim, see spmm_kernels.h), runs one ISA's kernel over rows (or
// column ranges) on torch's OpenMP pool, and transposes the result back. The ISA is chosen
// once from the CPU (AVX-512, else AVX2, else portable) and can be forced for tests.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "../checks.h"
#include "spmm.h"

namespace sparsekit {

// The dense weight, through the registered op (for dtypes the kernels do not cover; the
// convolution's fp64 path uses it too).
at::Tensor decompress_dense(const at::Tensor& values, const at::Tensor& metadata, int64_t k,
                            int64_t n, int64_t m) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparsekit::nm_decompress", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t)>();
  return op.call(values, metadata, k, n, m);
}

// The bias as the kernels take it (fp32): a contiguous fp32 bias in place, any other
// converted into buf. A bf16 model's bias converted by hand, not by a dispatched
// Tensor::to (half a microsecond per call: decoding calls hundreds of layers per token).
const float* bias_as_float(const std::optional<at::Tensor>& bias, std::vector<float>& buf) {
  if (!bias.has_value()) return nullptr;
  const at::Tensor& b = *bias;
  if (b.scalar_type() == at::kFloat && b.is_contiguous()) return b.const_data_ptr<float>();
  buf.resize(static_cast<size_t>(b.numel()));
  if (b.scalar_type() == at::kBFloat16 && b.is_contiguous()) {
    const at::BFloat16* p = b.const_data_ptr<at::BFloat16>();
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(p[i]);
  } else {
    const at::Tensor f = b.to(at::kFloat).contiguous();
    std::memcpy(buf.data(), f.const_data_ptr<float>(), buf.size() * sizeof(float));
  }
  return buf.data();
}

namespace {

bool cpu_supports(const char* isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (std::strcmp(isa, "avx512bf16") == 0) {  // + bf16 dot products and VBMI's multishift
    return cpu_supports("avx512") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512vbmi");
  }
  if (std::strcmp(isa, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
#endif
  return std::strcmp(isa, "scalar") == 0;
}

const SpmmKernels* kernels_for(const std::string& isa) {
#if defined(__x86_64__)
  if (isa == "avx512bf16") return &spmm_kernels_avx512bf16();
  if (isa == "avx512") return &spmm_kernels_avx512();
  if (isa == "avx2") return &spmm_kernels_avx2();
#endif
  if (isa == "scalar") return &spmm_kernels_scalar();
  return nullptr;
}

std::atomic<const SpmmKernels*> g_active{nullptr};

const SpmmKernels& active_kernels() {
  const SpmmKernels* k = g_active.load();
  if (k == nullptr) {
    for (const char* isa : {"avx512bf16", "avx512", "avx2", "scalar"}) {
      if (cpu_supports(isa) && (k = kernels_for(isa)) != nullptr) break;
    }
    g_active.store(k);
  }
  return *k;
}

ValueType value_type(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kFloat: return ValueType::kFloat32;
    case at::kHalf: return ValueType::kFloat16;
    case at::kBFloat16: return ValueType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "values must be float32, float16 or bfloat16, got ", values.scalar_type());
  }
}

bool has_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool fp32_batch_lanes();

// Up to this many rows of x, 2:4 forward runs the small-batch kernel (x row-major, index
// decode in registers, 8 rows per pass over the weight); above it a batch kernel. Measured
// crossovers (fp32, 2 threads, AVX-512): against the transposed-tile kernel, 9-10 rows on
// Zen 4 (4096x4096); against the lanes form, 16-24 rows on Zen 5 (4096x4096 at 16 rows:
// 3.1 ms small-batch, 3.7 ms lanes; at 32: 5.8 and 4.7 ms). SPARSEKIT_CPU_SMALL_BATCH
// overrides it.
int64_t small_batch_limit() {
  static const int64_t limit = [] {
    const char* env = std::getenv("SPARSEKIT_CPU_SMALL_BATCH");
    return env != nullptr ? std::atoll(env) : fp32_batch_lanes() ? int64_t{16} : int64_t{10};
  }();
  return limit;
}

// The bf16 2:4 forward for many rows of x: the lanes form (16 weight rows per register, x
// broadcast; sp24_bf16_avx512.cpp) unless SPARSEKIT_CPU_BF16_BATCH=pairs asks for the pair
// GEMM (x's column pairs prepared once). Measured on Zen 5 (2 threads, 4096x4096 to
// 11008x4096, weights past the LLC): lanes 1.09-1.26x torch's bf16 GEMM at batch 64-512,
// the pair GEMM 0.72-0.93x. The pair GEMM was measured the faster of the two forms it was
// compared with on Zen 4 (1.0-1.1x there); the lanes form is unmeasured on Zen 4.
bool bf16_batch_lanes() {
  static const bool lanes = [] {
    const char* env = std::getenv("SPARSEKIT_CPU_BF16_BATCH");
    return env == nullptr || std::strcmp(env, "pairs") != 0;
  }();
  return lanes;
}

// Whether the fp32 2:4 batch forward runs the lanes form (sp24_lanes_avx512.cpp) where it
// applies (fp32 values and x, K a multiple of 4, x's rows contiguous); SPARSEKIT_CPU_FP32_
// BATCH=tiles keeps the transposed-tile kernels. Measured on Zen 5 (2 threads, weights
// cycled past the LLC where they are large), against F.linear in the same run: 2.0-2.5x
// from 128x64 by 784 rows of x (a 1x1 convolution's pixels) to 1536x576 by 512, and 2.9-3.8x
// on 4096x4096 at 64-256 rows; the transposed-tile kernels 0.93-1.3x and 1.2-2.3x there.
// Unmeasured on Zen 4.
bool fp32_batch_lanes() {
  static const bool lanes = [] {
    const char* env = std::getenv("SPARSEKIT_CPU_FP32_BATCH");
    return env == nullptr || std::strcmp(env, "tiles") != 0;
  }();
  return lanes;
}

// From this many rows of x the bf16 2:4 forward runs its batch form instead of permuting x
// per weight row (SPARSEKIT_CPU_BF16_PAIRS overrides it): 32 for the lanes form (Zen 5,
// 4096x4096: 1.14x dense at batch 32 against 1.06x for the permute kernel, which wins
// below: 1.31x against 1.04x at 16), 64 for the pair GEMM.
int64_t bf16_pairs_batch() {
  static const int64_t limit = [] {
    const char* env = std::getenv("SPARSEKIT_CPU_BF16_PAIRS");
    return env != nullptr ? std::atoll(env) : bf16_batch_lanes() ? int64_t{32} : int64_t{64};
  }();
  return limit;
}

// Compressed weights up to this size are small enough for every thread to read whole from
// its own cache: the batch forwards (the bf16 pair GEMM, the fp32 batch kernel) split the
// tiles of x between threads; larger weights split their rows.
constexpr int64_t kSmallWeightBytes = 1 << 20;
// The pair GEMM on larger weights: x tiles of 32 rows (two registers per weight row and
// group). Measured against 64 on 4096x4096, 11008x4096 and 4096x11008 at batch 64-512 (two
// alternating runs each, noisy): 0.97x against 0.92x dense on average.
constexpr int kPairLargeWeightTile = 32;

// The pair GEMM's rows of x per tile: 64 (four registers per weight row and group) for
// small weights, kPairLargeWeightTile for those split by rows (SPARSEKIT_CPU_BF16_PAIR_TILE=32
// or 64 forces one).
int pair_tile_for(bool split_by_tiles) {
  static const int forced = [] {
    const char* env = std::getenv("SPARSEKIT_CPU_BF16_PAIR_TILE");
    return env != nullptr ? std::atoi(env) : 0;
  }();
  if (forced == 32 || forced == 64) return forced;
  return split_by_tiles ? 64 : kPairLargeWeightTile;
}


// The calling thread's buffer for x's prepared pairs (grown, never shrunk: a fresh
// allocation of several MB per call cost page faults on every call).
uint32_t* pair_scratch(int64_t words) {
  struct Free {
    void operator()(uint32_t* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<uint32_t, Free> buf;
  thread_local int64_t have = 0;
  if (words > have) {
    buf.reset();
    const size_t bytes = (static_cast<size_t>(words) * 4 + 63) / 64 * 64;
    buf.reset(static_cast<uint32_t*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(buf != nullptr, "out of memory for ", bytes, " bytes of prepared x pairs");
    have = words;
  }
  return buf.get();
}

// Batch rows per pass: as many vector registers as the kernels unroll.
int64_t batch_tile(const SpmmKernels& k) { return static_cast<int64_t>(k.lanes) * k.max_regs; }

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Groups per K-block so that a block of xT (or gxT) rows, ld floats each, stays in L1.
int64_t block_groups(const NMLayout& L, int64_t ld) {
  const int64_t cols = (24 * 1024) / (4 * ld);  // measured: 16-24 KB best, 40 KB much worse
  const int64_t chunk_cols = int64_t{L.chunk_groups} * L.m;
  return std::max<int64_t>(1, cols / chunk_cols) * L.chunk_groups;
}

// src2d[b0:b0+tb, :cols] transposed into a zero-padded fp32 [rows_p, ld] buffer.
at::Tensor transpose_tile(const at::Tensor& src2d, int64_t b0, int64_t tb, int64_t rows_p, int64_t ld) {
  at::Tensor t = at::zeros({rows_p, ld}, src2d.options().dtype(at::kFloat));
  t.narrow(0, 0, src2d.size(1)).narrow(1, 0, tb).copy_(src2d.narrow(0, b0, tb).t());
  return t;
}

// dst[j * ldd + i] = src[i * s0 + j * s1] for i < ni, j < nj, in 16x16 blocks.
void transpose_into(const float* src, int64_t s0, int64_t s1, int64_t ni, int64_t nj, float* dst,
                    int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t i0 = 0; i0 < ni; i0 += kB) {
    const int64_t i1 = std::min(ni, i0 + kB);
    for (int64_t j0 = 0; j0 < nj; j0 += kB) {
      const int64_t j1 = std::min(nj, j0 + kB);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ldd + i] = src[i * s0 + j * s1];
    }
  }
}

// Small-batch 2:4 forward: groups per column block so that the block's slice of the tb rows
// of x (fp32) stays in L1 (24 KB), in whole 32-column chunks. Without it a long row of x
// (K = 11008: 44 KB) was re-read from L2 for every weight row.
int64_t small_block_groups(int64_t tb) {
  const int64_t cols = (24 * 1024) / (4 * tb);
  return std::max<int64_t>(32, cols / 32 * 32) / 4;
}

// Calls f(b0, tb, ld) per batch tile: rows [b0, b0 + tb) of the batch, padded to ld floats
// (whole vectors; the kernel for NB = ld / lanes registers runs it).
template <typename F>
void for_each_batch_tile(const SpmmKernels& kern, int64_t batch, F&& f) {
  for (int64_t b0 = 0; b0 < batch; b0 += batch_tile(kern)) {
    const int64_t tb = std::min(batch_tile(kern), batch - b0);
    f(b0, tb, round_up(tb, kern.lanes));
  }
}

// The 2:4 kernel when the pattern is 2:4, else the general one, for ld floats of batch.
RowKernel pick(const RowKernel (&for_2_4)[kMaxTileRegs], const RowKernel (&general)[kMaxTileRegs],
               const NMLayout& L, int64_t ld, const SpmmKernels& kern) {
  return (L.n == 2 && L.m == 4 ? for_2_4 : general)[ld / kern.lanes - 1];
}

std::unique_ptr<float[]> scratch_for(const NMLayout& L);

// Runs fn over [0, count) units on torch's thread pool; a task covering units [i0, i1) gets
// the range [i0 * scale, min(i1 * scale, cap)) and its own scratch.
void run_kernel(RowKernel fn, const SpmmArgs& a, int64_t count, int64_t grain, int64_t scale = 1,
                int64_t cap = std::numeric_limits<int64_t>::max()) {
  at::parallel_for(0, count, grain, [&](int64_t i0, int64_t i1) {
    auto scratch = scratch_for(a.layout);
    fn(a, i0 * scale, std::min(i1 * scale, cap), scratch.get());
  });
}

// Per-task scratch, uninitialized (a zero-filled vector cost a memset per call).
std::unique_ptr<float[]> scratch_for(const NMLayout& L) {
  return std::unique_ptr<float[]>(new float[scratch_floats(L)]);
}

void check_batch_operand(const at::Tensor& t, const char* name, int64_t last, const char* what) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == last, name, " must have ", what, " = ", last,
                    " in its last dim, got shape ", t.sizes());
}

void check_pairing(const at::Tensor& t, const char* name, const at::Tensor& values) {
  TORCH_CHECK_TYPE(t.scalar_type() == values.scalar_type(), name, " (", t.scalar_type(),
                   ") must have the dtype of the weight values (", values.scalar_type(), ")");
  TORCH_CHECK_VALUE(t.device() == values.device(), name, " must be on ", values.device(),
                    ", got ", t.device());
}

// Rows of the batch: every dim but the last (numel / last would be 0 / 0 for k = 0 or
// a weight of 0 rows, whose products are still defined: zeros, or the bias).
int64_t leading_numel(const at::Tensor& t) {
  int64_t count = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) count *= t.size(d);
  return count;
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

at::Tensor decompress(const at::Tensor& values, const at::Tensor& metadata, int64_t k, int64_t n,
                      int64_t m) {
  return decompress_dense(values, metadata, k, n, m);
}

at::Tensor nm_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                         const std::optional<at::Tensor>& bias, int64_t k, int64_t n, int64_t m) {
  const NMLayout L = check_compressed(values, metadata, k, n, m);
  check_pairing(x, "x", values);
  check_batch_operand(x, "x", k, "k");
  const int64_t rows = values.size(0);
  if (bias.has_value()) {
    check_pairing(*bias, "bias", values);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == rows, "bias must have shape [", rows,
                      "], got ", bias->sizes());
  }
  if (!has_kernel_dtype(values.scalar_type())) {  // e.g. fp64: exact, via the dense weight
    // Over K padded to Kp, as the kernels compute: values in padding slots meet zero columns
    // of x (the products trust validated metadata; decompress alone refuses such values).
    const int64_t kp = L.groups * L.m;
    return at::linear(at::constant_pad_nd(x, {0, kp - k}), decompress(values, metadata, kp, n, m),
                      bias);
  }
  const int64_t batch = leading_numel(x);
  at::Tensor y_out = at::empty(with_last(x, rows), x.options());
  // The bf16 and small-batch paths read x and write y through pointers, which a contiguous
  // x and the new y give without a reshape: decoding calls every layer with a [1, 1, k] x,
  // and each reshape or view is a dispatched call. The other paths take 2-D tensors.
  const bool x_contiguous = x.is_contiguous();
  const SpmmKernels& kern = active_kernels();
  const int64_t kp = L.groups * L.m;
  const at::Tensor values_c = values.contiguous(), meta_c = metadata.contiguous();
  std::vector<float> bias_buf;
  const float* bias_p = bias_as_float(bias, bias_buf);
  const int64_t weight_bytes = values_c.nbytes() + meta_c.nbytes();
  if (n == 2 && m == 4 && kern.forward_2_4_bf16 != nullptr && values.scalar_type() == at::kBFloat16) {
    // bf16 dot products, any batch: x stays bf16 and row-major, padded to whole 64-column
    // chunks; y is summed in fp32.
    // x is used in place when its rows are already whole chunks (K a multiple of 64), as
    // in most models; y is written as bf16 directly (one rounding of the fp32 sum).
    const int64_t ldx = round_up(kp, 64);
    at::Tensor x16 = x;
    if (k != ldx || !x_contiguous) {
      x16 = at::zeros({batch, ldx}, x.options());
      x16.narrow(1, 0, k).copy_(x.reshape({batch, k}));
    }
    SpmmArgs a{values_c.const_data_ptr(), ValueType::kBFloat16, meta_c.const_data_ptr<uint8_t>(),
               L, rows, 0, nullptr, nullptr, nullptr, bias_p, 0, true, nullptr, 0, nullptr, rows};
    a.x16 = reinterpret_cast<const uint16_t*>(x16.const_data_ptr<at::BFloat16>());
    a.ldx = ldx;
    a.batch = batch;
    a.y16 = reinterpret_cast<uint16_t*>(y_out.data_ptr<at::BFloat16>());
    if (kern.forward_2_4_bf16_lanes != nullptr && batch >= bf16_pairs_batch() && bf16_batch_lanes() &&
        L.groups > 0) {  // (K = 0: the bias alone, below)
      // Many rows of x, the lanes form: threads split the weight rows (whole registers of
      // 16); partial sums wait in an fp32 buffer of the calling thread between K blocks.
      float* yf = reinterpret_cast<float*>(pair_scratch(batch * rows));
      LaneRows16 src;
      src.x = a.x16;
      src.ldx = ldx;
      src.goff = identity_goff(L.groups);
      const int64_t vecs = (rows + 15) / 16;
      at::parallel_for(0, vecs, 1, [&](int64_t v0, int64_t v1) {
        kern.forward_2_4_bf16_lanes(a, 16 * v0, std::min(rows, 16 * v1), src, yf);
      });
    } else if (kern.forward_2_4_bf16_pairs != nullptr && batch >= bf16_pairs_batch() && L.groups > 0) {
      // Many rows of x: prepare x's column pairs once, then the pair GEMM.
      const bool by_tiles = weight_bytes <= kSmallWeightBytes && batch > 64;
      a.pair_tile = pair_tile_for(by_tiles);
      const int64_t tile = a.pair_tile, tiles = (batch + tile - 1) / tile;
      if (by_tiles && tiles > 1) {
        // A small weight (every thread reads it from its cache): threads split the x tiles,
        // each preparing one tile's pairs into its own buffer and using them at once (in
        // L2), instead of all tiles' pairs written to memory and read back by every thread.
        at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
          uint32_t* pp = pair_scratch(pair_words_2_4_bf16(L, a.pair_tile));
          for (int64_t t = t0; t < t1; ++t) {
            SpmmArgs at = a;
            at.x16 += t * tile * a.ldx;
            at.y16 += t * tile * a.ldy;
            at.batch = std::min<int64_t>(tile, batch - t * tile);
            kern.prepare_pairs_2_4_bf16(at, 0, 1, pp);
            kern.forward_2_4_bf16_pairs(at, 0, rows, pp);
          }
        });
      } else {
        uint32_t* pp = pair_scratch(tiles * pair_words_2_4_bf16(L, a.pair_tile));
        at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
          kern.prepare_pairs_2_4_bf16(a, t0, t1, pp);
        });
        at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
          kern.forward_2_4_bf16_pairs(a, r0, r1, pp);
        });
      }
    } else {
      at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        kern.forward_2_4_bf16(a, r0, r1, nullptr);
      });
    }
    return y_out;
  }
  if (n == 2 && m == 4 && kern.forward_2_4[0] != nullptr && batch <= small_batch_limit()) {
    // Small batch: x rows stay row-major, up to 8 per pass over the compressed weight.
    // An fp32 x whose rows are whole 32-column chunks is read in place and y written
    // directly (decoding calls every layer with one row: no copies, no allocations).
    const int64_t ldx = round_up(kp, 32);
    const bool fp32 = x.scalar_type() == at::kFloat;
    const bool x_in_place = fp32 && k == ldx && x_contiguous;
    const at::Tensor x2 = x_in_place ? x : x.reshape({batch, k});
    for (int64_t b0 = 0; b0 < batch; b0 += kSmallTile) {
      const int64_t tb = std::min<int64_t>(kSmallTile, batch - b0);
      const float* xb = x_in_place ? x.const_data_ptr<float>() + b0 * k : nullptr;
      at::Tensor xb_copy, yb_copy;
      if (!x_in_place) {
        xb_copy = at::zeros({tb, ldx}, x.options().dtype(at::kFloat));
        xb_copy.narrow(1, 0, k).copy_(x2.narrow(0, b0, tb));
        xb = xb_copy.const_data_ptr<float>();
      }
      float* yb = fp32 ? y_out.data_ptr<float>() + b0 * rows : nullptr;
      if (!fp32) {
        yb_copy = at::empty({tb, rows}, x.options().dtype(at::kFloat));
        yb = yb_copy.data_ptr<float>();
      }
      SpmmArgs a{values_c.const_data_ptr(), value_type(values), meta_c.const_data_ptr<uint8_t>(),
                 L, rows, 0, nullptr, nullptr, nullptr, bias_p, small_block_groups(tb), true,
                 xb, ldx, yb, rows};
      const RowKernel fn = kern.forward_2_4[tb - 1];
      at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        float tail[32];  // the < 8 groups past the last whole 32-column chunk
        fn(a, r0, r1, tail);
      });
      if (!fp32) y_out.view({batch, rows}).narrow(0, b0, tb).copy_(yb_copy);
    }
    return y_out;
  }
  const at::Tensor x2 = x.reshape({batch, k});
  at::Tensor y = y_out.view({batch, rows});
  if (n == 2 && m == 4 && kern.forward_2_4_lanes != nullptr && fp32_batch_lanes() &&
      values.scalar_type() == at::kFloat && x2.scalar_type() == at::kFloat && kp == k &&
      x2.stride(1) == 1 && L.groups > 0) {  // (K = 0: the bias alone, below)
    // The lanes form: x read in place, y written directly; threads split the weight rows
    // (whole registers of 16).
    SpmmArgs a{values_c.const_data_ptr(), ValueType::kFloat32, meta_c.const_data_ptr<uint8_t>(),
               L, rows, 0, nullptr, nullptr, nullptr, bias_p, 0, true,
               x2.const_data_ptr<float>(), x2.stride(0), y.data_ptr<float>(), rows};
    a.batch = batch;
    LaneRows src;
    src.x = x2.const_data_ptr<float>();
    src.ldx = x2.stride(0);
    src.goff = identity_goff(L.groups);
    const int64_t vecs = (rows + 15) / 16;
    at::parallel_for(0, vecs, 1, [&](int64_t v0, int64_t v1) {
      kern.forward_2_4_lanes(a, 16 * v0, std::min(rows, 16 * v1), src);
    });
    return y_out;
  }
  const int64_t tile = batch_tile(kern), tiles = (batch + tile - 1) / tile;
  if (x2.scalar_type() == at::kFloat && tiles > 1 && weight_bytes <= kSmallWeightBytes) {
    // A small weight (every thread reads it from its own cache), many rows of x (the pixels
    // of a 1x1 convolution): threads split the batch tiles, each transposing its tiles into
    // its own buffers and running every weight row on them. Splitting each tile's rows
    // instead paid two allocations, two TensorIterator transposes and a thread fork per
    // tile: 3136x64 by a 64x64 weight took 7x F.linear's time.
    const float* xp = x2.const_data_ptr<float>();
    const int64_t xs0 = x2.stride(0), xs1 = x2.stride(1);
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> xT(static_cast<size_t>(kp * tile)), yT(static_cast<size_t>(rows * tile));
      auto scratch = scratch_for(L);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b0 = t * tile, tb = std::min(tile, batch - b0), ld = round_up(tb, kern.lanes);
        // xT [kp, ld]: x's rows as columns, zero beyond K and beyond the tile's rows (only
        // those are filled: the transpose writes the rest).
        transpose_into(xp + b0 * xs0, xs0, xs1, tb, k, xT.data(), ld);
        if (tb < ld)
          for (int64_t c = 0; c < k; ++c) std::fill_n(xT.data() + c * ld + tb, ld - tb, 0.f);
        std::fill_n(xT.data() + k * ld, (kp - k) * ld, 0.f);
        SpmmArgs a{values_c.const_data_ptr(), value_type(values), meta_c.const_data_ptr<uint8_t>(),
                   L, rows, ld, xT.data(), nullptr, yT.data(), bias_p, block_groups(L, ld)};
        pick(kern.forward_2_4_batch, kern.forward, L, ld, kern)(a, 0, rows, scratch.get());
        transpose_into(yT.data(), ld, 1, rows, tb, yp + b0 * rows, rows);
      }
    });
    return y_out;
  }
  for_each_batch_tile(kern, batch, [&](int64_t b0, int64_t tb, int64_t ld) {
    const at::Tensor xT = transpose_tile(x2, b0, tb, kp, ld);
    at::Tensor yT = at::empty({rows, ld}, x.options().dtype(at::kFloat));
    SpmmArgs a{values_c.const_data_ptr(), value_type(values), meta_c.const_data_ptr<uint8_t>(),
               L, rows, ld, xT.const_data_ptr<float>(), nullptr, yT.data_ptr<float>(), bias_p,
               block_groups(L, ld)};
    run_kernel(pick(kern.forward_2_4_batch, kern.forward, L, ld, kern), a, rows, 16);
    y.narrow(0, b0, tb).copy_(yT.narrow(1, 0, tb).t());
  });
  return y_out;
}

at::Tensor nm_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                    const at::Tensor& metadata, int64_t k, int64_t n, int64_t m) {
  const NMLayout L = check_compressed(values, metadata, k, n, m);
  check_pairing(grad_out, "grad_out", values);
  const int64_t rows = values.size(0);
  check_batch_operand(grad_out, "grad_out", rows, "the weight's rows");
  if (!has_kernel_dtype(values.scalar_type())) {  // fp64: over Kp too, then the first k
    return at::matmul(grad_out, decompress(values, metadata, L.groups * L.m, n, m).narrow(1, 0, k));
  }
  const int64_t batch = leading_numel(grad_out);
  const at::Tensor gy2 = grad_out.reshape({batch, rows});
  at::Tensor gx = at::empty({batch, k}, grad_out.options());
  const SpmmKernels& kern = active_kernels();
  const int64_t kp = L.groups * L.m;
  const at::Tensor values_c = values.contiguous(), meta_c = metadata.contiguous();
  for_each_batch_tile(kern, batch, [&](int64_t b0, int64_t tb, int64_t ld) {
    const at::Tensor gyT = transpose_tile(gy2, b0, tb, rows, ld);
    at::Tensor gxT = at::zeros({kp, ld}, grad_out.options().dtype(at::kFloat));
    SpmmArgs a{values_c.const_data_ptr(), value_type(values), meta_c.const_data_ptr<uint8_t>(),
               L, rows, ld, nullptr, gyT.const_data_ptr<float>(), gxT.data_ptr<float>(), nullptr,
               block_groups(L, ld)};
    // Threads own whole chunks of groups: disjoint columns of gxT, byte-aligned metadata.
    run_kernel(pick(kern.grad_input_2_4, kern.grad_input, L, ld, kern), a, L.chunks_per_row, 1,
               L.chunk_groups, L.groups);
    gx.narrow(0, b0, tb).copy_(gxT.narrow(0, 0, k).narrow(1, 0, tb).t());
  });
  return gx.view(with_last(grad_out, k));
}

at::Tensor nm_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& metadata,
                        int64_t k, int64_t n, int64_t m) {
  check_pattern(n, m);
  TORCH_CHECK_TYPE(metadata.scalar_type() == at::kByte, "metadata must be uint8, got ",
                   metadata.scalar_type());
  TORCH_CHECK_VALUE(metadata.dim() == 2, "metadata must be 2-D, got ", metadata.dim(), "-D");
  const NMLayout L(k, static_cast<int>(n), static_cast<int>(m));
  const int64_t rows = metadata.size(0);
  TORCH_CHECK_VALUE(metadata.size(1) == L.meta_bytes_per_row, "metadata must have shape [",
                    rows, ", ", L.meta_bytes_per_row, "] for k=", k, " and ", n, ":", m,
                    ", got ", metadata.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out (", grad_out.scalar_type(),
                   ") and x (", x.scalar_type(), ") must have one dtype");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be floating, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == metadata.device() && grad_out.device() == metadata.device(),
                    "grad_out, x and metadata must be on one device, got ", grad_out.device(), ", ",
                    x.device(), " and ", metadata.device());
  check_batch_operand(x, "x", k, "k");
  check_batch_operand(grad_out, "grad_out", rows, "the weight's rows");
  const int64_t batch = leading_numel(x);
  TORCH_CHECK_VALUE(grad_out.numel() == batch * rows, "grad_out and x must hold the same batch: ",
                    grad_out.sizes(), " vs ", x.sizes());
  if (!has_kernel_dtype(x.scalar_type())) {  // fp64: dense product, then gather kept entries
    // Over K padded to Kp (zero columns of x): a group with fewer than N real columns keeps
    // slots in the padding, and their gradient is 0. At Kp every slot is a real column, so
    // the kept positions are exactly where a decompressed all-ones weight is nonzero.
    const int64_t kp = L.groups * L.m;
    const at::Tensor xp = at::constant_pad_nd(x.reshape({batch, k}), {0, kp - k});
    const at::Tensor dense = at::matmul(grad_out.reshape({batch, rows}).t(), xp);
    const at::Tensor kept = decompress(at::ones({rows, L.values_per_row}, x.options()), metadata, kp, n, m);
    return dense.masked_select(kept.ne(0)).view({rows, L.values_per_row});
  }
  const at::Tensor gy2 = grad_out.reshape({batch, rows}), x2 = x.reshape({batch, k});
  // Written by the first batch tile, accumulated by the others (zeros only if no tile runs).
  at::Tensor gv = batch == 0 ? at::zeros({rows, L.values_per_row}, x.options().dtype(at::kFloat))
                             : at::empty({rows, L.values_per_row}, x.options().dtype(at::kFloat));
  const SpmmKernels& kern = active_kernels();
  const int64_t kp = L.groups * L.m;
  const at::Tensor meta_c = metadata.contiguous();
  for_each_batch_tile(kern, batch, [&](int64_t b0, int64_t tb, int64_t ld) {
    const at::Tensor xT = transpose_tile(x2, b0, tb, kp, ld);
    const at::Tensor gyT = transpose_tile(gy2, b0, tb, rows, ld);
    SpmmArgs a{nullptr, ValueType::kFloat32, meta_c.const_data_ptr<uint8_t>(), L, rows, ld,
               xT.const_data_ptr<float>(), gyT.const_data_ptr<float>(), gv.data_ptr<float>(), nullptr,
               block_groups(L, ld), b0 == 0};
    run_kernel(pick(kern.sddmm_2_4, kern.sddmm, L, ld, kern), a, rows, 16);
  });
  return gv.to(x.scalar_type());
}

}  // namespace

// The CPU ISA the product kernels run with ("avx512", "avx2", "scalar"), and a way to force
// one (tests exercise every variant the machine supports). Declared in sparsekit.cpp.
std::string spmm_active_isa() { return active_kernels().isa; }
const SpmmKernels& spmm_active_kernels() { return active_kernels(); }

bool spmm_set_isa(const std::string& isa) {
  const SpmmKernels* k = cpu_supports(isa.c_str()) ? kernels_for(isa) : nullptr;
  if (k != nullptr) g_active.store(k);
  return k != nullptr;
}

std::vector<std::string> spmm_compiled_isas() {
#if defined(__x86_64__)
  return {"scalar", "avx2", "avx512", "avx512bf16"};
#else
  return {"scalar"};
#endif
}

TORCH_LIBRARY_IMPL(sparsekit, CPU, lib) {
  lib.impl("nm_linear", &nm_linear_cpu);
  lib.impl("nm_linear_grad_input", &nm_linear_grad_input_cpu);
  lib.impl("nm_sddmm", &nm_sddmm_cpu);
}

const int64_t* identity_goff(int64_t groups) {
  thread_local std::vector<int64_t> table;
  for (int64_t g = static_cast<int64_t>(table.size()); g < groups; ++g) table.push_back(4 * g);
  return table.data();
}

}  // namespace sparsekit
