// The canonical compressed N:M format, written once for the host and the device.
//
// A weight W[R, K] is N:M along K. K is zero-padded to Kp (a multiple of M); each row
// holds G = Kp / M groups. Per row:
//   values   : G * N entries of W's dtype, groups in order, kept entries in increasing
//              index order inside a group. A group with fewer than N nonzeros fills its
//              remaining slots with the lowest unused indices (holding 0).
//   metadata : ceil(G * N * b / 8) bytes, b = ceil(log2 M); kept entry j of group g sits
//              at bit (g * N + j) * b, little-endian (bit 0 of byte 0 first). For 2:4 one
//              byte holds two groups, low nibble first, low 2 bits = first kept index.
//
// The kernels below work on "chunks": the smallest run of consecutive groups whose
// metadata ends on a byte boundary (lcm(N * b, 8) bits). Chunks never share a metadata
// byte, so every chunk can be compressed or decompressed by its own thread (an OpenMP
// iteration on the CPU, a CUDA thread on the GPU) without atomics.
//
// Element values are moved as raw bits (uint16_t / uint32_t / uint64_t), so one
// instantiation serves fp16 and bf16 alike. "Zero" means +0.0 or -0.0: masking a negative
// weight by multiplication yields -0.0, and such an entry is pruned, not kept.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace sparsekit {

// Kept index fields are at most 5 bits (M <= 32) and a group's bitmask fits in 32 bits.
constexpr int kMaxM = 32;

SK_HOST_DEVICE int index_bits(int m) {
  int b = 0;
  while ((1 << b) < m) ++b;
  return b;
}

SK_HOST_DEVICE int gcd_int(int a, int b) {
  while (b != 0) {
    int t = a % b;
    a = b;
    b = t;
  }
  return a;
}

SK_HOST_DEVICE int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

SK_HOST_DEVICE int lowest_bit(uint32_t x) {  // x != 0
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(x)) - 1;
#else
  return __builtin_ctz(x);
#endif
}

// Sizes derived from (K, N, M); identical on host and device.
struct NMLayout {
  int64_t k;             // logical reduction length
  int n, m, bits;        // pattern and bits per kept index
  int64_t groups;        // groups per row, ceil(K / M)
  int64_t values_per_row;
  int64_t meta_bytes_per_row;
  int chunk_groups;      // groups per byte-aligned chunk
  int64_t chunks_per_row;

  SK_HOST_DEVICE NMLayout(int64_t k_, int n_, int m_) : k(k_), n(n_), m(m_) {
    bits = index_bits(m);
    groups = (k + m - 1) / m;
    values_per_row = groups * n;
    meta_bytes_per_row = (values_per_row * bits + 7) / 8;
    chunk_groups = 8 / gcd_int(n * bits, 8);
    chunks_per_row = (groups + chunk_groups - 1) / chunk_groups;
  }
};

template <typename Bits>
SK_HOST_DEVICE bool is_nonzero(Bits v) {
  return static_cast<Bits>(v << 1) != 0;  // drop the sign bit: -0.0 counts as zero
}

// Appends `nbits` bits to a little-endian byte stream; full bytes are flushed at once.
struct BitWriter {
  uint8_t* out;
  uint32_t acc = 0;
  int filled = 0;
  SK_HOST_DEVICE explicit BitWriter(uint8_t* o) : out(o) {}
  SK_HOST_DEVICE void put(uint32_t v, int nbits) {
    acc |= v << filled;
    filled += nbits;
    while (filled >= 8) {
      *out++ = static_cast<uint8_t>(acc & 0xFFu);
      acc >>= 8;
      filled -= 8;
    }
  }
  SK_HOST_DEVICE void flush() {  // only at the end of a row: the last byte may be partial
    if (filled > 0) *out++ = static_cast<uint8_t>(acc & 0xFFu);
    acc = 0;
    filled = 0;
  }
};

struct BitReader {
  const uint8_t* in;
  uint32_t acc = 0;
  int filled = 0;
  SK_HOST_DEVICE explicit BitReader(const uint8_t* i) : in(i) {}
  SK_HOST_DEVICE uint32_t get(int nbits) {
    while (filled < nbits) {
      acc |= static_cast<uint32_t>(*in++) << filled;
      filled += 8;
    }
    uint32_t v = acc & ((1u << nbits) - 1u);
    acc >>= nbits;
    filled -= nbits;
    return v;
  }
};

