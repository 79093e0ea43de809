// CPU ops of the bitmask format (csrc/cpu/bitmask.h): compress / decompress, the product
// y = x @ W^T (+ b), its input gradient gx = gy @ W and the values' gradient bitmask_sddmm.
//
// Every op checks the compressed triple before a kernel reads it: offsets must start at 0,
// never decrease and end at values.numel(), and each row's mask must hold exactly its
// offsets' count of bits, none past k. The per-row check runs block by block just before
// the kernel streams the same rows (the mask words are then in L1), so a corrupt triple
// raises a ValueError and no kernel ever reads outside values.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "../checks.h"
#include "bitmask.h"

namespace sparsekit {

namespace {

bool avx512_supported() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512vpopcntdq") &&
         __builtin_cpu_supports("popcnt") &&
         __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

bool avx512bf16_supported() {
#if defined(__x86_64__)
  return avx512_supported() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

std::atomic<const BitmaskKernels*> g_bitmask{nullptr};

// The kernels named `isa` ("avx512bf16", "avx512", or "scalar": the portable ones), or
// null when this CPU (or build) lacks them.
const BitmaskKernels* variant(const std::string& isa) {
#if defined(__x86_64__)
  if (isa == "avx512bf16") return avx512bf16_supported() ? &bitmask_kernels_avx512bf16() : nullptr;
  if (isa == "avx512") return avx512_supported() ? &bitmask_kernels_avx512() : nullptr;
#endif
  return isa == "scalar" ? &bitmask_kernels_scalar() : nullptr;
}

const BitmaskKernels& kernels() {
  const BitmaskKernels* k = g_bitmask.load();
  if (k == nullptr) {
    for (const char* isa : {"avx512bf16", "avx512", "scalar"}) {
      if ((k = variant(isa)) != nullptr) break;
    }
    g_bitmask.store(k);
  }
  return *k;
}

constexpr int64_t kCheckBlock = 16;  // rows checked just before a kernel streams them

struct Layout {
  int64_t rows, k, chunks;
  uint16_t tail;
};

// Shapes, dtypes, devices and offsets (O(rows)); the per-row bit counts are checked by
// check_rows, fused with the kernels.
Layout check_triple(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets,
                    int64_t k) {
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(values.dim() == 1, "values must be 1-D [nnz], got ", values.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()) && values.element_size() >= 2,
                   "values must be float32, float16, bfloat16 or float64, got ", values.scalar_type());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kShort, "mask must be int16 (16-bit chunks), got ",
                   mask.scalar_type());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ",
                   offsets.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2, "mask must be 2-D [rows, ceil(k/16)], got ", mask.dim(), "-D");
  const int64_t rows = mask.size(0), chunks = bitmask_chunks(k);
  TORCH_CHECK_VALUE(mask.size(1) == chunks, "mask must have shape [", rows, ", ", chunks,
                    "] for k=", k, ", got ", mask.sizes());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == rows + 1, "offsets must have shape [",
                    rows + 1, "] (rows + 1), got ", offsets.sizes());
  TORCH_CHECK_VALUE(values.device() == mask.device() && values.device() == offsets.device(),
                    "values, mask and offsets must be on one device, got ", values.device(), ", ",
                    mask.device(), " and ", offsets.device());
  const at::Tensor off = offsets.contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0, "offsets must start at 0, got ", o[0]);
  TORCH_CHECK_VALUE(o[rows] == values.numel(), "offsets must end at values.numel() = ",
                    values.numel(), ", got ", o[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(o[r + 1] >= o[r], "offsets must not decrease: row ", r, " spans [", o[r],
                      ", ", o[r + 1], ")");
  }
  return Layout{rows, k, chunks, bitmask_tail_bits(k)};
}

[[noreturn]] void raise_bad_row(const Layout& L, const uint16_t* mask, const int64_t* off, int64_t r) {
  const uint16_t* row = mask + r * L.chunks;
  const int64_t bits = bitmask_row_bits(row, L.chunks, bitmask_popcount64);
  const bool past_k = L.chunks > 0 && (row[L.chunks - 1] & ~L.tail) != 0;
  TORCH_CHECK_VALUE(false, "mask and offsets disagree at row ", r, ": the mask holds ", bits,
                    " bits", past_k ? " (some past k)" : "", ", offsets give ",
                    off[r + 1] - off[r], " values");
  __builtin_unreachable();
}

