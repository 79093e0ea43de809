"""GEMM on a compressed N:M weight: y = x @ W^T (+ bias), and its backward pair.

W [R, K] is given in the canonical compressed form (values [R, ceil(K/M)*N], uint8
metadata; see sparsekit.format). Nothing dense is ever written to memory:

- `_nm_gemv_kernel` (batch <= GEMV_MAX_BATCH, the LLM decode case): works in the
  compressed domain. Each program streams a [BLOCK_R, BLOCK_S] tile of kept values and
  their metadata (the only large read: N/M of the dense bytes plus the indices), decodes
  each slot's dense column and gathers the matching x entries (x is tiny and stays in
  L1/L2), multiplying on CUDA cores. tl.dot would need >= 16 rows of x; at batch 1-8 it
  would also spend its time expanding tiles rather than reading bytes. When R alone gives
  too few programs to fill the GPU, the slots are split across programs (split-K) into an
  fp32 partial buffer that is summed afterwards.
- `_nm_gemm_fwd_kernel` (larger batches): expands each [BLOCK_R, BLOCK_K] weight tile on
  chip from values + metadata (slot j of group g lands at its kept index) and feeds it
  with the x tile to tl.dot (tensor cores, fp32 accumulate).
- `_nm_gemm_grad_input_kernel`: grad_x = grad_out @ W with the same on-chip expansion.
- `_nm_gemm_grad_values_kernel`: the SDDMM grad_values[r, s] = (grad_out^T @ x)[r, col(r, s)]:
  a dense [BLOCK_R, BLOCK_K] tile of grad_out^T @ x is accumulated over the batch in
  registers and only its kept entries are written, in the values layout.

Every N:M pattern with 0 < N < M <= 32 runs (M not a power of two pads each group to the
next power of two on chip, see kernels/_tiles.py), in fp16, bf16 and fp32 (fp32 products at
torch's tf32 setting), any K (ragged tiles are masked), any R and batch. Where N is a power
of two and the index width divides 8 (1:2, 2:4, N:16, ...), a tile's kept values and
metadata are read as contiguous runs (vectorized loads, each metadata byte read once);
other patterns (2:8, 3:7, ...) decode slot by slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import (INTERPRET, KERNEL_DTYPES, autotune, block_g, check_device,
                     check_k, check_metadata, check_pattern, check_tensor, dot_precision,
                     index_bits, mma, nm_dense_tile, pow2, prune_block_k, runs,
                     slot_index, slot_index_run, swizzle, tile_cols, unit_inner, upcast_dot)

__all__ = ["nm_gemm", "nm_gemm_forward", "nm_gemm_grad_input", "nm_gemm_grad_values",
           "supports", "GEMV_MAX_BATCH"]

# Batches up to this many rows run the compressed-domain GEMV kernel; above, tl.dot.
GEMV_MAX_BATCH = 8


def _cfg(**kw):
    warps, stages = kw.pop("warps"), kw.pop("stages")
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# (BLOCK_R, BLOCK_S): slots of kept values per step. Wide BLOCK_S keeps each row's value
# stream in long coalesced runs; small BLOCK_R keeps enough programs for R = 4096 on ~132
# SMs without split-K. The first entry is the one pinned under the interpreter or with
# SPARSEKIT_TRITON_AUTOTUNE=0 (see _tiles.Tuned).
_GEMV_CONFIGS = [
    _cfg(BLOCK_R=16, BLOCK_S=64, warps=4, stages=2),
    _cfg(BLOCK_R=8, BLOCK_S=128, warps=4, stages=3),
    _cfg(BLOCK_R=16, BLOCK_S=128, warps=4, stages=3),
    _cfg(BLOCK_R=8, BLOCK_S=256, warps=4, stages=3),
    _cfg(BLOCK_R=4, BLOCK_S=256, warps=4, stages=3),
    _cfg(BLOCK_R=32, BLOCK_S=128, warps=8, stages=3),
    _cfg(BLOCK_R=16, BLOCK_S=256, warps=8, stages=3),
    _cfg(BLOCK_R=4, BLOCK_S=128, warps=4, stages=3),
    _cfg(BLOCK_R=8, BLOCK_S=64, warps=4, stages=3),
    _cfg(BLOCK_R=2, BLOCK_S=256, warps=4, stages=3),
]

# (BLOCK_B, BLOCK_R, BLOCK_K dense columns): the usual tensor-core GEMM tiles; the wide
# batch tiles amortize the on-chip expansion of each weight tile over more rows of x, the
# 16/32-row ones serve batches just above the GEMV range and the backward at small batch.
_DOT_CONFIGS = [
    _cfg(BLOCK_B=64, BLOCK_R=64, BLOCK_K=64, GROUP=8, warps=4, stages=3),
    _cfg(BLOCK_B=128, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=8, stages=3),
    _cfg(BLOCK_B=128, BLOCK_R=64, BLOCK_K=64, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=64, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=128, BLOCK_R=128, BLOCK_K=32, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=128, BLOCK_R=256, BLOCK_K=64, GROUP=8, warps=8, stages=3),
    _cfg(BLOCK_B=256, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=8, stages=3),
    _cfg(BLOCK_B=16, BLOCK_R=64, BLOCK_K=128, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=16, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=32, BLOCK_R=64, BLOCK_K=128, GROUP=8, warps=4, stages=4),
    _cfg(BLOCK_B=32, BLOCK_R=128, BLOCK_K=64, GROUP=8, warps=4, stages=4),
]


def _prune_gemv(configs, named_args, **kwargs):
    """Keeps configs whose [BLOCK_B, BLOCK_R, BLOCK_S] gather fits ~64 fp32 per thread."""
    bb = kwargs.get("BLOCK_B", named_args.get("BLOCK_B", 1))
    fit = [c for c in configs
           if bb * c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_S"] <= 64 * 32 * c.num_warps]
    if fit:
        return fit
    return [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_S"])]


_DOT_PRUNE = {"early_config_prune": prune_block_k}
_DOT_KEY = ["B_BUCKET", "R", "K", "N", "M"]


@autotune(configs=_GEMV_CONFIGS, key=["R", "S", "SPLIT_SLOTS", "BLOCK_B", "N", "M"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _nm_gemv_kernel(x_ptr, values_ptr, meta_ptr, bias_ptr, out_ptr,
                    B, R, K, S, META_COLS, SPLIT_SLOTS,
                    stride_xb, stride_xk, stride_vr, stride_mr, stride_os, stride_ob, stride_or,
                    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    bb = tl.arange(0, BLOCK_B)
    row_ok = rows < R
    b_ok = bb < B
    s_begin = split * SPLIT_SLOTS
    s_end = tl.minimum(s_begin + SPLIT_SLOTS, S)
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        valid = row_ok[:, None] & (s < s_end)[None, :]
        v = tl.load(values_ptr + rows[:, None] * stride_vr + s[None, :], mask=valid, other=0.0)
        if 8 % BITS == 0:
            # s0 is a multiple of BLOCK_S (chunks are whole 256-slot steps): whole bytes.
            idx = slot_index_run(meta_ptr, stride_mr, rows, s0, R, S, BITS, BLOCK_R, BLOCK_S)
        else:
            idx = slot_index(meta_ptr, stride_mr, rows[:, None], s[None, :], valid, META_COLS,
                             BITS)
        cols = (s // N)[None, :] * M + idx  # [BLOCK_R, BLOCK_S] dense column of every slot
        xv = tl.load(x_ptr + bb[:, None, None] * stride_xb + cols[None, :, :] * stride_xk,
                     mask=b_ok[:, None, None] & (valid & (cols < K))[None, :, :], other=0.0)
        acc += tl.sum(xv.to(tl.float32) * v.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split * stride_os + bb[:, None] * stride_ob + rows[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=b_ok[:, None] & row_ok[None, :])


@autotune(configs=_DOT_CONFIGS, key=_DOT_KEY, prune_configs_by=_DOT_PRUNE)
@triton.heuristics({"BLOCK_G": block_g, "RUNS": runs})
@triton.jit
def _nm_gemm_fwd_kernel(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
                        B, R, K, G, META_COLS, B_BUCKET,
                        stride_xb, stride_xk, stride_vr, stride_mr, stride_yb, stride_yr,
                        N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BITS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IS_FP32: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, GROUP: tl.constexpr,
                        RUNS: tl.constexpr):
    pid_b, pid_r = swizzle(tl.program_id(0), tl.cdiv(B, BLOCK_B), tl.cdiv(R, BLOCK_R), GROUP)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    b_ok = bb < B
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        cols, col_ok = tile_cols(g0, K, M, MP, BLOCK_G)
        xt = tl.load(x_ptr + bb[:, None] * stride_xb + cols[None, :] * stride_xk,
                     mask=b_ok[:, None] & col_ok[None, :], other=0.0)
        w = nm_dense_tile(values_ptr, meta_ptr, stride_vr, stride_mr, rows, g0, R, G,
                          META_COLS, N, BITS, MP, BLOCK_R, BLOCK_G, RUNS)
        acc = mma(acc, xt, tl.trans(w), UPCAST, IS_FP32, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < R, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + bb[:, None] * stride_yb + rows[None, :] * stride_yr
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & (rows < R)[None, :])


@autotune(configs=_DOT_CONFIGS, key=_DOT_KEY, prune_configs_by=_DOT_PRUNE)
@triton.heuristics({"BLOCK_G": block_g, "RUNS": runs})
@triton.jit
def _nm_gemm_grad_input_kernel(gy_ptr, values_ptr, meta_ptr, gx_ptr,
                               B, R, K, G, META_COLS, B_BUCKET,
                               stride_gb, stride_gr, stride_vr, stride_mr, stride_xb, stride_xk,
                               N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                               BITS: tl.constexpr, UPCAST: tl.constexpr, IS_FP32: tl.constexpr,
                               PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_G: tl.constexpr, GROUP: tl.constexpr,
                               RUNS: tl.constexpr):
    pid_b, pid_g = swizzle(tl.program_id(0), tl.cdiv(B, BLOCK_B), tl.cdiv(G, BLOCK_G), GROUP)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    g0 = pid_g * BLOCK_G
    b_ok = bb < B
    acc = tl.zeros((BLOCK_B, BLOCK_G * MP), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        gy = tl.load(gy_ptr + bb[:, None] * stride_gb + rows[None, :] * stride_gr,
                     mask=b_ok[:, None] & (rows < R)[None, :], other=0.0)
        w = nm_dense_tile(values_ptr, meta_ptr, stride_vr, stride_mr, rows, g0, R, G,
                          META_COLS, N, BITS, MP, BLOCK_R, BLOCK_G, RUNS)
        acc = mma(acc, gy, w, UPCAST, IS_FP32, PRECISION)
    cols, col_ok = tile_cols(g0, K, M, MP, BLOCK_G)
    tl.store(gx_ptr + bb[:, None] * stride_xb + cols[None, :] * stride_xk,
             acc.to(gx_ptr.dtype.element_ty), mask=b_ok[:, None] & col_ok[None, :])


@autotune(configs=_DOT_CONFIGS, key=_DOT_KEY, prune_configs_by=_DOT_PRUNE)
@triton.heuristics({"BLOCK_G": block_g, "RUNS": runs})
@triton.jit
def _nm_gemm_grad_values_kernel(gy_ptr, x_ptr, meta_ptr, gv_ptr,
                                B, R, K, G, META_COLS, B_BUCKET,
                                stride_gb, stride_gr, stride_xb, stride_xk, stride_mr, stride_vr,
                                N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                                BITS: tl.constexpr, UPCAST: tl.constexpr, IS_FP32: tl.constexpr,
                                PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_G: tl.constexpr, GROUP: tl.constexpr,
                                RUNS: tl.constexpr):
    # Program tiles run over (rows, groups); the batch is the reduction.
    pid_r, pid_g = swizzle(tl.program_id(0), tl.cdiv(R, BLOCK_R), tl.cdiv(G, BLOCK_G), GROUP)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    groups = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < R
    cols, col_ok = tile_cols(pid_g * BLOCK_G, K, M, MP, BLOCK_G)
    acc = tl.zeros((BLOCK_R, BLOCK_G * MP), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        gyt = tl.load(gy_ptr + bb[None, :] * stride_gb + rows[:, None] * stride_gr,
                      mask=row_ok[:, None] & b_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + bb[:, None] * stride_xb + cols[None, :] * stride_xk,
                     mask=b_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(acc, gyt, xt, UPCAST, IS_FP32, PRECISION)
    dense = tl.reshape(acc, (BLOCK_R, BLOCK_G, MP))
    p = tl.arange(0, MP)
    # Slots in K's padding select columns >= K, where x was loaded as 0: they get 0.
    if RUNS:
        s0 = pid_g * BLOCK_G * N
        s = s0 + tl.arange(0, BLOCK_G * N)
        idx = tl.reshape(slot_index_run(meta_ptr, stride_mr, rows, s0, R, G * N, BITS, BLOCK_R,
                                        BLOCK_G * N), (BLOCK_R, BLOCK_G, N))
        hit = idx[:, :, :, None] == p[None, None, None, :]
        gv = tl.sum(tl.where(hit, dense[:, :, None, :], 0.0), axis=3)  # [BLOCK_R, BLOCK_G, N]
        tl.store(gv_ptr + rows[:, None] * stride_vr + s[None, :],
                 tl.reshape(gv, (BLOCK_R, BLOCK_G * N)).to(gv_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (s < G * N)[None, :])
    else:
        valid = row_ok[:, None] & (groups < G)[None, :]
        for j in tl.static_range(N):
            slot = groups[None, :] * N + j
            idx = slot_index(meta_ptr, stride_mr, rows[:, None], slot, valid, META_COLS, BITS)
            gv = tl.sum(tl.where(idx[:, :, None] == p[None, None, :], dense, 0.0), axis=2)
            tl.store(gv_ptr + rows[:, None] * stride_vr + slot,
                     gv.to(gv_ptr.dtype.element_ty), mask=valid)


# -- launchers -----------------------------------------------------------------------------

def supports(x_or_dtype, n: int, m: int) -> bool:
    """Whether these kernels run this call: a float16/bfloat16/float32 dtype (or a tensor of
    one, on CUDA or on the CPU under TRITON_INTERPRET=1) and an N:M pattern with
    0 < n < m <= 32. Never raises."""
    if isinstance(x_or_dtype, torch.Tensor):
        dtype, device = x_or_dtype.dtype, x_or_dtype.device
        if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
            return False
    else:
        dtype = x_or_dtype
    if dtype not in KERNEL_DTYPES:
        return False
    try:
        check_pattern(n, m)
    except (TypeError, ValueError):
        return False
    return True


def _shape(k, n, m):
    groups = -(-k // m)
    return groups, groups * n, (groups * n * index_bits(m) + 7) // 8


def _common(values, metadata, k, n, m, rows_from="values.shape[0]"):
    n, m = check_pattern(n, m)
    k = check_k(k)
    check_tensor("values", values, 2, KERNEL_DTYPES)
    groups, slots, _ = _shape(k, n, m)
    if values.shape[1] != slots:
        raise ValueError(f"values must have {slots} columns (ceil(k/m)*n for k={k}, {n}:{m}), "
                         f"got shape {tuple(values.shape)}")
    check_metadata(metadata, values.shape[0], k, n, m, rows_from)
    return k, n, m, groups


def _dot_meta(dtype, n, m, k):
    return dict(N=n, M=m, MP=pow2(m), BITS=index_bits(m), UPCAST=upcast_dot(dtype),
                IS_FP32=dtype == torch.float32, PRECISION=dot_precision(dtype))


def _bucket(batch: int) -> int:
    return min(pow2(batch), 1024)


def _split_k(device, rows: int, slots: int) -> int:
    """Splits the slots when the rows alone give fewer than ~2 programs per SM (assuming
    16-row tiles)."""
    if device.type != "cuda" or slots <= 1024:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = -(-rows // 16)
    if programs >= 2 * sms:
        return 1
    return max(1, min(-(-2 * sms // programs), slots // 512, 16))


def _split_plan(device, rows: int, slots: int, split=None) -> tuple[int, int]:
    """(programs along K, slots per program) for the GEMV kernel; `split` forces a count
    (tests). Chunks are whole 256-slot steps, so every program's loads stay aligned."""
    split = _split_k(device, rows, slots) if split is None else max(int(split), 1)
    if split == 1:
        return 1, slots
    chunk = -(-slots // (split * 256)) * 256
    return -(-slots // chunk), chunk


def nm_gemm_forward(x, values, metadata, bias, k: int, n: int, m: int, *,
                    _split=None) -> torch.Tensor:
    """y = x @ W^T (+ bias), W [R, k] given as (values, metadata) in the canonical N:M form.

    x: [B, k] (2-D; float16/bfloat16/float32), values: [R, ceil(k/m)*n] of x's dtype,
    metadata: uint8 [R, ceil(ceil(k/m)*n*ceil(log2 m)/8)], bias: [R] or None.
    Returns y [B, R] in x's dtype. No autograd (see `nm_gemm`)."""
    check_tensor("x", x, 2, KERNEL_DTYPES)
    k, n, m, groups = _common(values, metadata, k, n, m)
    if x.shape[1] != k:
        raise ValueError(f"x must be [batch, k={k}], got shape {tuple(x.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"values must have x's dtype {x.dtype}, got {values.dtype}")
    if bias is not None:
        check_tensor("bias", bias, 1, (x.dtype,))
        if bias.shape[0] != values.shape[0]:
            raise ValueError(f"bias must have {values.shape[0]} entries (R), got {bias.shape[0]}")
    device = check_device(x=x, values=values, metadata=metadata, bias=bias)
    values, metadata, bias = unit_inner(values), unit_inner(metadata), unit_inner(bias)
    batch, rows = x.shape[0], values.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=device)
    if batch == 0 or rows == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(batch, rows)) if bias is not None else y.zero_()
    bias_arg = bias if bias is not None else values  # never read when HAS_BIAS is False
    slots = values.shape[1]
    if batch <= GEMV_MAX_BATCH:
        split, split_slots = _split_plan(device, rows, slots, _split)
        out = y if split == 1 else torch.empty(split, batch, rows, dtype=torch.float32,
                                               device=device)
        stride_os = 0 if split == 1 else out.stride(0)
        ob, orow = (out.stride(0), out.stride(1)) if split == 1 else (out.stride(1), out.stride(2))
        _nm_gemv_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), split)](
            x, values, metadata, bias_arg, out, batch, rows, k, slots, metadata.shape[1],
            split_slots, x.stride(0), x.stride(1), values.stride(0), metadata.stride(0),
            stride_os, ob, orow, N=n, M=m, BITS=index_bits(m),
            HAS_BIAS=bias is not None and split == 1, BLOCK_B=pow2(batch))
        if split > 1:
            total = out.sum(0)
            if bias is not None:
                total += bias.float()
            y.copy_(total)
        return y
    _nm_gemm_fwd_kernel[lambda meta: (triton.cdiv(batch, meta["BLOCK_B"])
                                      * triton.cdiv(rows, meta["BLOCK_R"]),)](
        x, values, metadata, bias_arg, y, batch, rows, k, groups, metadata.shape[1],
        _bucket(batch), x.stride(0), x.stride(1), values.stride(0), metadata.stride(0),
        y.stride(0), y.stride(1), HAS_BIAS=bias is not None, **_dot_meta(x.dtype, n, m, k))
    return y