// 2:4 fast path: the canonical kept pair of a group as a function of its nonzero mask
// (4 bits -> nibble idx0 | idx1 << 2), 16 nibbles packed in one 64-bit constant so host
// and device code share it without a table in memory. Masks with 3+ nonzeros map to 0.
constexpr uint64_t make_2_4_lut() {
  uint64_t lut = 0;
  for (uint32_t nz = 0; nz < 16; ++nz) {
    uint32_t keep = nz;
    int have = __builtin_popcount(nz);
    if (have > 2) continue;
    for (; have < 2; ++have) keep |= ~keep & (keep + 1u);
    const uint32_t i0 = __builtin_ctz(keep), i1 = __builtin_ctz(keep & (keep - 1u));
    lut |= static_cast<uint64_t>(i0 | (i1 << 2)) << (4 * nz);
  }
  return lut;
}

// Compresses a full 2:4 group (4 real columns). Returns false if it holds 3+ nonzeros.
template <typename Bits>
SK_HOST_DEVICE bool compress_group_2_4(const Bits* in, Bits* out, uint32_t& nibble) {
  constexpr uint64_t kLut = make_2_4_lut();
  const uint32_t nz = static_cast<uint32_t>(is_nonzero(in[0])) |
                      static_cast<uint32_t>(is_nonzero(in[1])) << 1 |
                      static_cast<uint32_t>(is_nonzero(in[2])) << 2 |
                      static_cast<uint32_t>(is_nonzero(in[3])) << 3;
  nibble = static_cast<uint32_t>(kLut >> (4 * nz)) & 0xFu;
  out[0] = in[nibble & 3u];
  out[1] = in[nibble >> 2];
  return popcount32(nz) <= 2;
}

// Decompresses a full 2:4 group. Returns false unless idx0 < idx1 (canonical metadata).
template <typename Bits>
SK_HOST_DEVICE bool decompress_group_2_4(const Bits* in, uint32_t nibble, Bits* out) {
  const uint32_t i0 = nibble & 3u, i1 = nibble >> 2;
  // Zero the group, then two indexed stores: no branches on the (random) pattern.
  out[0] = Bits(0);
  out[1] = Bits(0);
  out[2] = Bits(0);
  out[3] = Bits(0);
  out[i0] = in[0];
  out[i1] = in[1];
  return i0 < i1;
}

// Compresses one chunk of one row. `row` points at the dense row (K entries), `vals` and
// `meta` at the row's values / metadata. Returns -1, or the index (within the row) of the
// first group holding more than N nonzeros; nothing is written for that group onwards.
// kN / kM > 0 fix the pattern at compile time (the hot 2:4 path), 0 reads it from `L`.
template <typename Bits, int kN = 0, int kM = 0>
SK_HOST_DEVICE int64_t compress_chunk(const Bits* row, Bits* vals, uint8_t* meta,
                                      const NMLayout& L, int64_t chunk) {
  const int n = kN > 0 ? kN : L.n;
  const int m = kM > 0 ? kM : L.m;
  const int bits = L.bits;
  const int64_t g0 = chunk * L.chunk_groups;
  int64_t g1 = g0 + L.chunk_groups;
  if (g1 > L.groups) g1 = L.groups;
  if constexpr (kN == 2 && kM == 4) {
    if (g1 * 4 <= L.k && g1 - g0 == 2) {  // a full byte of two full groups
      uint32_t lo, hi;
      const bool ok0 = compress_group_2_4(row + g0 * 4, vals + g0 * 2, lo);
      const bool ok1 = compress_group_2_4(row + g0 * 4 + 4, vals + g0 * 2 + 2, hi);
      if (!ok0) return g0;
      if (!ok1) return g0 + 1;
      meta[g0 / 2] = static_cast<uint8_t>(lo | (hi << 4));
      return -1;
    }
  }
  // A chunk starts on a byte boundary: (g0 * n * bits) is a multiple of 8.
  BitWriter writer(meta + (g0 * n * bits) / 8);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * m;
    const int width = (L.k - base) < m ? static_cast<int>(L.k - base) : m;
    uint32_t nz = 0;
    for (int i = 0; i < width; ++i) nz |= static_cast<uint32_t>(is_nonzero(row[base + i])) << i;
    if (popcount32(nz) > n) return g;
    uint32_t keep = nz;
    // Fill up to N slots with the lowest unused indices (zeros, or padding beyond K).
    for (int have = popcount32(nz); have < n; ++have) keep |= ~keep & (keep + 1u);
    Bits* out = vals + g * n;
    for (int j = 0; j < n; ++j) {
      const int idx = lowest_bit(keep);
      keep &= keep - 1u;
      out[j] = idx < width ? row[base + idx] : Bits(0);
      writer.put(static_cast<uint32_t>(idx), bits);
    }
  }
  if (g1 == L.groups) writer.flush();
  return -1;
}