// Raises for the first inconsistent row of [r0, r1).
void check_rows(const BitmaskKernels& kern, const Layout& L, const BitmaskArgs& a, int64_t r0,
                int64_t r1) {
  const int64_t bad = kern.first_bad_row(a, r0, r1, L.tail);
  if (bad >= 0) raise_bad_row(L, a.mask, a.offsets, bad);
}

void check_all_rows(const Layout& L, const at::Tensor& mask, const at::Tensor& offsets) {
  BitmaskArgs a{};
  a.mask = reinterpret_cast<const uint16_t*>(mask.const_data_ptr<int16_t>());
  a.offsets = offsets.const_data_ptr<int64_t>();
  a.chunks = L.chunks;
  const BitmaskKernels& kern = kernels();
  at::parallel_for(0, L.rows, 256, [&](int64_t r0, int64_t r1) { check_rows(kern, L, a, r0, r1); });
}

// Runs `kernel` over all rows on torch's pool, checking each block of rows first.
void run_rows(const Layout& L, BitmaskArgs a, BitmaskKernel kernel, bool scratch) {
  const BitmaskKernels& kern = kernels();
  at::parallel_for(0, L.rows, kCheckBlock, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(scratch ? bitmask_scratch_floats(L.chunks) : 0);
    for (int64_t b0 = r0; b0 < r1; b0 += kCheckBlock) {
      const int64_t b1 = std::min(b0 + kCheckBlock, r1);
      check_rows(kern, L, a, b0, b1);
      kernel(a, b0, b1, buf.data());
    }
  });
}

// Kept = numerically nonzero (-0.0 is pruned too): the raw bits without the sign.
template <typename T>
inline bool kept_bits(T bits) {
  return (bits & ~(T(1) << (8 * sizeof(T) - 1))) != 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bitmask_compress_cpu(const at::Tensor& w) {
  check_float_matrix(w, "w");
  const at::Tensor wc = w.contiguous();
  const int64_t rows = wc.size(0), k = wc.size(1), chunks = bitmask_chunks(k);
  const at::Tensor nan = at::isnan(wc);
  if (nan.any().item<bool>()) {
    const at::Tensor where = nan.nonzero()[0];
    TORCH_CHECK_VALUE(false, "w contains NaN (first at row ", where[0].item<int64_t>(), ", column ",
                      where[1].item<int64_t>(), "); a NaN weight cannot be compressed");
  }
  at::Tensor mask = at::empty({rows, chunks}, wc.options().dtype(at::kShort));
  at::Tensor offsets = at::empty({rows + 1}, wc.options().dtype(at::kLong));
  uint16_t* mk = reinterpret_cast<uint16_t*>(mask.data_ptr<int16_t>());
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  at::Tensor values;
  dispatch_bits(wc, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(wc.const_data_ptr());
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t count = 0;
        for (int64_t c = 0; c < chunks; ++c) {
          uint32_t word = 0;
          const int64_t hi = std::min<int64_t>(kChunk, k - c * kChunk);
          for (int64_t j = 0; j < hi; ++j) word |= static_cast<uint32_t>(kept_bits(src[r * k + c * kChunk + j])) << j;
          mk[r * chunks + c] = static_cast<uint16_t>(word);
          count += bitmask_popcount64(word);
        }
        off[r + 1] = count;
      }
    });
    for (int64_t r = 0; r < rows; ++r) off[r + 1] += off[r];
    values = at::empty({off[rows]}, wc.options());
    T* dst = static_cast<T*>(values.data_ptr());
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t p = off[r];
        for (int64_t j = 0; j < k; ++j) {
          const T bits = src[r * k + j];
          if (kept_bits(bits)) dst[p++] = bits;
        }
      }
    });
  });
  return {values, mask, offsets};
}

BitmaskArgs make_args(const Layout& L, const at::Tensor& kv, const at::Tensor& mask,
                      const at::Tensor& offsets);

// Writes the dense [rows, k] matrix into `dense` (contiguous, the values' dtype; checked
// by the callers), checking every row.
void decompress_into(const Layout& L, const at::Tensor& values, const at::Tensor& mask,
                     const at::Tensor& offsets, int64_t k, at::Tensor& dense) {
  const at::Tensor vc = values.contiguous(), mc = mask.contiguous(), oc = offsets.contiguous();
  const BitmaskArgs a = make_args(L, vc, mc, oc);
  const BitmaskKernels& kern = kernels();
  void* dst = dense.data_ptr();
  const int elem = static_cast<int>(values.element_size());
  // Each block of rows is checked just before it is decompressed (its mask then in L1).
  at::parallel_for(0, L.rows, kCheckBlock, [&](int64_t r0, int64_t r1) {
    for (int64_t b0 = r0; b0 < r1; b0 += kCheckBlock) {
      const int64_t b1 = std::min(b0 + kCheckBlock, r1);
      check_rows(kern, L, a, b0, b1);
      kern.decompress(a, b0, b1, dst, k, elem);
    }
  });
}

