// The bitmask kernels of the "avx512bf16" CPU variant: the AVX-512 set (bitmask_avx512.cpp)
// with a bf16 row-major forward on AVX512-BF16 dot products (vdpbf16ps).
//
// x stays bf16. Per 64-column block (four mask words): one byte compress of a column iota
// lists the kept columns, one two-source word permute gathers x at up to 32 of them, and
// one vdpbf16ps multiplies them by the packed values (one masked load) and adds pairs into
// 16 fp32 sums. Half the instructions per kept value of the fp32-widening kernel.
#include <cstdint>

#include "bitmask.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,popcnt,bmi2")

namespace sparsekit {
namespace bitmask_avx512bf16 {
namespace {

// y[b, r] for B rows of bf16 x (x16, padded to whole blocks).
template <int B>
void forward_t(const BitmaskArgs& a, int64_t r0, int64_t r1) {
  const int64_t C = a.chunks;
  const __m512i iota = _mm512_load_si512(kByteIota);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* mk = a.mask + r * C;
    const uint16_t* v = static_cast<const uint16_t*>(a.values) + a.offsets[r];
    __m512 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchValueBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mk + c + kPrefetchMaskWords), _MM_HINT_T0);
      const uint64_t bits = bitmask_block_bits(mk, c, C);
      const unsigned n = static_cast<unsigned>(_mm_popcnt_u64(bits));
      __m512i cols = _mm512_maskz_compress_epi8(bits, iota);
      const uint16_t* xb = a.x16 + c * kChunk;
      for (unsigned g = 0; g < n; g += 32) {  // one pass unless more than 32 are kept
        const __m512i idx = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(cols));
        const __mmask32 k = static_cast<__mmask32>(_bzhi_u32(0xFFFFFFFFu, n - g));
        const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(k, v + g);
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) {
          const uint16_t* xr = xb + b * a.ldx;
          // Zero past the kept values: x there may be inf, and 0 * inf is NaN.
          const __m512i xg = _mm512_maskz_permutex2var_epi16(k, _mm512_loadu_si512(xr), idx,
                                                             _mm512_loadu_si512(xr + 32));
          acc[b] = _mm512_dpbf16_ps(acc[b], w, (__m512bh)xg);
        }
        cols = _mm512_alignr_epi64(_mm512_setzero_si512(), cols, 4);  // the next 32 columns
      }
      v += n;
    }
    const float bias = a.bias != nullptr ? a.bias[r] : 0.0f;
    for (int b = 0; b < B; ++b) a.y[b * a.ldy + r] = _mm512_reduce_add_ps(acc[b]) + bias;
  }
}

void forward_small(const BitmaskArgs& a, int64_t r0, int64_t r1, float* scratch) {
  if (!a.bf16) {  // fp32 values: the AVX-512 kernel
    bitmask_kernels_avx512().forward_small(a, r0, r1, scratch);
    return;
  }
  bitmask_with_batch(a.batch, [&](auto b) { forward_t<decltype(b)::value>(a, r0, r1); });
}

}  // namespace
}  // namespace bitmask_avx512bf16

const BitmaskKernels& bitmask_kernels_avx512bf16() {
  static const BitmaskKernels k = [] {
    BitmaskKernels t = bitmask_kernels_avx512();
    t.isa = "avx512bf16";
    t.forward_small = &bitmask_avx512bf16::forward_small;
    t.bf16_x = true;
    return t;
  }();
  return k;
}

}  // namespace sparsekit

#pragma GCC pop_options
#endif  // __x86_64__
