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
#include <algorithm>
#include <cstring>
#include <memory>

#include "spmm.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")

#include "lanes.h"  // after the target: its AVX-512 helpers compile for it

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

// ---------------------------------------------------------------------------------------
// One row of x (decoding): every weight row is read once, from memory, and the kernel's
// speed is how fast it streams them. Passes of 16 rows take each row whole, in address
// order (the values and the metadata are two sequential streams, which the hardware
// prefetchers follow), and prefetch into L2 a fixed distance ahead of both streams, deep
// enough to cover the memory latency; the R-row passes above read R interleaved streams,
// prefetched into L1, and reached less of the memory bandwidth. The 16 sums are reduced
// together into one register (a transposing add tree) instead of one horizontal sum per
// row: with K = 576 a row is only 9 chunks.
constexpr int kRows1 = 16;
constexpr int64_t kAheadBytes = 8 << 10;  // prefetch distance in the values stream

// Lane j of the result: the sum of all 16 lanes of acc[j].
inline __m512 sum16(const __m512 (&acc)[16]) {
  __m512 c[8], d[4];
  for (int i = 0; i < 8; ++i) {  // 128-bit quarters: [A0+A2, A1+A3, B0+B2, B1+B3]
    const __m512 a = acc[2 * i], b = acc[2 * i + 1];
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // quarter q of d[i]: 4 partial sums of row 4i + q
    const __m512 a = c[2 * i], b = c[2 * i + 1];
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  const __m512 e01 = _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]), _mm512_unpackhi_ps(d[0], d[1]));
  const __m512 e23 = _mm512_add_ps(_mm512_unpacklo_ps(d[2], d[3]), _mm512_unpackhi_ps(d[2], d[3]));
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e01, e23, 0x44), _mm512_shuffle_ps(e01, e23, 0xEE));
  // Lane 4q + j of f holds row 4j + q.
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, f);
}

// fp32 -> bf16 in 16 lanes, as float_to_bf16.
inline __m256i floats_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v), high = _mm512_srli_epi32(bits, 16);
  const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, high, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// Chunk c of one weight row (its 32 values w, its 64 metadata bits m) times x's only row,
// added to sum.
inline __m512 row_chunk(__m512 sum, const uint16_t* x, __m512i w, uint64_t m, int64_t c, const Consts& k) {
  const __m512i xs = _mm512_permutex2var_epi16(_mm512_loadu_si512(x + 64 * c), chunk_indices(m, k),
                                               _mm512_loadu_si512(x + 64 * c + 32));
  return _mm512_dpbf16_ps(sum, reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(xs));
}

// Rows [r, r + 16) times x's only row, over all K.
void pass_one_row(const SpmmArgs& a, int64_t r, const Consts& k) {
  const NMLayout& L = a.layout;
  const int64_t full = L.groups / 16;
  const int64_t tail_groups = L.groups - 16 * full;
  const int64_t vpr = L.values_per_row, mpr = L.meta_bytes_per_row;
  const uint16_t* vals = static_cast<const uint16_t*>(a.values) + r * vpr;
  const uint8_t* meta = a.metadata + r * mpr;
  // Every 64 bytes of values come with 8 of metadata: both streams, the same way ahead.
  constexpr int64_t ahead_values = kAheadBytes / 2, ahead_meta = kAheadBytes / 8;
  __m512 acc[kRows1];
  for (int i = 0; i < kRows1; ++i) {
    const uint16_t* v = vals + i * vpr;
    const uint8_t* mp = meta + i * mpr;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
      prefetch_l2(v + 32 * c + ahead_values);
      if ((c & 7) == 0) prefetch_l2(mp + 8 * c + ahead_meta);
      uint64_t m;
      std::memcpy(&m, mp + 8 * c, 8);
      sum = row_chunk(sum, a.x16, _mm512_loadu_si512(v + 32 * c), m, c, k);
    }
    if (tail_groups > 0) {
      // As in pass: the last chunk's values and metadata end inside it (masked loads; the
      // indices past them point into x's zero padding).
      uint64_t m = 0;
      std::memcpy(&m, mp + 8 * full, static_cast<size_t>((tail_groups + 1) / 2));
      const __mmask32 vmask = (__mmask32{1} << (2 * tail_groups)) - 1;
      sum = row_chunk(sum, a.x16, _mm512_maskz_loadu_epi16(vmask, v + 32 * full), m, full, k);
    }
    acc[i] = sum;
  }
  __m512 y = sum16(acc);
  if (a.bias != nullptr) y = _mm512_add_ps(y, _mm512_loadu_ps(a.bias + r));
  if (a.y16 != nullptr) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.y16 + r), floats_to_bf16(y));
  } else {
    _mm512_storeu_ps(a.y + r, y);
  }
}

}  // namespace

