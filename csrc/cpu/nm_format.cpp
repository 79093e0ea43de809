// CPU kernels of the N:M format: mask selection, compress, decompress.
// Parallel over byte-aligned chunks of rows (at::parallel_for runs on torch's OpenMP pool,
// so torch.set_num_threads governs these kernels too).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdio>
#include <type_traits>
#include <limits>

#include "../checks.h"

namespace sparsekit {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

void atomic_min(std::atomic<int64_t>& target, int64_t v) {
  int64_t cur = target.load(std::memory_order_relaxed);
  while (v < cur && !target.compare_exchange_weak(cur, v)) {
  }
}

// Visits flat chunk indices [begin, end) as (row, chunk) pairs, one division per range;
// stops early when f returns false (an error was recorded).
template <typename F>
void for_each_chunk(const NMLayout& L, int64_t begin, int64_t end, F&& f) {
  if (begin >= end) return;
  int64_t r = begin / L.chunks_per_row, chunk = begin % L.chunks_per_row;
  for (int64_t c = begin; c < end; ++c) {
    if (!f(r, chunk)) return;
    if (++chunk == L.chunks_per_row) {
      chunk = 0;
      ++r;
    }
  }
}

// Grain: enough chunks per task that scheduling costs little next to the memory traffic.
int64_t grain_for(int64_t chunk_groups, int64_t m) {
  return std::max<int64_t>(1, 32768 / (chunk_groups * m));
}

// 2:4 with K % 8 == 0: rows hold whole metadata bytes, so the matrix is one flat run of
// bytes (8 dense entries -> 4 values + 1 byte) and flat group 2b+i is row * groups + g.
// Returns the first bad flat group of [b0, b1), or -1.
template <typename Bits>
int64_t compress_2_4_flat(const Bits* __restrict__ src, Bits* __restrict__ vals,
                          uint8_t* __restrict__ meta, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    uint32_t lo, hi;
    const bool ok0 = compress_group_2_4(src + 8 * b, vals + 4 * b, lo);
    const bool ok1 = compress_group_2_4(src + 8 * b + 4, vals + 4 * b + 2, hi);
    meta[b] = static_cast<uint8_t>(lo | (hi << 4));
    if (!(ok0 & ok1)) return ok0 ? 2 * b + 1 : 2 * b;
  }
  return -1;
}

template <typename Bits>
int64_t decompress_2_4_flat(const Bits* __restrict__ vals, const uint8_t* __restrict__ meta,
                            Bits* __restrict__ dst, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t byte = meta[b];
    const bool ok0 = decompress_group_2_4(vals + 4 * b, byte & 0xFu, dst + 8 * b);
    const bool ok1 = decompress_group_2_4(vals + 4 * b + 2, byte >> 4, dst + 8 * b + 4);
    if (!(ok0 & ok1)) return ok0 ? 2 * b + 1 : 2 * b;
  }
  return -1;
}

// 2:4 over a flat run of full groups (rows of K % 4 == 0 are one flat array of groups).
// Branch-free ranks: entry i is kept if fewer than 2 entries beat it (a tie goes to the
// lower index). Returns false if the run holds a NaN (the caller then locates it).
template <typename T, typename Acc, bool kAbs>
bool nm_mask_2_4_run(const T* __restrict__ src, bool* __restrict__ dst, int64_t g0, int64_t g1) {
  bool nan = false;
  for (int64_t g = g0; g < g1; ++g) {
    const T* p = src + 4 * g;
    Acc a = static_cast<Acc>(p[0]), b = static_cast<Acc>(p[1]);
    Acc c = static_cast<Acc>(p[2]), d = static_cast<Acc>(p[3]);
    if constexpr (kAbs) {
      a = std::abs(a), b = std::abs(b), c = std::abs(c), d = std::abs(d);
    }
    nan |= (a != a) | (b != b) | (c != c) | (d != d);
    const int ra = (b > a) + (c > a) + (d > a);
    const int rb = (a >= b) + (c > b) + (d > b);
    const int rc = (a >= c) + (b >= c) + (d > c);
    const int rd = (a >= d) + (b >= d) + (c >= d);
    bool* q = dst + 4 * g;
    q[0] = ra < 2, q[1] = rb < 2, q[2] = rc < 2, q[3] = rd < 2;
  }
  return !nan;
}

