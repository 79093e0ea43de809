// Types shared by the CPU N:M implicit-GEMM convolution kernels (conv_kernels.h, one copy
// per ISA) and the op wrapper (nm_conv2d.cpp). Plain pointers only, like spmm.h.
#pragma once

#include <cstdint>

#include "spmm.h"

namespace sparsekit {

// Layout (see nm_conv2d.cpp): the padded input is split by stride phase into planes
// xq[phase][c][b][Hq][Wq] (fp32), so that every output pixel (b, oh, ow), flattened as
// q = (b * Hq + oh) * Wq + ow, reads input channel c at kernel position (i, j) at
//   xq + koff[k] + q,   k = (i * kw + j) * C_in + c   (the weight's reduction index),
// for all pixels alike: a run of consecutive q is a run of consecutive floats. Columns
// ow >= Wo and rows oh >= Ho are computed and discarded (the price of one stride).
struct ConvArgs {
  const void* values;       // [rows, values_per_row], fp32 or bf16
  ValueType vtype;
  const uint8_t* metadata;  // [rows, meta_bytes_per_row], canonical
  NMLayout layout;          // k = kh * kw * C_in
  const int64_t* koff;      // [Kp]: offset of reduction index k in xq (0 for K's padding)
  const float* xq;
  const float* bias;        // fp32 [rows] or null
  // Segments of groups [seg[2s], seg[2s+1]) per channel block: block b owns segments
  // [seg_begin[b], seg_begin[b+1]). Every block's input window stays in L1 while all the
  // rows of a task sweep it.
  const int64_t* seg;
  const int64_t* seg_begin;
  int64_t blocks;
  // When C_in % M == 0 a segment's groups sit at one kernel position, and reduction index
  // k of a segment starting at group g0 reads xq + koff[g0 * M] + (k - g0 * M) * cstride:
  // the kernels then step a pointer instead of reading koff per kept weight (koff's int64
  // entries, 8 bytes per reduction index, would crowd the input window out of L1). 0 when
  // groups cross kernel positions (koff per index).
  int64_t cstride;
};

constexpr int kMaxConvRegs = 16;  // pixel vectors per tile: entries 1..16 (null above max)

// One tile: pixels [q0, q0 + NB * lanes) of rows [r0, r1); yt [r1 - r0, NB * lanes] fp32.
using ConvKernel = void (*)(const ConvArgs&, int64_t q0, int64_t r0, int64_t r1, float* yt);
struct ConvKernels {
  const char* isa;
  int lanes;
  int max_regs;
  ConvKernel forward[kMaxConvRegs];
};

const ConvKernels& conv_kernels_scalar();
const ConvKernels& conv_kernels_avx2();
const ConvKernels& conv_kernels_avx512();

}  // namespace sparsekit