// Rows [r0, r1) for every row of x: a.x16 (bf16, [a.batch, a.ldx], ldx a multiple of 64 and
// >= 64 * chunks, zero beyond K), a.y (fp32, [a.batch, a.ldy]).
void forward_2_4_bf16(const SpmmArgs& a, int64_t r0, int64_t r1, float* /*scratch*/) {
  const Consts k = make_consts();
  int64_t r = r0;
  if (a.batch == 1) {
    // The first kAheadBytes of this thread's rows at once, where pass_one_row's prefetches
    // start: a decoder's layers are only a few hundred KB per thread.
    const NMLayout& L = a.layout;
    const auto* v0 = reinterpret_cast<const char*>(static_cast<const uint16_t*>(a.values) + r0 * L.values_per_row);
    const auto* m0 = reinterpret_cast<const char*>(a.metadata + r0 * L.meta_bytes_per_row);
    const int64_t head = std::min<int64_t>((r1 - r0) * L.values_per_row * 2, kAheadBytes);
    for (int64_t o = 0; o < head; o += 64) prefetch_l2(v0 + o);
    for (int64_t o = 0; o < head / 8; o += 64) prefetch_l2(m0 + o);
    for (; r + kRows1 <= r1; r += kRows1) pass_one_row(a, r, k);
  }
  for (; r + kRows <= r1; r += kRows) rows_pass<kRows>(a, r, k);
  switch (r1 - r) {
    case 1: rows_pass<1>(a, r, k); break;
    case 2: rows_pass<2>(a, r, k); break;
    case 3: rows_pass<3>(a, r, k); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------
// Batch GEMM form (many rows of x): the gather moves from the weight's rows to x, once.
//
// A 2:4 group keeps one of six column pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3). For a tile
// of W = 16 * NR rows of x, prepare_pairs_2_4_bf16 writes, per group and per pair, the W
// rows' two bf16 entries at that pair side by side (one 32-bit lane per row of x):
//   pairs[tile][group][pair][W]  (uint32: low half the first column, high half the second)
// Then one row of the weight meets one group of x in NR instructions: the row's two kept
// values (adjacent in the compressed row: one 32-bit broadcast) times the group's lanes at
// the row's pair (an offset from the group's metadata nibble), summed by vdpbf16ps into W
// fp32 lanes, one per row of x. No permute per weight row: the preparation costs 6 stores
// per group and row of x, paid once for every weight row, and every product instruction
// does useful work on all its lanes (the permute kernel above spends one vpermt2w per
// vdpbf16ps). W = SpmmArgs::pair_tile: 32 (NR = 2) or 64 (NR = 4).
//
// Blocking (per thread, rows [r0, r1)): x tiles in sets whose pairs stay in the L3
// (kPairSetBytes); per set, weight rows in blocks of kPairBlockRows; per block, K in blocks
// of kPairGroups groups, whose rows are unpacked once (values and pair offsets) and then run
// kPairRows at a time over each x tile's pairs at that K block (24 KB: in L1). Partial sums
// wait in a per-thread [tile][row][W] fp32 buffer between K blocks; y is written through
// 16x16 transposes. Products are exact in fp32 and summed in fp32 (subnormals flushed, as
// above; the bf16 rounding of y flushes subnormal results too).
//
// Measured on Zen 4 (2 threads): 1.2x torch's bf16 GEMM at batch 512 on 192x576 to
// 1536x576 weights (in cache), about 1.0-1.1x on 4096x4096, 11008x4096 and 4096x11008 (past
// the LLC), where the permute kernel above fell to 0.6-0.8x at batch 256-512. Its limit is
// loads: each product instruction reads its own 64 bytes of pairs (the pair depends on the
// weight row), and Zen 4 issues one 512-bit load per cycle. Four registers of x rows per
// tile (W = 64) instead of two: 1.3x faster on the small weights, as the offset and
// broadcast per weight row and group serve four products (weights split by rows run
// W = 32: nm_linear.cpp). A broadcast folded into
// vdpbf16ps ({1to16}) was 1.7x slower than a separate one.
namespace {

// Per NR (registers of x rows per tile: 2 or 4): weight rows per register tile (16
// accumulators) and groups per K block (24 KB of pairs, even).
template <int NR>
constexpr int kPairRows = 16 / NR;
template <int NR>
constexpr int64_t kPairGroups = 64 / NR;
constexpr int64_t kPairBlockRows = 128;            // weight rows per block
constexpr int64_t kPairSetBytes = 16 << 20;        // bytes of x pairs per set of x tiles

// Metadata nibble (first kept index | second << 2) -> its pair (0..5). A non-canonical
// nibble maps to pair 0: in bounds, and the products trust validated metadata anyway.
inline __m128i pair_index_table() {
  return _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 2, 4, 5, 0);
}

// A block of weight rows at one K block, unpacked for the product: per row, the groups' two
// kept values (one uint32 each) and their pairs' offsets (uint32 units), kPairGroups of
// both, so the product reads them from one base pointer at constant offsets (eight row
// pointers would not fit the registers beside the sums), and the offsets are decoded 32 at
// a time instead of by one table lookup per group.
struct PackedRows {
  uint32_t* w;    // [rows][kPairGroups<NR>]
  uint16_t* off;  // [rows][kPairGroups<NR>]
};

template <int W>
void pack_rows(const SpmmArgs& a, int64_t r0, int64_t r1, int64_t g0, int64_t ng, PackedRows p) {
  constexpr int64_t KG = kPairGroups<W / 16>;
  static_assert(KG == 16 || KG == 32, "one or two 16-lane copies of values");
  static_assert(W == 32 || W == 64, "offsets are pair << log2(W)");
  constexpr int kShift = W == 32 ? 5 : 6;
  const NMLayout& L = a.layout;
  const __mmask16 vlo = static_cast<__mmask16>(ng >= 16 ? 0xFFFF : (1u << ng) - 1);
  const __mmask16 vhi = static_cast<__mmask16>(ng >= 32 ? 0xFFFF : ng > 16 ? (1u << (ng - 16)) - 1 : 0);
  const __mmask16 mmask = static_cast<__mmask16>((1u << ((ng + 1) / 2)) - 1);
  const __m128i table = pair_index_table(), nib = _mm_set1_epi8(0x0F);
  const uint16_t* values = static_cast<const uint16_t*>(a.values);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* v = values + r * L.values_per_row + 2 * g0;
    uint32_t* w = p.w + (r - r0) * KG;
    uint16_t* off = p.off + (r - r0) * KG;
    _mm512_storeu_si512(w, _mm512_maskz_loadu_epi32(vlo, v));
    if constexpr (KG == 32) _mm512_storeu_si512(w + 16, _mm512_maskz_loadu_epi32(vhi, v + 32));
    const __m128i m = _mm_maskz_loadu_epi8(mmask, a.metadata + r * L.meta_bytes_per_row + g0 / 2);
    const __m128i lo = _mm_and_si128(m, nib), hi = _mm_and_si128(_mm_srli_epi16(m, 4), nib);
    auto offsets = [&](__m128i nibbles) {  // 16 groups' pairs -> 16 uint16 offsets
      return _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_shuffle_epi8(table, nibbles)), kShift);
    };
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(off), offsets(_mm_unpacklo_epi8(lo, hi)));
    if constexpr (KG == 32) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + 16), offsets(_mm_unpackhi_epi8(lo, hi)));
    }
  }
}

