// 2:4 bf16 forward with AVX512-BF16 dot products (vdpbf16ps), chosen at run time as the
// "avx512bf16" CPU variant (AVX-512 F/BW/VL/DQ + BF16 + VBMI: Zen 4, Sapphire Rapids and
// later). No torch header: plain pointers through SpmmArgs.
//
// y[b, r] = sum_c dot(values[r, chunk c], x[b, the kept columns of chunk c]) (+ bias[r])
//
// A chunk is 16 groups (64 columns of x, 32 kept values = one 512-bit register of bf16).
// vdpbf16ps multiplies bf16 pairs and adds both products to one fp32 lane, and the two kept
// values of a group are adjacent in the compressed row, so one instruction applies a whole
// chunk of a row to x once x's kept entries sit beside them. Those are gathered per row and
// chunk with one two-source word permute (vpermt2w) over the chunk's 64 entries of x, whose
// indices come from the chunk's 64 metadata bits in two instructions: a multishift moves
// the 2-bit index of kept value s to the low bits of word s, and a ternary-logic op masks
// it and adds the group's base column (4 * (s / 2)). The values are used as stored: no
// packed copy of the weight exists.
//
// Blocking: R rows of the weight by T rows of x per pass, R * T accumulators in registers;
// each chunk of x, loaded once, serves R rows, and each row's compressed data, read once
// from memory, serves every batch tile from L1 (a block of R rows is 4 * K bytes and
// metadata). Products are exact in fp32 and summed in fp32 (the instruction flushes
// subnormal inputs and results to zero); the result is written as fp32, or rounded once to
// bf16 when the caller asks for it (SpmmArgs::y16).
#include <cstdint>
#include <cstring>

#include "spmm.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")

