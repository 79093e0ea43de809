"""Masked GEMM for training with masks: y = x @ (W * mask)^T (+ bias), fused.

W [R, K] is dense; the mask is either packed bits (uint8 [R, ceil(K/8)], column k at bit
k % 8 of byte k // 8, little-endian: see `pack_mask_bits`) or canonical N:M metadata (the
kept indices of sparsekit.format). Each kernel loads a weight tile and the mask bits that
cover it and zeroes the pruned entries on chip, so the masked weight is never written to
memory and the mask costs 1/16 (fp16) of the weight's bytes:

- `_masked_gemm_fwd_kernel`: y = x @ (W * mask)^T (+ bias);
- `_masked_gemm_grad_input_kernel`: grad_x = grad_out @ (W * mask);
- `_masked_gemm_grad_weight_kernel`: grad_W = (grad_out^T @ x) * mask, the mask applied to
  the accumulator before the store, so pruned weights get exactly zero gradient.

Pruned entries are selected out (a pruned inf or NaN weight contributes 0, not NaN).
fp16, bf16 and fp32 (fp32 products at torch's tf32 setting), fp32 accumulate; any shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekit import reference

from ._tiles import (KERNEL_DTYPES, autotune, block_g, check_device, check_metadata,
                     check_pattern, check_tensor, dot_precision, index_bits, keep_tile, mma,
                     pow2, prune_block_k, swizzle, tile_cols, unit_inner, upcast_dot)

__all__ = ["masked_gemm", "masked_gemm_forward", "masked_gemm_grad_input",
           "masked_gemm_grad_weight", "pack_mask_bits", "unpack_mask_bits", "supports"]


def _cfg(**kw):
    warps, stages = kw.pop("warps"), kw.pop("stages")
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Dense tensor-core tiles (the weight is dense here; the mask adds 1 bit per weight). The
# 128x128/256 tiles with 64-wide K are where fp16 GEMMs reach cuBLAS-class throughput on
# A100/H100; the narrower ones cover small batches and odd shapes. The first is the one
# pinned under the interpreter or SPARSEKIT_TRITON_AUTOTUNE=0 (see _tiles.Tuned).
_CONFIGS = [
    _cfg(BLOCK_B=64, BLOCK_R=64, BLOCK_K=64, GROUP=8, warps=4, stages=3),
    _cfg(BLOCK_B=128, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=8, stages=3),
    _cfg(BLOCK_B=128, BLOCK_R=256, BLOCK_K=64, GROUP=8, warps=8, stages=3),
    _cfg(BLOCK_B=256, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=8, stages=3),
    _cfg(BLOCK_B=128, BLOCK_R=128, BLOCK_K=32, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=128, BLOCK_R=64, BLOCK_K=64, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=64, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=64, BLOCK_R=256, BLOCK_K=32, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=16, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=32, BLOCK_R=64, BLOCK_K=128, GROUP=8, warps=4, stages=4),
]
_PRUNE = {"early_config_prune": prune_block_k}
_KEY = ["B_BUCKET", "R", "K", "N", "M"]


@triton.jit
def _masked_weight_tile(w_ptr, mask_ptr, stride_wr, stride_wk, stride_mr, rows, g0, R, K, G,
                        MASK_COLS, MASK_IS_BITS: tl.constexpr, N: tl.constexpr,
                        M: tl.constexpr, MP: tl.constexpr, BITS: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """(W * mask) tile [BLOCK_R, BLOCK_G*MP] (group layout). W is loaded whole (contiguous,
    vectorized) and the pruned entries are selected out on chip."""
    cols, col_ok = tile_cols(g0, K, M, MP, BLOCK_G)
    w = tl.load(w_ptr + rows[:, None] * stride_wr + cols[None, :] * stride_wk,
                mask=(rows < R)[:, None] & col_ok[None, :], other=0.0)
    keep = keep_tile(mask_ptr, stride_mr, rows, g0, R, G, MASK_COLS, MASK_IS_BITS, N, BITS, MP,
                     BLOCK_R, BLOCK_G)
    return tl.where(keep, w, 0.0)


@autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.heuristics({"BLOCK_G": block_g})
@triton.jit
def _masked_gemm_fwd_kernel(x_ptr, w_ptr, mask_ptr, bias_ptr, y_ptr,
                            B, R, K, G, MASK_COLS, B_BUCKET,
                            stride_xb, stride_xk, stride_wr, stride_wk, stride_mr,
                            stride_yb, stride_yr,
                            MASK_IS_BITS: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
                            MP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                            UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_G: tl.constexpr, GROUP: tl.constexpr):
    pid_b, pid_r = swizzle(tl.program_id(0), tl.cdiv(B, BLOCK_B), tl.cdiv(R, BLOCK_R), GROUP)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    b_ok = bb < B
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        cols, col_ok = tile_cols(g0, K, M, MP, BLOCK_G)
        xt = tl.load(x_ptr + bb[:, None] * stride_xb + cols[None, :] * stride_xk,
                     mask=b_ok[:, None] & col_ok[None, :], other=0.0)
        w = _masked_weight_tile(w_ptr, mask_ptr, stride_wr, stride_wk, stride_mr, rows, g0, R,
                                K, G, MASK_COLS, MASK_IS_BITS, N, M, MP, BITS, BLOCK_R, BLOCK_G)
        acc = mma(acc, xt, tl.trans(w), UPCAST, IS_FP32, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < R, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + bb[:, None] * stride_yb + rows[None, :] * stride_yr
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & (rows < R)[None, :])


@autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.heuristics({"BLOCK_G": block_g})
@triton.jit
def _masked_gemm_grad_input_kernel(gy_ptr, w_ptr, mask_ptr, gx_ptr,
                                   B, R, K, G, MASK_COLS, B_BUCKET,
                                   stride_gb, stride_gr, stride_wr, stride_wk, stride_mr,
                                   stride_xb, stride_xk,
                                   MASK_IS_BITS: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
                                   MP: tl.constexpr, BITS: tl.constexpr, UPCAST: tl.constexpr,
                                   IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                                   BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                                   BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
                                   GROUP: tl.constexpr):
    pid_b, pid_g = swizzle(tl.program_id(0), tl.cdiv(B, BLOCK_B), tl.cdiv(G, BLOCK_G), GROUP)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    g0 = pid_g * BLOCK_G
    b_ok = bb < B
    acc = tl.zeros((BLOCK_B, BLOCK_G * MP), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        gy = tl.load(gy_ptr + bb[:, None] * stride_gb + rows[None, :] * stride_gr,
                     mask=b_ok[:, None] & (rows < R)[None, :], other=0.0)
        w = _masked_weight_tile(w_ptr, mask_ptr, stride_wr, stride_wk, stride_mr, rows, g0, R,
                                K, G, MASK_COLS, MASK_IS_BITS, N, M, MP, BITS, BLOCK_R, BLOCK_G)
        acc = mma(acc, gy, w, UPCAST, IS_FP32, PRECISION)
    cols, col_ok = tile_cols(g0, K, M, MP, BLOCK_G)
    tl.store(gx_ptr + bb[:, None] * stride_xb + cols[None, :] * stride_xk,
             acc.to(gx_ptr.dtype.element_ty), mask=b_ok[:, None] & col_ok[None, :])


@autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.heuristics({"BLOCK_G": block_g})
@triton.jit
def _masked_gemm_grad_weight_kernel(gy_ptr, x_ptr, mask_ptr, gw_ptr,
                                    B, R, K, G, MASK_COLS, B_BUCKET,
                                    stride_gb, stride_gr, stride_xb, stride_xk, stride_mr,
                                    stride_wr, stride_wk,
                                    MASK_IS_BITS: tl.constexpr, N: tl.constexpr,
                                    M: tl.constexpr, MP: tl.constexpr, BITS: tl.constexpr,
                                    UPCAST: tl.constexpr, IS_FP32: tl.constexpr,
                                    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                                    BLOCK_G: tl.constexpr, GROUP: tl.constexpr):
    # Program tiles run over (rows, groups) of W; the batch is the reduction.
    pid_r, pid_g = swizzle(tl.program_id(0), tl.cdiv(R, BLOCK_R), tl.cdiv(G, BLOCK_G), GROUP)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    g0 = pid_g * BLOCK_G
    row_ok = rows < R
    cols, col_ok = tile_cols(g0, K, M, MP, BLOCK_G)
    acc = tl.zeros((BLOCK_R, BLOCK_G * MP), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        gyt = tl.load(gy_ptr + bb[None, :] * stride_gb + rows[:, None] * stride_gr,
                      mask=row_ok[:, None] & b_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + bb[:, None] * stride_xb + cols[None, :] * stride_xk,
                     mask=b_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(acc, gyt, xt, UPCAST, IS_FP32, PRECISION)
    # The mask is applied to the accumulator: pruned weights get exactly 0.
    keep = keep_tile(mask_ptr, stride_mr, rows, g0, R, G, MASK_COLS, MASK_IS_BITS, N, BITS, MP,
                     BLOCK_R, BLOCK_G)
    tl.store(gw_ptr + rows[:, None] * stride_wr + cols[None, :] * stride_wk,
             tl.where(keep, acc, 0.0).to(gw_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# -- mask packing --------------------------------------------------------------------------

def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool mask [R, K] -> uint8 [R, ceil(K/8)]: column k at bit k % 8 of byte k // 8
    (little-endian; the last byte's unused high bits are 0). Runs on the mask's device."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [R, K], got shape {tuple(mask.shape)}")
    return reference.pack_mask_bits(mask)


def unpack_mask_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_mask_bits: uint8 [R, ceil(k/8)] -> bool [R, k]."""
    check_tensor("bits", bits, 2, (torch.uint8,))
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or bits.shape[1] != -(-k // 8):
        raise ValueError(f"k must be an int with ceil(k/8) = {bits.shape[1]} (bits' columns), "
                         f"got {k!r}")
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    dense = (bits.unsqueeze(-1) >> shifts) & 1
    return dense.reshape(bits.shape[0], -1)[:, :k].bool()


# -- launchers -----------------------------------------------------------------------------

def supports(x_or_dtype) -> bool:
    """Whether these kernels run a call in this dtype (or on this tensor's device and dtype):
    float16, bfloat16, float32 on CUDA, or the CPU under TRITON_INTERPRET=1."""
    from .nm_gemm import supports as nm_supports

    return nm_supports(x_or_dtype, 1, 2)


def _check_mask(mask, rows: int, k: int, n: int, m: int, rows_from: str):
    """Validates the mask and returns the kernel's (MASK_IS_BITS, N, M, BITS, G)."""
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)):
        raise TypeError(f"n and m must be ints, got {n!r} and {m!r}")
    if n == 0 and m == 0:
        check_tensor("mask", mask, 2, (torch.uint8,))
        want = (rows, -(-k // 8))
        if tuple(mask.shape) != want:
            raise ValueError(f"mask must be packed bits of shape {want} (uint8 [R, ceil(K/8)], "
                             f"R from {rows_from}, K={k}), got {tuple(mask.shape)}")
        return True, 1, 8, 1, want[1]
    n, m = check_pattern(n, m)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.uint8:
        raise TypeError("mask must be uint8 N:M metadata when n, m are given")
    try:
        check_metadata(mask, rows, k, n, m, rows_from)
    except ValueError as exc:
        raise ValueError(str(exc).replace("metadata must", "mask (N:M metadata) must", 1)) from None
    return False, n, m, index_bits(m), -(-k // m)


def _meta(dtype, mask_is_bits, n, m, bits):
    return dict(MASK_IS_BITS=mask_is_bits, N=n, M=m, MP=pow2(m), BITS=bits,
                UPCAST=upcast_dot(dtype), IS_FP32=dtype == torch.float32,
                PRECISION=dot_precision(dtype))


def _check_bool_mask_given(mask):
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        raise TypeError("mask must be packed bits (uint8 [R, ceil(K/8)]), not a bool tensor: "
                        "pack it with sparsekit.kernels.pack_mask_bits(mask)")


def masked_gemm_forward(x, weight, mask, bias=None, n: int = 0, m: int = 0) -> torch.Tensor:
    """y = x @ (weight * mask)^T (+ bias). x [B, K], weight [R, K] (same float dtype), mask:
    packed bits uint8 [R, ceil(K/8)] (n = m = 0) or N:M metadata for pattern n:m; bias [R]
    or None. Returns [B, R] in x's dtype. No autograd (see `masked_gemm`)."""
    check_tensor("x", x, 2, KERNEL_DTYPES)
    check_tensor("weight", weight, 2, (x.dtype,))
    _check_bool_mask_given(mask)
    rows, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x must be [batch, K={k}] (weight is {tuple(weight.shape)}), got "
                         f"shape {tuple(x.shape)}")
    is_bits, n, m, bits, groups = _check_mask(mask, rows, k, n, m, "weight.shape[0]")
    if bias is not None:
        check_tensor("bias", bias, 1, (x.dtype,))
        if bias.shape[0] != rows:
            raise ValueError(f"bias must have {rows} entries (R), got {bias.shape[0]}")
    device = check_device(x=x, weight=weight, mask=mask, bias=bias)
    mask, bias = unit_inner(mask), unit_inner(bias)
    batch = x.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=device)
    if batch == 0 or rows == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(batch, rows)) if bias is not None else y.zero_()
    _masked_gemm_fwd_kernel[lambda meta: (triton.cdiv(batch, meta["BLOCK_B"])
                                          * triton.cdiv(rows, meta["BLOCK_R"]),)](
        x, weight, mask, bias if bias is not None else weight, y, batch, rows, k, groups,
        mask.shape[1], min(pow2(batch), 1024), x.stride(0), x.stride(1), weight.stride(0),
        weight.stride(1), mask.stride(0), y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
        **_meta(x.dtype, is_bits, n, m, bits))
    return y


