// Where every value and metadata bit of a 2:4 weight sits for the sparse tensor-core MMA
// mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col (f16 / bf16, sparsity selector 0),
// written once for the host and the device.
//
// The product y = x @ W^T is computed as D = A @ B with A = W (sparse, rows = output
// features, the MMA's M = 16) and B = x^T (the batch is the MMA's N = 8). One MMA covers a
// "tile": 16 weight rows x 32 logical K columns = 16 x 16 kept values.
//
// PTX fragment rules encoded here (lane = %laneid, g = lane >> 2, t = lane & 3):
//   A (4 x .b32, 8 kept halves): element e of lane sits at tile row g + 8 * ((e >> 1) & 1)
//     and compressed column 2t + 8 * (e >> 2) + (e & 1) (the dense m16n8k16 A layout over
//     the 16 compressed columns; compressed column c holds kept entry c % 2 of group c / 2).
//   E (1 x .b32, selector 0): lanes 4g and 4g + 1 supply it. Lane 4g + h describes the K
//     half h (logical columns 16h .. 16h + 15): bits 0..15 for row g, bits 16..31 for row
//     g + 8; inside each 16 bits, 4-column chunk c at bits 4c .. 4c + 3, low 2 bits the
//     index of the first kept entry. That is exactly two bytes of the canonical metadata.
//     (The PTX ISA gives this layout only as a figure. It is also what CUTLASS's
//     reorder_meta for 16-bit types, in tools/util/host_reorder.h, stores at interleaved row
//     4g + h: rows g, g + 8, g + 16, g + 24 go to rows 4g .. 4g + 3, the 2x2 swap puts K half
//     h of rows g and g + 8 into the word of row 4g + h, and the warp loads word l into lane
//     l; rows g + 16 and g + 24 are the next tile's, read with selector 1.)
//   B (4 x .b32, 8 halves): element j of lane is x[batch g][k = 2t + 8 * (j >> 1) + (j & 1)].
//   D (4 x .f32): element i of lane is y[batch 2t + (i & 1)][row g + 8 * (i >> 1)].
//
// The packed ("reordered") form, a cache derived from the canonical one:
//   values: [row_tiles][k_tiles][32 lanes][8 halves]  -> one 16-byte load per lane per
//           tile; a warp reads 512 contiguous bytes.
//   meta:   [row_tiles][k_tiles / 4][16 meta lanes][4 words] -> meta lane 2g + h loads one
//           16-byte vector holding its E word for 4 consecutive tiles.
// Rows are padded to a multiple of 16 and tiles to a multiple of 4 with zero values and
// metadata nibble 0x4 (indices 0, 1), so kernels never bounds-check the weight.
#pragma once

#include <cstdint>

#include "nm_format.h"

namespace sparsekit {
namespace sp24 {

constexpr int kRows = 16;           // MMA M: weight rows per tile
constexpr int kK = 32;              // MMA K: logical columns per tile
constexpr int kKept = 16;           // kept values per tile row
constexpr int kBatch = 8;           // MMA N: batch rows per MMA
// Up to this many rows of x the small-batch kernel runs, above it the tiled kernel (the
// dispatcher's self-check and its per-path fallback split calls at the same place).
constexpr int kSmallMaxBatch = 2 * kBatch;
constexpr int kTilesPerMeta = 4;    // tiles per 16-byte metadata vector
constexpr int kMetaLanes = 16;      // lanes supplying E (selector 0)
constexpr int kValuesPerLane = 8;   // halves of A per lane per tile
constexpr uint16_t kPadMeta16 = 0x4444;  // four chunks keeping indices (0, 1)

struct PackedLayout {
  int64_t rows, k;        // logical weight shape
  int64_t row_tiles;      // ceil(rows / 16)
  int64_t k_tiles;        // ceil(k / 32) rounded up to a multiple of 4
  int64_t meta_quads;     // k_tiles / 4