// The block's rows at the K block from group g0 (values and metadata) into L2 while the
// current K block runs. A K block reads one short run of each of kPairBlockRows rows, a
// row's length apart: more streams than the hardware prefetchers follow, so pack_rows
// otherwise waited on each row's line in turn (10% of the time on 4096x4096, batch 512).
template <int W>
inline void prefetch_rows(const SpmmArgs& a, int64_t r0, int64_t r1, int64_t g0) {
  const NMLayout& L = a.layout;
  if (g0 >= L.groups) return;
  constexpr int64_t kValueBytes = kPairGroups<W / 16> * 4;  // two bf16 per group
  const char* values = static_cast<const char*>(a.values);
  for (int64_t r = r0; r < r1; ++r) {
    const char* v = values + (r * L.values_per_row + 2 * g0) * 2;
    for (int64_t b = 0; b < kValueBytes; b += 64) _mm_prefetch(v + b, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(a.metadata + r * L.meta_bytes_per_row + g0 / 2), _MM_HINT_T1);
  }
}

// MR packed rows times one x tile over ng groups: c[MR][W] fp32 holds the partial sums
// (zero when `first`). xg: the tile's pairs at the K block's first group.
template <int MR, int NR>
inline void pair_tile(const uint32_t* w, const uint16_t* off, int64_t ng, const uint32_t* xg,
                      float* c, bool first) {
  constexpr int W = 16 * NR;
  constexpr int64_t G = 6 * W;  // uint32 per group of pairs
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * W + 16 * j);
  for (int64_t g = 0; g < ng; ++g) {
    const uint32_t* x0 = xg + g * G;
    for (int i = 0; i < MR; ++i) {
      const __m512bh wv =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(w[i * kPairGroups<NR> + g])));
      const uint32_t* xp = x0 + off[i * kPairGroups<NR> + g];
      for (int j = 0; j < NR; ++j) {
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j],
                                     reinterpret_cast<__m512bh>(_mm512_loadu_si512(xp + 16 * j)), wv);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(c + i * W + 16 * j, acc[i][j]);
}

