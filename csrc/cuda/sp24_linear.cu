// 2:4 products on NVIDIA's sparse tensor cores: y = x @ W^T (+ bias) with mma.sp
// (m16n8k32, f16 / bf16 in, f32 accumulate; sm_80 and sm_90), on the packed layout of
// csrc/sp24_layout.h, which sp24_pack derives from the canonical form.
//
// Two kernels:
//   - small batch (1..16 rows of x): bandwidth-bound. A block owns one 16-row tile of W;
//     its warps split K in runs of 4 tiles (one 16-byte load per lane per tile of values,
//     one 16-byte metadata vector per 4 tiles), accumulate in registers, and reduce
//     through shared memory. When the row tiles leave multiprocessors idle, K is also split
//     across blocks (fp32 partial sums, then a finishing pass).
//   - large batch: a 128 x 128 output tile per block, 8 warps of 64 x 32, K in stages of
//     64 staged through shared memory with cp.async (4-stage pipeline); x fragments come
//     from ldmatrix, W fragments from one 16-byte shared load per lane.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <atomic>

#include "../checks.h"
#include "../sp24_layout.h"
#include "sp24_mma.cuh"

namespace sparsekit {

void check_sp24_packed(const at::Tensor& packed_values, const at::Tensor& packed_meta,
                       int64_t rows, int64_t k);
sp24::PackedLayout check_sp24_canonical(const at::Tensor& values, const at::Tensor& metadata,
                                        int64_t k);
void fail_unordered_sp24_metadata(int64_t row, int64_t group, uint32_t nibble);

namespace {

using sp24::PackedLayout;

// ---------------------------------------------------------------- packing (one-time)

__global__ void pack_kernel(const uint16_t* __restrict__ values, int64_t values_per_row,
                            const uint8_t* __restrict__ meta, int64_t meta_bytes,
                            PackedLayout L, uint16_t* __restrict__ packed_values,
                            uint32_t* __restrict__ packed_meta) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= L.row_tiles * L.k_tiles * 32) return;
  const int lane = static_cast<int>(idx % 32);
  const int64_t tile = idx / 32, kt = tile % L.k_tiles, rt = tile / L.k_tiles;
  sp24::pack_lane_values(values, values_per_row, L, rt, kt, lane,
                         packed_values + L.values_offset(rt, kt, lane));
  if (lane < sp24::kMetaLanes) {
    packed_meta[L.meta_offset(rt, kt, lane)] =
        sp24::pack_meta_word(meta, meta_bytes, L, rt, kt, lane);
  }
}

// The first (row * groups + group) whose indices are not strictly increasing, by atomicMin
// into *first_bad (initialised to the number of groups: none).
__global__ void find_unordered_kernel(const uint8_t* __restrict__ meta, int64_t rows,
                                      int64_t groups, int64_t meta_bytes,
                                      unsigned long long* first_bad) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * groups) return;
  const int64_t row = idx / groups, g = idx % groups;
  if (!sp24::meta_group_ordered(meta + row * meta_bytes, g)) {
    atomicMin(first_bad, static_cast<unsigned long long>(idx));
  }
}