#if defined(__x86_64__) || defined(__i386__)
#define SPARSEKIT_X86 1
#include <immintrin.h>

// AVX2 2:4 mask for fp32, 8 groups (32 floats) per step, compiled for AVX2 by attribute and
// chosen at run time (cpu_has_avx2). Each 128-bit lane holds one group, so in-lane permutes
// line every entry up against the other three. Entry i is beaten by the entry s places on
// (mod 4) if that one is larger, or equal and at a lower index (the rotation wrapped).
// Kept iff beaten fewer than 2 times. Returns false on NaN.
#define SK_AVX2 __attribute__((target("avx2"), always_inline)) inline

// -1 in the lanes of v beaten by the rotated r (larger, or equal and wrapped = lower index).
SK_AVX2 __m256i beats_2_4(__m256 r, __m256 v, __m256 wrap) {
  return _mm256_castps_si256(_mm256_or_ps(_mm256_cmp_ps(r, v, _CMP_GT_OQ),
                                          _mm256_and_ps(_mm256_cmp_ps(r, v, _CMP_EQ_OQ), wrap)));
}

// int32 -1 where kept, for the 8 floats (2 groups) at p; ORs NaN lanes into `nan`.
SK_AVX2 __m256i keep8_2_4(const float* p, __m256 no_sign, __m256& nan) {
  // Lanes (i = 0..3 per group) where the rotation by s wrapped, i.e. (i + s) % 4 < i.
  const __m256 wrap1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, -1, 0, 0, 0, -1));
  const __m256 wrap2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
  const __m256 wrap3 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, -1, -1, 0, -1, -1, -1));
  const __m256 v = _mm256_and_ps(_mm256_loadu_ps(p), no_sign);
  nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i rank = _mm256_add_epi32(
      _mm256_add_epi32(beats_2_4(_mm256_permute_ps(v, _MM_SHUFFLE(0, 3, 2, 1)), v, wrap1),
                       beats_2_4(_mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)), v, wrap2)),
      beats_2_4(_mm256_permute_ps(v, _MM_SHUFFLE(2, 1, 0, 3)), v, wrap3));
  return _mm256_cmpgt_epi32(rank, _mm256_set1_epi32(-2));  // fewer than 2 wins (-1 each)
}

__attribute__((target("avx2"))) bool nm_mask_2_4_avx2(const float* __restrict__ src,
                                                     bool* __restrict__ dst, int64_t g0,
                                                     int64_t g1, bool absolute) {
  const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(absolute ? 0x7FFFFFFF : -1));
  __m256 nan = _mm256_setzero_ps();
  int64_t g = g0;
  for (; g + 8 <= g1; g += 8) {
    const float* p = src + 4 * g;
    const __m256i k0 = keep8_2_4(p, no_sign, nan), k1 = keep8_2_4(p + 8, no_sign, nan);
    const __m256i k2 = keep8_2_4(p + 16, no_sign, nan), k3 = keep8_2_4(p + 24, no_sign, nan);
    // 32 int32 masks -> 32 bytes of 0/1, in order (packs interleave 128-bit lanes).
    const __m256i w01 = _mm256_packs_epi32(k0, k1), w23 = _mm256_packs_epi32(k2, k3);
    __m256i bytes = _mm256_packs_epi16(w01, w23);
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    bytes = _mm256_and_si256(bytes, _mm256_set1_epi8(1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4 * g), bytes);
  }
  bool ok = _mm256_movemask_ps(nan) == 0;
  if (g < g1) ok &= absolute ? nm_mask_2_4_run<float, float, true>(src, dst, g, g1)
                             : nm_mask_2_4_run<float, float, false>(src, dst, g, g1);
  return ok;
}