template <int NR>
void pair_rows(int64_t mr, const uint32_t* w, const uint16_t* off, int64_t ng, const uint32_t* xg,
               float* c, bool first) {
  if constexpr (kPairRows<NR> == 8) {  // only instantiated where a tile has 8 rows
    switch (mr) {
      case 8: pair_tile<8, NR>(w, off, ng, xg, c, first); return;
      case 7: pair_tile<7, NR>(w, off, ng, xg, c, first); return;
      case 6: pair_tile<6, NR>(w, off, ng, xg, c, first); return;
      case 5: pair_tile<5, NR>(w, off, ng, xg, c, first); return;
      default: break;
    }
  }
  switch (mr) {
    case 4: pair_tile<4, NR>(w, off, ng, xg, c, first); break;
    case 3: pair_tile<3, NR>(w, off, ng, xg, c, first); break;
    case 2: pair_tile<2, NR>(w, off, ng, xg, c, first); break;
    case 1: pair_tile<1, NR>(w, off, ng, xg, c, first); break;
    default: break;
  }
}
static_assert(kPairRows<2> <= 8 && kPairRows<4> <= 8, "pair_rows covers 1..8 rows");

// Pairs of x tiles [t0, t1): per 16 rows of x and 8 groups, each row's 32 entries are one
// register whose 32-bit lanes already hold pairs (0,1) and (2,3) of every group; two byte
// shuffles inside each group give (0,2), (1,3) and (0,3), (1,2). A 16x16 transpose of each
// of the three turns "one row of x, 16 pairs" into "one pair, 16 rows of x": 16 stores.
// Rows of x past the batch are zero. x rows hold ldx >= 4 * groups entries, a multiple of
// 64, so the 8-group loads stay inside them; only the groups < `groups` are stored.
template <int NR>
void prepare_pairs(const SpmmArgs& a, int64_t t0, int64_t t1, uint32_t* pairs) {
  constexpr int W = 16 * NR;
  const int64_t groups = a.layout.groups;
  // pair index of lane parity (even, odd) for each of the three registers
  constexpr int kPair[3][2] = {{0, 5}, {1, 4}, {2, 3}};
  const __m512i swap02 = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15));
  const __m512i swap03 = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 1, 6, 7, 2, 3, 4, 5, 8, 9, 14, 15, 10, 11, 12, 13));
  for (int64_t t = t0; t < t1; ++t) {
    uint32_t* out = pairs + t * groups * 6 * W;
    for (int h = 0; h < NR; ++h) {
      const int64_t b0 = t * W + 16 * h, rows = std::clamp<int64_t>(a.batch - b0, 0, 16);
      // Row pointers advanced 8 groups per step; rows past the batch read a zero row.
      alignas(64) static const uint16_t kZeroRow[32] = {};
      const uint16_t* rowp[16];
      int64_t step[16];
      for (int j = 0; j < 16; ++j) {
        rowp[j] = j < rows ? a.x16 + (b0 + j) * a.ldx : kZeroRow;
        step[j] = j < rows ? 32 : 0;
      }
      for (int64_t g8 = 0; g8 < groups; g8 += 8) {
        const int64_t lanes = std::min<int64_t>(16, 2 * (groups - g8));
        for (int q = 0; q < 3; ++q) {  // one register set at a time: 16 + 16 in flight
          __m512i z[16];
          for (int j = 0; j < 16; ++j) {
            const __m512i row = _mm512_loadu_si512(rowp[j]);
            z[j] = q == 0 ? row : _mm512_shuffle_epi8(row, q == 1 ? swap02 : swap03);
          }
          transpose16(z);
          uint32_t* o = out + g8 * 6 * W + 16 * h;
          if (lanes == 16) {
            for (int l = 0; l < 16; ++l) _mm512_storeu_si512(o + (l / 2) * 6 * W + kPair[q][l & 1] * W, z[l]);
          } else {
            for (int64_t l = 0; l < lanes; ++l) {
              _mm512_storeu_si512(o + (l / 2) * 6 * W + kPair[q][l & 1] * W, z[l]);
            }
          }
        }
        for (int j = 0; j < 16; ++j) rowp[j] += step[j];
      }
    }
  }
}

