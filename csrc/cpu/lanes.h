// Shared by the "lanes" 2:4 batch forwards (16 weight rows per register, rows of x
// broadcast): sp24_bf16_avx512.cpp (bf16 values, dot products) and sp24_lanes_avx512.cpp
// (fp32). x86 only; included after an AVX-512 target pragma.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <immintrin.h>
#include <memory>

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

// Weight rows [r0, r1) of a lanes form against the a.batch rows of x that `rows`
// describes. Weight rows go in blocks of `block_rows`, K in blocks of groups whose packed
// register rows (16 weight rows; `per_group` elements of P per group) fit `packed_bytes`,
// at least `min_groups` and a multiple of it: the whole of K when it fits, so that a tile's
// sums stay in registers over all of K (ResNet-18's 64-channel 3x3 layer at batch 16 made 3
// passes over a 12.8 MB y otherwise). Per block and K block, pack(rv, rend, g0, ng, out)
// unpacks each register row; the next K block's rows (or the next block's first) are
// prefetched into L2 a few lines per tile (`value_bytes` a kept value); and
// tile(mr, nb, packed, ng, x, goff, goff2, gsplit, r, last, first, final, b0) runs mr <= MR
// register rows from weight row r (the last `last` lanes wide) by nb <= NB rows of x from
// row b0 (x[j]: their starts; goff, goff2, gsplit: LaneRowsOf's, from the K block's first
// group, the last two null when no group spans two runs), keeping its sums where its form
// does between K blocks.
template <int MR, int NB, typename P, typename T, typename Pack, typename Tile>
void lanes_forward(const SpmmArgs& a, int64_t r0, int64_t r1, const LaneRowsOf<T>& rows,
                   int64_t block_rows, int64_t min_groups, int64_t packed_bytes,
                   int64_t per_group, int64_t value_bytes, Pack&& pack, Tile&& tile) {
  if (r1 <= r0 || a.batch <= 0) return;  // (no rows: nothing to size the blocks by)
  const NMLayout& L = a.layout;
  const int64_t block = std::min<int64_t>(block_rows, r1 - r0);
  const int64_t vecs = (block + 15) / 16;
  const int64_t unit = per_group * static_cast<int64_t>(sizeof(P));  // bytes per group and register row
  const int64_t kg = std::max(min_groups, packed_bytes / (vecs * unit) / min_groups * min_groups);
  struct Free {
    void operator()(P* p) const { std::free(p); }
  };
  std::unique_ptr<P[], Free> packed(static_cast<P*>(
      std::aligned_alloc(64, static_cast<size_t>(vecs * std::min(kg, L.groups) * unit))));
  for (int64_t rb = r0; rb < r1; rb += block) {
    const int64_t re = std::min(rb + block, r1), nv = (re - rb + 15) / 16;
    const int64_t tail = re - (rb + 16 * (nv - 1));  // rows in the last register row
    for (int64_t g0 = 0; g0 < L.groups; g0 += kg) {
      const int64_t ng = std::min(kg, L.groups - g0);
      const bool first = g0 == 0, final = g0 + ng >= L.groups;
      for (int64_t v = 0; v < nv; ++v) pack(rb + 16 * v, re, g0, ng, packed.get() + v * ng * per_group);
      // A K block reads one short run of each weight row, a row apart: more streams than
      // the hardware prefetchers follow (the bf16 form's unpacking waited on them for a
      // third of the time at batch 64, with the prefetches issued all at once dropped).
      LaneRowPrefetch next;
      if (!final) {
        next.start(a, value_bytes, rb, re, g0 + kg, kg);
      } else {
        next.start(a, value_bytes, re, std::min(re + block, r1), 0, kg);
      }
      const int64_t count = (a.batch + NB - 1) / NB * ((nv + MR - 1) / MR);
      const int64_t per = (next.remaining() + count - 1) / count;
      const int64_t* goff = rows.goff + g0;
      const int64_t* goff2 = rows.gsplit != nullptr ? rows.goff2 + g0 : nullptr;
      const uint8_t* gsplit = rows.gsplit != nullptr ? rows.gsplit + g0 : nullptr;
      for (int64_t b0 = 0; b0 < a.batch; b0 += NB) {
        const int nb = static_cast<int>(std::min<int64_t>(NB, a.batch - b0));
        const T* x[NB];
        rows.rows(b0, nb, x);
        for (int64_t v = 0; v < nv; v += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, nv - v));
          const __mmask16 last = static_cast<__mmask16>(
              v + mr == nv && tail < 16 ? (1u << tail) - 1 : 0xFFFF);
          tile(mr, nb, packed.get() + v * ng * per_group, ng, x, goff, goff2, gsplit,
               rb + 16 * v, last, first, final, b0);
          next.step(per);
        }
      }
    }
  }
}

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
