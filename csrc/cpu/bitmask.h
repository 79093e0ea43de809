// The bitmask format of unstructured sparse matrices (sparsekit/bitmask.py documents it)
// and the types its CPU kernels share (bitmask_scalar.cpp, bitmask_avx512.cpp; the op
// wrappers are in bitmask_format.cpp). Plain pointers only: the ISA files include no torch
// header.
//
// W [rows, k] is stored as
//   mask     int16 [rows, chunks], chunks = ceil(k / 16): bit j of chunk c says whether
//            column 16c + j is kept (nonzero); bits past k are 0;
//   values   [nnz] the kept entries in row-major order;
//   offsets  int64 [rows + 1]: row r's kept entries are values[offsets[r], offsets[r+1]),
//            offsets[r+1] - offsets[r] = popcount(mask[r]).
#pragma once

#include <cstdint>
#include <type_traits>

#include "spmm.h"  // bf16_to_float

namespace sparsekit {

constexpr int64_t kChunk = 16;  // columns per mask chunk (one 16-bit word)

inline int64_t bitmask_chunks(int64_t k) { return (k + kChunk - 1) / kChunk; }

// The bits a row's last chunk may hold (columns below k).
inline uint16_t bitmask_tail_bits(int64_t k) {
  const int64_t rem = k % kChunk;
  return rem == 0 ? uint16_t{0xFFFF} : static_cast<uint16_t>((1u << rem) - 1u);
}

// Portable popcount (the baseline x86-64 target has no popcnt instruction, and
// __builtin_popcount then calls a library routine).
inline int bitmask_popcount64(uint64_t x) {
  x = x - ((x >> 1) & 0x5555555555555555ull);
  x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
  x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
  return static_cast<int>((x * 0x0101010101010101ull) >> 56);
}

// Bits set in mask_row[0, chunks), four words at a time; `popcount` counts a uint64.
template <typename Popcount>
inline int64_t bitmask_row_bits(const uint16_t* mask_row, int64_t chunks, Popcount popcount) {
  int64_t total = 0, c = 0;
  for (; c + 4 <= chunks; c += 4) {
    uint64_t w;
    __builtin_memcpy(&w, mask_row + c, sizeof(w));
    total += popcount(w);
  }
  for (; c < chunks; ++c) total += popcount(static_cast<uint64_t>(mask_row[c]));
  return total;
}

// True when row `mask_row` holds exactly `count` bits and none past k: the invariant that
// keeps every kernel's reads of values inside the row's range.
template <typename Popcount>
inline bool bitmask_row_ok(const uint16_t* mask_row, int64_t chunks, uint16_t tail, int64_t count,
                           Popcount popcount) {
  return bitmask_row_bits(mask_row, chunks, popcount) == count &&
         (chunks == 0 || (mask_row[chunks - 1] & ~tail) == 0);
}

struct BitmaskArgs {
  const void* values;       // [nnz] fp32, or bf16 when `bf16`
  bool bf16;
  const uint16_t* mask;     // [rows, chunks]
  const int64_t* offsets;   // [rows + 1], validated against mask before any kernel runs
  int64_t rows;
  int64_t chunks;
  // Row-major small-batch forward: x [batch, ldx] fp32 (or x16, bf16, for kernels whose
  // bf16_x is set and bf16 values), ldx >= bitmask_padded_k(chunks), zero past k;
  // y [batch, ldy] fp32.
  int64_t batch;
  const float* x;
  const uint16_t* x16;
  int64_t ldx;
  float* y;
  int64_t ldy;
  const float* bias;        // forward only, may be null
  // Batch-in-lanes kernels: ld (a multiple of 16) floats per row of xT [chunks*16, ld],
  // gyT [rows, ld], and of the output: forward yT [rows, ld], grad input gxT [chunks*16, ld]
  // (accumulated). sddmm writes gv [nnz] fp32 (accumulated unless `first`).
  int64_t ld;
  const float* xT;
  const float* gyT;
  float* out;
  bool first;
};

constexpr int kBitmaskSmallBatch = 8;  // rows of x the row-major forward handles per pass

// Calls f(std::integral_constant<int, B>{}) with B = batch (1..kBitmaskSmallBatch; larger
// values take kBitmaskSmallBatch): the row-major kernels are templates on it.
template <typename F>
inline void bitmask_with_batch(int64_t batch, F&& f) {
  switch (batch) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, kBitmaskSmallBatch>{}); break;
  }
}