def masked_gemm_grad_input(grad_out, weight, mask, n: int = 0, m: int = 0) -> torch.Tensor:
    """grad_x = grad_out @ (weight * mask): grad_out [B, R] -> [B, K]. No autograd."""
    check_tensor("grad_out", grad_out, 2, KERNEL_DTYPES)
    check_tensor("weight", weight, 2, (grad_out.dtype,))
    _check_bool_mask_given(mask)
    rows, k = weight.shape
    if grad_out.shape[1] != rows:
        raise ValueError(f"grad_out must be [batch, R={rows}], got shape {tuple(grad_out.shape)}")
    is_bits, n, m, bits, groups = _check_mask(mask, rows, k, n, m, "weight.shape[0]")
    device = check_device(grad_out=grad_out, weight=weight, mask=mask)
    mask = unit_inner(mask)
    batch = grad_out.shape[0]
    gx = torch.empty(batch, k, dtype=grad_out.dtype, device=device)
    if batch == 0 or k == 0:
        return gx
    if rows == 0:
        return gx.zero_()
    meta = _meta(grad_out.dtype, is_bits, n, m, bits)
    _masked_gemm_grad_input_kernel[lambda c: (triton.cdiv(batch, c["BLOCK_B"])
                                              * triton.cdiv(groups, c["BLOCK_G"]),)](
        grad_out, weight, mask, gx, batch, rows, k, groups, mask.shape[1],
        min(pow2(batch), 1024), grad_out.stride(0), grad_out.stride(1), weight.stride(0),
        weight.stride(1), mask.stride(0), gx.stride(0), gx.stride(1), **meta)
    return gx