template <int NR>
void forward_pairs(const SpmmArgs& a, int64_t r0, int64_t r1, const uint32_t* pairs) {
  constexpr int W = 16 * NR;
  const NMLayout& L = a.layout;
  const int64_t groups = L.groups;
  const int64_t tiles = (a.batch + W - 1) / W;
  const int64_t tile_bytes = groups * 6 * W * 4;
  // x tiles in sets of at most kPairSetBytes of pairs (they stay in the cache while every
  // block of rows runs over them), rows in blocks of kPairBlockRows.
  const int64_t set = std::clamp<int64_t>(kPairSetBytes / tile_bytes, 1, tiles);
  const int64_t block = std::min<int64_t>(r1 - r0, kPairBlockRows);
  // Per thread: a block's rows packed at one K block, and its partial sums [tile][row][W].
  std::unique_ptr<uint32_t[]> wbuf(new uint32_t[block * kPairGroups<NR>]);
  std::unique_ptr<uint16_t[]> obuf(new uint16_t[block * kPairGroups<NR>]);
  std::unique_ptr<float[]> c(new float[(set * block + 16) * W]);  // + 16: the last rows' transposes read past
  for (int64_t t0 = 0; t0 < tiles; t0 += set) {
    const int64_t t1 = std::min(t0 + set, tiles);
    for (int64_t rb = r0; rb < r1; rb += block) {
      const int64_t re = std::min(rb + block, r1), nr = re - rb;
      for (int64_t g0 = 0; g0 < groups; g0 += kPairGroups<NR>) {
        const int64_t ng = std::min(kPairGroups<NR>, groups - g0);
        pack_rows<W>(a, rb, re, g0, ng, {wbuf.get(), obuf.get()});
        prefetch_rows<W>(a, rb, re, g0 + kPairGroups<NR>);
        for (int64_t t = t0; t < t1; ++t) {
          const uint32_t* xg = pairs + (t * groups + g0) * 6 * W;
          // The next x tile's pairs at this K block (24 KB) are prefetched a slice per register
          // tile, so the next tile's first rows do not wait for them.
          const bool more = t + 1 < t1;
          const char* next = reinterpret_cast<const char*>(xg + groups * 6 * W);
          const int64_t lines = ng * 6 * W * 4 / 64, per = (lines * kPairRows<NR> + nr - 1) / nr;
          for (int64_t r = 0; r < nr; r += kPairRows<NR>) {
            if (more) {
              const int64_t l1 = std::min(lines, (r / kPairRows<NR> + 1) * per);
              for (int64_t l = r / kPairRows<NR> * per; l < l1; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
            }
            pair_rows<NR>(std::min<int64_t>(kPairRows<NR>, nr - r), wbuf.get() + r * kPairGroups<NR>,
                          obuf.get() + r * kPairGroups<NR>, ng, xg, c.get() + ((t - t0) * nr + r) * W,
                          g0 == 0);
          }
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        // 16 rows by 16 rows of x at a time, transposed in registers: y's rows are written
        // 16 contiguous outputs at a time (rounded to bf16 by vcvtneps2bf16, nearest even).
        const float* ct = c.get() + (t - t0) * nr * W;
        for (int64_t r = 0; r < nr; r += 16) {
          const __mmask16 rm = static_cast<__mmask16>(nr - r >= 16 ? 0xFFFF : (1u << (nr - r)) - 1);
          const __m512 bias = a.bias != nullptr ? _mm512_maskz_loadu_ps(rm, a.bias + rb + r)
                                                : _mm512_setzero_ps();
          for (int h = 0; h < NR; ++h) {
            const int64_t b0 = t * W + 16 * h, nb = std::min<int64_t>(16, a.batch - b0);
            if (nb <= 0) break;
            __m512i v[16];
            for (int i = 0; i < 16; ++i) v[i] = _mm512_castps_si512(_mm512_loadu_ps(ct + (r + i) * W + 16 * h));
            transpose16(v);
            for (int64_t j = 0; j < nb; ++j) {
              const __m512 yv = _mm512_add_ps(_mm512_castsi512_ps(v[j]), bias);
              if (a.y16 != nullptr) {
                _mm256_mask_storeu_epi16(a.y16 + (b0 + j) * a.ldy + rb + r, rm,
                                         reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(yv)));
              } else {
                _mm512_mask_storeu_ps(a.y + (b0 + j) * a.ldy + rb + r, rm, yv);
              }
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Lanes form (many rows of x): 16 weight rows per register, one row of x broadcast.
//
// A register of kept values holds 16 weight rows' two kept values of one group (one 32-bit
// lane per weight row). One row of x meets it as the group's 4 bf16 (8 bytes) broadcast to
// every lane, then one byte shuffle (vpshufb, per-lane control from the row's metadata
// nibble) moves each lane's two kept columns beside its values, and vdpbf16ps adds both
// products to the lane's fp32 sum: y[b, 16 rows] directly, no transposes of x or y. A
// register tile is kLaneMR register rows (32 weight rows) by kLaneNB rows of x: per group,
// kLaneNB 8-byte broadcasts and 2 * kLaneMR loads of values and controls serve kLaneMR *
// kLaneNB products. The values and controls of a block of weight rows at one K block are
// unpacked first (16x16 transposes: [group][values | controls][16 lanes]) and used from
// L2 by every row of x.
//
// Measured on Zen 5 (2 threads, 4096x4096 bf16, batch 64-512): the product loop runs at
// about 0.7 cycles per vdpbf16ps, where the pair GEMM above ran at 0.9-1.3 (a load of its
// own 64 bytes of pairs per product, plus the pairs' preparation and the transposes of y).
// A shuffle per product costs nothing there: Zen 5 issues it beside the dot products.
constexpr int kLaneMR = 2;                  // register rows (16 weight rows each) per tile
constexpr int kLaneNB = 6;                  // rows of x per tile
constexpr int64_t kLaneGroups = 64;         // groups per K block, at least
constexpr int64_t kLaneBlockRows = 256;     // weight rows per block
constexpr int64_t kLanePackedBytes = 512 << 10;  // a block's packed K block, at most (in L2)

// Metadata nibble (first kept index | second << 2) -> the lane's vpshufb control: bytes
// 2a, 2a + 1, 2b, 2b + 1 of the group's 8 bytes of x (a broadcast qword: every 128-bit
// lane holds them). Non-canonical nibbles stay inside the group.
inline __m512i lane_control_table() {
  alignas(64) uint32_t t[16];
  for (uint32_t n = 0; n < 16; ++n) {
    const uint32_t i0 = n & 3u, i1 = n >> 2;
    t[n] = (2 * i0) | (2 * i0 + 1) << 8 | (2 * i1) << 16 | (2 * i1 + 1) << 24;
  }
  return _mm512_load_si512(t);
}

// Weight rows [rv, rv + 16) (those >= rend are zero) at groups [g0, g0 + ng), g0 even:
// out[g][0][lane] = the row's two kept values (one uint32), out[g][1][lane] its control.
void pack_lanes(const SpmmArgs& a, int64_t rv, int64_t rend, int64_t g0, int64_t ng, uint32_t* out,
                __m512i table) {
  const NMLayout& L = a.layout;
  const uint16_t* values = static_cast<const uint16_t*>(a.values);
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t gg = 0; gg < ng; gg += 16) {
    const int64_t n16 = std::min<int64_t>(16, ng - gg);
    const __mmask16 vm = static_cast<__mmask16>(n16 == 16 ? 0xFFFF : (1u << n16) - 1);
    const __mmask16 mm = static_cast<__mmask16>((1u << ((n16 + 1) / 2)) - 1);
    __m512i v[16], c[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t r = rv + i;
      if (r < rend) {
        v[i] = _mm512_maskz_loadu_epi32(vm, values + r * L.values_per_row + 2 * (g0 + gg));
        const __m128i m = _mm_maskz_loadu_epi8(mm, a.metadata + r * L.meta_bytes_per_row + (g0 + gg) / 2);
        const __m128i lo = _mm_and_si128(m, nib), hi = _mm_and_si128(_mm_srli_epi16(m, 4), nib);
        c[i] = _mm512_permutexvar_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), table);
      } else {
        v[i] = _mm512_setzero_si512();
        c[i] = _mm512_setzero_si512();
      }
    }
    transpose16(v);
    transpose16(c);
    for (int64_t j = 0; j < n16; ++j) {
      _mm512_store_si512(out + (gg + j) * 32, v[j]);
      _mm512_store_si512(out + (gg + j) * 32 + 16, c[j]);
    }
  }
}

// MR register rows (weight rows r .. r + 16 * MR, the last `last` lanes wide) by NB rows of x
// (x: row b0 at the K block's first column) over ng groups. Sums are fp32 in yf [.., ldy]
// (started from the bias or zero when `first`); when `out16` is set they are instead
// written to it as bf16 (the K block is the last).
template <int MR, int NB, bool Split>
void lane_tile(const uint32_t* packed, int64_t ng, const uint16_t* const* x, const int64_t* goff,
               const int64_t* goff2, const uint8_t* gsplit, int64_t r, __mmask16 last,
               const float* bias, bool first, float* yf, uint16_t* out16, int64_t ldy) {
  __m512 acc[MR][NB];
  lane_sums_load(acc, r, last, bias, first, yf, ldy);
  for (int64_t g = 0; g < ng; ++g) {
    __m512i xb[NB];
    const int64_t o = goff[g];
    for (int j = 0; j < NB; ++j) {
      uint64_t q;
      std::memcpy(&q, x[j] + o, sizeof(q));
      xb[j] = _mm512_set1_epi64(static_cast<long long>(q));
    }
    if constexpr (Split) {  // a group over two runs: its second run's elements from goff2
      // (both 8-byte reads stay inside the padded input: conv_lanes_forward)
      const int64_t o2 = goff2[g];
      const __mmask32 m = static_cast<__mmask32>(gsplit[g] * 0x11111111u);  // per qword
      for (int j = 0; j < NB; ++j) {
        uint64_t q2;
        std::memcpy(&q2, x[j] + o2, sizeof(q2));
        xb[j] = _mm512_mask_blend_epi16(m, xb[j], _mm512_set1_epi64(static_cast<long long>(q2)));
      }
    }
    for (int i = 0; i < MR; ++i) {
      const uint32_t* p = packed + (i * ng + g) * 32;
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_load_si512(p));
      const __m512i c = _mm512_load_si512(p + 16);
      for (int j = 0; j < NB; ++j) {
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], reinterpret_cast<__m512bh>(_mm512_shuffle_epi8(xb[j], c)), w);
      }
    }
  }
  if (out16 == nullptr) return lane_sums_store(acc, r, last, yf, ldy);
  for (int i = 0; i < MR; ++i) {
    const __mmask16 m = i == MR - 1 ? last : static_cast<__mmask16>(0xFFFF);
    for (int j = 0; j < NB; ++j) {
      _mm256_mask_storeu_epi16(out16 + j * ldy + r + 16 * i, m,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[i][j])));
    }
  }
}

