// Types shared by the CPU N:M product kernels (spmm_kernels.h, one copy per ISA) and the
// op wrappers (nm_linear.cpp). Plain pointers only: the ISA files include no torch header.
#pragma once

#include <cstdint>

#include "../nm_format.h"

namespace sparsekit {

enum class ValueType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// bf16 is the high half of an fp32.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

struct SpmmArgs {
  const void* values;       // [rows, values_per_row] of vtype
  ValueType vtype;
  const uint8_t* metadata;  // [rows, meta_bytes_per_row], canonical
  NMLayout layout;
  int64_t rows;
  int64_t ld;               // row stride (floats) of xT, gyT, yT, gxT
  const float* xT;          // forward, sddmm: [Kp, ld]
  const float* gyT;         // grad input, sddmm: [rows, ld]
  float* out;               // forward: yT [rows, ld]; grad input: gxT [Kp, ld] (accumulated);
                            // sddmm: gv [rows, values_per_row] (accumulated unless `first`)
  const float* bias;        // forward only, may be null
  // Groups per K-block (a multiple of layout.chunk_groups): the batch kernels sweep K in
  // blocks whose xT/gxT rows stay in L1, carrying partial sums across blocks.
  int64_t block_groups;
  bool first;               // sddmm: the first batch tile writes gv instead of adding to it
  // 2:4 small-batch forward (row-major operands): x [tb, ldx] fp32 with ldx a multiple of
  // 32 and zero padding beyond K; y [tb, ldy] fp32.
  const float* x;
  int64_t ldx;
  float* y;
  int64_t ldy;
  // 2:4 bf16 forward with bf16 dot products (forward_2_4_bf16): x16 [batch, ldx] bf16 with
  // ldx a multiple of 64 and zero padding beyond K, into y [batch, ldy] fp32.
  const uint16_t* x16 = nullptr;
  int64_t batch = 0;
  uint16_t* y16 = nullptr;  // if set, y is written here as bf16 instead of to y (same ldy)
  int pair_tile = 64;       // the pair GEMM's rows of x per tile: 32 or 64
};

// The rows of x of the lanes forwards (T: float for fp32, uint16_t for bf16): row p's
// group g (4 elements) at goff[g] from the row's start (rows()). Row-major x: row p at x + p * ldx, goff[g] =
// 4 * g (identity_goff). A convolution's implicit GEMM: row p is output pixel (b, oh, ow),
// which starts at x + ((b * hp + oh * sh) * wp + ow * sw) * channels in the zero-padded NHWC
// input [batch, hp, wp, channels], and goff[g] is the offset of group g's kernel position
// and channels from there.
template <typename T>
struct LaneRowsOf {
  const T* x = nullptr;
  int64_t ldx = 0;
  int64_t out_h = 0, out_w = 0, hp = 0, wp = 0, channels = 0, sh = 1, sw = 1;  // out_w > 0: conv
  const int64_t* goff = nullptr;  // [groups]
  // A convolution whose C_in is not a multiple of 4 has groups that span two runs of x
  // (two kernel positions): element e of group g comes from the row's start + goff2[g] + e
  // where bit e of gsplit[g] is set, else from the row's start + goff[g] + e. Null when no
  // group spans two.
  const int64_t* goff2 = nullptr;  // [groups]
  const uint8_t* gsplit = nullptr;  // [groups]
  // The starts of rows p .. p + n - 1 into out[0 .. n): a convolution steps its pixel's
  // (b, oh, ow) instead of two integer divisions per row, which weigh on a tile whose K is
  // short (the 3-channel stem's 37 groups).
  void rows(int64_t p, int n, const T** out) const {
    if (out_w == 0) {
      for (int j = 0; j < n; ++j) out[j] = x + (p + j) * ldx;
      return;
    }
    int64_t ow = p % out_w, q = p / out_w, oh = q % out_h, b = q / out_h;
    for (int j = 0; j < n; ++j) {
      out[j] = x + ((b * hp + oh * sh) * wp + ow * sw) * channels;
      if (++ow == out_w) {
        ow = 0;
        if (++oh == out_h) {
          oh = 0;
          ++b;
        }
      }
    }
  }
};
using LaneRows = LaneRowsOf<float>;
using LaneRows16 = LaneRowsOf<uint16_t>;

// {0, 4, 8, ..., 4 * (groups - 1)}: the group offsets of a row-major x. The calling thread's
// table, grown as needed and kept (a Linear's lanes forward would otherwise build one per
// call); valid until this thread asks again for more groups.
const int64_t* identity_goff(int64_t groups);

// 2:4 metadata byte -> the kept columns of its two groups within their 8 columns, one
// byte each: (idx0, idx1, 4 + idx0', 4 + idx1'), always < 8 even for corrupt metadata.
struct MetaLanes24 {
  uint32_t lanes[256];
};
constexpr MetaLanes24 make_meta_lanes_2_4() {
  MetaLanes24 t{};
  for (uint32_t byte = 0; byte < 256; ++byte) {
    t.lanes[byte] = (byte & 3u) | ((byte >> 2) & 3u) << 8 | (4u + ((byte >> 4) & 3u)) << 16 |
                    (4u + (byte >> 6)) << 24;
  }
  return t;
}
inline constexpr MetaLanes24 kMetaLanes24 = make_meta_lanes_2_4();

constexpr int kMaxTileRegs = 16;  // NB = 1..16 vector registers of batch per pass (per ISA:
                                  // SpmmKernels::max_regs, the entries above it are null)
constexpr int kSmallTile = 8;     // rows of x per pass of the 2:4 small-batch kernel
constexpr int kRowTile = 16;     // rows decoded together by the batch forward

// Floats of per-thread scratch every kernel may use: kRowTile rows of fp32 values and of
// int64 offsets.
inline int64_t scratch_floats(const NMLayout& L) { return 3 * kRowTile * L.values_per_row + 32; }

// One ISA's kernels, indexed by NB - 1. forward and sddmm cover rows [r0, r1); grad_input
// covers groups [g0, g1) of every row (g0 a multiple of layout.chunk_groups), so threads
// own disjoint columns of gxT. `scratch` holds scratch_floats(layout) floats.
using RowKernel = void (*)(const SpmmArgs&, int64_t, int64_t, float*);
struct SpmmKernels {
  const char* isa;
  int lanes;
  int max_regs;
  RowKernel forward[kMaxTileRegs];
  RowKernel grad_input[kMaxTileRegs];
  RowKernel sddmm[kMaxTileRegs];
  // 2:4 forward for 1..8 rows of x (index = rows - 1), kept-index decode and x permutes in
  // registers (no transposed copy); null where the ISA has none. Its scratch needs only 32
  // floats (the groups past the last whole SIMD chunk).
  RowKernel forward_2_4[kMaxTileRegs];
  // 2:4 batch forward (xT layout, ld = NB * lanes), indices decoded on the fly.
  RowKernel forward_2_4_batch[kMaxTileRegs];
  // 2:4 grad input (groups range, like grad_input) and sddmm (rows), decoded on the fly.
  RowKernel grad_input_2_4[kMaxTileRegs];
  RowKernel sddmm_2_4[kMaxTileRegs];
  // 2:4 fp32 forward for many rows of x in the lanes form (sp24_lanes_avx512.cpp): fp32
  // values (K a multiple of 4), rows [r0, r1) for the a.batch rows of x that LaneRows
  // describes, into y [a.batch, a.ldy] fp32; null where the ISA has none.
  void (*forward_2_4_lanes)(const SpmmArgs&, int64_t, int64_t, const LaneRows&) = nullptr;
  // 2:4 forward for bf16 values and x with bf16 dot products (AVX512-BF16), every row of x
  // over rows [r0, r1) (SpmmArgs::x16, batch, y); null where the ISA has none.
  RowKernel forward_2_4_bf16 = nullptr;
  // The same product for many rows of x (the pair GEMM of sp24_bf16_avx512.cpp): x in tiles
  // of SpmmArgs::pair_tile rows, each prepared once into per-group column pairs
  // (prepare_pairs_2_4_bf16 over tiles [t0, t1), pair_words_2_4_bf16 uint32 per tile), then
  // forward_2_4_bf16_pairs over weight rows [r0, r1).
  void (*prepare_pairs_2_4_bf16)(const SpmmArgs&, int64_t, int64_t, uint32_t*) = nullptr;
  void (*forward_2_4_bf16_pairs)(const SpmmArgs&, int64_t, int64_t, const uint32_t*) = nullptr;
  // The same product in the lanes form (sp24_bf16_avx512.cpp): 16 weight rows per register
  // and rows of x (the a.batch rows that LaneRows16 describes) broadcast, over weight rows
  // [r0, r1); partial sums in the fp32 buffer (SpmmArgs layout of y), the result in y16
  // when set.
  void (*forward_2_4_bf16_lanes)(const SpmmArgs&, int64_t, int64_t, const LaneRows16&, float*) = nullptr;
};

// uint32 words of prepared pairs per x tile of `tile` rows.
inline int64_t pair_words_2_4_bf16(const NMLayout& L, int tile) { return L.groups * 6 * tile; }

// Defined in spmm_<isa>.cpp; the AVX ones only on x86 builds.
const SpmmKernels& spmm_kernels_scalar();
const SpmmKernels& spmm_kernels_avx2();
const SpmmKernels& spmm_kernels_avx512();
const SpmmKernels& spmm_kernels_avx512bf16();  // avx512 + the AVX512-BF16 2:4 forward

}  // namespace sparsekit