  SK_HOST_DEVICE PackedLayout(int64_t rows_, int64_t k_) : rows(rows_), k(k_) {
    row_tiles = (rows + kRows - 1) / kRows;
    const int64_t tiles = (k + kK - 1) / kK;
    k_tiles = (tiles + kTilesPerMeta - 1) / kTilesPerMeta * kTilesPerMeta;
    meta_quads = k_tiles / kTilesPerMeta;
  }
  SK_HOST_DEVICE int64_t values_numel() const { return row_tiles * k_tiles * 32 * kValuesPerLane; }
  SK_HOST_DEVICE int64_t meta_words() const { return row_tiles * k_tiles * kMetaLanes; }
  // Offset (in halves) of a lane's 8 values for tile (rt, kt).
  SK_HOST_DEVICE int64_t values_offset(int64_t rt, int64_t kt, int lane) const {
    return ((rt * k_tiles + kt) * 32 + lane) * kValuesPerLane;
  }
  // Offset (in 32-bit words) of a metadata lane's word for tile (rt, kt).
  SK_HOST_DEVICE int64_t meta_offset(int64_t rt, int64_t kt, int meta_lane) const {
    return ((rt * meta_quads + kt / kTilesPerMeta) * kMetaLanes + meta_lane) * kTilesPerMeta +
           kt % kTilesPerMeta;
  }
};

SK_HOST_DEVICE int lane_group(int lane) { return lane >> 2; }
SK_HOST_DEVICE int lane_thread(int lane) { return lane & 3; }

// A: tile row and compressed column of element e (0..7) of a lane.
SK_HOST_DEVICE int a_row(int lane, int e) { return lane_group(lane) + 8 * ((e >> 1) & 1); }
SK_HOST_DEVICE int a_col(int lane, int e) {
  return 2 * lane_thread(lane) + 8 * (e >> 2) + (e & 1);
}

// E: metadata lane (0..15) <-> warp lane; a metadata lane covers rows g, g + 8, K half h.
SK_HOST_DEVICE int meta_lane_of(int lane) { return 2 * lane_group(lane) + lane_thread(lane); }
SK_HOST_DEVICE bool supplies_meta(int lane) { return lane_thread(lane) < 2; }
SK_HOST_DEVICE int meta_row(int meta_lane, int high) { return (meta_lane >> 1) + 8 * high; }
SK_HOST_DEVICE int meta_half(int meta_lane) { return meta_lane & 1; }

// B: logical tile column (k) of element j (0..7) of a lane; its batch row is lane_group.
SK_HOST_DEVICE int b_k(int lane, int j) {
  return 2 * lane_thread(lane) + 8 * (j >> 1) + (j & 1);
}

// D: tile row and batch column of accumulator element i (0..3) of a lane.
SK_HOST_DEVICE int d_row(int lane, int i) { return lane_group(lane) + 8 * (i >> 1); }
SK_HOST_DEVICE int d_batch(int lane, int i) { return 2 * lane_thread(lane) + (i & 1); }

// Canonical 2:4 metadata: one nibble per group, two groups per byte, low nibble first.
// The 16 bits of K half h of tile kt are the nibbles of groups 8 kt + 4h .. 8 kt + 4h + 3;
// a group past the row's last (K padding) reads as 0x4, a valid "keep 0 and 1" nibble.
SK_HOST_DEVICE uint16_t canonical_meta16(const uint8_t* row_meta, int64_t groups, int64_t kt,
                                         int half) {
  uint16_t bits = 0;
  for (int c = 0; c < 4; ++c) {
    const int64_t g = 8 * kt + 4 * half + c;
    const uint16_t nibble = g < groups ? static_cast<uint16_t>((row_meta[g >> 1] >> (4 * (g & 1))) & 0xF)
                                       : uint16_t{0x4};
    bits |= static_cast<uint16_t>(nibble << (4 * c));
  }
  return bits;
}

// Whether group g of one row's canonical 2:4 metadata holds two strictly increasing
// indices. mma.sp reads the indices as given; equal or decreasing ones are undefined
// behaviour on the GPU, so packing refuses them (the canonical format never has them).
SK_HOST_DEVICE bool meta_group_ordered(const uint8_t* row_meta, int64_t g) {
  const uint32_t nibble = (row_meta[g >> 1] >> ((g & 1) * 4)) & 0xFu;
  return (nibble & 3u) < (nibble >> 2);
}

// Packs one metadata word: rows g and g + 8 of row tile rt (a missing row reads as padding).
SK_HOST_DEVICE uint32_t pack_meta_word(const uint8_t* meta, int64_t meta_bytes,
                                       const PackedLayout& L, int64_t rt, int64_t kt,
                                       int meta_lane) {
  const int64_t groups = (L.k + 3) / 4;
  uint32_t word = 0;
  for (int high = 0; high < 2; ++high) {
    const int64_t row = rt * kRows + meta_row(meta_lane, high);
    const uint16_t bits = row < L.rows
        ? canonical_meta16(meta + row * meta_bytes, groups, kt, meta_half(meta_lane))
        : kPadMeta16;
    word |= static_cast<uint32_t>(bits) << (16 * high);
  }
  return word;
}

// Packs one lane's 8 values of tile (rt, kt) from canonical values [rows, vpr] (raw bits).
SK_HOST_DEVICE void pack_lane_values(const uint16_t* values, int64_t values_per_row,
                                     const PackedLayout& L, int64_t rt, int64_t kt, int lane,
                                     uint16_t* out) {
  for (int e = 0; e < kValuesPerLane; ++e) {
    const int64_t row = rt * kRows + a_row(lane, e);
    const int64_t col = kt * kKept + a_col(lane, e);
    out[e] = (row < L.rows && col < values_per_row) ? values[row * values_per_row + col]
                                                    : uint16_t{0};
  }
}

// ---- the large-batch kernel's staging (csrc/cuda/sp24_linear.cu) -------------------------
// A block computes a kM x kN tile of y^T (weight rows x batch rows) with 8 warps (2 along
// the rows x 4 along the batch, each 64 x 32), K in steps of 2 tiles staged in shared
// memory. Every index the kernel computes is a function here, so the CPU emulation
// (csrc/cpu/sp24.cpp, staged=True) runs the same arithmetic.
namespace tiled {

constexpr int kM = 128;                      // weight rows per block
constexpr int kN = 128;                      // batch rows per block
constexpr int kTiles = 2;                    // K tiles per step
constexpr int kRowTiles = kM / kRows;        // 8
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRowTiles = 4;             // 64 weight rows per warp
constexpr int kWarpBatchTiles = 4;           // 32 batch rows per warp
constexpr int kXChunks = kTiles * kK / 8;    // 16-byte chunks per staged x row
constexpr int kXStride = kTiles * kK + 8;    // halves per staged x row: +16 bytes, so the 8
                                             // row addresses of an ldmatrix hit distinct banks

// One pipeline stage of shared memory (27 KiB).
struct alignas(16) Stage {
  uint32_t a[kRowTiles][kTiles][32][4];      // packed values: one 16-byte vector per lane
  uint32_t e[kRowTiles][kMetaLanes][2];      // metadata words of the step's 2 tiles
  uint16_t x[kN][kXStride];                  // x rows, K-contiguous
};

// cp.async pipeline depth of the tiled kernel for a GPU that lets one block opt in to
// `smem_per_block` bytes of shared memory (cudaDevAttrMaxSharedMemoryPerBlockOptin): 4
// stages (108 KiB) where they fit (sm_80/87: 163 KiB, sm_90: 227 KiB), 3 (81 KiB) on GPUs
// capped at 99 KiB (sm_86, sm_89, sm_120), 2 below that; 0 when not even 2 fit (the
// launcher then refuses the tiled kernel, and only that path).
constexpr int kMaxStages = 4;
constexpr int kMinStages = 2;
inline int stages_for_smem(int64_t smem_per_block) {
  const int64_t fit = smem_per_block / static_cast<int64_t>(sizeof(Stage));
  if (fit < kMinStages) return 0;
  return fit > kMaxStages ? kMaxStages : static_cast<int>(fit);
}

SK_HOST_DEVICE int warp_m(int warp) { return warp / 4; }
SK_HOST_DEVICE int warp_n(int warp) { return warp % 4; }

// Copy c (0 .. kRowTiles*kTiles*32) of values: 16 bytes to a[rtl][tile][lane] from the packed
// vector at the returned index (in 16-byte units); valid = the row tile exists.
struct ACopy { int rtl, tile, lane; int64_t src; bool valid; };
SK_HOST_DEVICE ACopy a_copy(int c, int64_t rt0, int64_t kt0, const PackedLayout& L) {
  ACopy r;
  r.rtl = c / (kTiles * 32);
  const int rem = c % (kTiles * 32);
  r.tile = rem / 32;
  r.lane = rem % 32;
  const int64_t rt = rt0 + r.rtl;
  r.valid = rt < L.row_tiles;
  r.src = r.valid ? L.values_offset(rt, kt0, 0) / kValuesPerLane + rem : 0;
  return r;
}

// Metadata of a row tile past the weight (its values are zero): any valid word will do,
// all-zero words are undefined behaviour for mma.sp.
constexpr uint32_t kPadMetaWord = 0x44444444u;

// Copy c (0 .. kRowTiles*16) of metadata: 8 bytes (the words of tiles kt0, kt0 + 1) to
// e[rtl][meta_lane] from the returned word index.
struct ECopy { int rtl, meta_lane; int64_t src; bool valid; };
SK_HOST_DEVICE ECopy e_copy(int c, int64_t rt0, int64_t kt0, const PackedLayout& L) {
  ECopy r;
  r.rtl = c / kMetaLanes;
  r.meta_lane = c % kMetaLanes;
  const int64_t rt = rt0 + r.rtl;
  r.valid = rt < L.row_tiles;
  r.src = r.valid ? L.meta_offset(rt, kt0, r.meta_lane) : 0;
  return r;
}

// Copy c (0 .. kN*kXChunks) of x: 16 bytes to x[row][chunk*8] from element (n, col) of x;
// valid = inside the batch and the (8-aligned) columns.
struct XCopy { int row, chunk; int64_t n, col; bool valid; };
SK_HOST_DEVICE XCopy x_copy(int c, int64_t n0, int64_t kt0, int64_t batch, int64_t kx) {
  XCopy r;
  r.row = c / kXChunks;
  r.chunk = c % kXChunks;
  r.n = n0 + r.row;
  r.col = kt0 * kK + r.chunk * 8;
  r.valid = r.n < batch && r.col < kx;
  return r;
}

// The staged x row and column whose address lane gives to ldmatrix.x4 for batch tile nt
// and step tile kt: matrix q = lane / 8 covers K columns 8q .. 8q + 7, row lane % 8 of it.
SK_HOST_DEVICE int x_frag_row(int warp, int nt, int lane) {
  return warp_n(warp) * (kWarpBatchTiles * kBatch) + nt * kBatch + (lane & 7);
}
SK_HOST_DEVICE int x_frag_col(int kt, int lane) { return kt * kK + (lane >> 3) * 8; }

SK_HOST_DEVICE int a_row_tile(int warp, int mt) { return warp_m(warp) * kWarpRowTiles + mt; }

// Output row (weight row) and batch row of accumulator element i of (mt, nt).
SK_HOST_DEVICE int64_t out_row(int64_t rt0, int warp, int mt, int lane, int i) {
  return (rt0 + a_row_tile(warp, mt)) * kRows + d_row(lane, i);
}
SK_HOST_DEVICE int64_t out_batch(int64_t n0, int warp, int nt, int lane, int i) {
  return n0 + warp_n(warp) * (kWarpBatchTiles * kBatch) + nt * kBatch + d_batch(lane, i);
}

}  // namespace tiled

}  // namespace sp24
}  // namespace sparsekit
