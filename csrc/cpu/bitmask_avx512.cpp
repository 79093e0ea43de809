// CPU kernels of the bitmask format with AVX-512 F/BW/VL/DQ/VBMI2/VPOPCNTDQ (Ice Lake, Zen 4
// and later), chosen at run time.
//
// Small batches (x row-major), the bandwidth-bound regime: the compressed weight is
// streamed once for all rows of x. Sparse rows (up to 45% kept) go by 64-column blocks:
// the kept columns' list, then x gathered beside the packed values (forward_small_t).
// Denser rows go by 16-column chunks: one expand of the packed values per mask word, and
// every row of x takes an FMA with the chunk (forward_small_chunks_t).
// Larger batches (batch in the vector lanes, xT [Kp, ld]): a row's kept columns are
// decoded once into a list (compress of a column iota), then every kept value is a
// broadcast times ld/16 vectors of xT, so the work is proportional to the kept entries.
#include <cstdint>
#include <type_traits>

#include "bitmask.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512vpopcntdq,popcnt,bmi2,fma")

namespace sparsekit {
namespace bitmask_avx512 {
namespace {

// Bits set in a row's `chunks` mask words: 32 words per vector popcount.
inline int64_t row_bits(const uint16_t* row, int64_t chunks) {
  __m512i s = _mm512_setzero_si512();
  int64_t c = 0;
  for (; c + 32 <= chunks; c += 32) s = _mm512_add_epi64(s, _mm512_popcnt_epi64(_mm512_loadu_si512(row + c)));
  const __mmask32 rest = static_cast<__mmask32>(_bzhi_u32(0xFFFFFFFFu, static_cast<unsigned>(chunks - c)));
  s = _mm512_add_epi64(s, _mm512_popcnt_epi64(_mm512_maskz_loadu_epi16(rest, row + c)));
  return _mm512_reduce_add_epi64(s);
}

int64_t first_bad_row(const BitmaskArgs& a, int64_t r0, int64_t r1, uint16_t tail) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = a.mask + r * a.chunks;
    if (row_bits(row, a.chunks) != a.offsets[r + 1] - a.offsets[r] ||
        (a.chunks > 0 && (row[a.chunks - 1] & ~tail) != 0)) {
      return r;
    }
  }
  return -1;
}

// The chunk of word m as 16 weights (zeros where m has no bit), from the packed values at p.
// A masked load of exactly popcount(m) values (never past them, so never past the end of
// values) and an in-register expand: the expand-load with a memory operand is microcoded
// on some cores (AMD Zen 4) and many times slower.
template <bool BF16>
inline __m512 expand_chunk(uint16_t m, const void* p, unsigned count) {
  const uint32_t low = _bzhi_u32(0xFFFFu, count);  // the low `count` bits
  if constexpr (BF16) {
    // Widened to 32-bit lanes before the expand: the 16-bit expand is the slower one.
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(low), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_maskz_expand_epi32(m, h), 16));
  } else {
    return _mm512_maskz_expand_ps(m, _mm512_maskz_loadu_ps(static_cast<__mmask16>(low), p));
  }
}

// The row-major forward, 64 columns (four mask words) per step. One byte compress of a
// column iota lists the block's kept columns (vpcompressb: one instruction per 64 columns,
// where an expand of the values takes one per 16 and is the slow instruction on AMD Zen 4);
// a two-source permute per 32 columns of x gathers the x entries beside the packed values,
// which are read with one masked load per 16. Work per block: one compress, and per 16
// kept values one permute pair and one FMA for each row of x.

// `k` lanes of packed values at p as fp32 (zero in the other lanes; never read past them).
template <bool BF16>
inline __m512 load_values(__mmask16 k, const void* p) {
  if constexpr (BF16) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  } else {
    return _mm512_maskz_loadu_ps(k, p);
  }
}