// Columns the row-major forward reads per step (four mask words), and the padded length of
// a row of x it reads.
constexpr int64_t kBlock = 64;
inline int64_t bitmask_padded_k(int64_t chunks) { return (chunks + 3) / 4 * kBlock; }

// The 64 mask bits of the block starting at word c of a row of `chunks` words (zero past
// them).
inline uint64_t bitmask_block_bits(const uint16_t* mask_row, int64_t c, int64_t chunks) {
  if (c + 4 <= chunks) {
    uint64_t w;
    __builtin_memcpy(&w, mask_row + c, sizeof(w));
    return w;
  }
  uint64_t w = 0;
  for (int64_t i = c; i < chunks; ++i) w |= static_cast<uint64_t>(mask_row[i]) << (16 * (i - c));
  return w;
}

// Byte i holds i: a byte compress of it under a block's bits lists the block's kept columns.
alignas(64) inline constexpr uint8_t kByteIota[64] = {
    0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
    44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63};

// Software prefetch distances of the block kernels, per step: values 1 KB ahead, mask
// 256 words (512 B) ahead. Rows of a few KB are too short for the hardware prefetcher to
// ramp up on (at 90% sparsity, 9% faster on 11008x4096 past the cache on Zen 4).
constexpr int64_t kPrefetchValueBytes = 1024;
constexpr int64_t kPrefetchMaskWords = 256;

// Kernels over rows [r0, r1). `scratch` holds bitmask_scratch_floats(chunks) floats.
using BitmaskKernel = void (*)(const BitmaskArgs&, int64_t r0, int64_t r1, float* scratch);
inline int64_t bitmask_scratch_floats(int64_t chunks) { return 2 * (chunks * kChunk + 32); }

// The first row in [r0, r1) whose mask disagrees with its offsets (or has bits past k),
// else -1. Runs before any kernel reads those rows.
using BitmaskCheck = int64_t (*)(const BitmaskArgs&, int64_t r0, int64_t r1, uint16_t tail);

// Rows [r0, r1) of the dense matrix into dst [rows, k] (row-major, entries of `elem`
// bytes: 2, 4 or 8; a.values holds the kept entries in that width). Rows already checked.
using BitmaskDecompress = void (*)(const BitmaskArgs& a, int64_t r0, int64_t r1, void* dst,
                                   int64_t k, int elem);

struct BitmaskKernels {
  const char* isa;
  BitmaskCheck first_bad_row;
  BitmaskKernel forward_small;  // row-major x, 1..kBitmaskSmallBatch rows
  bool bf16_x;                  // forward_small reads bf16 x (x16) when the values are bf16
  BitmaskKernel forward;        // xT -> yT
  BitmaskKernel grad_input;     // gyT -> gxT (+=)
  BitmaskKernel sddmm;          // gyT, xT -> gv
  BitmaskDecompress decompress;
};

// The portable decompression (bitmask_scalar.cpp), also the AVX-512 one's fallback for
// 8-byte entries.
void bitmask_decompress_rows_scalar(const BitmaskArgs& a, int64_t r0, int64_t r1, void* dst,
                                    int64_t k, int elem);

const BitmaskKernels& bitmask_kernels_scalar();
const BitmaskKernels& bitmask_kernels_avx512();
const BitmaskKernels& bitmask_kernels_avx512bf16();

}  // namespace sparsekit
