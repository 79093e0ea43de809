// CPU N:M products with AVX2 + FMA + F16C (8 floats per vector), chosen at run time.
// Every function below the pragma is compiled for those extensions; torch headers and
// nm_format.h are included before it so their inline code keeps the baseline target.
#include <cstdint>
#include <utility>

#include "spmm.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace sparsekit {
namespace spmm_avx2 {

struct V {
  static constexpr bool kHasForward24 = true;
  static constexpr int kRegs = 16;
  static constexpr int kLanes = 8;
  using reg = __m256;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static reg bcast(float x) { return _mm256_set1_ps(x); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[0..3] (+)= the lane sums of a, b, c, d.
  static void hsum4_add(reg a, reg b, reg c, reg d, float* out, bool accumulate) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
    _mm_storeu_ps(out, accumulate ? _mm_add_ps(_mm_loadu_ps(out), sums) : sums);
  }
  static float half1(uint16_t h) { return _cvtsh_ss(h); }
  static void widen16(const uint16_t* in, int64_t count, bool bf16, float* out) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
      const __m256 f = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                            : _mm256_cvtph_ps(h);
      _mm256_storeu_ps(out + i, f);
    }
    for (; i < count; ++i) out[i] = bf16 ? bf16_to_float(in[i]) : _cvtsh_ss(in[i]);
  }
};

}  // namespace spmm_avx2
}  // namespace sparsekit

#define SK_ISA_NS spmm_avx2
#include "spmm_kernels.h"
#include "conv_kernels.h"

namespace sparsekit {
namespace spmm_avx2 {

// 8 kept values of a 16-column chunk (4 groups) widened to fp32.
template <ValueType VT>
inline __m256 load8(const void* values, int64_t at) {
  if constexpr (VT == ValueType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(values) + at);
  } else {
    const __m128i h = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + at));
    if constexpr (VT == ValueType::kFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

constexpr int64_t kPrefetchRows = 2;

// 2:4 forward for TB rows of x: per 16 columns, 2 metadata bytes become 8 lane indices
// (lane j: 4 * (j / 2) + ((meta >> 2j) & 3)); lanes 0-3 index the first 8 columns and
// lanes 4-7 the next 8, so two in-register permutes and a fixed blend gather x.
template <int TB, ValueType VT>
void forward_2_4_typed(const SpmmArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const NMLayout& L = a.layout;
  const int64_t chunks = L.groups / 4;
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  // Columns in blocks whose slice of the TB rows of x stays in L1 (a.block_groups, a
  // multiple of 4 groups); each row's partial sums carry over in y.
  const int64_t block_chunks = a.block_groups / 4 > 0 ? a.block_groups / 4 : 1;
  for (int64_t c0 = 0; c0 < chunks || c0 == 0; c0 += block_chunks) {
  const int64_t c1 = c0 + block_chunks < chunks ? c0 + block_chunks : chunks;
  const bool last = c1 == chunks;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = a.metadata + r * L.meta_bytes_per_row;
    const int64_t vbase = r * L.values_per_row;
    const int64_t pf_rows = r + kPrefetchRows < r1 ? kPrefetchRows : 0;
    // Two accumulator sets (even / odd chunks) for few rows of x: FMA latency, not
    // throughput, would bound a single chain.
    constexpr int kSets = TB <= 4 ? 2 : 1;
    __m256 acc[kSets][TB];
    for (int s = 0; s < kSets; ++s)
      for (int b = 0; b < TB; ++b) acc[s][b] = _mm256_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      uint16_t m16;
      __builtin_memcpy(&m16, meta + 2 * c, 2);
      const __m256i idx = _mm256_add_epi32(
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(m16), shifts), three), base);
      // Prefetch the same chunk of a row kPrefetchRows ahead: rows are walked a column
      // block at a time, which the hardware prefetcher does not follow across rows.
      _mm_prefetch(static_cast<const char*>(a.values) +
                       (vbase + pf_rows * L.values_per_row + 8 * c) * (VT == ValueType::kFloat32 ? 4 : 2),
                   _MM_HINT_T1);
      if ((c & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(meta + pf_rows * L.meta_bytes_per_row + 2 * c), _MM_HINT_T1);
      const __m256 w = load8<VT>(a.values, vbase + 8 * c);
      __m256* set = acc[kSets == 2 ? (c & 1) : 0];
      for (int b = 0; b < TB; ++b) {
        const float* x = a.x + b * a.ldx + 16 * c;
        const __m256 xs = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(x), idx),
                                          _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), idx), 0xF0);
        set[b] = _mm256_fmadd_ps(w, xs, set[b]);
      }
    }
    float sums[TB];
    for (int b = 0; b < TB; ++b) {
      sums[b] = V::hsum(kSets == 2 ? _mm256_add_ps(acc[0][b], acc[kSets - 1][b]) : acc[0][b]);
    }
    if (last) forward_2_4_tail(a, r, chunks * 4, TB, sums, scratch);
    if (c0 == 0) {
      const float bias = a.bias != nullptr ? a.bias[r] : 0.f;
      for (int b = 0; b < TB; ++b) a.y[b * a.ldy + r] = sums[b] + bias;
    } else {
      for (int b = 0; b < TB; ++b) a.y[b * a.ldy + r] += sums[b];
    }
  }
  }
}

}  // namespace spmm_avx2
}  // namespace sparsekit

namespace sparsekit {
const ConvKernels& conv_kernels_avx2() {
  static const ConvKernels k = spmm_avx2::make_conv_kernels(
      "avx2", std::make_integer_sequence<int, kMaxConvRegs>{});
  return k;
}

const SpmmKernels& spmm_kernels_avx2() {
  static const SpmmKernels k =
      spmm_avx2::make_kernels("avx2", std::make_integer_sequence<int, 8>{});
  return k;
}
}  // namespace sparsekit

#pragma GCC pop_options
#endif