// y[b, r] for B rows of x (fp32, padded to whole blocks).
template <int B, bool BF16>
void forward_small_t(const BitmaskArgs& a, int64_t r0, int64_t r1) {
  using T = typename std::conditional<BF16, uint16_t, float>::type;
  const int64_t C = a.chunks;
  const __m512i iota = _mm512_load_si512(kByteIota), bit5 = _mm512_set1_epi32(32);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* mk = a.mask + r * C;
    const T* v = static_cast<const T*>(a.values) + a.offsets[r];
    __m512 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchValueBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mk + c + kPrefetchMaskWords), _MM_HINT_T0);
      const uint64_t bits = bitmask_block_bits(mk, c, C);
      const unsigned n = static_cast<unsigned>(_mm_popcnt_u64(bits));
      __m512i cols = _mm512_maskz_compress_epi8(bits, iota);  // kept columns, then zeros
      const float* xb = a.x + c * kChunk;
      for (unsigned g = 0; g < n; g += 16) {  // one pass unless more than 16 are kept
        const __m512i idx = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(cols));
        const __mmask16 high = _mm512_test_epi32_mask(idx, bit5);  // column >= 32
        // Lanes past the kept values stay out of the sum (x there may be inf).
        const __mmask16 k = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, n - g));
        const __m512 w = load_values<BF16>(k, v + g);
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) {
          const float* xr = xb + b * a.ldx;
          const __m512 lo = _mm512_permutex2var_ps(_mm512_loadu_ps(xr), idx, _mm512_loadu_ps(xr + 16));
          const __m512 hi = _mm512_permutex2var_ps(_mm512_loadu_ps(xr + 32), idx, _mm512_loadu_ps(xr + 48));
          acc[b] = _mm512_mask3_fmadd_ps(w, _mm512_mask_blend_ps(high, lo, hi), acc[b], k);
        }
        cols = _mm512_alignr_epi32(_mm512_setzero_si512(), cols, 4);  // the next 16 columns
      }
      v += n;
    }
    const float bias = a.bias != nullptr ? a.bias[r] : 0.0f;
    for (int b = 0; b < B; ++b) a.y[b * a.ldy + r] = _mm512_reduce_add_ps(acc[b]) + bias;
  }
}

// The chunk kernel: y[b, r] for B rows of x; U chunks in flight per row for B < 4 (FMA
// latency).
template <int B, bool BF16>
void forward_small_chunks_t(const BitmaskArgs& a, int64_t r0, int64_t r1) {
  constexpr int U = B == 1 ? 4 : (B <= 3 ? 2 : 1);
  using T = typename std::conditional<BF16, uint16_t, float>::type;
  const int64_t C = a.chunks;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* mk = a.mask + r * C;
    const T* v = static_cast<const T*>(a.values) + a.offsets[r];
    __m512 acc[U][B];
    for (int u = 0; u < U; ++u)
      for (int b = 0; b < B; ++b) acc[u][b] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + U <= C; c += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const uint16_t m = mk[c + u];
        const unsigned count = _mm_popcnt_u32(m);
        const __m512 w = expand_chunk<BF16>(m, v, count);
        v += count;
        const float* xc = a.x + (c + u) * kChunk;
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b)
          acc[u][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + b * a.ldx), acc[u][b]);
      }
    }
    for (; c < C; ++c) {
      const uint16_t m = mk[c];
      const unsigned count = _mm_popcnt_u32(m);
      const __m512 w = expand_chunk<BF16>(m, v, count);
      v += count;
      const float* xc = a.x + c * kChunk;
      for (int b = 0; b < B; ++b)
        acc[0][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + b * a.ldx), acc[0][b]);
    }
    const float bias = a.bias != nullptr ? a.bias[r] : 0.0f;
    for (int b = 0; b < B; ++b) {
      __m512 s = acc[0][b];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][b]);
      a.y[b * a.ldy + r] = _mm512_reduce_add_ps(s) + bias;
    }
  }
}

// Above this share of kept entries the block kernel mostly needs two or more passes per
// block, and the chunk kernel (one expand per 16 columns, whatever their count) is faster:
// on a Zen 4 core, 1.8 ns per 16 columns at any density against the block kernel's 0.8 at
// 20% kept, 1.4 at 30% and 2.0 at 50%.
constexpr double kBlockMaxDensity = 0.45;

template <bool BF16>
void forward_small_dispatch(const BitmaskArgs& a, int64_t r0, int64_t r1) {
  const double cells = static_cast<double>(a.rows) * static_cast<double>(a.chunks * kChunk);
  const bool chunks = static_cast<double>(a.offsets[a.rows]) > kBlockMaxDensity * cells;
  bitmask_with_batch(a.batch, [&](auto b) {
    if (chunks) {
      forward_small_chunks_t<decltype(b)::value, BF16>(a, r0, r1);
    } else {
      forward_small_t<decltype(b)::value, BF16>(a, r0, r1);
    }
  });
}

void forward_small(const BitmaskArgs& a, int64_t r0, int64_t r1, float*) {
  if (a.bf16) {
    forward_small_dispatch<true>(a, r0, r1);
  } else {
    forward_small_dispatch<false>(a, r0, r1);
  }
}