// Decompresses one chunk of one row into `row` (K entries). Returns -1, or the index of
// the first group whose metadata is not canonical (an index >= M, indices not strictly
// increasing, an index into K's padding where the group has N real columns, or a nonzero
// value stored at a padding position beyond K): the rule of sparsekit.format.check_metadata.
template <typename Bits, int kN = 0, int kM = 0>
SK_HOST_DEVICE int64_t decompress_chunk(const Bits* vals, const uint8_t* meta, Bits* row,
                                        const NMLayout& L, int64_t chunk) {
  const int n = kN > 0 ? kN : L.n;
  const int m = kM > 0 ? kM : L.m;
  const int bits = L.bits;
  const int64_t g0 = chunk * L.chunk_groups;
  int64_t g1 = g0 + L.chunk_groups;
  if (g1 > L.groups) g1 = L.groups;
  if constexpr (kN == 2 && kM == 4) {
    if (g1 * 4 <= L.k && g1 - g0 == 2) {
      const uint32_t byte = meta[g0 / 2];
      const bool ok0 = decompress_group_2_4(vals + g0 * 2, byte & 0xFu, row + g0 * 4);
      const bool ok1 = decompress_group_2_4(vals + g0 * 2 + 2, byte >> 4, row + g0 * 4 + 4);
      if (!ok0) return g0;
      if (!ok1) return g0 + 1;
      return -1;
    }
  }
  BitReader reader(meta + (g0 * n * bits) / 8);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * m;
    const int width = (L.k - base) < m ? static_cast<int>(L.k - base) : m;
    Bits group[kMaxM];
    for (int i = 0; i < width; ++i) group[i] = Bits(0);
    const Bits* in = vals + g * n;
    int prev = -1;
    for (int j = 0; j < n; ++j) {
      const int idx = static_cast<int>(reader.get(bits));
      if (idx >= m || idx <= prev) return g;
      prev = idx;
      if (idx < width) {
        group[idx] = in[j];
      } else if (is_nonzero(in[j])) {
        return g;
      }
    }
    // Canonical: a group with at least N real columns never points into K's padding, and
    // one with fewer keeps exactly 0..N-1 (with increasing indices: last index below both).
    if (prev >= (width > n ? width : n)) return g;
    for (int i = 0; i < width; ++i) row[base + i] = group[i];
  }
  return -1;
}

// N:M mask of one group: keep the N largest scores (of |scores| if `absolute`), ties to the
// lower index. Scores are
// compared in `Acc` (float, or double for fp64). Entries beyond K are absent (as -inf
// padding would be, since padding sits after every real entry). Returns -1, or the column
// offset inside the group of the first NaN.
template <typename T, typename Acc>
SK_HOST_DEVICE int nm_mask_group(const T* scores, bool* keep, int width, int n, bool absolute) {
  Acc s[kMaxM];
  for (int i = 0; i < width; ++i) {
    s[i] = static_cast<Acc>(scores[i]);
    if (absolute && s[i] < Acc(0)) s[i] = -s[i];
    if (s[i] != s[i]) return i;
  }
  for (int i = 0; i < width; ++i) {
    int rank = 0;
    for (int j = 0; j < width; ++j) rank += (s[j] > s[i]) | ((s[j] == s[i]) & (j < i));
    keep[i] = rank < n;
  }
  return -1;
}

}  // namespace sparsekit
