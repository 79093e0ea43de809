// N:M sparse products on the CPU, written once over a small vector abstraction `V` and
// compiled per instruction set (spmm_scalar.cpp, spmm_avx2.cpp, spmm_avx512.cpp). Each of
// those files defines SK_ISA_NS and its `V` before including this header, so the inline
// code below exists once per ISA under distinct names (no ODR clash between targets).
//
// Layout: the batch is the vector dimension. Activations are transposed into xT[Kp, ld]
// (batch padded with zeros to whole vectors), so one kept weight w at column c adds
// w * xT[c, :] to a whole row of outputs: one broadcast and NB vector FMAs. Only kept
// weights are multiplied (half the FLOPs of dense for 2:4), the compressed row is read
// once per batch tile, and its index decode is shared by the whole tile.
//
//   forward      yT[r, :]  = sum_j v[r, j] * xT[col(r, j), :]  (+ bias[r])
//   grad input   gxT[c, :] += v[r, j] * gyT[r, :]  for c = col(r, j)   (threads own columns)
//   sddmm        gv[r, j]  = dot(gyT[r, :], xT[col(r, j), :])
//
// Values arrive as fp32, fp16 or bf16 and are widened to fp32; all arithmetic is fp32.
// The general kernels (any N:M) decode a row's metadata into offsets first; the 2:4 ones
// (*_2_4) map each metadata byte to its four kept columns through a table as they go,
// and the ISA files add a small-batch 2:4 forward (forward_2_4_typed) that keeps x
// row-major and gathers it with in-register permutes. Metadata is assumed canonical where
// it matters for speed; an index >= M is clamped, so corrupt metadata never reads outside
// the operands.
#pragma once

#include <cstdint>
#include <utility>

#include "spmm.h"

#ifndef SK_ISA_NS
#error "define SK_ISA_NS and the vector type V before including spmm_kernels.h"
#endif