def masked_gemm_grad_weight(grad_out, x, mask, n: int = 0, m: int = 0) -> torch.Tensor:
    """grad_W = (grad_out^T @ x) * mask: [R, K] in grad_out's dtype, exactly 0 at every
    pruned entry. grad_out [B, R], x [B, K]. No autograd."""
    check_tensor("grad_out", grad_out, 2, KERNEL_DTYPES)
    check_tensor("x", x, 2, (grad_out.dtype,))
    _check_bool_mask_given(mask)
    if x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"x and grad_out must have the same batch, got {x.shape[0]} and "
                         f"{grad_out.shape[0]}")
    rows, k = grad_out.shape[1], x.shape[1]
    is_bits, n, m, bits, groups = _check_mask(mask, rows, k, n, m, "grad_out.shape[1]")
    device = check_device(grad_out=grad_out, x=x, mask=mask)
    mask = unit_inner(mask)
    gw = torch.empty(rows, k, dtype=grad_out.dtype, device=device)
    if rows == 0 or k == 0:
        return gw
    if grad_out.shape[0] == 0:
        return gw.zero_()
    meta = _meta(grad_out.dtype, is_bits, n, m, bits)
    _masked_gemm_grad_weight_kernel[lambda c: (triton.cdiv(rows, c["BLOCK_R"])
                                               * triton.cdiv(groups, c["BLOCK_G"]),)](
        grad_out, x, mask, gw, grad_out.shape[0], rows, k, groups, mask.shape[1],
        min(pow2(grad_out.shape[0]), 1024), grad_out.stride(0), grad_out.stride(1),
        x.stride(0), x.stride(1), mask.stride(0), gw.stride(0), gw.stride(1), **meta)
    return gw


