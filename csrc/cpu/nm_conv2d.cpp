// CPU implementation of nm_conv2d: a 2-D convolution whose weight [out, C_in, kh, kw] is
// stored N:M compressed as the [out, kh * kw * C_in] matrix of DESIGN.md (groups along
// input channels at one kernel position), computed directly from the input (implicit
// GEMM, no im2col buffer; kernels in conv_kernels.h).
//
// 2:4 in fp32 and bf16 runs the lanes forms on a padded NHWC copy of the input (below:
// conv_lanes_forward). Otherwise the wrapper validates, copies the input (NCHW or
// channels_last, fp32/bf16/fp16) once into fp32 stride-phase planes with the zero padding
// in place (conv.h), builds the
// offset table of every reduction index and the channel-block segments, then runs tiles
// of output pixels x blocks of output channels on torch's OpenMP pool and scatters each
// tile's valid pixels into the NCHW output.
//
// The result is channels-last in memory when x is (and not also NCHW-contiguous), else NCHW,
// on every path, as the fake implementation and the reference promise
// (reference.conv2d_output_format). SparseConv2d hands the 2:4 lanes kernels a channels-last
// x, so their channels-last result needs no copy back, and the layers after it run on
// channels-last: torch's NCHW max pooling ran 18x slower than its channels-last one here
// (256x64x8x8, the digits CNN: 3.7 ms against 0.2), which made that model 0.89x dense.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../checks.h"
#include "conv.h"