namespace sparsekit {
namespace SK_ISA_NS {

// Widens a row's values [first, first + count) to fp32.
inline void load_values(const SpmmArgs& a, int64_t r, int64_t first, int64_t count, float* out) {
  const int64_t base = r * a.layout.values_per_row + first;
  if (a.vtype == ValueType::kFloat32) {
    const float* v = static_cast<const float*>(a.values) + base;
    for (int64_t i = 0; i < count; ++i) out[i] = v[i];
  } else {
    V::widen16(static_cast<const uint16_t*>(a.values) + base, count,
               a.vtype == ValueType::kBFloat16, out);
  }
}

// Offsets (column * ld) of row r's kept entries in groups [g0, g1), g0 chunk-aligned. Any
// N:M; 2:4 has kernels of its own that decode metadata bytes through kMetaLanes24.
inline void decode_offsets(const SpmmArgs& a, int64_t r, int64_t g0, int64_t g1, int64_t* offs) {
  const NMLayout& L = a.layout;
  const uint8_t* meta = a.metadata + r * L.meta_bytes_per_row;
  const int64_t ld = a.ld;
  BitReader reader(meta + (g0 * L.n * L.bits) / 8);
  int64_t o = 0;
  for (int64_t g = g0; g < g1; ++g) {
    for (int j = 0; j < L.n; ++j, ++o) {
      // Clamped: non-canonical metadata (an index >= M) must not read outside the row.
      const int64_t idx = static_cast<int64_t>(reader.get(L.bits));
      offs[o] = (g * L.m + (idx < L.m ? idx : L.m - 1)) * ld;
    }
  }
}

// acc[0][t] += sum over S sets; S independent accumulator sets hide the FMA latency when
// NB alone gives too few chains. One set when two would not leave registers free: the
// compiler then kept the accumulators on the stack (a load, an FMA and a store each).
template <int NB>
inline void accumulate(const float* vals, const int64_t* offs, int64_t count, const float* base,
                       typename V::reg (&out)[NB]) {
  constexpr int S = 4 * NB > V::kRegs ? 1 : (NB >= 4 ? 2 : 4 / NB);
  typename V::reg acc[S][NB];
  for (int t = 0; t < NB; ++t) acc[0][t] = out[t];
  for (int s = 1; s < S; ++s)
    for (int t = 0; t < NB; ++t) acc[s][t] = V::zero();
  int64_t i = 0;
  for (; i + S <= count; i += S) {
    for (int s = 0; s < S; ++s) {
      const typename V::reg w = V::bcast(vals[i + s]);
      const float* x = base + offs[i + s];
      for (int t = 0; t < NB; ++t) acc[s][t] = V::fma(w, V::load(x + t * V::kLanes), acc[s][t]);
    }
  }
  for (; i < count; ++i) {
    const typename V::reg w = V::bcast(vals[i]);
    const float* x = base + offs[i];
    for (int t = 0; t < NB; ++t) acc[0][t] = V::fma(w, V::load(x + t * V::kLanes), acc[0][t]);
  }
  for (int s = 1; s < S; ++s)
    for (int t = 0; t < NB; ++t) acc[0][t] = V::add(acc[0][t], acc[s][t]);
  for (int t = 0; t < NB; ++t) out[t] = acc[0][t];
}

// Forward over rows [r0, r1) in tiles of kRowTile rows: the tile's compressed rows are read
// once, sequentially, and decoded into scratch (values + offsets); then K is swept in
// blocks whose xT rows stay in L1, every row of the tile accumulating into its yT row.
template <int NB>
void forward_rows(const SpmmArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const NMLayout& L = a.layout;
  const int64_t vpr = L.values_per_row;
  float* vals = scratch;
  int64_t* offs = reinterpret_cast<int64_t*>(scratch + kRowTile * vpr + 16);
  for (int64_t rt = r0; rt < r1; rt += kRowTile) {
    const int64_t nr = r1 - rt < kRowTile ? r1 - rt : kRowTile;
    for (int64_t i = 0; i < nr; ++i) {
      load_values(a, rt + i, 0, vpr, vals + i * vpr);
      decode_offsets(a, rt + i, 0, L.groups, offs + i * vpr);
      float* y = a.out + (rt + i) * a.ld;
      const typename V::reg b = V::bcast(a.bias != nullptr ? a.bias[rt + i] : 0.f);
      for (int t = 0; t < NB; ++t) V::store(y + t * V::kLanes, b);
    }
    for (int64_t g0 = 0; g0 < L.groups; g0 += a.block_groups) {
      const int64_t g1 = g0 + a.block_groups < L.groups ? g0 + a.block_groups : L.groups;
      const int64_t j0 = g0 * L.n, count = (g1 - g0) * L.n;
      for (int64_t i = 0; i < nr; ++i) {
        float* y = a.out + (rt + i) * a.ld;
        typename V::reg acc[NB];
        for (int t = 0; t < NB; ++t) acc[t] = V::load(y + t * V::kLanes);
        accumulate<NB>(vals + i * vpr + j0, offs + i * vpr + j0, count, a.xT, acc);
        for (int t = 0; t < NB; ++t) V::store(y + t * V::kLanes, acc[t]);
      }
    }
  }
}

template <int NB>
void grad_input_groups(const SpmmArgs& a, int64_t g_begin, int64_t g_end, float* scratch) {
  const int64_t n = a.layout.n;
  float* vals = scratch;
  int64_t* offs = reinterpret_cast<int64_t*>(scratch + a.layout.values_per_row + 8);
  for (int64_t g0 = g_begin; g0 < g_end; g0 += a.block_groups) {
    const int64_t g1 = g0 + a.block_groups < g_end ? g0 + a.block_groups : g_end;
    const int64_t count = (g1 - g0) * n;
    for (int64_t r = 0; r < a.rows; ++r) {
      load_values(a, r, g0 * n, count, vals);
      decode_offsets(a, r, g0, g1, offs);
      typename V::reg gy[NB];
      for (int t = 0; t < NB; ++t) gy[t] = V::load(a.gyT + r * a.ld + t * V::kLanes);
      for (int64_t i = 0; i < count; ++i) {
        const typename V::reg w = V::bcast(vals[i]);
        float* gx = a.out + offs[i];
        for (int t = 0; t < NB; ++t) {
          V::store(gx + t * V::kLanes, V::fma(w, gy[t], V::load(gx + t * V::kLanes)));
        }
      }
    }
  }
}

template <int NB>
void sddmm_rows(const SpmmArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const NMLayout& L = a.layout;
  int64_t* offs = reinterpret_cast<int64_t*>(scratch + L.values_per_row + 8);
  for (int64_t g0 = 0; g0 < L.groups; g0 += a.block_groups) {
    const int64_t g1 = g0 + a.block_groups < L.groups ? g0 + a.block_groups : L.groups;
    const int64_t count = (g1 - g0) * L.n;
    for (int64_t r = r0; r < r1; ++r) {
      decode_offsets(a, r, g0, g1, offs);
      typename V::reg gy[NB];
      for (int t = 0; t < NB; ++t) gy[t] = V::load(a.gyT + r * a.ld + t * V::kLanes);
      float* gv = a.out + r * L.values_per_row + g0 * L.n;
      for (int64_t i = 0; i < count; ++i) {
        const float* x = a.xT + offs[i];
        typename V::reg acc = V::mul(gy[0], V::load(x));
        for (int t = 1; t < NB; ++t) acc = V::fma(gy[t], V::load(x + t * V::kLanes), acc);
        gv[i] = (a.first ? 0.f : gv[i]) + V::hsum(acc);
      }
    }
  }
}

// One fp16 / bf16 value (flat index) as fp32.
inline float value16(const SpmmArgs& a, int64_t at) {
  const uint16_t h = static_cast<const uint16_t*>(a.values)[at];
  return a.vtype == ValueType::kBFloat16 ? bf16_to_float(h) : V::half1(h);
}

// Values of row r for groups [g0, g1) as fp32: in place for fp32, widened into scratch.
inline const float* row_values_f32(const SpmmArgs& a, int64_t r, int64_t g0, int64_t g1,
                                   float* scratch) {
  const int64_t first = g0 * a.layout.n;
  if (a.vtype == ValueType::kFloat32) {
    return static_cast<const float*>(a.values) + r * a.layout.values_per_row + first;
  }
  load_values(a, r, first, (g1 - g0) * a.layout.n, scratch);
  return scratch;
}

// Prefetches row r's values and metadata for groups [g0, g1): rows are visited a K-block
// at a time, a pattern (8 KB strides) the hardware prefetcher does not follow.
inline void prefetch_block(const SpmmArgs& a, int64_t r, int64_t g0, int64_t g1) {
  const NMLayout& L = a.layout;
  const int64_t elem = a.vtype == ValueType::kFloat32 ? 4 : 2;
  const char* v = static_cast<const char*>(a.values) + (r * L.values_per_row + g0 * L.n) * elem;
  const int64_t bytes = (g1 - g0) * L.n * elem;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(v + off);
  __builtin_prefetch(a.metadata + r * L.meta_bytes_per_row + (g0 * L.n * L.bits) / 8);
}

// 2:4 batch forward: like forward_rows, but reads values and metadata in place (L2-resident
// for a tile of kRowTile rows after the first K-block) and turns each metadata byte into
// four xT row offsets through a table, instead of materializing decoded offsets.
template <int NB>
void forward_2_4_batch(const SpmmArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const NMLayout& L = a.layout;
  constexpr int64_t ld = int64_t{NB} * V::kLanes;  // == a.ld (the wrapper picks NB from it)
  // Independent accumulator sets: enough FMA chains in flight, within the register file.
  // Two sets only up to half the registers: with 2 * NB + 2 <= 32 as the bound, NB 9-15
  // (batch tiles of 129-240 rows) kept their 18-30 accumulators on the stack, and a
  // 200x576 by 576x576 product ran at 0.54x F.linear (1.18x with one set).
  constexpr int S = (NB >= 4 || 4 * NB + 4 > V::kRegs) ? (4 * NB > V::kRegs ? 1 : 2) : 4;
  // Rows per tile: their compressed data stays in L2 across the K-blocks, and each K-block
  // of xT is brought into L1 once per tile.
  constexpr int64_t kTile = 64;
  for (int64_t rt = r0; rt < r1; rt += kTile) {
    const int64_t nr = r1 - rt < kTile ? r1 - rt : kTile;
    for (int64_t i = 0; i < nr; ++i) {
      float* y = a.out + (rt + i) * ld;
      const typename V::reg b = V::bcast(a.bias != nullptr ? a.bias[rt + i] : 0.f);
      for (int t = 0; t < NB; ++t) V::store(y + t * V::kLanes, b);
    }
    for (int64_t g0 = 0; g0 < L.groups; g0 += a.block_groups) {
      const int64_t g1 = g0 + a.block_groups < L.groups ? g0 + a.block_groups : L.groups;
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = rt + i;
        const float* vals = row_values_f32(a, r, g0, g1, scratch);
        const uint8_t* meta = a.metadata + r * L.meta_bytes_per_row;
        prefetch_block(a, r + 2 < r1 ? r + 2 : r, g0, g1);
        float* y = a.out + r * ld;
        typename V::reg acc[S][NB];
        for (int t = 0; t < NB; ++t) acc[0][t] = V::load(y + t * V::kLanes);
        for (int s = 1; s < S; ++s)
          for (int t = 0; t < NB; ++t) acc[s][t] = V::zero();
        int64_t g = g0;
        for (; g + 1 < g1; g += 2, vals += 4) {
          const uint32_t lanes = kMetaLanes24.lanes[meta[g / 2]];
          const float* xg = a.xT + g * 4 * ld;
          for (int j = 0; j < 4; ++j) {
            const typename V::reg w = V::bcast(vals[j]);
            const float* x = xg + ((lanes >> (8 * j)) & 0xFFu) * ld;
            typename V::reg* set = acc[j % S];
            for (int t = 0; t < NB; ++t) set[t] = V::fma(w, V::load(x + t * V::kLanes), set[t]);
          }
        }
        if (g < g1) {  // a last lone group (odd group count)
          const uint32_t lanes = kMetaLanes24.lanes[meta[g / 2] & 0xFu];
          for (int j = 0; j < 2; ++j) {
            const typename V::reg w = V::bcast(vals[j]);
            const float* x = a.xT + (g * 4 + ((lanes >> (8 * j)) & 0xFFu)) * ld;
            for (int t = 0; t < NB; ++t) acc[0][t] = V::fma(w, V::load(x + t * V::kLanes), acc[0][t]);
          }
        }
        for (int s = 1; s < S; ++s)
          for (int t = 0; t < NB; ++t) acc[0][t] = V::add(acc[0][t], acc[s][t]);
        for (int t = 0; t < NB; ++t) V::store(y + t * V::kLanes, acc[0][t]);
      }
    }
  }
}

// 2:4 grad input for H batch registers starting at register h0 of each gyT/gxT row. Per
// tile of 64 rows and per group (4 columns of gxT), the group's gradient is accumulated in
// registers over the tile's rows, each row contributing its group as 4 dense weights (2 of
// them zero). That spends twice the FLOPs of the kept weights but keeps the updates out of
// memory: a read-modify-write of gxT per kept weight was bound by stores and by the
// dependency between rows updating the same column.
template <int H>
void grad_input_2_4_pass(const SpmmArgs& a, int64_t g_begin, int64_t g_end, int64_t ld,
                         int h0, float* scratch) {
  constexpr int64_t kTile = 64;
  const NMLayout& L = a.layout;
  const bool f32 = a.vtype == ValueType::kFloat32;
  for (int64_t rt = 0; rt < a.rows; rt += kTile) {
    const int64_t r_end = rt + kTile < a.rows ? rt + kTile : a.rows;
    const int64_t nr = r_end - rt;
    (void)scratch;
    for (int64_t g = g_begin; g < g_end; ++g) {
      float* gx = a.out + g * 4 * ld + h0 * V::kLanes;
      typename V::reg acc[4][H];
      for (int j = 0; j < 4; ++j)
        for (int t = 0; t < H; ++t) acc[j][t] = V::load(gx + j * ld + t * V::kLanes);
      const int shift = 4 * static_cast<int>(g & 1);
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = rt + i;
        const uint32_t nib = (a.metadata[r * L.meta_bytes_per_row + g / 2] >> shift) & 0xFu;
        const int64_t at = r * L.values_per_row + 2 * g;
        float w[4] = {0.f, 0.f, 0.f, 0.f};
        w[nib >> 2] = f32 ? static_cast<const float*>(a.values)[at + 1] : value16(a, at + 1);
        w[nib & 3u] = f32 ? static_cast<const float*>(a.values)[at] : value16(a, at);
        const float* gy = a.gyT + r * ld + h0 * V::kLanes;
        typename V::reg gyr[H];
        for (int t = 0; t < H; ++t) gyr[t] = V::load(gy + t * V::kLanes);
        for (int j = 0; j < 4; ++j) {
          const typename V::reg wj = V::bcast(w[j]);
          for (int t = 0; t < H; ++t) acc[j][t] = V::fma(wj, gyr[t], acc[j][t]);
        }
      }
      for (int j = 0; j < 4; ++j)
        for (int t = 0; t < H; ++t) V::store(gx + j * ld + t * V::kLanes, acc[j][t]);
    }
  }
}

