// Op schemas of the sparsekit namespace (the one place they are declared) and a small
// pybind11 module reporting how this extension was built. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL).
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "sp24_layout.h"

#ifndef SPARSEKIT_TORCH_VERSION
#error "setup.py defines SPARSEKIT_TORCH_VERSION (the torch this extension is built against)"
#endif
#ifndef SPARSEKIT_CUDA_VERSION
#define SPARSEKIT_CUDA_VERSION ""
#endif
#ifndef SPARSEKIT_CUDA_ARCH_LIST
#define SPARSEKIT_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(sparsekit, lib) {
  // Boolean N:M mask along the last dim of a 2-D score matrix: the n largest of every m
  // (of |scores| when absolute, which saves magnitude pruning a pass over the weight).
  lib.def("nm_mask(Tensor scores, int n, int m, bool absolute=False) -> Tensor");
  // Dense 2-D N:M matrix -> (values, metadata) in the canonical format (DESIGN.md).
  lib.def("nm_compress(Tensor w, int n, int m) -> (Tensor, Tensor)");
  // (values, metadata) -> dense [rows, k].
  lib.def("nm_decompress(Tensor values, Tensor metadata, int k, int n, int m) -> Tensor");
  // y = x @ W^T (+ bias), W = (values, metadata) [rows, k]; x [..., k] -> y [..., rows].
  lib.def(
      "nm_linear(Tensor x, Tensor values, Tensor metadata, Tensor? bias, int k, int n, int m) "
      "-> Tensor");
  // grad_x = grad_out @ W: grad_out [..., rows] -> [..., k].
  lib.def(
      "nm_linear_grad_input(Tensor grad_out, Tensor values, Tensor metadata, int k, int n, "
      "int m) -> Tensor");
  // Gradient of the kept values: (grad_out^T @ x) at W's kept positions, values layout.
  lib.def("nm_sddmm(Tensor grad_out, Tensor x, Tensor metadata, int k, int n, int m) -> Tensor");
  // 2-D convolution (groups=1) of x [B, in_channels, H, W] (NCHW or channels_last) with the
  // weight (values, metadata) [out, kh * kw * in_channels] (the conv weight permuted to
  // [out, kh, kw, in_channels], DESIGN.md), computed from x directly (implicit GEMM, no
  // im2col buffer) -> [B, out, H_out, W_out] contiguous.
  lib.def(
      "nm_conv2d(Tensor x, Tensor values, Tensor metadata, Tensor? bias, int in_channels, "
      "int kh, int kw, int[2] stride, int[2] padding, int[2] dilation, int n, int m) -> Tensor");
  // y = x @ (weight * mask)^T (+ bias) with a dense weight [rows, k] and its mask given as
  // packed bits (n = m = 0: uint8 [rows, ceil(k/8)], column c at bit c % 8 of byte c // 8)
  // or as canonical N:M metadata; pruned entries select 0. Triton on CUDA (kernels/).
  lib.def(
      "masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias, int n=0, int m=0) "
      "-> Tensor");
  // grad_x = grad_out @ (weight * mask): grad_out [..., rows] -> [..., k].
  lib.def(
      "masked_linear_grad_input(Tensor grad_out, Tensor weight, Tensor mask, int n=0, "
      "int m=0) -> Tensor");
  // grad_W = (grad_out^T @ x) * mask: [rows, k], exactly 0 wherever the mask prunes.
  lib.def(
      "masked_linear_grad_weight(Tensor grad_out, Tensor x, Tensor mask, int n=0, int m=0) "
      "-> Tensor");
  // Unstructured sparsity in the bitmask format (csrc/cpu/bitmask.h, sparsekit/bitmask.py):
  // values [nnz] (kept entries, row-major), mask int16 [rows, ceil(k/16)] (bit j of chunk c
  // = column 16c + j kept), offsets int64 [rows + 1] (row r's values start).
  lib.def("bitmask_compress(Tensor w) -> (Tensor, Tensor, Tensor)");
  lib.def("bitmask_decompress(Tensor values, Tensor mask, Tensor offsets, int k) -> Tensor");
  lib.def("bitmask_decompress_into(Tensor values, Tensor mask, Tensor offsets, int k, "
          "Tensor(a!) out) -> ()");
  lib.def(
      "bitmask_linear(Tensor x, Tensor values, Tensor mask, Tensor offsets, Tensor? bias, int k) "
      "-> Tensor");
  lib.def(
      "bitmask_linear_grad_input(Tensor grad_out, Tensor values, Tensor mask, Tensor offsets, "
      "int k) -> Tensor");
  // Gradient of the kept values: (grad_out^T @ x) at the kept positions, [nnz].
  lib.def("bitmask_sddmm(Tensor grad_out, Tensor x, Tensor mask, Tensor offsets, int k) -> Tensor");
  // Internal (no reference; present only in a compiled build): the 2:4 sparse tensor-core
  // path. sp24_pack derives the mma.sp layout (csrc/sp24_layout.h) from the canonical pair;
  // sp24_linear multiplies on it (CUDA); sp24_emulate_linear replays the MMA fragment rules
  // on the CPU in float64, to check the layout without a GPU (staged: through the large-batch
  // kernel's shared-memory staging and ldmatrix, else the small-batch kernel's loads).
  // (values, metadata) -> dense [rows, k] written into `out` (contiguous, values' dtype):
  // the dense path of the layers' kernel choice reuses one scratch buffer with it.
  lib.def(
      "nm_decompress_into(Tensor values, Tensor metadata, int k, int n, int m, Tensor(a!) out) "
      "-> ()");
  lib.def("sp24_pack(Tensor values, Tensor metadata, int k) -> (Tensor, Tensor)");
  lib.def(
      "sp24_linear(Tensor x, Tensor packed_values, Tensor packed_meta, Tensor? bias, int rows, "
      "int k) -> Tensor");
  lib.def(
      "sp24_emulate_linear(Tensor x, Tensor packed_values, Tensor packed_meta, Tensor? bias, "
      "int rows, int k, bool staged=False) -> Tensor");
}