// 2:4 compress of fp32 with AVX2, two groups (8 floats, one metadata byte) per step. The
// nonzero mask of the 8 floats (one movemask) indexes two 256-entry tables: the lanes to
// gather (kept indices of group 0, then 4 + those of group 1) and the metadata byte.
struct Compress24Tables {
  uint32_t lanes[256];  // four 8-bit lane indices
  uint8_t meta[256];
  bool valid[256];      // both groups hold at most 2 nonzeros
};

constexpr Compress24Tables make_compress_2_4_tables() {
  Compress24Tables t{};
  constexpr uint64_t kLut = make_2_4_lut();
  for (uint32_t nz = 0; nz < 256; ++nz) {
    const uint32_t lo = (kLut >> (4 * (nz & 0xFu))) & 0xFu, hi = (kLut >> (4 * (nz >> 4))) & 0xFu;
    t.lanes[nz] = (lo & 3u) | (lo >> 2) << 8 | (4u + (hi & 3u)) << 16 | (4u + (hi >> 2)) << 24;
    t.meta[nz] = static_cast<uint8_t>(lo | hi << 4);
    t.valid[nz] = __builtin_popcount(nz & 0xFu) <= 2 && __builtin_popcount(nz >> 4) <= 2;
  }
  return t;
}

constexpr Compress24Tables kCompress24 = make_compress_2_4_tables();

__attribute__((target("avx2"))) int64_t compress_2_4_flat_avx2(const float* __restrict__ src,
                                                              float* __restrict__ vals,
                                                              uint8_t* __restrict__ meta,
                                                              int64_t b0, int64_t b1) {
  const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b = b0; b < b1; ++b) {
    const __m256 v = _mm256_loadu_ps(src + 8 * b);
    // -0.0 is zero: compare |v| with 0 (unordered NaN compares as nonzero).
    const int nz = _mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_and_ps(v, no_sign), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    const __m256i lanes = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(
        static_cast<int>(kCompress24.lanes[nz])));
    _mm_storeu_ps(vals + 4 * b, _mm256_castps256_ps128(_mm256_permutevar8x32_ps(v, lanes)));
    meta[b] = kCompress24.meta[nz];
    if (!kCompress24.valid[nz]) return __builtin_popcount(nz & 0xF) > 2 ? 2 * b : 2 * b + 1;
  }
  return -1;
}

// 16-bit (fp16 / bf16) 2:4 paths with SSSE3 byte shuffles, one metadata byte (2 groups,
// 8 dense entries = 16 bytes, 4 values = 8 bytes) per step, shuffle controls from tables.
struct Shuffle16Tables {
  uint8_t expand[256][16];    // metadata byte -> pshufb control: 4 values -> 8 entries
  uint8_t gather[256][16];    // nonzero mask -> pshufb control: 8 entries -> 4 kept values
};

constexpr Shuffle16Tables make_shuffle16_tables() {
  Shuffle16Tables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    const uint32_t pos[4] = {b & 3u, (b >> 2) & 3u, 4u + ((b >> 4) & 3u), 4u + (b >> 6)};
    for (int h = 0; h < 8; ++h) t.expand[b][2 * h] = t.expand[b][2 * h + 1] = 0x80;  // zero
    for (uint32_t v = 0; v < 4; ++v) {
      t.expand[b][2 * pos[v]] = static_cast<uint8_t>(2 * v);
      t.expand[b][2 * pos[v] + 1] = static_cast<uint8_t>(2 * v + 1);
    }
    const uint32_t lanes = kCompress24.lanes[b];
    for (int v = 0; v < 4; ++v) {
      const uint32_t l = (lanes >> (8 * v)) & 0xFFu;
      t.gather[b][2 * v] = static_cast<uint8_t>(2 * l);
      t.gather[b][2 * v + 1] = static_cast<uint8_t>(2 * l + 1);
    }
    for (int i = 8; i < 16; ++i) t.gather[b][i] = 0x80;
  }
  return t;
}