namespace sparsekit {
namespace spmm_avx512bf16 {
namespace {

constexpr int kRows = 4;   // R: weight rows per pass
constexpr int kBatch = 4;  // T: rows of x per pass (R * T = 16 accumulators)
constexpr int64_t kPrefetchRows = 8;  // how far ahead (in weight rows) to prefetch

struct Consts {
  __m512i shift;  // multishift control: the low byte of word s takes metadata bits 2s..
  __m512i three;  // 0x0003 per word
  __m512i base;   // 4 * (s / 2) per word s: the first column of kept value s's group
};

inline Consts make_consts() {
  alignas(64) uint8_t shift[64];
  alignas(64) uint16_t base[32];
  for (int s = 0; s < 32; ++s) {
    shift[2 * s] = static_cast<uint8_t>(2 * s);
    shift[2 * s + 1] = 0;
    base[s] = static_cast<uint16_t>(4 * (s / 2));
  }
  return {_mm512_load_si512(shift), _mm512_set1_epi16(3), _mm512_load_si512(base)};
}

// fp32 -> bf16, rounded to nearest even (NaN stays NaN), as torch rounds.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Word s: the column (0..63) of chunk-local x that kept value s multiplies.
inline __m512i chunk_indices(uint64_t meta, const Consts& k) {
  const __m512i fields = _mm512_multishift_epi64_epi8(k.shift, _mm512_set1_epi64(static_cast<long long>(meta)));
  return _mm512_ternarylogic_epi32(fields, k.three, k.base, 0xEA);  // (fields & 3) | base
}

// R rows [r, r + R) times T rows of x [b0, b0 + T), over all K, into y (fp32).
template <int R, int T>
void pass(const SpmmArgs& a, int64_t r, int64_t b0, const Consts& k) {
  const NMLayout& L = a.layout;
  const int64_t full = L.groups / 16;             // whole chunks
  const int64_t tail_groups = L.groups - 16 * full;
  const uint16_t* vals[R];
  const uint8_t* meta[R];
  for (int i = 0; i < R; ++i) {
    vals[i] = static_cast<const uint16_t*>(a.values) + (r + i) * L.values_per_row;
    meta[i] = a.metadata + (r + i) * L.meta_bytes_per_row;
  }
  __m512 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const uint16_t* x = a.x16 + b0 * a.ldx;
  auto step = [&](const __m512i (&w)[R], const __m512i (&idx)[R], int64_t c) {
    for (int t = 0; t < T; ++t) {
      const uint16_t* xc = x + t * a.ldx + 64 * c;
      const __m512i lo = _mm512_loadu_si512(xc), hi = _mm512_loadu_si512(xc + 32);
      for (int i = 0; i < R; ++i) {
        const __m512i xs = _mm512_permutex2var_epi16(lo, idx[i], hi);
        acc[i][t] = _mm512_dpbf16_ps(acc[i][t], reinterpret_cast<__m512bh>(w[i]),
                                     reinterpret_cast<__m512bh>(xs));
      }
    }
  };
  // Rows a pass or two ahead, prefetched chunk by chunk: the rows of a layer are a few KB
  // each, too short for the hardware prefetcher to ramp up on the R streams.
  const int64_t ahead = r + kPrefetchRows + R <= a.rows ? kPrefetchRows : 0;
  for (int64_t c = 0; c < full; ++c) {
    __m512i w[R], idx[R];
    if (b0 == 0 && ahead > 0) {
      for (int i = 0; i < R; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(vals[i] + ahead * L.values_per_row + 32 * c), _MM_HINT_T0);
        if ((c & 7) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(meta[i] + ahead * L.meta_bytes_per_row + 8 * c), _MM_HINT_T0);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      uint64_t m;
      std::memcpy(&m, meta[i] + 8 * c, 8);
      idx[i] = chunk_indices(m, k);
      w[i] = _mm512_loadu_si512(vals[i] + 32 * c);
    }
    step(w, idx, c);
  }
  if (tail_groups > 0) {
    // The last chunk's values and metadata end inside it: masked loads (never past the
    // row), zero values beyond; their indices point into x's zero padding (ldx >= 64 * chunks).
    const __mmask32 vmask = (__mmask32{1} << (2 * tail_groups)) - 1;
    __m512i w[R], idx[R];
    for (int i = 0; i < R; ++i) {
      uint64_t m = 0;
      std::memcpy(&m, meta[i] + 8 * full, static_cast<size_t>((tail_groups + 1) / 2));
      idx[i] = chunk_indices(m, k);
      w[i] = _mm512_maskz_loadu_epi16(vmask, vals[i] + 32 * full);
    }
    step(w, idx, full);
  }
  for (int i = 0; i < R; ++i) {
    const float bias = a.bias != nullptr ? a.bias[r + i] : 0.f;
    for (int t = 0; t < T; ++t) {
      const float v = _mm512_reduce_add_ps(acc[i][t]) + bias;
      if (a.y16 != nullptr) {
        a.y16[(b0 + t) * a.ldy + r + i] = float_to_bf16(v);
      } else {
        a.y[(b0 + t) * a.ldy + r + i] = v;
      }
    }
  }
}

template <int R>
void rows_pass(const SpmmArgs& a, int64_t r, const Consts& k) {
  int64_t b0 = 0;
  for (; b0 + kBatch <= a.batch; b0 += kBatch) pass<R, kBatch>(a, r, b0, k);
  switch (a.batch - b0) {
    case 1: pass<R, 1>(a, r, b0, k); break;
    case 2: pass<R, 2>(a, r, b0, k); break;
    case 3: pass<R, 3>(a, r, b0, k); break;
    default: break;
  }
}

static_assert(kBatch == 4 && kRows == 4, "the remainder switches cover 1..3");

}  // namespace

// Rows [r0, r1) for every row of x: a.x16 (bf16, [a.batch, a.ldx], ldx a multiple of 64 and
// >= 64 * chunks, zero beyond K), a.y (fp32, [a.batch, a.ldy]).
void forward_2_4_bf16(const SpmmArgs& a, int64_t r0, int64_t r1, float* /*scratch*/) {
  const Consts k = make_consts();
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) rows_pass<kRows>(a, r, k);
  switch (r1 - r) {
    case 1: rows_pass<1>(a, r, k); break;
    case 2: rows_pass<2>(a, r, k); break;
    case 3: rows_pass<3>(a, r, k); break;
    default: break;
  }
}

}  // namespace spmm_avx512bf16
}  // namespace sparsekit

#pragma GCC pop_options

namespace sparsekit {
// The AVX-512 kernels with this bf16 forward added, under the name "avx512bf16".
const SpmmKernels& spmm_kernels_avx512bf16() {
  static const SpmmKernels k = [] {
    SpmmKernels t = spmm_kernels_avx512();
    t.isa = "avx512bf16";
    t.forward_2_4_bf16 = &spmm_avx512bf16::forward_2_4_bf16;
    return t;
  }();
  return k;
}
}  // namespace sparsekit
#endif
