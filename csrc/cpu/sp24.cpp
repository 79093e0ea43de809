// The sparse tensor-core layout on the CPU: packing (the same code the CUDA op runs) and an
// emulation of mma.sp m16n8k32 that checks the packing and the kernels' index arithmetic
// against the PTX fragment rules without a GPU.
//
// The emulator restates the PTX ISA's rules on its own (it does not call the helpers of
// sp24_layout.h for the hardware side): a lane's registers are filled the way the CUDA
// kernel fills them (packed offsets, sp24::b_k) and read back the way the hardware reads
// them, so a disagreement between the two shows up as a wrong product.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "../checks.h"
#include "../sp24_layout.h"

namespace sparsekit {

// Shared with csrc/cuda/sp24_linear.cu: argument checks of the packed form.
void check_sp24_packed(const at::Tensor& packed_values, const at::Tensor& packed_meta,
                       int64_t rows, int64_t k) {
  TORCH_CHECK_VALUE(rows >= 0 && k >= 0, "rows and k must be >= 0, got ", rows, " and ", k);
  const sp24::PackedLayout L(rows, k);
  TORCH_CHECK_TYPE(packed_values.scalar_type() == at::kHalf ||
                       packed_values.scalar_type() == at::kBFloat16,
                   "packed_values must be float16 or bfloat16, got ",
                   packed_values.scalar_type());
  TORCH_CHECK_VALUE(packed_values.dim() == 1 && packed_values.numel() == L.values_numel() &&
                        packed_values.is_contiguous(),
                    "packed_values must be contiguous 1-D with ", L.values_numel(),
                    " entries for rows=", rows, ", k=", k, " (from sp24_pack)");
  TORCH_CHECK_TYPE(packed_meta.scalar_type() == at::kInt, "packed_meta must be int32, got ",
                   packed_meta.scalar_type());
  TORCH_CHECK_VALUE(packed_meta.dim() == 1 && packed_meta.numel() == L.meta_words() &&
                        packed_meta.is_contiguous(),
                    "packed_meta must be contiguous 1-D with ", L.meta_words(),
                    " entries for rows=", rows, ", k=", k, " (from sp24_pack)");
  // The kernels read packed_values in 16-byte and packed_meta in 16- or 8-byte vectors: an
  // offset view (a slice of a larger buffer) would be a misaligned access on the GPU.
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(packed_values.data_ptr()) % 16 == 0,
                    "packed_values must start on a 16-byte boundary (pass the tensors "
                    "sp24_pack returns, or a copy: not an offset view)");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(packed_meta.data_ptr()) % 16 == 0,
                    "packed_meta must start on a 16-byte boundary (pass the tensors "
                    "sp24_pack returns, or a copy: not an offset view)");
}

// Shared with CUDA: the canonical 2:4 pair checked for packing.
sp24::PackedLayout check_sp24_canonical(const at::Tensor& values, const at::Tensor& metadata,
                                        int64_t k) {
  check_compressed(values, metadata, k, 2, 4);
  TORCH_CHECK_TYPE(values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16,
                   "values must be float16 or bfloat16 for the sparse tensor-core layout, got ",
                   values.scalar_type());
  return sp24::PackedLayout(values.size(0), k);
}

// The error for a group whose 2:4 indices are not strictly increasing (row, group, nibble).
void fail_unordered_sp24_metadata(int64_t row, int64_t group, uint32_t nibble) {
  TORCH_CHECK_VALUE(false, "metadata row ", row, ", group ", group, ": kept indices ",
                    nibble & 3u, " and ", nibble >> 2, " are not strictly increasing; the "
                    "sparse tensor cores need canonical 2:4 metadata (as sparsekit.compress "
                    "writes it)");
}