namespace sparsekit {
std::string spmm_active_isa();
bool spmm_set_isa(const std::string& isa);
std::vector<std::string> spmm_compiled_isas();
std::string bitmask_active_isa();
bool bitmask_set_isa(const std::string& isa);
#ifdef SPARSEKIT_WITH_CUDA
const char* sp24_mma_instruction();  // csrc/cuda/sp24_linear.cu
#endif
}  // namespace sparsekit

namespace {

py::list cpu_isa_available() {
  py::list out;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.append("avx2");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    out.append("avx512");
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi")) {
      out.append("avx512bf16");
    }
  }
  return out;
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = SPARSEKIT_TORCH_VERSION;
#ifdef SPARSEKIT_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = SPARSEKIT_CUDA_VERSION;
  info["cuda_arch_list"] = SPARSEKIT_CUDA_ARCH_LIST;
  info["sp24_mma"] = sparsekit::sp24_mma_instruction();
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_arch_list"] = py::none();
  info["sp24_mma"] = py::none();
#endif
  info["sp24_small_max_batch"] = sparsekit::sp24::kSmallMaxBatch;
  // CPU product kernels compiled into this build, and the one that runs.
  info["cpu_isa_compiled"] = sparsekit::spmm_compiled_isas();
  info["cpu_isa_active"] = sparsekit::spmm_active_isa();
  info["cpu_isa_available"] = cpu_isa_available();
  // The bitmask (unstructured) kernels: "avx512bf16", "avx512" (both need VBMI2) or
  // "scalar" (portable).
  info["cpu_bitmask_isa_active"] = sparsekit::bitmask_active_isa();
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekit compiled kernels; the ops live under torch.ops.sparsekit";
  m.def("build_info", &build_info, "How this extension was built (versions, kernels, ISAs).");
  m.def("sp24_tiled_stages", &sparsekit::sp24::tiled::stages_for_smem,
        "cp.async pipeline depth of the tiled 2:4 CUDA kernel on a GPU that allows this many "
        "bytes of shared memory per block (0: the tiled kernel does not fit).");
  m.def(
      "set_cpu_isa",
      [](const std::string& isa) {
        if (!sparsekit::spmm_set_isa(isa)) return false;
        // The bitmask kernels follow, to the best variant they have at or below `isa`
        // (theirs need VBMI2 beside AVX-512; "avx2" is portable there).
        if (!sparsekit::bitmask_set_isa(isa) &&
            !(isa == "avx512bf16" && sparsekit::bitmask_set_isa("avx512"))) {
          sparsekit::bitmask_set_isa("scalar");
        }
        return true;
      },
      "Forces the CPU product kernels to one ISA ('avx512bf16', 'avx512', 'avx2', 'scalar'); returns "
      "False (and changes nothing) if this CPU or build lacks it.");
}
