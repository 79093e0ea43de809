// N:M implicit-GEMM convolution on the CPU, written once over the vector abstraction `V`
// of spmm_kernels.h and compiled per instruction set: spmm_<isa>.cpp includes this header
// after its `V` (the same ISA files, so one runtime choice and `set_cpu_isa` cover both).
//
// Loop structure: output pixels are the vector dimension. The input is stored per stride
// phase with channels as planes (conv.h), so for a tile of NB * lanes consecutive output
// pixels q, one kept weight w of row r at reduction index k adds w * xq[koff[k] + q ..]:
// one broadcast, NB unaligned vector loads and NB FMAs, whatever the stride, dilation or
// padding. Only kept weights are multiplied and no im2col buffer exists: the tile's
// "patch matrix" is the input itself, addressed through koff.
//
// Why pixels and not channels-last (NHWC, kept channels gathered with permutes): an NHWC
// tile needs a permute per kept group and a horizontal reduction per output, while here a
// kept weight is a broadcast and NB independent FMAs; K-blocking by channel (conv.h) keeps
// the tile's input window in L1 while all rows of a task sweep it. Measured against torch's
// own convolution in bench/bench_conv.py (README: "Sparse convolution").
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "conv.h"

#ifndef SK_ISA_NS
#error "define SK_ISA_NS and the vector type V before including conv_kernels.h"
#endif