// Refuses metadata that mma.sp cannot take (see meta_group_ordered). One small kernel and
// one read back per packing, which happens once per weight; inside CUDA graph capture the
// read back is impossible, and the check is left to the packing outside capture.
void check_ordered_metadata(const at::Tensor& metadata, int64_t k, cudaStream_t stream) {
  const int64_t rows = metadata.size(0), groups = (k + 3) / 4, total = rows * groups;
  if (total == 0) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  at::Tensor first_bad = at::full({1}, total, metadata.options().dtype(at::kLong));
  find_unordered_kernel<<<(total + 255) / 256, 256, 0, stream>>>(
      metadata.data_ptr<uint8_t>(), rows, groups, metadata.size(1),
      reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t bad = first_bad.item<int64_t>();
  if (bad < total) {
    const int64_t row = bad / groups, g = bad % groups;
    const uint8_t byte = metadata.select(0, row).select(0, g >> 1).item<uint8_t>();
    fail_unordered_sp24_metadata(row, g, (byte >> ((g & 1) * 4)) & 0xFu);
  }
}

std::tuple<at::Tensor, at::Tensor> sp24_pack_cuda(const at::Tensor& values_in,
                                                  const at::Tensor& metadata_in, int64_t k) {
  const PackedLayout L = check_sp24_canonical(values_in, metadata_in, k);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous();
  const at::Tensor metadata = metadata_in.contiguous();
  check_ordered_metadata(metadata, k, c10::cuda::getCurrentCUDAStream());
  at::Tensor pv = at::empty({L.values_numel()}, values.options());
  at::Tensor pm = at::empty({L.meta_words()}, metadata.options().dtype(at::kInt));
  const int64_t work = L.row_tiles * L.k_tiles * 32;
  if (work == 0) return {pv, pm};
  const int threads = 256;
  const int64_t blocks = (work + threads - 1) / threads;
  pack_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint16_t*>(values.data_ptr()), values.size(1),
      metadata.data_ptr<uint8_t>(), metadata.size(1), L,
      reinterpret_cast<uint16_t*>(pv.data_ptr()),
      reinterpret_cast<uint32_t*>(pm.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pv, pm};
}

// ---------------------------------------------------------------- device helpers

template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  static constexpr bool kBf16 = false;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

using sp24::mma_sp;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(bytes));
}

__device__ __forceinline__ void cp_async8(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Read-only global loads kept in program order (see mma_sp).
__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ld_nc_u32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t component(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// ---------------------------------------------------------------- small batch

constexpr int kSmallWarps = 8;
using sp24::kSmallMaxBatch;

// The registers of one step: 4 tiles (one metadata vector) of W and the matching x.
template <int kNT>
struct SmallStep {
  uint4 a[sp24::kTilesPerMeta];
  uint4 e;
  uint32_t b[kNT][sp24::kTilesPerMeta][4];
};

// kNT n8 tiles of the batch (1: batch <= 8, 2: batch <= 16). x: [batch, ldx], columns at
// and past kx read as zero. partial != nullptr: fp32 atomics into partial (split K).
template <typename T, int kNT>
__global__ __launch_bounds__(kSmallWarps * 32) void small_batch_kernel(
    const T* __restrict__ x, int64_t batch, int64_t kx, int64_t ldx,
    const uint4* __restrict__ packed_values, const uint4* __restrict__ packed_meta,
    const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial, PackedLayout L,
    int64_t quads_per_split) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rt = blockIdx.x;
  const int64_t q_begin = blockIdx.y * quads_per_split;
  const int64_t q_end = min(q_begin + quads_per_split, L.meta_quads);
  // Lanes that supply no metadata load a neighbour's vector (the MMA ignores it).
  const int meta_lane = sp24::meta_lane_of(lane) & (sp24::kMetaLanes - 1);
  const int group = sp24::lane_group(lane);

  const uint32_t* xw[kNT];  // this lane's x row as half pairs (row 0 when past the batch)
  bool row_ok[kNT];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int64_t n = nt * sp24::kBatch + group;
    row_ok[nt] = n < batch;
    xw[nt] = reinterpret_cast<const uint32_t*>(x + (row_ok[nt] ? n : 0) * ldx);
  }

  auto load = [&](SmallStep<kNT>& st, int64_t q) {
#pragma unroll
    for (int j = 0; j < sp24::kTilesPerMeta; ++j) {
      st.a[j] = ld_nc_v4(packed_values +
                         L.values_offset(rt, q * sp24::kTilesPerMeta + j, lane) / 8);
    }
    st.e = ld_nc_v4(packed_meta + L.meta_offset(rt, q * sp24::kTilesPerMeta, meta_lane) / 4);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int j = 0; j < sp24::kTilesPerMeta; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t col = (q * sp24::kTilesPerMeta + j) * sp24::kK + sp24::b_k(lane, 2 * r);
          const bool ok = row_ok[nt] && col < kx;
          const uint32_t v = ld_nc_u32(xw[nt] + (ok ? col / 2 : 0));
          st.b[nt][j][r] = ok ? v : 0u;
        }
      }
    }
  };

  float acc[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  // Software pipeline: the loads of step q + kSmallWarps are in flight during the MMAs of q.
  int64_t q = q_begin + warp;
  if (q < q_end) {
    SmallStep<kNT> cur, nxt;
    load(cur, q);
    for (; q < q_end; q += kSmallWarps) {
      const bool more = q + kSmallWarps < q_end;
      if (more) load(nxt, q + kSmallWarps);
#pragma unroll
      for (int j = 0; j < sp24::kTilesPerMeta; ++j) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          mma_sp<Elem<T>::kBf16>(acc[nt], cur.a[j], cur.b[nt][j], component(cur.e, j));
        }
      }
      if (more) cur = nxt;
    }
  }

  // Cross-warp reduction: red[warp][element][lane], element = nt * 4 + i.
  __shared__ float red[kSmallWarps][kNT * 4][32];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][nt * 4 + i][lane] = acc[nt][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kNT * 4 * 32; idx += blockDim.x) {
    const int element = idx / 32, l = idx % 32, nt = element / 4, i = element % 4;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kSmallWarps; ++w) sum += red[w][element][l];
    const int64_t row = rt * sp24::kRows + sp24::d_row(l, i);
    const int64_t n = nt * sp24::kBatch + sp24::d_batch(l, i);
    if (row >= L.rows || n >= batch) continue;
    if (partial != nullptr) {
      atomicAdd(partial + n * L.rows + row, sum);
    } else {
      if (bias != nullptr) sum += Elem<T>::to_float(bias[row]);
      y[n * L.rows + row] = Elem<T>::from_float(sum);
    }
  }
}