def nm_gemm_grad_input(grad_out, values, metadata, k: int, n: int, m: int) -> torch.Tensor:
    """grad_x = grad_out @ W: grad_out [B, R] -> [B, k] in grad_out's dtype. No autograd."""
    check_tensor("grad_out", grad_out, 2, KERNEL_DTYPES)
    k, n, m, groups = _common(values, metadata, k, n, m)
    if grad_out.shape[1] != values.shape[0]:
        raise ValueError(f"grad_out must be [batch, R={values.shape[0]}], got shape "
                         f"{tuple(grad_out.shape)}")
    if values.dtype != grad_out.dtype:
        raise TypeError(f"values must have grad_out's dtype {grad_out.dtype}, got {values.dtype}")
    device = check_device(grad_out=grad_out, values=values, metadata=metadata)
    values, metadata = unit_inner(values), unit_inner(metadata)
    batch, rows = grad_out.shape
    gx = torch.empty(batch, k, dtype=grad_out.dtype, device=device)
    if batch == 0 or k == 0:
        return gx
    if rows == 0:
        return gx.zero_()
    _nm_gemm_grad_input_kernel[lambda meta: (triton.cdiv(batch, meta["BLOCK_B"])
                                             * triton.cdiv(groups, meta["BLOCK_G"]),)](
        grad_out, values, metadata, gx, batch, rows, k, groups, metadata.shape[1],
        _bucket(batch), grad_out.stride(0), grad_out.stride(1), values.stride(0),
        metadata.stride(0), gx.stride(0), gx.stride(1), **_dot_meta(grad_out.dtype, n, m, k))
    return gx