constexpr Shuffle16Tables kShuffle16 = make_shuffle16_tables();

__attribute__((target("ssse3"))) int64_t decompress_2_4_flat_16(const uint16_t* __restrict__ vals,
                                                              const uint8_t* __restrict__ meta,
                                                              uint16_t* __restrict__ dst,
                                                              int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t byte = meta[b];
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vals + 4 * b));
    const __m128i ctl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kShuffle16.expand[byte]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8 * b), _mm_shuffle_epi8(v, ctl));
    // Canonical metadata keeps idx0 < idx1 in both nibbles.
    if (((byte & 3u) >= ((byte >> 2) & 3u)) | (((byte >> 4) & 3u) >= (byte >> 6))) {
      return ((byte & 3u) >= ((byte >> 2) & 3u)) ? 2 * b : 2 * b + 1;
    }
  }
  return -1;
}

__attribute__((target("ssse3"))) int64_t compress_2_4_flat_16(const uint16_t* __restrict__ src,
                                                            uint16_t* __restrict__ vals,
                                                            uint8_t* __restrict__ meta,
                                                            int64_t b0, int64_t b1) {
  const __m128i no_sign = _mm_set1_epi16(0x7FFF);
  for (int64_t b = b0; b < b1; ++b) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8 * b));
    // Zero entries (+0.0 or -0.0) -> 0xFFFF lanes; one bit per entry after the pack.
    const __m128i is_zero = _mm_cmpeq_epi16(_mm_and_si128(v, no_sign), _mm_setzero_si128());
    const int nz = ~_mm_movemask_epi8(_mm_packs_epi16(is_zero, is_zero)) & 0xFF;
    const __m128i ctl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kShuffle16.gather[nz]));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(vals + 4 * b), _mm_shuffle_epi8(v, ctl));
    meta[b] = kCompress24.meta[nz];
    if (!kCompress24.valid[nz]) return __builtin_popcount(nz & 0xF) > 2 ? 2 * b : 2 * b + 1;
  }
  return -1;
}

// AVX-512 (F/BW/VL + VBMI2) 2:4 decompress of a flat run of metadata bytes [b0, b1), for
// 2-byte (W = 2) or 4-byte (W = 4) entries. 64 metadata bytes at a time: two nibble
// lookups turn every group's nibble into its 4-bit kept mask (0 when not canonical), and
// one expand per output vector places the packed values between zeros (a 16-bit expand
// per 32 bf16/fp16 entries, a 32-bit one per 16 fp32). `stream` writes with non-temporal
// stores, for outputs larger than the last-level cache: no read of the destination's
// lines before they are written. Returns -1, or the first bad flat group.
alignas(16) constexpr uint8_t kKeptNibble[16] = {  // nibble (i1 << 2 | i0) -> kept mask
    0, 0, 0, 0, 0x3, 0, 0, 0, 0x5, 0x6, 0, 0, 0x9, 0xA, 0xC, 0};