namespace {

std::tuple<at::Tensor, at::Tensor> sp24_pack_cpu(const at::Tensor& values_in,
                                                 const at::Tensor& metadata_in, int64_t k) {
  const sp24::PackedLayout L = check_sp24_canonical(values_in, metadata_in, k);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor metadata = metadata_in.contiguous();
  const int64_t groups = (k + 3) / 4;
  for (int64_t r = 0; r < metadata.size(0); ++r) {
    const uint8_t* row_meta = metadata.data_ptr<uint8_t>() + r * metadata.size(1);
    for (int64_t g = 0; g < groups; ++g) {
      if (!sp24::meta_group_ordered(row_meta, g)) {
        fail_unordered_sp24_metadata(r, g, (row_meta[g >> 1] >> ((g & 1) * 4)) & 0xFu);
      }
    }
  }
  at::Tensor pv = at::empty({L.values_numel()}, values.options());
  at::Tensor pm = at::empty({L.meta_words()}, metadata.options().dtype(at::kInt));
  const auto* src = reinterpret_cast<const uint16_t*>(values.data_ptr());
  const auto* meta = metadata.data_ptr<uint8_t>();
  auto* dst = reinterpret_cast<uint16_t*>(pv.data_ptr());
  auto* words = reinterpret_cast<uint32_t*>(pm.data_ptr<int32_t>());
  const int64_t vpr = values.size(1), mbytes = metadata.size(1);
  at::parallel_for(0, L.row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t rt = begin; rt < end; ++rt) {
      for (int64_t kt = 0; kt < L.k_tiles; ++kt) {
        for (int lane = 0; lane < 32; ++lane) {
          sp24::pack_lane_values(src, vpr, L, rt, kt, lane, dst + L.values_offset(rt, kt, lane));
        }
        for (int ml = 0; ml < sp24::kMetaLanes; ++ml) {
          words[L.meta_offset(rt, kt, ml)] = sp24::pack_meta_word(meta, mbytes, L, rt, kt, ml);
        }
      }
    }
  });
  return {pv, pm};
}

template <typename T>
double bits_to_double(uint16_t bits) {
  return static_cast<double>(static_cast<float>(T(bits, T::from_bits())));
}

// One m16n8k32 MMA as the PTX ISA defines it, on the registers of 32 lanes.
// a[lane][i]: A elements a0..a7; e[lane]: metadata word; b[lane][i]: b0..b7; returns
// d[lane][i] = d0..d3 (added to acc).
void emulate_mma(const double (*a)[8], const uint32_t* e, const double (*b)[8],
                 double (*acc)[4]) {
  double A[16][16] = {}, B[32][8] = {}, dense[16][32] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 8; ++i) {
      // Multiplicand A (m16n8k16 layout over the compressed 16 x 16 matrix).
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = a[lane][i];
      // Multiplicand B (32 x 8): row = tig * 2 + (i & 1) + 8 * (i / 2), column = groupID.
      B[tig * 2 + (i & 1) + 8 * (i / 2)][group] = b[lane][i];
    }
  }
  // Metadata, sparsity selector 0: threads 0 and 1 of each group of four. Thread h holds
  // the indices of K columns 16h..16h+15 for row groupID (bits 0-15) and groupID + 8
  // (bits 16-31), one 4-bit nibble per 4-column chunk, two 2-bit indices per nibble.
  for (int group = 0; group < 8; ++group) {
    for (int h = 0; h < 2; ++h) {
      const uint32_t word = e[group * 4 + h];
      for (int high = 0; high < 2; ++high) {
        const int row = group + 8 * high;
        for (int chunk = 0; chunk < 4; ++chunk) {
          const uint32_t nibble = (word >> (16 * high + 4 * chunk)) & 0xF;
          const int i0 = nibble & 3, i1 = nibble >> 2;
          TORCH_CHECK(i0 < i1, "invalid ordered metadata nibble 0x", std::hex, nibble,
                      " at tile row ", std::dec, row, ", chunk ", h * 4 + chunk);
          const int base = 16 * h + 4 * chunk, src = 8 * h + 2 * chunk;
          dense[row][base + i0] = A[row][src];
          dense[row][base + i1] = A[row][src + 1];
        }
      }
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
      // Accumulator D (16 x 8): row = groupID (+8 for d2, d3), column = tig * 2 + (i & 1).
      const int row = i < 2 ? group : group + 8, col = tig * 2 + (i & 1);
      double sum = 0;
      for (int kk = 0; kk < 32; ++kk) sum += dense[row][kk] * B[kk][col];
      acc[lane][i] += sum;
    }
  }
}