template <int MR, bool Split>
void lane_tiles(int nb, const uint32_t* packed, int64_t ng, const uint16_t* const* x, const int64_t* goff,
                const int64_t* goff2, const uint8_t* gsplit, int64_t r, __mmask16 last,
                const float* bias, bool first, float* yf, uint16_t* out16, int64_t ldy) {
#define SPARSEKIT_LANE_TILE(NB) \
  lane_tile<MR, NB, Split>(packed, ng, x, goff, goff2, gsplit, r, last, bias, first, yf, out16, ldy)
  switch (nb) {
    case 6: SPARSEKIT_LANE_TILE(6); break;
    case 5: SPARSEKIT_LANE_TILE(5); break;
    case 4: SPARSEKIT_LANE_TILE(4); break;
    case 3: SPARSEKIT_LANE_TILE(3); break;
    case 2: SPARSEKIT_LANE_TILE(2); break;
    case 1: SPARSEKIT_LANE_TILE(1); break;
    default: break;
  }
#undef SPARSEKIT_LANE_TILE
}

// One pass of MR = 1 or 2 register rows, with or without groups over two runs.
template <bool Split>
void lane_tiles_mr(int mr, int nb, const uint32_t* packed, int64_t ng, const uint16_t* const* x,
                   const int64_t* goff, const int64_t* goff2, const uint8_t* gsplit, int64_t r,
                   __mmask16 last, const float* bias, bool first, float* yf, uint16_t* out16,
                   int64_t ldy) {
  if (mr == 2) {
    lane_tiles<2, Split>(nb, packed, ng, x, goff, goff2, gsplit, r, last, bias, first, yf, out16, ldy);
  } else {
    lane_tiles<1, Split>(nb, packed, ng, x, goff, goff2, gsplit, r, last, bias, first, yf, out16, ldy);
  }
}
static_assert(kLaneNB == 6 && kLaneMR == 2, "lane_tiles covers 1..6 rows of x, 1..2 register rows");

}  // namespace