def nm_gemm_grad_values(grad_out, x, metadata, k: int, n: int, m: int) -> torch.Tensor:
    """The kept values' gradient: (grad_out^T @ x) at W's kept positions, in the values
    layout [R, ceil(k/m)*n] and grad_out's dtype; slots in K's padding get 0. No autograd."""
    check_tensor("grad_out", grad_out, 2, KERNEL_DTYPES)
    check_tensor("x", x, 2, KERNEL_DTYPES)
    n, m = check_pattern(n, m)
    k = check_k(k)
    if x.shape[1] != k:
        raise ValueError(f"x must be [batch, k={k}], got shape {tuple(x.shape)}")
    if x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"x and grad_out must have the same batch, got {x.shape[0]} and "
                         f"{grad_out.shape[0]}")
    if x.dtype != grad_out.dtype:
        raise TypeError(f"x must have grad_out's dtype {grad_out.dtype}, got {x.dtype}")
    rows = grad_out.shape[1]
    check_metadata(metadata, rows, k, n, m, "grad_out.shape[1]")
    device = check_device(grad_out=grad_out, x=x, metadata=metadata)
    metadata = unit_inner(metadata)
    groups, slots, _ = _shape(k, n, m)
    gv = torch.empty(rows, slots, dtype=grad_out.dtype, device=device)
    if rows == 0 or slots == 0:
        return gv
    if grad_out.shape[0] == 0:
        return gv.zero_()
    _nm_gemm_grad_values_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"])
                                              * triton.cdiv(groups, meta["BLOCK_G"]),)](
        grad_out, x, metadata, gv, grad_out.shape[0], rows, k, groups, metadata.shape[1],
        _bucket(grad_out.shape[0]), grad_out.stride(0), grad_out.stride(1), x.stride(0),
        x.stride(1), metadata.stride(0), gv.stride(0), **_dot_meta(grad_out.dtype, n, m, k))
    return gv