template <typename T>
at::Tensor emulate_linear(const at::Tensor& x, const at::Tensor& pv, const at::Tensor& pm,
                          const c10::optional<at::Tensor>& bias, int64_t rows, int64_t k) {
  const sp24::PackedLayout L(rows, k);
  const int64_t batch = x.size(0);
  at::Tensor xd = x.to(at::kDouble).contiguous();
  at::Tensor y = at::zeros({batch, rows}, x.options().dtype(at::kDouble));
  const double* xp = xd.data_ptr<double>();
  double* yp = y.data_ptr<double>();
  const auto* vals = reinterpret_cast<const uint16_t*>(pv.data_ptr());
  const auto* words = reinterpret_cast<const uint32_t*>(pm.data_ptr<int32_t>());
  const int64_t batch_tiles = (batch + sp24::kBatch - 1) / sp24::kBatch;
  at::parallel_for(0, L.row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t rt = begin; rt < end; ++rt) {
      for (int64_t bt = 0; bt < batch_tiles; ++bt) {
        double acc[32][4] = {};
        for (int64_t kt = 0; kt < L.k_tiles; ++kt) {
          double a[32][8], b[32][8];
          uint32_t e[32];
          for (int lane = 0; lane < 32; ++lane) {
            // Filled as the CUDA kernel fills its registers.
            const uint16_t* lv = vals + L.values_offset(rt, kt, lane);
            for (int i = 0; i < 8; ++i) a[lane][i] = bits_to_double<T>(lv[i]);
            e[lane] = sp24::supplies_meta(lane)
                ? words[L.meta_offset(rt, kt, sp24::meta_lane_of(lane))] : 0u;
            const int64_t n = bt * sp24::kBatch + sp24::lane_group(lane);
            for (int j = 0; j < 8; ++j) {
              const int64_t col = kt * sp24::kK + sp24::b_k(lane, j);
              b[lane][j] = (n < batch && col < k) ? xp[n * k + col] : 0.0;
            }
          }
          emulate_mma(a, e, b, acc);
        }
        for (int lane = 0; lane < 32; ++lane) {
          for (int i = 0; i < 4; ++i) {
            const int64_t row = rt * sp24::kRows + sp24::d_row(lane, i);
            const int64_t n = bt * sp24::kBatch + sp24::d_batch(lane, i);
            if (row < rows && n < batch) yp[n * rows + row] = acc[lane][i];
          }
        }
      }
    }
  });
  if (bias.has_value()) y += bias->to(at::kDouble);
  return y;
}