void prepare_pairs_2_4_bf16(const SpmmArgs& a, int64_t t0, int64_t t1, uint32_t* pairs) {
  if (a.pair_tile == 32) {
    prepare_pairs<2>(a, t0, t1, pairs);
  } else {
    prepare_pairs<4>(a, t0, t1, pairs);
  }
}

// Rows [r0, r1) for the a.batch rows of x that `rows` describes (spmm.h: LaneRows16; a
// Linear's x or a convolution's output pixels), in the lanes form (above). Sums are carried
// in yf (fp32 [a.batch, a.ldy]) between K blocks, untouched when K is one block; the last K
// block writes a.y16 (bf16) when set, else yf.
void forward_2_4_bf16_lanes(const SpmmArgs& a, int64_t r0, int64_t r1, const LaneRows16& rows, float* yf) {
  const __m512i table = lane_control_table();
  lanes_forward<kLaneMR, kLaneNB, uint32_t>(
      a, r0, r1, rows, kLaneBlockRows, kLaneGroups, kLanePackedBytes, 32, 2,
      [&](int64_t rv, int64_t rend, int64_t g0, int64_t ng, uint32_t* out) {
        pack_lanes(a, rv, rend, g0, ng, out, table);
      },
      [&](int mr, int nb, const uint32_t* pv, int64_t ng, const uint16_t* const* x,
          const int64_t* goff, const int64_t* goff2, const uint8_t* gsplit, int64_t r,
          __mmask16 last, bool first, bool final, int64_t b0) {
        float* yb = yf + b0 * a.ldy;
        uint16_t* out16 = final && a.y16 != nullptr ? a.y16 + b0 * a.ldy : nullptr;
        if (gsplit != nullptr) {
          lane_tiles_mr<true>(mr, nb, pv, ng, x, goff, goff2, gsplit, r, last, a.bias, first, yb,
                              out16, a.ldy);
        } else {
          lane_tiles_mr<false>(mr, nb, pv, ng, x, goff, nullptr, nullptr, r, last, a.bias, first,
                               yb, out16, a.ldy);
        }
      });
}

void forward_2_4_bf16_pairs(const SpmmArgs& a, int64_t r0, int64_t r1, const uint32_t* pairs) {
  if (a.pair_tile == 32) {
    forward_pairs<2>(a, r0, r1, pairs);
  } else {
    forward_pairs<4>(a, r0, r1, pairs);
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
    t.prepare_pairs_2_4_bf16 = &spmm_avx512bf16::prepare_pairs_2_4_bf16;
    t.forward_2_4_bf16_pairs = &spmm_avx512bf16::forward_2_4_bf16_pairs;
    t.forward_2_4_bf16_lanes = &spmm_avx512bf16::forward_2_4_bf16_lanes;
    return t;
  }();
  return k;
}
}  // namespace sparsekit
#endif