// Split K: y = partial (+ bias), cast.
template <typename T>
__global__ void finish_kernel(const float* __restrict__ partial, const T* __restrict__ bias,
                              T* __restrict__ y, int64_t batch, int64_t rows) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * rows) return;
  float v = partial[idx];
  if (bias != nullptr) v += Elem<T>::to_float(bias[idx % rows]);
  y[idx] = Elem<T>::from_float(v);
}

// ---------------------------------------------------------------- large batch

namespace tiled = sp24::tiled;

// kStages: cp.async pipeline depth, chosen per GPU from its shared memory (stages_for_smem).
template <typename T, int kStages>
__global__ __launch_bounds__(tiled::kThreads) void large_batch_kernel(
    const T* __restrict__ x, int64_t batch, int64_t kx, int64_t ldx,
    const uint4* __restrict__ packed_values, const uint32_t* __restrict__ packed_meta,
    const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial, PackedLayout L,
    int64_t steps_per_split) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  tiled::Stage* stages = reinterpret_cast<tiled::Stage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t rt0 = static_cast<int64_t>(blockIdx.x) * tiled::kRowTiles;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * tiled::kN;
  const int64_t tiles = (kx + sp24::kK - 1) / sp24::kK;
  // This block's share of K (blockIdx.z: split K when the output tiles are too few).
  const int64_t first = blockIdx.z * steps_per_split;
  const int64_t steps =
      min((tiles + tiled::kTiles - 1) / tiled::kTiles - first, steps_per_split);

  auto load = [&](int slot, int64_t step) {
    tiled::Stage& s = stages[slot];
    const int64_t kt0 = (first + step) * tiled::kTiles;
    for (int c = tid; c < tiled::kRowTiles * tiled::kTiles * 32; c += tiled::kThreads) {
      const tiled::ACopy cp = tiled::a_copy(c, rt0, kt0, L);
      cp_async16(s.a[cp.rtl][cp.tile][cp.lane], packed_values + cp.src, cp.valid);
    }
    for (int c = tid; c < tiled::kRowTiles * sp24::kMetaLanes; c += tiled::kThreads) {
      const tiled::ECopy cp = tiled::e_copy(c, rt0, kt0, L);
      if (cp.valid) {
        cp_async8(s.e[cp.rtl][cp.meta_lane], packed_meta + cp.src, true);
      } else {  // row tiles past the weight: valid metadata (zero is undefined for mma.sp)
        s.e[cp.rtl][cp.meta_lane][0] = s.e[cp.rtl][cp.meta_lane][1] = tiled::kPadMetaWord;
      }
    }
    for (int c = tid; c < tiled::kN * tiled::kXChunks; c += tiled::kThreads) {
      const tiled::XCopy cp = tiled::x_copy(c, n0, kt0, batch, kx);
      cp_async16(&s.x[cp.row][cp.chunk * 8], cp.valid ? x + cp.n * ldx + cp.col : x, cp.valid);
    }
  };

  float acc[tiled::kWarpRowTiles][tiled::kWarpBatchTiles][4];