at::Tensor decompress(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets,
                      int64_t k) {
  const Layout L = check_triple(values, mask, offsets, k);
  at::Tensor dense = at::empty({L.rows, k}, values.options());
  decompress_into(L, values, mask, offsets, k, dense);
  return dense;
}

at::Tensor bitmask_decompress_cpu(const at::Tensor& values, const at::Tensor& mask,
                                  const at::Tensor& offsets, int64_t k) {
  return decompress(values, mask, offsets, k);
}

// Into a caller's buffer: an unstructured layer's dense path reuses one scratch buffer
// instead of allocating (and page-faulting) a fresh dense weight on every call.
void bitmask_decompress_into_cpu(const at::Tensor& values, const at::Tensor& mask,
                                 const at::Tensor& offsets, int64_t k, at::Tensor out) {
  const Layout L = check_triple(values, mask, offsets, k);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == L.rows && out.size(1) == k,
                    "out must have shape [", L.rows, ", ", k, "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == values.scalar_type(), "out must have the values' dtype ",
                   values.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == values.device() && out.is_contiguous(),
                    "out must be a contiguous tensor on ", values.device());
  decompress_into(L, values, mask, offsets, k, out);
}

void check_operand(const at::Tensor& t, const char* name, int64_t last, const char* what,
                   const at::Tensor& values) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == last, name, " must have ", what, " = ", last,
                    " in its last dim, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == values.scalar_type(), name, " (", t.scalar_type(),
                   ") must have the dtype of the weight values (", values.scalar_type(), ")");
  TORCH_CHECK_VALUE(t.device() == values.device(), name, " must be on ", values.device(), ", got ",
                    t.device());
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

bool has_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The values as the kernels read them: fp32 or bf16 (fp16 is widened to fp32 once).
at::Tensor kernel_values(const at::Tensor& values) {
  return values.scalar_type() == at::kBFloat16 ? values.contiguous() : values.to(at::kFloat).contiguous();
}

BitmaskArgs make_args(const Layout& L, const at::Tensor& kv, const at::Tensor& mask,
                      const at::Tensor& offsets) {
  BitmaskArgs a{};
  a.values = kv.const_data_ptr();
  a.bf16 = kv.scalar_type() == at::kBFloat16;
  a.mask = reinterpret_cast<const uint16_t*>(mask.const_data_ptr<int16_t>());
  a.offsets = offsets.const_data_ptr<int64_t>();
  a.rows = L.rows;
  a.chunks = L.chunks;
  return a;
}

constexpr int64_t kBatchTile = 512;  // rows of the batch transposed at a time

// fp32 [kp, ld] with t[:n, :tb] = src[b0 : b0 + tb, :n]^T and zeros elsewhere.
at::Tensor transpose_tile(const at::Tensor& src2, int64_t b0, int64_t tb, int64_t kp, int64_t ld) {
  at::Tensor t = at::zeros({kp, ld}, src2.options().dtype(at::kFloat));
  t.narrow(0, 0, src2.size(1)).narrow(1, 0, tb).copy_(src2.narrow(0, b0, tb).t());
  return t;
}

int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