// Row r's kept columns into cols (int32, 16 slots of slack) and, for bf16, its values
// widened into vals; returns the count and points *row_vals at the row's fp32 values.
inline int64_t decode_row(const BitmaskArgs& a, int64_t r, int32_t* cols, float* vals,
                          const float** row_vals) {
  const uint16_t* mk = a.mask + r * a.chunks;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t p = 0;
  for (int64_t c = 0; c < a.chunks; ++c) {
    const uint16_t m = mk[c];
    const __m512i col = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(c * kChunk)));
    _mm512_storeu_si512(cols + p, _mm512_maskz_compress_epi32(m, col));
    p += _mm_popcnt_u32(m);
  }
  const int64_t off = a.offsets[r];
  if (a.bf16) {
    const uint16_t* h = static_cast<const uint16_t*>(a.values) + off;
    int64_t i = 0;
    for (; i + 16 <= p; i += 16) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i));
      _mm512_storeu_ps(vals + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)));
    }
    for (; i < p; ++i) vals[i] = bf16_to_float(h[i]);
    *row_vals = vals;
  } else {
    *row_vals = static_cast<const float*>(a.values) + off;
  }
  return p;
}

inline float* cols_scratch_end(float* scratch, int64_t chunks) {
  return scratch + chunks * kChunk + 32;
}

// yT[r, t0 : t0 + 16*NB] for one batch tile; two accumulator sets hide FMA latency.
template <int NB>
inline void forward_tile(const BitmaskArgs& a, int64_t r, int64_t t0, const int32_t* cols,
                         const float* vals, int64_t nnz, float bias) {
  __m512 acc0[NB], acc1[NB];
  for (int j = 0; j < NB; ++j) acc0[j] = acc1[j] = _mm512_setzero_ps();
  const float* xT = a.xT + t0;
  const int64_t ld = a.ld;
  int64_t q = 0;
  for (; q + 2 <= nnz; q += 2) {
    const __m512 w0 = _mm512_set1_ps(vals[q]), w1 = _mm512_set1_ps(vals[q + 1]);
    const float* x0 = xT + static_cast<int64_t>(cols[q]) * ld;
    const float* x1 = xT + static_cast<int64_t>(cols[q + 1]) * ld;
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      acc0[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x0 + 16 * j), acc0[j]);
      acc1[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x1 + 16 * j), acc1[j]);
    }
  }
  if (q < nnz) {
    const __m512 w0 = _mm512_set1_ps(vals[q]);
    const float* x0 = xT + static_cast<int64_t>(cols[q]) * ld;
    for (int j = 0; j < NB; ++j) acc0[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x0 + 16 * j), acc0[j]);
  }
  float* y = a.out + r * ld + t0;
  const __m512 b = _mm512_set1_ps(bias);
  for (int j = 0; j < NB; ++j) _mm512_storeu_ps(y + 16 * j, _mm512_add_ps(_mm512_add_ps(acc0[j], acc1[j]), b));
}

template <int NB>
inline void grad_input_tile(const BitmaskArgs& a, int64_t r, int64_t t0, const int32_t* cols,
                            const float* vals, int64_t nnz) {
  __m512 g[NB];
  for (int j = 0; j < NB; ++j) g[j] = _mm512_loadu_ps(a.gyT + r * a.ld + t0 + 16 * j);
  for (int64_t q = 0; q < nnz; ++q) {
    const __m512 w = _mm512_set1_ps(vals[q]);
    float* gx = a.out + static_cast<int64_t>(cols[q]) * a.ld + t0;
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j)
      _mm512_storeu_ps(gx + 16 * j, _mm512_fmadd_ps(w, g[j], _mm512_loadu_ps(gx + 16 * j)));
  }
}

constexpr int kMaxTile = 8;  // vectors of batch per pass (128 lanes)

template <typename F>
inline void for_each_tile(int64_t ld, F&& f) {
  int64_t t0 = 0;
  for (; t0 + 16 * kMaxTile <= ld; t0 += 16 * kMaxTile) f(t0, std::integral_constant<int, kMaxTile>{});
  switch ((ld - t0) / 16) {
    case 1: f(t0, std::integral_constant<int, 1>{}); break;
    case 2: f(t0, std::integral_constant<int, 2>{}); break;
    case 3: f(t0, std::integral_constant<int, 3>{}); break;
    case 4: f(t0, std::integral_constant<int, 4>{}); break;
    case 5: f(t0, std::integral_constant<int, 5>{}); break;
    case 6: f(t0, std::integral_constant<int, 6>{}); break;
    case 7: f(t0, std::integral_constant<int, 7>{}); break;
    default: break;
  }
}