# -- autograd ------------------------------------------------------------------------------

class _MaskedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, bias, n, m):
        x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1]) if x.dim() != 2 else x
        y = masked_gemm_forward(x2, weight, mask, bias, n, m)
        ctx.save_for_backward(x2, weight, mask)
        ctx.pattern, ctx.x_shape, ctx.has_bias = (n, m), x.shape, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, mask = ctx.saved_tensors
        n, m = ctx.pattern
        gy = grad_y.reshape(grad_y.shape[:-1].numel(), weight.shape[0])
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = masked_gemm_grad_input(gy, weight, mask, n, m).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = masked_gemm_grad_weight(gy, x2, mask, n, m)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = gy.sum(0, dtype=torch.float32).to(gy.dtype)
        return grad_x, grad_w, None, grad_bias, None, None


def masked_gemm(x, weight, mask, bias=None, n: int = 0, m: int = 0) -> torch.Tensor:
    """y = x @ (weight * mask)^T (+ bias), fused; differentiable in x, weight and bias, the
    weight's gradient exactly 0 wherever the mask prunes.

    x: [..., K]; weight: [R, K]; mask: packed bits uint8 [R, ceil(K/8)] (`pack_mask_bits`)
    when n = m = 0, else the canonical N:M metadata of pattern n:m (`compress(...).metadata`).

    >>> bits = sparsekit.kernels.pack_mask_bits(sparsekit.masks.magnitude(w, 0.5))
    >>> y = sparsekit.kernels.masked_gemm(x, w, bits, b)
    """
    check_tensor("x", x, None, KERNEL_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., K]")
    return _MaskedGemm.apply(x, weight, mask, bias, n, m)