// The large-batch kernel on the CPU: its copies into a shared-memory stage (tiled::*_copy),
// ldmatrix as PTX defines it, the MMA, and its output mapping. Its pipeline only reorders
// these steps, so it is left out.
template <typename T>
at::Tensor emulate_staged(const at::Tensor& x_in, const at::Tensor& pv, const at::Tensor& pm,
                          const c10::optional<at::Tensor>& bias, int64_t rows, int64_t k) {
  namespace tiled = sp24::tiled;
  const sp24::PackedLayout L(rows, k);
  const int64_t batch = x_in.size(0);
  const int64_t kx = (k + 7) / 8 * 8;  // as the launcher pads x
  at::Tensor x = at::zeros({batch, kx}, x_in.options());
  x.narrow(1, 0, k).copy_(x_in);
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* vals = reinterpret_cast<const uint16_t*>(pv.data_ptr());
  const auto* words = reinterpret_cast<const uint32_t*>(pm.data_ptr<int32_t>());
  at::Tensor y = at::zeros({batch, rows}, x_in.options().dtype(at::kDouble));
  double* yp = y.data_ptr<double>();
  const int64_t row_blocks = (L.row_tiles + tiled::kRowTiles - 1) / tiled::kRowTiles;
  const int64_t batch_blocks = (batch + tiled::kN - 1) / tiled::kN;
  const int64_t steps = ((kx + sp24::kK - 1) / sp24::kK + tiled::kTiles - 1) / tiled::kTiles;
  constexpr int kW = tiled::kWarps, kMT = tiled::kWarpRowTiles, kNT = tiled::kWarpBatchTiles;
  at::parallel_for(0, row_blocks * batch_blocks, 1, [&](int64_t begin, int64_t end) {
    auto stage = std::make_unique<tiled::Stage>();
    std::vector<double> acc_store(static_cast<size_t>(kW) * kMT * kNT * 32 * 4);
    auto acc = [&](int w, int mt, int nt) {
      return reinterpret_cast<double(*)[4]>(&acc_store[(((w * kMT + mt) * kNT) + nt) * 32 * 4]);
    };
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t rt0 = (blk / batch_blocks) * tiled::kRowTiles;
      const int64_t n0 = (blk % batch_blocks) * tiled::kN;
      std::fill(acc_store.begin(), acc_store.end(), 0.0);
      tiled::Stage& s = *stage;
      for (int64_t step = 0; step < steps; ++step) {
        const int64_t kt0 = step * tiled::kTiles;
        for (int c = 0; c < tiled::kRowTiles * tiled::kTiles * 32; ++c) {
          const tiled::ACopy cp = tiled::a_copy(c, rt0, kt0, L);
          uint32_t* dst = s.a[cp.rtl][cp.tile][cp.lane];
          if (cp.valid) std::memcpy(dst, vals + cp.src * sp24::kValuesPerLane, 16);
          else std::memset(dst, 0, 16);
        }
        for (int c = 0; c < tiled::kRowTiles * sp24::kMetaLanes; ++c) {
          const tiled::ECopy cp = tiled::e_copy(c, rt0, kt0, L);
          uint32_t* dst = s.e[cp.rtl][cp.meta_lane];
          if (cp.valid) std::memcpy(dst, words + cp.src, 8);
          else dst[0] = dst[1] = tiled::kPadMetaWord;
        }
        for (int c = 0; c < tiled::kN * tiled::kXChunks; ++c) {
          const tiled::XCopy cp = tiled::x_copy(c, n0, kt0, batch, kx);
          uint16_t* dst = &s.x[cp.row][cp.chunk * 8];
          if (cp.valid) std::memcpy(dst, xb + cp.n * kx + cp.col, 16);
          else std::memset(dst, 0, 16);
        }
        for (int kt = 0; kt < tiled::kTiles; ++kt) {
          for (int w = 0; w < kW; ++w) {
            double b[kNT][32][8];
            for (int nt = 0; nt < kNT; ++nt) {
              // ldmatrix.x4: lane 8q + r gives the address of row r of matrix q; lane i
              // receives row i / 4, elements 2 (i % 4) and 2 (i % 4) + 1 of each matrix q
              // in its register q (first element in the low half).
              for (int i = 0; i < 32; ++i) {
                for (int q = 0; q < 4; ++q) {
                  const int provider = 8 * q + i / 4;
                  const uint16_t* row = &s.x[tiled::x_frag_row(w, nt, provider)]
                                            [tiled::x_frag_col(kt, provider)];
                  b[nt][i][2 * q] = bits_to_double<T>(row[2 * (i % 4)]);
                  b[nt][i][2 * q + 1] = bits_to_double<T>(row[2 * (i % 4) + 1]);
                }
              }
            }
            for (int mt = 0; mt < kMT; ++mt) {
              const int rtl = tiled::a_row_tile(w, mt);
              double a[32][8];
              uint32_t e[32];
              for (int lane = 0; lane < 32; ++lane) {
                const auto* lv = reinterpret_cast<const uint16_t*>(s.a[rtl][kt][lane]);
                for (int i = 0; i < 8; ++i) a[lane][i] = bits_to_double<T>(lv[i]);
                e[lane] = s.e[rtl][sp24::meta_lane_of(lane) & (sp24::kMetaLanes - 1)][kt];
              }
              for (int nt = 0; nt < kNT; ++nt) emulate_mma(a, e, b[nt], acc(w, mt, nt));
            }
          }
        }
      }
      for (int w = 0; w < kW; ++w) {
        for (int mt = 0; mt < kMT; ++mt) {
          for (int lane = 0; lane < 32; ++lane) {
            for (int i = 0; i < 4; ++i) {
              const int64_t row = tiled::out_row(rt0, w, mt, lane, i);
              if (row >= rows) continue;
              for (int nt = 0; nt < kNT; ++nt) {
                const int64_t n = tiled::out_batch(n0, w, nt, lane, i);
                if (n < batch) yp[n * rows + row] = acc(w, mt, nt)[lane][i];
              }
            }
          }
        }
      }
    }
  });
  if (bias.has_value()) y += bias->to(at::kDouble);
  return y;
}

at::Tensor sp24_emulate_linear_cpu(const at::Tensor& x, const at::Tensor& packed_values,
                                   const at::Tensor& packed_meta,
                                   const c10::optional<at::Tensor>& bias, int64_t rows,
                                   int64_t k, bool staged) {
  check_sp24_packed(packed_values, packed_meta, rows, k);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == k, "x must be 2-D [batch, ", k, "], got ",
                    x.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == rows, "bias must have shape [",
                      rows, "], got ", bias->sizes());
  }
  if (staged) {
    TORCH_CHECK_TYPE(x.scalar_type() == packed_values.scalar_type(),
                     "x must have the weight's dtype ", packed_values.scalar_type(),
                     " for the staged emulation (the kernel copies raw halves), got ",
                     x.scalar_type());
    if (packed_values.scalar_type() == at::kHalf) {
      return emulate_staged<c10::Half>(x, packed_values, packed_meta, bias, rows, k);
    }
    return emulate_staged<c10::BFloat16>(x, packed_values, packed_meta, bias, rows, k);
  }
  if (packed_values.scalar_type() == at::kHalf) {
    return emulate_linear<c10::Half>(x, packed_values, packed_meta, bias, rows, k);
  }
  return emulate_linear<c10::BFloat16>(x, packed_values, packed_meta, bias, rows, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, lib) {
  lib.impl("sp24_pack", &sp24_pack_cpu);
  lib.impl("sp24_emulate_linear", &sp24_emulate_linear_cpu);
}

}  // namespace sparsekit