namespace sparsekit {

std::string spmm_active_isa();
const SpmmKernels& spmm_active_kernels();  // nm_linear.cpp

at::Tensor decompress_dense(const at::Tensor& values, const at::Tensor& metadata, int64_t k,
                            int64_t n, int64_t m);  // nm_linear.cpp
const float* bias_as_float(const std::optional<at::Tensor>& bias,
                           std::vector<float>& buf);  // nm_linear.cpp

namespace {

const ConvKernels& active_conv_kernels() {
  const std::string isa = spmm_active_isa();
#if defined(__x86_64__)
  if (isa == "avx512" || isa == "avx512bf16") return conv_kernels_avx512();
  if (isa == "avx2") return conv_kernels_avx2();
#endif
  return conv_kernels_scalar();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::pair<int64_t, int64_t> pair_arg(c10::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK_VALUE(v.size() == 2, name, " must have 2 entries (height, width), got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= min && v[1] >= min, name, " must be >= ", min, ", got ", v);
  return {v[0], v[1]};
}


// Floats of a tile's input window per channel block (SPARSEKIT_CONV_WINDOW overrides it).
// ResNet-18's stride-1 3x3 layers (64 / 128 / 256 / 512 channels at 56 / 28 / 14 / 7
// pixels), 2:4, fp32, 2 threads, AVX-512, AMD EPYC (Zen 4), all window sizes alternating
// in one run: at batch 1, 4000 floats 1.28 / 1.39 / 1.15 / 1.67 ms, 6000 1.21 / 1.33 /
// 1.08 / 1.58, 8000 1.21 / 1.33 / 1.09 / 1.60, 12000 1.34 / 1.43 / 1.15 / 1.64, 16000
// 1.38 / 1.54 / 1.27 / 1.79; at batch 16, 4000 19.3 / 25.9 / 30.6 / 37.2 ms, 8000 18.7 /
// 26.7 / 33.6 / 40.2, 12000 18.9 / 28.3 / 33.6 / 43.2. The window estimate counts every
// row and phase a tile may touch, more than it reads at once.
int64_t window_floats() {
  static const int64_t floats = [] {
    const char* env = std::getenv("SPARSEKIT_CONV_WINDOW");
    return env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : int64_t{8000};
  }();
  return floats;
}

// Input floats of one channel that a tile of `width` pixels reads: the output rows it
// spans plus the kernel's reach, in every stride phase.
int64_t window_per_channel(int64_t width, int64_t wq, int64_t kh, int64_t dh, int64_t sh,
                           int64_t phases) {
  const int64_t rows = ceil_div(width, wq) + (kh - 1) * dh / sh + 1;
  return rows * wq * phases;
}

// 2:4 in fp32 (AVX-512) and bf16 (AVX512-BF16) runs the lanes forms (sp24_lanes_avx512.cpp,
// sp24_bf16_avx512.cpp) as an implicit GEMM over the zero-padded NHWC input: output pixels
// are its rows of x, and group g of reduction index (i * kw + j) * C_in + c reads 4 elements
// at one fixed offset from a pixel's receptive field, or, when C_in is not a multiple of 4,
// from two (a group that continues into the next kernel position; LaneRowsOf, spmm.h).
// SPARSEKIT_CPU_CONV=planes keeps the stride-phase plane kernels below, which also run what
// the lanes forms do not (fp16, other N:M, groups over more than two runs). Measured on
// Zen 5 (2 threads), ResNet-18's convolutions against F.conv2d in the same run: fp32 3x3
// 1.11-1.32x at batch 1 and 0.96-1.15x at batch 16 (the plane kernels 0.72-1.05x and
// 0.52-0.81x; F.conv2d runs near the FMA peak there), bf16 1.05-1.35x (planes 0.28-0.41x),
// the 3-channel stem fp32 1.17x at batch 16 and bf16 1.30-2.77x.
// The output's memory layout (as reference.conv2d_output_format and the fake promise):
// channels-last when x is channels-last and not also NCHW-contiguous, else NCHW.
bool channels_last_out(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}
at::MemoryFormat output_format(const at::Tensor& x) {
  return channels_last_out(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

bool conv_lanes() {
  static const bool lanes = [] {
    const char* env = std::getenv("SPARSEKIT_CPU_CONV");
    return env == nullptr || std::strcmp(env, "planes") != 0;
  }();
  return lanes;
}

// Zero columns added on the right of the padded NHWC input for C_in not a multiple of 4: a
// group ending a run reads up to 3 elements past it (masked off, but read).
int64_t lanes_extra_columns(int64_t in_channels) {
  return in_channels % 4 == 0 ? 0 : ceil_div(3, in_channels);
}

// The group offsets of the lanes convolution (spmm.h: LaneRowsOf) over the padded NHWC input
// of width wp: group g's 4 reduction indices k = (i * kw + j) * C_in + c at offset
// (i * dh * wp + j * dw) * C_in + c from a pixel's receptive field (K's padding columns
// continue the last run). Groups whose 4 elements are not one run of x (C_in not a multiple
// of 4) take a second run (goff2, gsplit); false when a group spans more than two (C_in of
// 1 or 2 with dilation).
struct LaneConvTables {
  std::vector<int64_t> goff, goff2;
  std::vector<uint8_t> gsplit;
  bool split = false;
};
bool lane_conv_tables(int64_t groups, int64_t in_channels, int64_t kh, int64_t kw, int64_t dh,
                      int64_t dw, int64_t wp, LaneConvTables& t) {
  const int64_t k = kh * kw * in_channels;
  t.goff.assign(static_cast<size_t>(groups), 0);
  t.goff2.assign(static_cast<size_t>(groups), 0);
  t.gsplit.assign(static_cast<size_t>(groups), 0);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t o[4];
    for (int64_t e = 0; e < 4; ++e) {
      const int64_t kk = 4 * g + e;
      if (kk >= k) {
        o[e] = o[e - 1] + 1;  // (K >= 1, so e >= 1 here)
        continue;
      }
      const int64_t pos = kk / in_channels, c = kk % in_channels, i = pos / kw, j = pos % kw;
      o[e] = (i * dh * wp + j * dw) * in_channels + c;
    }
    int64_t s = 1;
    while (s < 4 && o[s] == o[0] + s) ++s;
    for (int64_t e = s + 1; e < 4; ++e) {
      if (o[e] != o[s] + (e - s)) return false;
    }
    const size_t gi = static_cast<size_t>(g);
    t.goff[gi] = o[0];
    if (s < 4) {
      t.goff2[gi] = o[s] - s;
      t.gsplit[gi] = static_cast<uint8_t>((0xF << s) & 0xF);
      t.split = true;
    }
  }
  return true;
}

at::Tensor conv_lanes_forward(const SpmmKernels& kern, const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& metadata, const std::optional<at::Tensor>& bias,
                              const NMLayout& L, const LaneConvTables& tables, int64_t in_channels,
                              int64_t ph, int64_t pw, int64_t sh, int64_t sw, int64_t out_h,
                              int64_t out_w) {
  const int64_t batch = x.size(0), rows = values.size(0);
  const at::Tensor xn = at::constant_pad_nd(x.permute({0, 2, 3, 1}),
                                            {0, 0, pw, pw + lanes_extra_columns(in_channels), ph, ph})
                            .contiguous();
  const int64_t hp = xn.size(1), wp = xn.size(2);
  const at::Tensor values_c = values.contiguous(), meta_c = metadata.contiguous();
  std::vector<float> bias_buf;
  const float* bias_p = bias_as_float(bias, bias_buf);
  at::Tensor yn = at::empty({batch, out_h, out_w, rows}, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  SpmmArgs a{values_c.const_data_ptr(), bf16 ? ValueType::kBFloat16 : ValueType::kFloat32,
             meta_c.const_data_ptr<uint8_t>(), L, rows, 0, nullptr, nullptr, nullptr, bias_p, 0,
             true, nullptr, 0, bf16 ? nullptr : yn.data_ptr<float>(), rows};
  a.batch = batch * out_h * out_w;
  auto describe = [&](auto& src, const auto* data) {
    src.x = data;
    src.out_h = out_h;
    src.out_w = out_w;
    src.hp = hp;
    src.wp = wp;
    src.channels = in_channels;
    src.sh = sh;
    src.sw = sw;
    src.goff = tables.goff.data();
    if (tables.split) {
      src.goff2 = tables.goff2.data();
      src.gsplit = tables.gsplit.data();
    }
  };
  const int64_t vecs = (rows + 15) / 16;
  if (bf16) {
    LaneRows16 src;
    describe(src, reinterpret_cast<const uint16_t*>(xn.const_data_ptr<at::BFloat16>()));
    a.y16 = reinterpret_cast<uint16_t*>(yn.data_ptr<at::BFloat16>());
    // fp32 sums between K blocks; its pages are only touched when K takes more than one.
    const at::Tensor yf = at::empty({a.batch, rows}, x.options().dtype(at::kFloat));
    float* yfp = yf.data_ptr<float>();
    at::parallel_for(0, vecs, 1, [&](int64_t v0, int64_t v1) {
      kern.forward_2_4_bf16_lanes(a, 16 * v0, std::min(rows, 16 * v1), src, yfp);
    });
  } else {
    LaneRows src;
    describe(src, xn.const_data_ptr<float>());
    at::parallel_for(0, vecs, 1, [&](int64_t v0, int64_t v1) {
      kern.forward_2_4_lanes(a, 16 * v0, std::min(rows, 16 * v1), src);
    });
  }
  const at::Tensor y = yn.permute({0, 3, 1, 2});  // channels-last in memory
  return channels_last_out(x) ? y : y.contiguous();
}

at::Tensor nm_conv2d_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                         const std::optional<at::Tensor>& bias, int64_t in_channels, int64_t kh,
                         int64_t kw, c10::IntArrayRef stride, c10::IntArrayRef padding,
                         c10::IntArrayRef dilation, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(in_channels > 0 && kh > 0 && kw > 0,
                    "in_channels, kh and kw must be positive, got ", in_channels, ", ", kh, ", ", kw);
  const int64_t k = kh * kw * in_channels;
  const NMLayout L = check_compressed(values, metadata, k, n, m);
  const auto [sh, sw] = pair_arg(stride, "stride", 1);
  const auto [ph, pw] = pair_arg(padding, "padding", 0);
  const auto [dh, dw] = pair_arg(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == in_channels, "x must be [batch, ", in_channels,
                    ", H, W], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), "x (", x.scalar_type(),
                   ") must have the dtype of the weight values (", values.scalar_type(), ")");
  TORCH_CHECK_VALUE(x.device() == values.device(), "x must be on ", values.device(), ", got ",
                    x.device());
  const int64_t rows = values.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "bias (", bias->scalar_type(),
                     ") must have the dtype of the weight values (", values.scalar_type(), ")");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == rows, "bias must have shape [", rows,
                      "], got ", bias->sizes());
  }
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3);
  const int64_t hp = height + 2 * ph, wp = width + 2 * pw;
  const int64_t out_h = (hp - dh * (kh - 1) - 1) / sh + 1;
  const int64_t out_w = (wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK_VALUE(hp >= dh * (kh - 1) + 1 && wp >= dw * (kw - 1) + 1 && out_h > 0 && out_w > 0,
                    "x of shape ", x.sizes(), " (padded to ", hp, "x", wp,
                    ") is smaller than the dilated kernel (", dh * (kh - 1) + 1, "x",
                    dw * (kw - 1) + 1, ")");
  const at::ScalarType dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    // e.g. fp64: exact, through the dense weight and torch's convolution.
    const at::Tensor w = decompress_dense(values, metadata, k, n, m)
                             .view({rows, kh, kw, in_channels})
                             .permute({0, 3, 1, 2});
    return at::conv2d(x, w, bias, {sh, sw}, {ph, pw}, {dh, dw}).contiguous(output_format(x));
  }
  if (batch == 0 || rows == 0) {
    return at::empty({batch, rows, out_h, out_w}, x.options().memory_format(output_format(x)));
  }
  const SpmmKernels& skern = spmm_active_kernels();
  const bool lanes_kernel = dtype == at::kFloat ? skern.forward_2_4_lanes != nullptr
                          : dtype == at::kBFloat16 && skern.forward_2_4_bf16_lanes != nullptr;
  LaneConvTables tables;
  if (lanes_kernel && values.scalar_type() == dtype && n == 2 && m == 4 && conv_lanes() &&
      lane_conv_tables(L.groups, in_channels, kh, kw, dh, dw,
                       wp + lanes_extra_columns(in_channels), tables)) {
    return conv_lanes_forward(skern, x, values, metadata, bias, L, tables, in_channels, ph, pw,
                              sh, sw, out_h, out_w);
  }
  at::Tensor y = at::empty({batch, rows, out_h, out_w}, x.options().dtype(at::kFloat));

  // Stride-phase planes xq[phase][c][b][hq][wq], zero-padded (conv.h).
  const int64_t phases = sh * sw, hq = ceil_div(hp, sh), wq = ceil_div(wp, sw), plane = hq * wq;
  const ConvKernels& kern = active_conv_kernels();
  const int64_t lanes = kern.lanes, max_width = kern.max_regs * lanes;
  const int64_t planes_floats = phases * in_channels * batch * plane;
  at::Tensor xq = at::zeros({planes_floats + plane + max_width + lanes}, x.options().dtype(at::kFloat));
  const at::Tensor xc = x.permute({1, 0, 2, 3});  // [C, B, H, W] view, any memory format
  for (int64_t a = 0; a < sh; ++a) {
    for (int64_t b = 0; b < sw; ++b) {
      // Padded row a + sh * i holds input row a + sh * i - ph.
      const int64_t i0 = ph > a ? ceil_div(ph - a, sh) : 0;
      const int64_t i1 = height - 1 + ph - a >= 0 ? (height - 1 + ph - a) / sh + 1 : 0;
      const int64_t j0 = pw > b ? ceil_div(pw - b, sw) : 0;
      const int64_t j1 = width - 1 + pw - b >= 0 ? (width - 1 + pw - b) / sw + 1 : 0;
      if (i1 <= i0 || j1 <= j0) continue;
      const int64_t r0 = a + sh * i0 - ph, c0 = b + sw * j0 - pw;
      xq.narrow(0, (a * sw + b) * in_channels * batch * plane, in_channels * batch * plane)
          .view({in_channels, batch, hq, wq})
          .narrow(2, i0, i1 - i0)
          .narrow(3, j0, j1 - j0)
          .copy_(xc.slice(2, r0, r0 + (i1 - i0 - 1) * sh + 1, sh)
                     .slice(3, c0, c0 + (j1 - j0 - 1) * sw + 1, sw));
    }
  }

  // Offset of every reduction index k = (i * kw + j) * C_in + c; K's padding reads offset 0
  // (its values are 0).
  const int64_t kp = L.groups * L.m;
  std::vector<int64_t> koff(static_cast<size_t>(kp), 0);
  for (int64_t kk = 0; kk < k; ++kk) {
    const int64_t pos = kk / in_channels, c = kk % in_channels;
    const int64_t di = (pos / kw) * dh, dj = (pos % kw) * dw;
    const int64_t phase = (di % sh) * sw + dj % sw;
    koff[kk] = ((phase * in_channels + c) * batch) * plane + (di / sh) * wq + dj / sw;
  }

  // Tiles of output pixels q = (b * hq + oh) * wq + ow. Images at least a tile wide are
  // tiled each on its own (no work on the rows past out_h); smaller ones run as one range
  // across the batch, so a tile still holds enough pixels.
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const int64_t image_len = out_h * wq;
  if (image_len >= max_width) {
    for (int64_t b = 0; b < batch; ++b) ranges.emplace_back(b * plane, b * plane + image_len);
  } else {
    ranges.emplace_back(0, (batch - 1) * plane + image_len);
  }
  // Equal tiles per range, as wide as the registers allow.
  const int64_t len0 = ranges[0].second - ranges[0].first;
  const int64_t per_range = ceil_div(len0, max_width);
  const int64_t nb = ceil_div(ceil_div(len0, per_range), lanes);
  const int64_t tile_w = nb * lanes;
  std::vector<int64_t> tiles;
  for (const auto& [q0, q1] : ranges)
    for (int64_t q = q0; q < q1; q += tile_w) tiles.push_back(q);

  // Channel blocks whose input window (all phases, tile rows plus the kernel's reach) is
  // about window_floats(), in whole groups; one block when groups cross kernel
  // positions (C_in not a multiple of M, e.g. the 3-channel stem).
  std::vector<int64_t> seg, seg_begin{0};
  if (in_channels % m == 0) {
    const int64_t per_channel = window_per_channel(tile_w, wq, kh, dh, sh, std::min(phases, kh * kw));
    const int64_t cb = std::clamp<int64_t>((window_floats() / per_channel) / m * m, m, in_channels);
    for (int64_t c0 = 0; c0 < in_channels; c0 += cb) {
      const int64_t c1 = std::min(c0 + cb, in_channels);
      for (int64_t pos = 0; pos < kh * kw; ++pos) {
        seg.push_back((pos * in_channels + c0) / m);
        seg.push_back((pos * in_channels + c1) / m);
      }
      seg_begin.push_back(static_cast<int64_t>(seg.size() / 2));
    }
  } else {
    seg = {0, L.groups};
    seg_begin.push_back(1);
  }

  // fp16 values widen once (the kernels read fp32 or bf16 in place).
  const at::Tensor values_k = (dtype == at::kHalf ? values.to(at::kFloat) : values).contiguous();
  const at::Tensor meta_c = metadata.contiguous();
  std::vector<float> bias_buf;
  const float* bias_p = bias_as_float(bias, bias_buf);
  ConvArgs args{values_k.const_data_ptr(),
                values_k.scalar_type() == at::kBFloat16 ? ValueType::kBFloat16 : ValueType::kFloat32,
                meta_c.const_data_ptr<uint8_t>(),
                L,
                koff.data(),
                xq.const_data_ptr<float>(),
                bias_p,
                seg.data(),
                seg_begin.data(),
                static_cast<int64_t>(seg_begin.size()) - 1,
                in_channels % m == 0 ? batch * plane : 0};
  const ConvKernel fn = kern.forward[nb - 1];

  // Work units: tiles x blocks of output channels; enough units for every thread even
  // when the whole batch is one tile (small late layers at batch 1).
  const int64_t threads = at::get_num_threads();
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  const int64_t row_blocks = std::min(ceil_div(rows, 8), std::max<int64_t>(1, ceil_div(4 * threads, ntiles)));
  const int64_t rows_per_block = ceil_div(rows, row_blocks);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, ntiles * row_blocks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> yt(static_cast<size_t>(rows_per_block * tile_w));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t q0 = tiles[u / row_blocks];
      const int64_t r0 = (u % row_blocks) * rows_per_block;
      const int64_t r1 = std::min(rows, r0 + rows_per_block);
      if (r0 >= r1) continue;
      fn(args, q0, r0, r1, yt.data());
      // Scatter the tile's valid pixels, one output row segment at a time.
      for (int64_t q = q0; q < q0 + tile_w;) {
        const int64_t b = q / plane, rem = q % plane, oh = rem / wq, ow = rem % wq;
        const int64_t run = std::min(wq - ow, q0 + tile_w - q);
        if (b < batch && oh < out_h && ow < out_w) {
          const int64_t len = std::min(run, out_w - ow);
          for (int64_t r = r0; r < r1; ++r) {
            std::memcpy(yp + ((b * rows + r) * out_h + oh) * out_w + ow,
                        yt.data() + (r - r0) * tile_w + (q - q0), sizeof(float) * len);
          }
        }
        q += run;
      }
    }
  });
  return (dtype == at::kFloat ? y : y.to(dtype)).contiguous(output_format(x));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, lib) { lib.impl("nm_conv2d", &nm_conv2d_cpu); }

}  // namespace sparsekit