// 2:4 grad input by read-modify-write of gxT per kept weight: over tiles of 64 rows, then
// K-blocks of this thread's columns [g_begin, g_end), so the gxT block stays in L1. Used
// for wide batch tiles, where the register-accumulating pass would re-read the weight.
template <int NB>
void grad_input_2_4_rmw(const SpmmArgs& a, int64_t g_begin, int64_t g_end, float* scratch) {
  constexpr int64_t ld = int64_t{NB} * V::kLanes;
  constexpr int64_t kTile = 64;
  const NMLayout& L = a.layout;
  for (int64_t rt = 0; rt < a.rows; rt += kTile) {
    const int64_t r_end = rt + kTile < a.rows ? rt + kTile : a.rows;
    for (int64_t g0 = g_begin; g0 < g_end; g0 += a.block_groups) {
      const int64_t g1 = g0 + a.block_groups < g_end ? g0 + a.block_groups : g_end;
      for (int64_t r = rt; r < r_end; ++r) {
        const float* vals = row_values_f32(a, r, g0, g1, scratch);
        const uint8_t* meta = a.metadata + r * L.meta_bytes_per_row;
        typename V::reg gy[NB];
        for (int t = 0; t < NB; ++t) gy[t] = V::load(a.gyT + r * ld + t * V::kLanes);
        for (int64_t g = g0; g < g1; g += 2, vals += 4) {
          const uint32_t lanes = kMetaLanes24.lanes[meta[g / 2]];
          const int kept = g + 1 < g1 ? 4 : 2;  // a lone last group keeps its low nibble only
          float* xg = a.out + g * 4 * ld;
          for (int j = 0; j < kept; ++j) {
            const typename V::reg w = V::bcast(vals[j]);
            float* p = xg + ((lanes >> (8 * j)) & 0xFFu) * ld;
            for (int t = 0; t < NB; ++t) {
              V::store(p + t * V::kLanes, V::fma(w, gy[t], V::load(p + t * V::kLanes)));
            }
          }
        }
      }
    }
  }
}