template <int W>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,bmi2"))) int64_t
decompress_2_4_flat_avx512(const void* vals_in, const uint8_t* __restrict__ meta, void* dst_in,
                           int64_t b0, int64_t b1, bool stream) {
  using Bits = std::conditional_t<W == 2, uint16_t, uint32_t>;
  const Bits* vals = static_cast<const Bits*>(vals_in);
  Bits* dst = static_cast<Bits*>(dst_in);
  const __m512i lut = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kKeptNibble)));
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
  int64_t b = b0;
  // Whole 64-byte steps from a multiple of 64, so that each step's output (8 * W * 64
  // bytes) starts 64-byte aligned when dst does.
  const int64_t head = std::min(b1, (b0 + 63) / 64 * 64);
  if (head > b) {
    const int64_t g = decompress_2_4_flat(vals, meta, dst, b, head);
    if (g >= 0) return g;
    b = head;
  }
  stream = stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
  alignas(64) uint8_t kept[64];
  for (; b + 64 <= b1; b += 64) {
    const __m512i m = _mm512_loadu_si512(meta + b);
    const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(m, low));
    const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(m, 4), low));
    const __m512i k = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
    if ((_mm512_test_epi8_mask(k, low) & _mm512_test_epi8_mask(k, high)) != ~0ull) {
      return decompress_2_4_flat(vals, meta, dst, b, b1);  // locates the bad group
    }
    _mm512_store_si512(kept, k);
    const Bits* v = vals + 4 * b;
    Bits* out = dst + 8 * b;
    constexpr int kPer = 64 / W;  // outputs per vector, from kPer / 2 values
#pragma GCC unroll 4
    for (int i = 0; i < 8 * 64 / kPer; ++i) {
      const __m512i packed = _mm512_castsi256_si512(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i * kPer / 2)));
      __m512i e;
      if constexpr (W == 2) {
        uint32_t bits;
        __builtin_memcpy(&bits, kept + 4 * i, sizeof(bits));
        e = _mm512_maskz_expand_epi16(bits, packed);
      } else {
        uint16_t bits;
        __builtin_memcpy(&bits, kept + 2 * i, sizeof(bits));
        e = _mm512_maskz_expand_epi32(bits, packed);
      }
      if (stream) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(out + i * kPer), e);
      } else {
        _mm512_storeu_si512(out + i * kPer, e);
      }
    }
  }
  if (stream) _mm_sfence();
  return b < b1 ? decompress_2_4_flat(vals, meta, dst, b, b1) : -1;
}

bool cpu_has_avx512_vbmi2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
           __builtin_cpu_supports("bmi2");
  }();
  return has;
}

// Outputs of at least this many bytes are written with non-temporal stores: the size of
// the last-level cache (they could not stay in it anyway), as Linux reports it for this
// machine's CPU 0 (sysconf's figure can be the host's whole L3 in a virtual machine), else
// 32 MiB. 11008x4096 bf16 on Zen 4: 3.8 -> 3.4 ms.
int64_t stream_bytes() {
  static const int64_t bytes = [] {
    int64_t size = int64_t{32} << 20;
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long kb = 0;
      char unit = 0;
      if (std::fscanf(f, "%ld%c", &kb, &unit) >= 1 && kb > 0) {
        size = static_cast<int64_t>(kb) << (unit == 'M' ? 20 : 10);
      }
      std::fclose(f);
    }
    return size;
  }();
  return bytes;
}

bool cpu_has_ssse3() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("ssse3") != 0;
  }();
  return has;
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}
#endif

