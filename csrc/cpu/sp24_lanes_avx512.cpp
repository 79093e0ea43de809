// 2:4 fp32 forward for many rows of x in the lanes form, part of the AVX-512 variants: 16
// weight rows per register, one row of x broadcast; rows of x are those of a row-major
// matrix (nm_linear) or a convolution's output pixels over its NHWC input (nm_conv2d, an
// implicit GEMM). No torch header: plain pointers through SpmmArgs and LaneRows (spmm.h).
//
// y[b, r .. r + 16] += w0 * x[b, 4g + i0] + w1 * x[b, 4g + i1] per group g, where w0, w1 hold
// the 16 rows' two kept values and i0, i1 their indices in the group. The group's 4 floats
// of x are broadcast to every 128-bit lane (one 16-byte load), and vpermilps, whose
// per-lane control picks one of the 4 floats of its 128-bit lane, moves each row's kept
// column into its lane: two permutes and two FMAs per row of x, group and 16 weight rows,
// with y's 16 outputs in one register: no transposes of x or y, and every lane does useful
// work whatever the batch. A register tile is kLaneMR register rows (32 weight rows) by
// kLaneNB rows of x. The values and indices of a block of weight rows at one K block are
// unpacked first (16x16 transposes: [group][w0 | w1 | i0 | i1][16 lanes]) and used from L2
// by every row of x; partial sums wait in y between K blocks.
//
// Measured on Zen 5 (2 threads): see nm_linear.cpp, where it is chosen.
#include <algorithm>
#include <cstdint>

#include "spmm.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

#include "lanes.h"  // after the target: its AVX-512 helpers compile for it