# -- autograd ------------------------------------------------------------------------------

class _NMGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, metadata, bias, k, n, m):
        x2 = x.reshape(x.shape[:-1].numel(), k) if x.dim() != 2 else x
        y = nm_gemm_forward(x2, values, metadata, bias, k, n, m)
        ctx.save_for_backward(x2, values, metadata)
        ctx.pattern, ctx.x_shape, ctx.has_bias = (k, n, m), x.shape, bias is not None
        return y.reshape(*x.shape[:-1], values.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, values, metadata = ctx.saved_tensors
        k, n, m = ctx.pattern
        gy = grad_y.reshape(grad_y.shape[:-1].numel(), values.shape[0])
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nm_gemm_grad_input(gy, values, metadata, k, n, m).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_values = nm_gemm_grad_values(gy, x2, metadata, k, n, m)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = gy.sum(0, dtype=torch.float32).to(gy.dtype)
        return grad_x, grad_values, None, grad_bias, None, None, None


def nm_gemm(x, values, metadata, bias, k: int, n: int, m: int) -> torch.Tensor:
    """y = x @ W^T (+ bias) on the compressed N:M weight W = (values, metadata), [R, k].

    x: [..., k] (leading batch dims allowed); differentiable in x, values and bias (the
    kept values only: pruned weights have no slot). fp16/bf16/fp32 on CUDA (or the CPU
    under TRITON_INTERPRET=1); see `supports`.

    >>> t = sparsekit.compress(w, 2, 4, prune=True)
    >>> y = sparsekit.kernels.nm_gemm(x, t.values, t.metadata, None, t.shape[1], 2, 4)
    """
    check_tensor("x", x, None, KERNEL_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., k]")
    if x.shape[-1] != k:
        raise ValueError(f"x must have k={k} in its last dim, got shape {tuple(x.shape)}")
    return _NMGemm.apply(x, values, metadata, bias, k, n, m)