template <int NB>
void grad_input_2_4(const SpmmArgs& a, int64_t g_begin, int64_t g_end, float* scratch) {
  constexpr int64_t ld = int64_t{NB} * V::kLanes;
  // Accumulators: 4 columns x H registers, H <= 4 (AVX-512) or 2 (16-register ISAs).
  constexpr int kH = V::kRegs >= 32 ? 4 : 2;
  // Measured (AVX-512, 4096x4096): registers win at batch 64 (11.8 vs 15.6 ms), the
  // read-modify-write at batch 256 (38.5 vs 50.4 ms), where registers need two passes.
  if constexpr (NB <= kH) {
    grad_input_2_4_pass<NB>(a, g_begin, g_end, ld, 0, scratch);
  } else {
    grad_input_2_4_rmw<NB>(a, g_begin, g_end, scratch);
  }
}

// 2:4 sddmm, indices decoded on the fly; four dot products reduced together (hsum4).
template <int NB>
void sddmm_2_4(const SpmmArgs& a, int64_t r0, int64_t r1, float* scratch) {
  constexpr int64_t ld = int64_t{NB} * V::kLanes;
  constexpr int64_t kTile = 64;
  const NMLayout& L = a.layout;
  (void)scratch;
  for (int64_t rt = r0; rt < r1; rt += kTile) {
    const int64_t r_end = rt + kTile < r1 ? rt + kTile : r1;
    for (int64_t g0 = 0; g0 < L.groups; g0 += a.block_groups) {
      const int64_t g1 = g0 + a.block_groups < L.groups ? g0 + a.block_groups : L.groups;
      for (int64_t r = rt; r < r_end; ++r) {
        const uint8_t* meta = a.metadata + r * L.meta_bytes_per_row;
        typename V::reg gy[NB];
        for (int t = 0; t < NB; ++t) gy[t] = V::load(a.gyT + r * ld + t * V::kLanes);
        float* gv = a.out + r * L.values_per_row + 2 * g0;
        for (int64_t g = g0; g < g1; g += 2, gv += 4) {
          const uint32_t lanes = kMetaLanes24.lanes[meta[g / 2]];
          const float* xg = a.xT + g * 4 * ld;
          typename V::reg p[4];
          for (int j = 0; j < 4; ++j) {
            const float* x = xg + ((lanes >> (8 * j)) & 0xFFu) * ld;
            p[j] = V::mul(gy[0], V::load(x));
            for (int t = 1; t < NB; ++t) p[j] = V::fma(gy[t], V::load(x + t * V::kLanes), p[j]);
          }
          if (g + 1 < g1) {
            V::hsum4_add(p[0], p[1], p[2], p[3], gv, !a.first);
          } else {  // a lone last group: its two values only (the odd slots are absent)
            gv[0] = (a.first ? 0.f : gv[0]) + V::hsum(p[0]);
            gv[1] = (a.first ? 0.f : gv[1]) + V::hsum(p[1]);
          }
        }
      }
    }
  }
}