namespace sparsekit {
namespace SK_ISA_NS {

template <ValueType VT>
inline float conv_value(const void* values, int64_t at) {
  if constexpr (VT == ValueType::kFloat32) {
    return static_cast<const float*>(values)[at];
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(values)[at]);
  }
}

// Rows [r0, r1) over pixels [q0, q0 + NB * lanes): per channel block, every row's partial
// sums are loaded from yt, accumulate the block's kept weights, and are stored back.
template <int NB, ValueType VT, bool kIs24>
void conv_tile_typed(const ConvArgs& a, int64_t q0, int64_t r0, int64_t r1, float* yt) {
  using reg = typename V::reg;
  constexpr int kW = NB * V::kLanes;
  // Two accumulator sets for few pixel vectors: FMA latency would bound one chain.
  constexpr int kSets = NB >= 4 ? 1 : 2;
  const NMLayout& L = a.layout;
  const float* x = a.xq + q0;
  // The rows' kept values and metadata into L2 first (up to 768 KB of its 1 MB on Zen 4), in address order. A
  // row's share of a channel block is one short run per kernel position, kh * kw runs
  // apart, too short for the hardware prefetchers: a weight read from memory (batch 1,
  // where each value serves one tile) otherwise waited on its lines one run at a time.
  // ResNet-18's 512->512 3x3 layer at batch 1, weights cycled past the LLC: 0.60-0.67x of
  // F.conv2d without, 0.85-0.93x with (prefetching a few rows ahead instead: 0.70-0.81x).
  {
    constexpr int64_t kValueBytes = VT == ValueType::kFloat32 ? 4 : 2;
    constexpr int64_t kBudget = 768 << 10;
    const int64_t row_bytes = L.values_per_row * kValueBytes + L.meta_bytes_per_row;
    const int64_t rp = std::min(r1, r0 + std::max<int64_t>(1, kBudget / row_bytes));
    const char* values = static_cast<const char*>(a.values);
    const char* meta = reinterpret_cast<const char*>(a.metadata);
    for (int64_t b = r0 * L.values_per_row * kValueBytes; b < rp * L.values_per_row * kValueBytes; b += 64)
      __builtin_prefetch(values + b, 0, 2);
    for (int64_t b = r0 * L.meta_bytes_per_row; b < rp * L.meta_bytes_per_row; b += 64)
      __builtin_prefetch(meta + b, 0, 2);
  }
  for (int64_t blk = 0; blk < a.blocks; ++blk) {
    for (int64_t r = r0; r < r1; ++r) {
      float* y = yt + (r - r0) * kW;
      reg acc[kSets][NB];
      if (blk == 0) {
        const reg b = V::bcast(a.bias != nullptr ? a.bias[r] : 0.f);
        for (int t = 0; t < NB; ++t) acc[0][t] = b;
      } else {
        for (int t = 0; t < NB; ++t) acc[0][t] = V::load(y + t * V::kLanes);
      }
      for (int s = 1; s < kSets; ++s)
        for (int t = 0; t < NB; ++t) acc[s][t] = V::zero();
      const uint8_t* meta = a.metadata + r * L.meta_bytes_per_row;
      const int64_t vrow = r * L.values_per_row;
      for (int64_t s = a.seg_begin[blk]; s < a.seg_begin[blk + 1]; ++s) {
        const int64_t g0 = a.seg[2 * s], g1 = a.seg[2 * s + 1];
        // With a channel stride (conv.h) the segment's reads step from its first index.
        const int64_t cs = a.cstride;
        const float* xg = x + a.koff[g0 * L.m];
        if constexpr (kIs24) {
          // One metadata nibble per group: low 2 bits the first kept index (DESIGN.md).
          for (int64_t g = g0; g < g1; ++g, xg += 4 * cs) {
            const uint32_t nib = (static_cast<uint32_t>(meta[g >> 1]) >> ((g & 1) << 2)) & 0xFu;
            const float* x0 = cs != 0 ? xg + static_cast<int64_t>(nib & 3u) * cs : x + a.koff[4 * g + (nib & 3u)];
            const float* x1 = cs != 0 ? xg + static_cast<int64_t>(nib >> 2) * cs : x + a.koff[4 * g + (nib >> 2)];
            const reg w0 = V::bcast(conv_value<VT>(a.values, vrow + 2 * g));
            const reg w1 = V::bcast(conv_value<VT>(a.values, vrow + 2 * g + 1));
            for (int t = 0; t < NB; ++t) acc[0][t] = V::fma(w0, V::load(x0 + t * V::kLanes), acc[0][t]);
            for (int t = 0; t < NB; ++t)
              acc[kSets - 1][t] = V::fma(w1, V::load(x1 + t * V::kLanes), acc[kSets - 1][t]);
          }
        } else {
          const int64_t bit0 = g0 * L.n * L.bits;
          BitReader reader(meta + bit0 / 8);
          if (bit0 % 8 != 0) reader.get(static_cast<int>(bit0 % 8));
          int64_t e = g0 * L.n;
          for (int64_t g = g0; g < g1; ++g, xg += L.m * cs) {
            for (int j = 0; j < L.n; ++j, ++e) {
              // Clamped: non-canonical metadata (an index >= M) must not read outside koff.
              int64_t idx = static_cast<int64_t>(reader.get(L.bits));
              idx = idx < L.m ? idx : L.m - 1;
              const float* xk = cs != 0 ? xg + idx * cs : x + a.koff[g * L.m + idx];
              const reg w = V::bcast(conv_value<VT>(a.values, vrow + e));
              reg* set = acc[kSets == 2 ? (j & 1) : 0];
              for (int t = 0; t < NB; ++t) set[t] = V::fma(w, V::load(xk + t * V::kLanes), set[t]);
            }
          }
        }
      }
      for (int s = 1; s < kSets; ++s)
        for (int t = 0; t < NB; ++t) acc[0][t] = V::add(acc[0][t], acc[s][t]);
      for (int t = 0; t < NB; ++t) V::store(y + t * V::kLanes, acc[0][t]);
    }
  }
}

template <int NB>
void conv_forward(const ConvArgs& a, int64_t q0, int64_t r0, int64_t r1, float* yt) {
  const bool is24 = a.layout.n == 2 && a.layout.m == 4;
  if (a.vtype == ValueType::kBFloat16) {
    if (is24) return conv_tile_typed<NB, ValueType::kBFloat16, true>(a, q0, r0, r1, yt);
    return conv_tile_typed<NB, ValueType::kBFloat16, false>(a, q0, r0, r1, yt);
  }
  if (is24) return conv_tile_typed<NB, ValueType::kFloat32, true>(a, q0, r0, r1, yt);
  return conv_tile_typed<NB, ValueType::kFloat32, false>(a, q0, r0, r1, yt);
}

// Pixel vectors per tile: accumulators plus two broadcast weights within the registers.
constexpr int conv_max_regs() { return V::kRegs - 4 < kMaxConvRegs ? V::kRegs - 4 : kMaxConvRegs; }

template <int... NB>
ConvKernels make_conv_kernels(const char* isa, std::integer_sequence<int, NB...>) {
  return ConvKernels{isa, V::kLanes, conv_max_regs(),
                     {(NB + 1 <= conv_max_regs() ? &conv_forward<NB + 1> : nullptr)...}};
}

}  // namespace SK_ISA_NS
}  // namespace sparsekit