at::Tensor bitmask_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                              const at::Tensor& offsets, const std::optional<at::Tensor>& bias,
                              int64_t k) {
  const Layout L = check_triple(values, mask, offsets, k);
  check_operand(x, "x", k, "k", values);
  if (bias.has_value()) {
    check_operand(*bias, "bias", L.rows, "the weight's rows", values);
    TORCH_CHECK_VALUE(bias->dim() == 1, "bias must have shape [", L.rows, "], got ", bias->sizes());
  }
  if (!has_kernel_dtype(values.scalar_type())) {  // fp64: exact, via the dense weight
    return at::linear(x, decompress(values, mask, offsets, k), bias);
  }
  const int64_t batch = x.numel() / std::max<int64_t>(k, 1);
  const at::Tensor x2 = x.reshape({batch, k});
  at::Tensor y = at::empty({batch, L.rows}, x.options().dtype(at::kFloat));
  const at::Tensor kv = kernel_values(values), mc = mask.contiguous(), oc = offsets.contiguous();
  at::Tensor bias32;
  BitmaskArgs a = make_args(L, kv, mc, oc);
  if (bias.has_value()) {
    bias32 = bias->to(at::kFloat).contiguous();
    a.bias = bias32.const_data_ptr<float>();
  }
  const BitmaskKernels& kern = kernels();
  const int64_t kp = L.chunks * kChunk;
  if (batch == 0 || L.rows == 0) {
    // nothing to stream (still validated above)
  } else if (batch <= kBitmaskSmallBatch) {
    // x row-major, padded with zeros to whole 64-column blocks, as the kernel reads it: bf16
    // for kernels with bf16 dot products and bf16 values, else fp32.
    const bool x16 = kern.bf16_x && a.bf16;
    const at::ScalarType xt = x16 ? at::kBFloat16 : at::kFloat;
    const int64_t kpad = bitmask_padded_k(L.chunks);
    at::Tensor xp;
    if (x2.scalar_type() == xt && kpad == k && x2.is_contiguous()) {
      xp = x2;
    } else {
      xp = at::zeros({batch, kpad}, x2.options().dtype(xt));
      xp.narrow(1, 0, k).copy_(x2);
    }
    a.batch = batch;
    if (x16) {
      a.x16 = reinterpret_cast<const uint16_t*>(xp.const_data_ptr<at::BFloat16>());
    } else {
      a.x = xp.const_data_ptr<float>();
    }
    a.ldx = kpad;
    a.y = y.data_ptr<float>();
    a.ldy = L.rows;
    run_rows(L, a, kern.forward_small, false);
  } else {
    for (int64_t b0 = 0; b0 < batch; b0 += kBatchTile) {
      const int64_t tb = std::min(kBatchTile, batch - b0), ld = round16(tb);
      const at::Tensor xT = transpose_tile(x2, b0, tb, kp, ld);
      at::Tensor yT = at::empty({L.rows, ld}, y.options());
      a.ld = ld;
      a.xT = xT.const_data_ptr<float>();
      a.out = yT.data_ptr<float>();
      run_rows(L, a, kern.forward, true);
      y.narrow(0, b0, tb).copy_(yT.narrow(1, 0, tb).t());
    }
  }
  return y.to(x.scalar_type()).view(with_last(x, L.rows));
}

at::Tensor bitmask_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                         const at::Tensor& mask, const at::Tensor& offsets,
                                         int64_t k) {
  const Layout L = check_triple(values, mask, offsets, k);
  check_operand(grad_out, "grad_out", L.rows, "the weight's rows", values);
  if (!has_kernel_dtype(values.scalar_type())) {
    return at::matmul(grad_out, decompress(values, mask, offsets, k));
  }
  const int64_t batch = grad_out.numel() / std::max<int64_t>(L.rows, 1);
  const at::Tensor gy2 = grad_out.reshape({batch, L.rows});
  at::Tensor gx = at::zeros({batch, k}, grad_out.options().dtype(at::kFloat));
  const at::Tensor kv = kernel_values(values), mc = mask.contiguous(), oc = offsets.contiguous();
  BitmaskArgs a = make_args(L, kv, mc, oc);
  const BitmaskKernels& kern = kernels();
  const int64_t kp = L.chunks * kChunk;
  // Rows scatter into all of gx: each thread accumulates its rows into a private gxT.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), L.rows));
  for (int64_t b0 = 0; b0 < batch && L.rows > 0; b0 += kBatchTile) {
    const int64_t tb = std::min(kBatchTile, batch - b0), ld = round16(tb);
    const at::Tensor gyT = transpose_tile(gy2, b0, tb, L.rows, ld);
    at::Tensor parts = at::zeros({threads, kp, ld}, gx.options());
    a.ld = ld;
    a.gyT = gyT.const_data_ptr<float>();
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(bitmask_scratch_floats(L.chunks));
      for (int64_t t = t0; t < t1; ++t) {
        BitmaskArgs at = a;
        at.out = parts.data_ptr<float>() + t * kp * ld;
        const int64_t r0 = L.rows * t / threads, r1 = L.rows * (t + 1) / threads;
        for (int64_t b = r0; b < r1; b += kCheckBlock) {
          const int64_t e = std::min(b + kCheckBlock, r1);
          check_rows(kern, L, at, b, e);
          kern.grad_input(at, b, e, buf.data());
        }
      }
    });
    gx.narrow(0, b0, tb).copy_(parts.sum(0).narrow(0, 0, k).narrow(1, 0, tb).t());
  }
  return gx.to(grad_out.scalar_type()).view(with_last(grad_out, k));
}