// 2:4 small-batch forward for TB rows of x and values of type VT: defined by the ISA files
// whose V::kHasForward24 is true (after including this header), with in-register permutes.
template <int TB, ValueType VT>
void forward_2_4_typed(const SpmmArgs& a, int64_t r0, int64_t r1, float* scratch);

template <int TB>
void forward_2_4_rows(const SpmmArgs& a, int64_t r0, int64_t r1, float* scratch) {
  switch (a.vtype) {
    case ValueType::kFloat32: return forward_2_4_typed<TB, ValueType::kFloat32>(a, r0, r1, scratch);
    case ValueType::kFloat16: return forward_2_4_typed<TB, ValueType::kFloat16>(a, r0, r1, scratch);
    case ValueType::kBFloat16: return forward_2_4_typed<TB, ValueType::kBFloat16>(a, r0, r1, scratch);
  }
}

// Scalar tail of the 2:4 forward: groups [g0, groups) of row r, added to sums[0..tb).
inline void forward_2_4_tail(const SpmmArgs& a, int64_t r, int64_t g0, int tb, float* sums,
                             float* scratch) {
  const NMLayout& L = a.layout;
  const int64_t count = (L.groups - g0) * 2;
  if (count == 0) return;
  load_values(a, r, g0 * 2, count, scratch);
  const uint8_t* meta = a.metadata + r * L.meta_bytes_per_row;
  for (int64_t g = g0; g < L.groups; ++g) {
    const uint32_t nib = (meta[g / 2] >> (4 * (g & 1))) & 0xFu;
    const int64_t c0 = g * 4 + (nib & 3u), c1 = g * 4 + (nib >> 2);
    const float v0 = scratch[(g - g0) * 2], v1 = scratch[(g - g0) * 2 + 1];
    for (int b = 0; b < tb; ++b) {
      const float* x = a.x + b * a.ldx;
      sums[b] += v0 * x[c0] + v1 * x[c1];
    }
  }
}

// The ISA file may define forward_2_4_rows<TB> (V::kHasForward24); otherwise none.
template <int TB>
RowKernel forward_2_4_entry() {
  if constexpr (V::kHasForward24 && TB <= kSmallTile) {
    return &forward_2_4_rows<TB>;
  } else {
    return nullptr;
  }
}

template <int... NB>
SpmmKernels make_kernels(const char* isa, std::integer_sequence<int, NB...>) {
  return SpmmKernels{isa,
                     V::kLanes,
                     static_cast<int>(sizeof...(NB)),
                     {&forward_rows<NB + 1>...},
                     {&grad_input_groups<NB + 1>...},
                     {&sddmm_rows<NB + 1>...},
                     {forward_2_4_entry<NB + 1>()...},
                     {&forward_2_4_batch<NB + 1>...},
                     {&grad_input_2_4<NB + 1>...},
                     {&sddmm_2_4<NB + 1>...}};
}

}  // namespace SK_ISA_NS
}  // namespace sparsekit
