// Shared by the "lanes" 2:4 batch forwards (16 weight rows per register, rows of x
// broadcast): sp24_bf16_avx512.cpp (bf16 values, dot products) and sp24_lanes_avx512.cpp
// (fp32). x86 only; included after an AVX-512 target pragma.
#pragma once

#include <algorithm>
#include <cstdint>
#include <immintrin.h>

#include "spmm.h"

namespace sparsekit {

// Prefetches into L2 the values and metadata of weight rows [r, r1) at the K block of
// `groups` groups from group g0, a few lines per call of step(): a K block reads one short
// run of each row, a row apart, more streams than the hardware prefetchers follow, and
// prefetches issued all at once would overflow the miss buffers (those that find none are
// dropped).
struct LaneRowPrefetch {
  const SpmmArgs* a = nullptr;
  int64_t value_bytes = 0;  // bytes per kept value
  int64_t r = 0, r1 = 0, g0 = 0, lines = 0;  // lines: of values per row (+ 1 of metadata)
  int64_t line = 0;
  void start(const SpmmArgs& args, int64_t bytes_per_value, int64_t rows0, int64_t rows1,
             int64_t group0, int64_t groups) {
    a = &args;
    value_bytes = bytes_per_value;
    r = rows0;
    r1 = rows1;
    g0 = group0;
    line = 0;
    lines = (std::min(groups, args.layout.groups - group0) * 2 * value_bytes + 63) / 64;
  }
  // Lines left to prefetch.
  int64_t remaining() const { return (r1 - r) * (lines + 1) - line; }
  void step(int64_t n) {
    const NMLayout& L = a->layout;
    for (; n > 0 && r < r1; --n) {
      const char* p = line < lines
          ? static_cast<const char*>(a->values) + (r * L.values_per_row + 2 * g0) * value_bytes + 64 * line
          : reinterpret_cast<const char*>(a->metadata + r * L.meta_bytes_per_row + g0 / 2);
      _mm_prefetch(p, _MM_HINT_T1);
      if (++line > lines) {
        line = 0;
        ++r;
      }
    }
  }
};

namespace {

// A lanes tile's sums: MR registers of 16 weight rows (from row r; the last register
// `last` lanes wide) by NB rows of x, in y [.., ldy] fp32 between K blocks. Started from the
// bias (or zero) at the first K block, else loaded from y.
template <int MR, int NB>
inline void lane_sums_load(__m512 (&acc)[MR][NB], int64_t r, __mmask16 last, const float* bias,
                           bool first, const float* y, int64_t ldy) {
  for (int i = 0; i < MR; ++i) {
    const __mmask16 m = i == MR - 1 ? last : static_cast<__mmask16>(0xFFFF);
    for (int j = 0; j < NB; ++j) {
      acc[i][j] = first ? (bias != nullptr ? _mm512_maskz_loadu_ps(m, bias + r + 16 * i) : _mm512_setzero_ps())
                        : _mm512_maskz_loadu_ps(m, y + j * ldy + r + 16 * i);
    }
  }
}

template <int MR, int NB>
inline void lane_sums_store(const __m512 (&acc)[MR][NB], int64_t r, __mmask16 last, float* y, int64_t ldy) {
  for (int i = 0; i < MR; ++i) {
    const __mmask16 m = i == MR - 1 ? last : static_cast<__mmask16>(0xFFFF);
    for (int j = 0; j < NB; ++j) _mm512_mask_storeu_ps(y + j * ldy + r + 16 * i, m, acc[i][j]);
  }
}


// 16x16 transpose of 32-bit lanes: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + i + 4], 0x88);
      t[8 * h + i + 4] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + i + 4], 0xDD);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
  }
}

}  // namespace
}  // namespace sparsekit