void forward(const BitmaskArgs& a, int64_t r0, int64_t r1, float* scratch) {
  int32_t* cols = reinterpret_cast<int32_t*>(scratch);
  float* vals = cols_scratch_end(scratch, a.chunks);
  for (int64_t r = r0; r < r1; ++r) {
    const float* rv;
    const int64_t nnz = decode_row(a, r, cols, vals, &rv);
    const float bias = a.bias != nullptr ? a.bias[r] : 0.0f;
    for_each_tile(a.ld, [&](int64_t t0, auto nb) { forward_tile<decltype(nb)::value>(a, r, t0, cols, rv, nnz, bias); });
  }
}

void grad_input(const BitmaskArgs& a, int64_t r0, int64_t r1, float* scratch) {
  int32_t* cols = reinterpret_cast<int32_t*>(scratch);
  float* vals = cols_scratch_end(scratch, a.chunks);
  for (int64_t r = r0; r < r1; ++r) {
    const float* rv;
    const int64_t nnz = decode_row(a, r, cols, vals, &rv);
    for_each_tile(a.ld, [&](int64_t t0, auto nb) { grad_input_tile<decltype(nb)::value>(a, r, t0, cols, rv, nnz); });
  }
}

void sddmm(const BitmaskArgs& a, int64_t r0, int64_t r1, float* scratch) {
  int32_t* cols = reinterpret_cast<int32_t*>(scratch);
  float* vals = cols_scratch_end(scratch, a.chunks);
  for (int64_t r = r0; r < r1; ++r) {
    const float* rv;
    const int64_t nnz = decode_row(a, r, cols, vals, &rv);
    const float* gy = a.gyT + r * a.ld;
    float* gv = a.out + a.offsets[r];
    for (int64_t q = 0; q < nnz; ++q) {
      const float* x = a.xT + static_cast<int64_t>(cols[q]) * a.ld;
      __m512 s = _mm512_setzero_ps();
      for (int64_t b = 0; b < a.ld; b += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(gy + b), _mm512_loadu_ps(x + b), s);
      const float d = _mm512_reduce_add_ps(s);
      gv[q] = a.first ? d : gv[q] + d;
    }
  }
}

// Dense rows from the packed values: 16-bit entries 32 columns per step (two mask words,
// one masked load of their kept values and one word expand), 32-bit entries 16 per step;
// the row's last step stores only the columns below k. 8-byte entries: the portable loop.
void decompress(const BitmaskArgs& a, int64_t r0, int64_t r1, void* dst, int64_t k, int elem) {
  if (elem != 2 && elem != 4) {
    bitmask_decompress_rows_scalar(a, r0, r1, dst, k, elem);
    return;
  }
  const int64_t C = a.chunks;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* mk = a.mask + r * C;
    if (elem == 2) {
      const uint16_t* v = static_cast<const uint16_t*>(a.values) + a.offsets[r];
      uint16_t* row = static_cast<uint16_t*>(dst) + r * k;
      for (int64_t c = 0; c < C; c += 2) {
        const uint32_t bits = mk[c] | (c + 1 < C ? static_cast<uint32_t>(mk[c + 1]) << 16 : 0u);
        const unsigned n = static_cast<unsigned>(_mm_popcnt_u32(bits));
        const __m512i w = _mm512_maskz_expand_epi16(
            bits, _mm512_maskz_loadu_epi16(static_cast<__mmask32>(_bzhi_u32(0xFFFFFFFFu, n)), v));
        v += n;
        const int64_t left = k - c * kChunk;
        const __mmask32 keep = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>(_bzhi_u32(0xFFFFFFFFu, static_cast<unsigned>(left)));
        _mm512_mask_storeu_epi16(row + c * kChunk, keep, w);
      }
    } else {
      const float* v = static_cast<const float*>(a.values) + a.offsets[r];
      float* row = static_cast<float*>(dst) + r * k;
      for (int64_t c = 0; c < C; ++c) {
        const uint16_t bits = mk[c];
        const unsigned n = static_cast<unsigned>(_mm_popcnt_u32(bits));
        const __m512 w = _mm512_maskz_expand_ps(
            bits, _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, n)), v));
        v += n;
        const int64_t left = k - c * kChunk;
        const __mmask16 keep = left >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<unsigned>(left)));
        _mm512_mask_storeu_ps(row + c * kChunk, keep, w);
      }
    }
  }
}

}  // namespace
}  // namespace bitmask_avx512

const BitmaskKernels& bitmask_kernels_avx512() {
  static const BitmaskKernels k{"avx512", bitmask_avx512::first_bad_row, bitmask_avx512::forward_small, false, bitmask_avx512::forward,
                                bitmask_avx512::grad_input, bitmask_avx512::sddmm, bitmask_avx512::decompress};
  return k;
}

}  // namespace sparsekit

#pragma GCC pop_options
#endif  // __x86_64__