std::tuple<at::Tensor, at::Tensor> nm_compress_cpu(const at::Tensor& dense_in, int64_t n,
                                                   int64_t m) {
  check_pattern(n, m);
  check_float_matrix(dense_in, "w");
  const at::Tensor dense = dense_in.contiguous();
  const int64_t rows = dense.size(0);
  const NMLayout L(dense.size(1), static_cast<int>(n), static_cast<int>(m));
  at::Tensor values = at::empty({rows, L.values_per_row}, dense.options());
  at::Tensor metadata = at::empty({rows, L.meta_bytes_per_row}, dense.options().dtype(at::kByte));
  std::atomic<int64_t> bad{kNone};
  dispatch_bits(dense, [&](auto zero_bits) {
    using Bits = decltype(zero_bits);
    const Bits* src = static_cast<const Bits*>(dense.const_data_ptr());
    Bits* vals = static_cast<Bits*>(values.data_ptr());
    uint8_t* meta = metadata.data_ptr<uint8_t>();
    if (n == 2 && m == 4 && L.k % 8 == 0) {
      at::parallel_for(0, rows * L.k / 8, grain_for(2, m), [&](int64_t begin, int64_t end) {
        int64_t g;
#ifdef SPARSEKIT_X86
        if (std::is_same_v<Bits, uint32_t> && cpu_has_avx2()) {
          g = compress_2_4_flat_avx2(reinterpret_cast<const float*>(src),
                                     reinterpret_cast<float*>(vals), meta, begin, end);
        } else if (std::is_same_v<Bits, uint16_t> && cpu_has_ssse3()) {
          g = compress_2_4_flat_16(reinterpret_cast<const uint16_t*>(src),
                                   reinterpret_cast<uint16_t*>(vals), meta, begin, end);
        } else
#endif
        {
          g = compress_2_4_flat(src, vals, meta, begin, end);
        }
        if (g >= 0) atomic_min(bad, g);
      });
      return;
    }
    dispatch_pattern(n, m, [&](auto kN, auto kM) {
      const int64_t total = rows * L.chunks_per_row;
      at::parallel_for(0, total, grain_for(L.chunk_groups, m), [&](int64_t begin, int64_t end) {
        for_each_chunk(L, begin, end, [&](int64_t r, int64_t chunk) {
          const int64_t g = compress_chunk<Bits, kN.value, kM.value>(
              src + r * L.k, vals + r * L.values_per_row, meta + r * L.meta_bytes_per_row, L,
              chunk);
          if (g >= 0) atomic_min(bad, r * L.groups + g);
          return g < 0;
        });
      });
    });
  });
  if (bad.load() != kNone) raise_not_nm(dense, bad.load(), L);
  return {values, metadata};
}

// Writes the dense [rows, k] matrix into `dense` (contiguous, checked by the callers).
void decompress_into(const at::Tensor& values_in, const at::Tensor& metadata_in, int64_t k,
                     int64_t n, int64_t m, const NMLayout& L, at::Tensor& dense) {
  const at::Tensor values = values_in.contiguous();
  const at::Tensor metadata = metadata_in.contiguous();
  const int64_t rows = values.size(0);
  std::atomic<int64_t> bad{kNone};
  dispatch_bits(values, [&](auto zero_bits) {
    using Bits = decltype(zero_bits);
    const Bits* vals = static_cast<const Bits*>(values.const_data_ptr());
    const uint8_t* meta = metadata.const_data_ptr<uint8_t>();
    Bits* dst = static_cast<Bits*>(dense.data_ptr());
    if (n == 2 && m == 4 && L.k % 8 == 0) {
#ifdef SPARSEKIT_X86
      const bool stream = dense.nbytes() >= static_cast<size_t>(stream_bytes());
#endif
      at::parallel_for(0, rows * L.k / 8, grain_for(2, m), [&](int64_t begin, int64_t end) {
        int64_t g;
#ifdef SPARSEKIT_X86
        if (sizeof(Bits) <= 4 && cpu_has_avx512_vbmi2()) {
          g = decompress_2_4_flat_avx512<sizeof(Bits) == 2 ? 2 : 4>(vals, meta, dst, begin, end, stream);
        } else if (std::is_same_v<Bits, uint16_t> && cpu_has_ssse3()) {
          g = decompress_2_4_flat_16(reinterpret_cast<const uint16_t*>(vals), meta,
                                     reinterpret_cast<uint16_t*>(dst), begin, end);
        } else
#endif
        {
          g = decompress_2_4_flat(vals, meta, dst, begin, end);
        }
        if (g >= 0) atomic_min(bad, g);
      });
      return;
    }
    dispatch_pattern(n, m, [&](auto kN, auto kM) {
      const int64_t total = rows * L.chunks_per_row;
      at::parallel_for(0, total, grain_for(L.chunk_groups, m), [&](int64_t begin, int64_t end) {
        for_each_chunk(L, begin, end, [&](int64_t r, int64_t chunk) {
          const int64_t g = decompress_chunk<Bits, kN.value, kM.value>(
              vals + r * L.values_per_row, meta + r * L.meta_bytes_per_row, dst + r * L.k, L,
              chunk);
          if (g >= 0) atomic_min(bad, r * L.groups + g);
          return g < 0;
        });
      });
    });
  });
  if (bad.load() != kNone) raise_bad_metadata(bad.load(), L);
}

