// CPU N:M products with AVX-512 F/BW/VL/DQ (16 floats per vector), chosen at run time.
// Every function below the pragma is compiled for those extensions; torch headers and
// nm_format.h are included before it so their inline code keeps the baseline target.
#include <cstdint>
#include <utility>

#include "spmm.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace sparsekit {
namespace spmm_avx512 {

struct V {
  static constexpr bool kHasForward24 = true;
  static constexpr int kRegs = 32;
  static constexpr int kLanes = 16;
  using reg = __m512;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static reg bcast(float x) { return _mm512_set1_ps(x); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static float hsum(reg a) { return _mm512_reduce_add_ps(a); }
  // out[0..3] (+)= the lane sums of a, b, c, d (one transpose-and-add tree for all four).
  static void hsum4_add(reg a, reg b, reg c, reg d, float* out, bool accumulate) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
    // 128-bit blocks: one 4-lane partial of a, b, c, d each.
    __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(2, 3, 0, 1)));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m128 sums = _mm512_castps512_ps128(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s));
    _mm_storeu_ps(out, accumulate ? _mm_add_ps(_mm_loadu_ps(out), sums) : sums);
  }
  static float half1(uint16_t h) { return _cvtsh_ss(h); }
  static void widen16(const uint16_t* in, int64_t count, bool bf16, float* out) {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
      const __m512 f = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                            : _mm512_cvtph_ps(h);
      _mm512_storeu_ps(out + i, f);
    }
    for (; i < count; ++i) out[i] = bf16 ? bf16_to_float(in[i]) : _cvtsh_ss(in[i]);
  }
};
}  // namespace spmm_avx512
}  // namespace sparsekit

#define SK_ISA_NS spmm_avx512
#include "spmm_kernels.h"
#include "conv_kernels.h"

namespace sparsekit {
namespace spmm_avx512 {

// 16 kept values of a 32-column chunk (8 groups) widened to fp32.
template <ValueType VT>
inline __m512 load16(const void* values, int64_t at) {
  if constexpr (VT == ValueType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(values) + at);
  } else {
    const __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(values) + at));
    if constexpr (VT == ValueType::kFloat16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

constexpr int64_t kPrefetchRows = 2;

// 2:4 forward for TB rows of x: per 32 columns, the 4 metadata bytes become 16 lane
// indices in registers (lane j: 4 * (j / 2) + ((meta >> 2j) & 3)), and one two-source
// permute gathers the x entries the 16 kept values multiply.
template <int TB, ValueType VT>
void forward_2_4_typed(const SpmmArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const NMLayout& L = a.layout;
  const int64_t chunks = L.groups / 8;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  // Columns in blocks whose slice of the TB rows of x stays in L1 (a.block_groups, a
  // multiple of 8 groups); each row's partial sums carry over in y.
  const int64_t block_chunks = a.block_groups / 8 > 0 ? a.block_groups / 8 : 1;
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
    __m512 acc[kSets][TB];
    for (int s = 0; s < kSets; ++s)
      for (int b = 0; b < TB; ++b) acc[s][b] = _mm512_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t m32;
      __builtin_memcpy(&m32, meta + 4 * c, 4);
      const __m512i idx = _mm512_add_epi32(
          _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(m32)), shifts), three),
          base);
      // Prefetch the same chunk of a row kPrefetchRows ahead: rows are walked a column
      // block at a time, which the hardware prefetcher does not follow across rows.
      _mm_prefetch(static_cast<const char*>(a.values) +
                       (vbase + pf_rows * L.values_per_row + 16 * c) * (VT == ValueType::kFloat32 ? 4 : 2),
                   _MM_HINT_T1);
      if ((c & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(meta + pf_rows * L.meta_bytes_per_row + 4 * c), _MM_HINT_T1);
      const __m512 w = load16<VT>(a.values, vbase + 16 * c);
      __m512* set = acc[kSets == 2 ? (c & 1) : 0];
      for (int b = 0; b < TB; ++b) {
        const float* x = a.x + b * a.ldx + 32 * c;
        const __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(x), idx, _mm512_loadu_ps(x + 16));
        set[b] = _mm512_fmadd_ps(w, xs, set[b]);
      }
    }
    float sums[TB];
    for (int b = 0; b < TB; ++b) {
      sums[b] = _mm512_reduce_add_ps(kSets == 2 ? _mm512_add_ps(acc[0][b], acc[kSets - 1][b]) : acc[0][b]);
    }
    if (last) forward_2_4_tail(a, r, chunks * 8, TB, sums, scratch);
    if (c0 == 0) {
      const float bias = a.bias != nullptr ? a.bias[r] : 0.f;
      for (int b = 0; b < TB; ++b) a.y[b * a.ldy + r] = sums[b] + bias;
    } else {
      for (int b = 0; b < TB; ++b) a.y[b * a.ldy + r] += sums[b];
    }
  }
  }
}

}  // namespace spmm_avx512
}  // namespace sparsekit

namespace sparsekit {
const ConvKernels& conv_kernels_avx512() {
  static const ConvKernels k = spmm_avx512::make_conv_kernels(
      "avx512", std::make_integer_sequence<int, kMaxConvRegs>{});
  return k;
}

namespace spmm_avx512 {
void forward_2_4_lanes(const SpmmArgs& a, int64_t r0, int64_t r1, const LaneRows& rows);  // sp24_lanes_avx512.cpp
}

const SpmmKernels& spmm_kernels_avx512() {
  static const SpmmKernels k = [] {
    SpmmKernels t = spmm_avx512::make_kernels("avx512", std::make_integer_sequence<int, kMaxTileRegs>{});
    t.forward_2_4_lanes = &spmm_avx512::forward_2_4_lanes;
    return t;
  }();
  return k;
}
}  // namespace sparsekit

#pragma GCC pop_options
#endif
