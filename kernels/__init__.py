"""Triton kernels of sparsekit, installed as the package `sparsekit.kernels`.

One file per op, its launchers and autograd beside the kernel:
  nm_gemm       y = x @ W^T (+ bias) on the compressed N:M weight (values + metadata), its
                grad input and the gradient of the kept values (SDDMM); the GPU path of
                SparseLinear wherever the CUDA extension does not cover a call.
  masked_gemm   y = x @ (W * mask)^T (+ bias) with the mask packed as bits or given as N:M
                metadata, fused (the masked weight is never written); pruned weights get
                exactly zero gradient. The GPU path of sparsekit.prune's masks.
Needs triton; the kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1
was set before triton was imported (how the tests run them without a GPU).
"""

from . import masked_gemm as _masked_gemm_module  # noqa: F401
from . import nm_gemm as _nm_gemm_module  # noqa: F401
from .masked_gemm import (masked_gemm, masked_gemm_forward, masked_gemm_grad_input,
                          masked_gemm_grad_weight, pack_mask_bits, unpack_mask_bits)
from .masked_gemm import supports as masked_gemm_supports
from .nm_gemm import (GEMV_MAX_BATCH, nm_gemm, nm_gemm_forward, nm_gemm_grad_input,
                      nm_gemm_grad_values, supports)

__all__ = ["GEMV_MAX_BATCH", "nm_gemm", "nm_gemm_forward", "nm_gemm_grad_input",
           "nm_gemm_grad_values", "supports",
           "masked_gemm", "masked_gemm_forward", "masked_gemm_grad_input",
           "masked_gemm_grad_weight", "masked_gemm_supports", "pack_mask_bits", "unpack_mask_bits"]