at::Tensor nm_decompress_cpu(const at::Tensor& values, const at::Tensor& metadata, int64_t k,
                             int64_t n, int64_t m) {
  const NMLayout L = check_compressed(values, metadata, k, n, m);
  at::Tensor dense = at::empty({values.size(0), k}, values.options());
  decompress_into(values, metadata, k, n, m, L, dense);
  return dense;
}

// Into a caller's buffer: a layer's dense path reuses one scratch buffer instead of
// allocating (and page-faulting) a fresh dense weight on every call.
void nm_decompress_into_cpu(const at::Tensor& values, const at::Tensor& metadata, int64_t k,
                            int64_t n, int64_t m, at::Tensor out) {
  const NMLayout L = check_compressed(values, metadata, k, n, m);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == values.size(0) && out.size(1) == k,
                    "out must have shape [", values.size(0), ", ", k, "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == values.scalar_type(), "out must have the values' dtype ",
                   values.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == values.device() && out.is_contiguous(),
                    "out must be a contiguous tensor on ", values.device());
  decompress_into(values, metadata, k, n, m, L, out);
}


at::Tensor nm_mask_cpu(const at::Tensor& scores_in, int64_t n, int64_t m, bool absolute) {
  check_pattern(n, m);
  check_float_matrix(scores_in, "scores");
  const at::Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0), k = scores.size(1);
  const int64_t groups = (k + m - 1) / m;
  at::Tensor mask = at::empty({rows, k}, scores.options().dtype(at::kBool));
  std::atomic<int64_t> nan_at{kNone};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "nm_mask", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = scores.const_data_ptr<scalar_t>();
    bool* dst = mask.data_ptr<bool>();
    // Any group, any pattern; records the first NaN of [begin, end) (flat group indices).
    auto generic = [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / groups, col = (i % groups) * m;
        const int width = static_cast<int>(std::min(m, k - col));
        const int at = nm_mask_group<scalar_t, acc_t>(src + r * k + col, dst + r * k + col,
                                                      width, static_cast<int>(n), absolute);
        if (at >= 0) {
          atomic_min(nan_at, r * k + col + at);
          return;
        }
      }
    };
    if (n == 2 && m == 4 && k % 4 == 0) {
      at::parallel_for(0, rows * groups, grain_for(1, m), [&](int64_t begin, int64_t end) {
        bool ok;
#ifdef SPARSEKIT_X86
        if (std::is_same_v<scalar_t, float> && cpu_has_avx2()) {
          ok = nm_mask_2_4_avx2(reinterpret_cast<const float*>(src), dst, begin, end, absolute);
        } else
#endif
        {
          ok = absolute ? nm_mask_2_4_run<scalar_t, acc_t, true>(src, dst, begin, end)
                        : nm_mask_2_4_run<scalar_t, acc_t, false>(src, dst, begin, end);
        }
        if (!ok) generic(begin, end);
      });
    } else {
      at::parallel_for(0, rows * groups, grain_for(1, m), generic);
    }
  });
  if (nan_at.load() != kNone) raise_nan_score(nan_at.load() / k, nan_at.load() % k);
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, lib) {
  lib.impl("nm_mask", &nm_mask_cpu);
  lib.impl("nm_compress", &nm_compress_cpu);
  lib.impl("nm_decompress", &nm_decompress_cpu);
  lib.impl("nm_decompress_into", &nm_decompress_into_cpu);
}

}  // namespace sparsekit