namespace sparsekit {
namespace spmm_avx512 {
namespace {

constexpr int kMR = 2;                  // register rows (16 weight rows each) per tile
constexpr int kNB = 6;                  // rows of x per tile
constexpr int64_t kGroups = 64;         // groups per K block, at least
constexpr int64_t kBlockRows = 128;     // weight rows per block
constexpr int64_t kPackedBytes = 512 << 10;  // a block's packed K block, at most (in L2)
constexpr int64_t kPacked = 64;         // floats per group and register row

// Weight rows [rv, rv + 16) (those >= rend are zero) at groups [g0, g0 + ng), g0 even:
// out[g] = {w0[16], w1[16], i0[16], i1[16]} (indices as int32 in float lanes).
void pack(const SpmmArgs& a, int64_t rv, int64_t rend, int64_t g0, int64_t ng, float* out) {
  const NMLayout& L = a.layout;
  const float* values = static_cast<const float*>(a.values);
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m512i three = _mm512_set1_epi32(3);
  for (int64_t gg = 0; gg < ng; gg += 16) {
    const int64_t n16 = std::min<int64_t>(16, ng - gg);
    const __mmask16 vlo = static_cast<__mmask16>(n16 >= 8 ? 0xFFFF : (1u << (2 * n16)) - 1);
    const __mmask16 vhi = static_cast<__mmask16>(n16 >= 16 ? 0xFFFF : n16 > 8 ? (1u << (2 * (n16 - 8))) - 1 : 0);
    const __mmask16 mm = static_cast<__mmask16>((1u << ((n16 + 1) / 2)) - 1);
    __m512i lo[16], hi[16], c[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t r = rv + i;
      if (r < rend) {
        const float* v = values + r * L.values_per_row + 2 * (g0 + gg);
        lo[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(vlo, v));
        hi[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(vhi, v + 16));
        const __m128i m = _mm_maskz_loadu_epi8(mm, a.metadata + r * L.meta_bytes_per_row + (g0 + gg) / 2);
        const __m128i l4 = _mm_and_si128(m, nib), h4 = _mm_and_si128(_mm_srli_epi16(m, 4), nib);
        c[i] = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(l4, h4));
      } else {
        lo[i] = hi[i] = c[i] = _mm512_setzero_si512();
      }
    }
    transpose16(lo);  // lo[j]: value j of groups gg .. gg + 7 (group j / 2, kept j % 2)
    transpose16(hi);
    transpose16(c);   // c[j]: the nibbles of group gg + j
    for (int64_t j = 0; j < n16; ++j) {
      float* o = out + (gg + j) * kPacked;
      const __m512i* src = j < 8 ? lo : hi;
      const int64_t q = 2 * (j % 8);
      _mm512_store_si512(o, src[q]);
      _mm512_store_si512(o + 16, src[q + 1]);
      _mm512_store_si512(o + 32, _mm512_and_si512(c[j], three));
      _mm512_store_si512(o + 48, _mm512_and_si512(_mm512_srli_epi32(c[j], 2), three));
    }
  }
}

// MR register rows (weight rows r .. r + 16 * MR, the last `last` lanes wide) by NB rows of x
// (x[j]: row j's start, goff: the K block's group offsets) over ng groups, summed into y
// (started from the bias or zero when `first`).
template <int MR, int NB, bool Split>
void tile(const float* packed, int64_t ng, const float* const* x, const int64_t* goff,
          const int64_t* goff2, const uint8_t* gsplit, int64_t r, __mmask16 last,
          const float* bias, bool first, float* y, int64_t ldy) {
  __m512 acc[MR][NB];
  lane_sums_load(acc, r, last, bias, first, y, ldy);
  for (int64_t g = 0; g < ng; ++g) {
    __m512 xb[NB];
    const int64_t o = goff[g];
    if constexpr (Split) {  // a group over two runs: its second run's lanes from goff2
      // (both 4-float reads stay inside the padded input: conv_lanes_forward)
      const int64_t o2 = goff2[g];
      const __mmask16 m = static_cast<__mmask16>(gsplit[g] * 0x1111u);  // per 128-bit lane
      for (int j = 0; j < NB; ++j) {
        xb[j] = _mm512_mask_blend_ps(m, _mm512_broadcast_f32x4(_mm_loadu_ps(x[j] + o)),
                                     _mm512_broadcast_f32x4(_mm_loadu_ps(x[j] + o2)));
      }
    } else {
      for (int j = 0; j < NB; ++j) xb[j] = _mm512_broadcast_f32x4(_mm_loadu_ps(x[j] + o));
    }
    for (int i = 0; i < MR; ++i) {
      const float* p = packed + (i * ng + g) * kPacked;
      const __m512 w0 = _mm512_load_ps(p), w1 = _mm512_load_ps(p + 16);
      const __m512i i0 = _mm512_load_si512(p + 32), i1 = _mm512_load_si512(p + 48);
      for (int j = 0; j < NB; ++j) {
        acc[i][j] = _mm512_fmadd_ps(_mm512_permutevar_ps(xb[j], i0), w0, acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(_mm512_permutevar_ps(xb[j], i1), w1, acc[i][j]);
      }
    }
  }
  lane_sums_store(acc, r, last, y, ldy);
}

template <int MR, bool Split>
void tiles(int nb, const float* packed, int64_t ng, const float* const* x, const int64_t* goff,
           const int64_t* goff2, const uint8_t* gsplit, int64_t r, __mmask16 last,
           const float* bias, bool first, float* y, int64_t ldy) {
  switch (nb) {
    case 6: tile<MR, 6, Split>(packed, ng, x, goff, goff2, gsplit, r, last, bias, first, y, ldy); break;
    case 5: tile<MR, 5, Split>(packed, ng, x, goff, goff2, gsplit, r, last, bias, first, y, ldy); break;
    case 4: tile<MR, 4, Split>(packed, ng, x, goff, goff2, gsplit, r, last, bias, first, y, ldy); break;
    case 3: tile<MR, 3, Split>(packed, ng, x, goff, goff2, gsplit, r, last, bias, first, y, ldy); break;
    case 2: tile<MR, 2, Split>(packed, ng, x, goff, goff2, gsplit, r, last, bias, first, y, ldy); break;
    case 1: tile<MR, 1, Split>(packed, ng, x, goff, goff2, gsplit, r, last, bias, first, y, ldy); break;
    default: break;
  }
}

// One register tile row pass (MR = 1 or 2), with or without groups over two runs.
template <bool Split>
void tiles_mr(int mr, int nb, const float* packed, int64_t ng, const float* const* x,
              const int64_t* goff, const int64_t* goff2, const uint8_t* gsplit, int64_t r,
              __mmask16 last, const float* bias, bool first, float* y, int64_t ldy) {
  if (mr == 2) {
    tiles<2, Split>(nb, packed, ng, x, goff, goff2, gsplit, r, last, bias, first, y, ldy);
  } else {
    tiles<1, Split>(nb, packed, ng, x, goff, goff2, gsplit, r, last, bias, first, y, ldy);
  }
}
static_assert(kNB == 6 && kMR == 2, "tiles covers 1..6 rows of x, 1..2 register rows");

}  // namespace

// Rows [r0, r1) for the a.batch rows of x that `rows` describes (spmm.h: LaneRows), a.values
// fp32, into a.y [a.batch, a.ldy] fp32. Every group reads 4 elements of x: K's padding
// columns too (their values are 0, and validated metadata never keeps them), so they
// must be readable.
void forward_2_4_lanes(const SpmmArgs& a, int64_t r0, int64_t r1, const LaneRows& rows) {
  lanes_forward<kMR, kNB, float>(
      a, r0, r1, rows, kBlockRows, kGroups, kPackedBytes, kPacked, 4,
      [&](int64_t rv, int64_t rend, int64_t g0, int64_t ng, float* out) { pack(a, rv, rend, g0, ng, out); },
      [&](int mr, int nb, const float* pv, int64_t ng, const float* const* x, const int64_t* goff,
          const int64_t* goff2, const uint8_t* gsplit, int64_t r, __mmask16 last, bool first,
          bool /*final: the sums stay in a.y*/, int64_t b0) {
        float* yb = a.y + b0 * a.ldy;
        if (gsplit != nullptr) {
          tiles_mr<true>(mr, nb, pv, ng, x, goff, goff2, gsplit, r, last, a.bias, first, yb, a.ldy);
        } else {
          tiles_mr<false>(mr, nb, pv, ng, x, goff, nullptr, nullptr, r, last, a.bias, first, yb,
                          a.ldy);
        }
      });
}

}  // namespace spmm_avx512
}  // namespace sparsekit

#pragma GCC pop_options
#endif