at::Tensor bitmask_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask,
                             const at::Tensor& offsets, int64_t k) {
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out (", grad_out.scalar_type(),
                   ") and x (", x.scalar_type(), ") must have one dtype");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be floating, got ", x.scalar_type());
  // The values' count is offsets[-1]: a stand-in values tensor of that size lets
  // check_triple validate mask and offsets.
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1, "offsets must be 1-D [rows + 1], got ",
                    offsets.sizes());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  const int64_t nnz = offsets.contiguous()[-1].item<int64_t>();
  TORCH_CHECK_VALUE(nnz >= 0, "offsets must end at the count of kept values (>= 0), got ", nnz);
  const at::Tensor shape_only = at::empty({nnz}, x.options());
  const Layout L = check_triple(shape_only, mask, offsets, k);
  check_operand(x, "x", k, "k", shape_only);
  check_operand(grad_out, "grad_out", L.rows, "the weight's rows", shape_only);
  const int64_t batch = x.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK_VALUE(grad_out.numel() == batch * L.rows, "grad_out and x must hold the same batch: ",
                    grad_out.sizes(), " vs ", x.sizes());
  const at::Tensor mc = mask.contiguous(), oc = offsets.contiguous();
  if (!has_kernel_dtype(x.scalar_type())) {  // fp64: dense product, then the kept entries
    check_all_rows(L, mc, oc);
    const at::Tensor dense = at::matmul(grad_out.reshape({batch, L.rows}).t(), x.reshape({batch, k}));
    const at::Tensor kept = decompress(at::ones({nnz}, x.options()), mc, oc, k);
    return dense.masked_select(kept.ne(0));
  }
  at::Tensor gv = at::zeros({nnz}, x.options().dtype(at::kFloat));
  const at::Tensor x2 = x.reshape({batch, k}), gy2 = grad_out.reshape({batch, L.rows});
  const at::Tensor kv = at::empty({0}, x.options().dtype(at::kFloat));
  BitmaskArgs a = make_args(L, kv, mc, oc);
  a.values = nullptr;
  const BitmaskKernels& kern = kernels();
  const int64_t kp = L.chunks * kChunk;
  for (int64_t b0 = 0; b0 < batch && L.rows > 0; b0 += kBatchTile) {
    const int64_t tb = std::min(kBatchTile, batch - b0), ld = round16(tb);
    const at::Tensor xT = transpose_tile(x2, b0, tb, kp, ld);
    const at::Tensor gyT = transpose_tile(gy2, b0, tb, L.rows, ld);
    a.ld = ld;
    a.xT = xT.const_data_ptr<float>();
    a.gyT = gyT.const_data_ptr<float>();
    a.out = gv.data_ptr<float>();
    a.first = b0 == 0;
    run_rows(L, a, kern.sddmm, true);
  }
  if (batch == 0) check_all_rows(L, mc, oc);
  return gv.to(x.scalar_type());
}

}  // namespace

// The ISA of the bitmask kernels ("avx512bf16", "avx512" or "scalar", the portable ones),
// and a way to force one: sparsekit.cpp's set_cpu_isa calls this beside the N:M kernels'.
std::string bitmask_active_isa() { return kernels().isa; }

bool bitmask_set_isa(const std::string& isa) {
  // No AVX2 variant: "avx2" means the portable kernels.
  const BitmaskKernels* k = variant(isa == "avx2" ? "scalar" : isa);
  if (k == nullptr) return false;
  g_bitmask.store(k);
  return true;
}

TORCH_LIBRARY_IMPL(sparsekit, CPU, lib) {
  lib.impl("bitmask_compress", &bitmask_compress_cpu);
  lib.impl("bitmask_decompress", &bitmask_decompress_cpu);
  lib.impl("bitmask_decompress_into", &bitmask_decompress_into_cpu);
  lib.impl("bitmask_linear", &bitmask_linear_cpu);
  lib.impl("bitmask_linear_grad_input", &bitmask_linear_grad_input_cpu);
  lib.impl("bitmask_sddmm", &bitmask_sddmm_cpu);
}

}  // namespace sparsekit