#pragma unroll
  for (int mt = 0; mt < tiled::kWarpRowTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < tiled::kWarpBatchTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();
  }

  // Lanes that supply no metadata read a neighbour's word (the MMA ignores it).
  const int meta_lane = sp24::meta_lane_of(lane) & (sp24::kMetaLanes - 1);
  for (int64_t step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t next = step + kStages - 1;
    if (next < steps) load(static_cast<int>(next % kStages), next);
    cp_async_commit();

    const tiled::Stage& s = stages[step % kStages];
#pragma unroll
    for (int kt = 0; kt < tiled::kTiles; ++kt) {
      uint32_t b[tiled::kWarpBatchTiles][4];
#pragma unroll
      for (int nt = 0; nt < tiled::kWarpBatchTiles; ++nt) {
        ldmatrix_x4(b[nt], &s.x[tiled::x_frag_row(warp, nt, lane)][tiled::x_frag_col(kt, lane)]);
      }
#pragma unroll
      for (int mt = 0; mt < tiled::kWarpRowTiles; ++mt) {
        const int rtl = tiled::a_row_tile(warp, mt);
        const uint4 a = *reinterpret_cast<const uint4*>(s.a[rtl][kt][lane]);
        const uint32_t e = s.e[rtl][meta_lane][kt];
#pragma unroll
        for (int nt = 0; nt < tiled::kWarpBatchTiles; ++nt) {
          mma_sp<Elem<T>::kBf16>(acc[mt][nt], a, b[nt], e);
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < tiled::kWarpRowTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = tiled::out_row(rt0, warp, mt, lane, i);
      if (row >= L.rows) continue;
      const float add = bias != nullptr ? Elem<T>::to_float(bias[row]) : 0.f;
#pragma unroll
      for (int nt = 0; nt < tiled::kWarpBatchTiles; ++nt) {
        const int64_t n = tiled::out_batch(n0, warp, nt, lane, i);
        if (n >= batch) continue;
        if (partial != nullptr) {
          atomicAdd(partial + n * L.rows + row, acc[mt][nt][i]);
        } else {
          y[n * L.rows + row] = Elem<T>::from_float(acc[mt][nt][i] + add);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- launcher

// (ATen/cuda/CUDAContext.h would pull in cusparse.h, which a toolkit may lack.)
int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// How to split `work` units of K over blocks when `blocks` output tiles are fewer than
// `target` blocks; each split keeps at least `min_per_split` units. Splitting costs a
// zero-fill, fp32 atomics and a finishing kernel, so it is only for grids too small.
struct KSplit { int64_t splits, per_split; };
KSplit split_k(int64_t blocks, int64_t work, int64_t min_per_split, int64_t target) {
  int64_t splits = 1;
  if (blocks < target && work > 0) {
    splits = std::min<int64_t>((target + blocks - 1) / blocks,
                               (work + min_per_split - 1) / min_per_split);
    splits = std::max<int64_t>(splits, 1);
  }
  const int64_t per = std::max<int64_t>((work + splits - 1) / splits, 1);
  return {std::max<int64_t>((work + per - 1) / per, 1), per};
}

// Pipeline depth of the tiled kernel on `device` (0: it does not fit), asked once per device.
int tiled_stages(int device) {
  static std::atomic<int> cached[64] = {};  // stages + 1 once known, per device
  if (device >= 0 && device < 64) {
    const int known = cached[device].load();
    if (known > 0) return known - 1;
  }
  const int stages = tiled::stages_for_smem(
      device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (device >= 0 && device < 64) cached[device].store(stages + 1);
  return stages;
}

// One tiled launch with kStages stages; the opt-in to more than 48 KiB of dynamic shared
// memory is made once per (device, dtype, depth).
template <typename T, int kStages>
void launch_tiled(dim3 grid, cudaStream_t stream, int device, const T* x, int64_t batch,
                  int64_t kx, int64_t ldx, const uint4* pv, const uint32_t* pm, const T* bias,
                  T* y, float* partial, const PackedLayout& L, int64_t per_split) {
  constexpr size_t smem = sizeof(tiled::Stage) * kStages;
  static std::atomic<bool> attribute_set[64] = {};
  if (device < 0 || device >= 64 || !attribute_set[device].load()) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(large_batch_kernel<T, kStages>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    if (device >= 0 && device < 64) attribute_set[device].store(true);
  }
  large_batch_kernel<T, kStages><<<grid, tiled::kThreads, smem, stream>>>(
      x, batch, kx, ldx, pv, pm, bias, y, partial, L, per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(const at::Tensor& x, int64_t kx, const at::Tensor& pv, const at::Tensor& pm,
            const T* bias, at::Tensor& y, const PackedLayout& L) {
  const int64_t batch = x.size(0);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const auto* pvp = reinterpret_cast<const uint4*>(pv.data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, x.get_device());
  at::Tensor partial;
  float* partial_ptr = nullptr;
  auto finish = [&](int64_t splits) {
    if (splits <= 1) return;
    const int64_t n = batch * L.rows;
    finish_kernel<T><<<(n + 255) / 256, 256, 0, stream>>>(partial_ptr, bias, yp, batch, L.rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (batch <= kSmallMaxBatch) {
    // A block per row tile; K split across warps (8 runs of 4 tiles at a time) and, when
    // some multiprocessors would get no block, across blocks too. One block per SM is
    // enough to stream: its 8 warps keep two runs each (about 37 KB) of loads in flight,
    // more than an SM's share of HBM bandwidth times its latency (about 20 KB on an H100),
    // so a 4096-row weight (256 blocks) runs as one kernel, without the partial sums.
    const KSplit split = split_k(L.row_tiles, L.meta_quads, kSmallWarps, sms);
    if (split.splits > 1) {
      partial = at::zeros({batch, L.rows}, x.options().dtype(at::kFloat));
      partial_ptr = partial.data_ptr<float>();
    }
    const int64_t per_split = split.per_split;
    const dim3 grid(static_cast<unsigned>(L.row_tiles), static_cast<unsigned>(split.splits));
    const auto* pmp = reinterpret_cast<const uint4*>(pm.data_ptr());
    if (batch <= sp24::kBatch) {
      small_batch_kernel<T, 1><<<grid, kSmallWarps * 32, 0, stream>>>(
          xp, batch, kx, x.stride(0), pvp, pmp, bias, yp, partial_ptr, L, per_split);
    } else {
      small_batch_kernel<T, 2><<<grid, kSmallWarps * 32, 0, stream>>>(
          xp, batch, kx, x.stride(0), pvp, pmp, bias, yp, partial_ptr, L, per_split);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish(split.splits);
    return;
  }
  const int device = x.get_device();
  const int stages = tiled_stages(device);
  TORCH_CHECK(stages > 0, "the tiled 2:4 kernel needs ", tiled::kMinStages * sizeof(tiled::Stage),
              " bytes of shared memory per block; this GPU allows ",
              device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t row_blocks = (L.row_tiles + tiled::kRowTiles - 1) / tiled::kRowTiles;
  const int64_t batch_blocks = (batch + tiled::kN - 1) / tiled::kN;
  const int64_t steps = ((kx + sp24::kK - 1) / sp24::kK + tiled::kTiles - 1) / tiled::kTiles;
  // At moderate batch the output tiles are few (32 for 4096 rows): split K across blocks
  // until the GPU holds two blocks per multiprocessor, keeping >= 4 steps per block.
  const KSplit split = split_k(row_blocks * batch_blocks, steps, 4, 2 * sms);
  if (split.splits > 1) {
    partial = at::zeros({batch, L.rows}, x.options().dtype(at::kFloat));
    partial_ptr = partial.data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(batch_blocks),
                  static_cast<unsigned>(split.splits));
  const auto* pmp = reinterpret_cast<const uint32_t*>(pm.data_ptr());
  switch (stages) {
    case 4:
      launch_tiled<T, 4>(grid, stream, device, xp, batch, kx, x.stride(0), pvp, pmp, bias, yp,
                         partial_ptr, L, split.per_split);
      break;
    case 3:
      launch_tiled<T, 3>(grid, stream, device, xp, batch, kx, x.stride(0), pvp, pmp, bias, yp,
                         partial_ptr, L, split.per_split);
      break;
    default:
      launch_tiled<T, 2>(grid, stream, device, xp, batch, kx, x.stride(0), pvp, pmp, bias, yp,
                         partial_ptr, L, split.per_split);
  }
  finish(split.splits);
}

at::Tensor sp24_linear_cuda(const at::Tensor& x_in, const at::Tensor& packed_values,
                            const at::Tensor& packed_meta, const c10::optional<at::Tensor>& bias,
                            int64_t rows, int64_t k) {
  check_sp24_packed(packed_values, packed_meta, rows, k);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) == k, "x must be 2-D [batch, ", k,
                    "], got ", x_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == packed_values.scalar_type(), "x must have dtype ",
                   packed_values.scalar_type(), " (the weight's), got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.device() == packed_values.device() &&
                        x_in.device() == packed_meta.device(),
                    "x, packed_values and packed_meta must be on one device, got ",
                    x_in.device(), ", ", packed_values.device(), ", ", packed_meta.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == rows, "bias must have shape [",
                      rows, "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x_in.scalar_type(), "bias must have dtype ",
                     x_in.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x_in.device(), "bias must be on ", x_in.device());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, x_in.get_device());
  TORCH_CHECK(major >= 8, "sp24_linear needs sparse tensor cores (sm_80 or newer); this GPU "
              "is compute capability ", major, ".x");
  const int64_t batch = x_in.size(0);
  at::Tensor y = at::empty({batch, rows}, x_in.options());
  if (batch == 0 || rows == 0) return y;
  if (k == 0) {
    return bias.has_value() ? bias->unsqueeze(0).expand({batch, rows}).contiguous() : y.zero_();
  }
  // x rows must start on 16 bytes and hold a multiple of 8 columns: pad with zeros if not
  // (the weight past k is zero, so padded columns add nothing).
  const int64_t kx = (k + 7) / 8 * 8;
  at::Tensor x = x_in;
  const bool aligned = x.is_contiguous() && kx == k &&
                       reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  if (!aligned) {
    x = at::zeros({batch, kx}, x_in.options());
    x.narrow(1, 0, k).copy_(x_in);
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const PackedLayout L(rows, k);
  if (x.scalar_type() == at::kHalf) {
    launch<__half>(x, kx, packed_values, packed_meta,
                   b.defined() ? reinterpret_cast<const __half*>(b.data_ptr()) : nullptr, y, L);
  } else {
    launch<__nv_bfloat16>(
        x, kx, packed_values, packed_meta,
        b.defined() ? reinterpret_cast<const __nv_bfloat16*>(b.data_ptr()) : nullptr, y, L);
  }
  return y;
}

}  // namespace

// The sparse MMA instruction this build's 2:4 kernels use (build_info reports it).
const char* sp24_mma_instruction() { return sp24::kMmaInstruction; }

TORCH_LIBRARY_IMPL(sparsekit, CUDA, lib) {
  lib.impl("sp24_pack", &sp24_pack_cuda);
  lib.impl("sp24_linear", &sp24_linear_cuda);
}

}  // namespace sparsekit
