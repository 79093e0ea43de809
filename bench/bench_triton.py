"""Triton kernels on the GPU against cuBLAS dense and torch's 2:4 semi-structured sparsity,
on the same weights in the same run (skipped without a CUDA GPU).

- masked_gemm forward + backward (y = x @ (W*M)^T, grad_x, grad_W masked) against dense
  torch.matmul (x @ W^T, gy @ W, gy^T @ x): 4096x4096, batch 2048, fp16, a 50% random mask
  as packed bits. Target: within 1.15x of dense (ratio dense/sparse >= 0.87).
- nm_gemm forward on a 2:4 compressed fp16 weight at batch 1, 4 and 16 (LLM decode) on
  4096x4096, 11008x4096 and 4096x11008 against dense F.linear (target >= 1.4x faster; the
  bytes allow 1.78x) and against F.linear on torch.sparse.to_sparse_semi_structured of the
  same weight (target: faster).

Each time is the median of CUDA-event timings of single calls made alternately with the
baseline's, L2 flushed before every call (bench/common.cuda_paired_seconds). Run:

    .venv/bin/python -m pytest bench/bench_triton.py --benchmark-only -q \\
        --benchmark-json=bench/results/<device>.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekit as sk

from common import cuda_paired_seconds, machine_info, rel_err, semi_structured

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
DECODE_BATCHES = [1, 4, 16]
REPEATS = 50
MASKED_TARGET = 1 / 1.15
NM_TARGET = 1.4


@pytest.fixture(autouse=True)
def _gpu():
    # Decided when a benchmark runs, never at import: collection works without a GPU.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the interpreter is not timed")


def _synced(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


def test_masked_gemm_fwd_bwd(benchmark):
    from sparsekit import kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = k = 4096
    batch = 2048
    dtype = torch.float16
    w = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    keep = torch.rand(rows, k, device="cuda", generator=gen) < 0.5
    bits = kernels.pack_mask_bits(keep)
    x = torch.randn(batch, k, device="cuda", generator=gen).to(dtype)
    gy = torch.randn(batch, rows, device="cuda", generator=gen).to(dtype)
    w_masked = torch.where(keep, w, 0)  # the dense baseline multiplies the same weights

    def sparse():
        return (kernels.masked_gemm_forward(x, w, bits),
                kernels.masked_gemm_grad_input(gy, w, bits),
                kernels.masked_gemm_grad_weight(gy, x, bits))

    def dense():
        return torch.matmul(x, w_masked.t()), torch.matmul(gy, w_masked), torch.matmul(gy.t(), x)

    y, gx, gw = sparse()  # compiles and autotunes outside the timings
    ref = dense()
    errors = [rel_err(a, b) for a, b in zip((y, gx, gw), (ref[0], ref[1], ref[2] * keep))]
    assert max(errors) < 1e-2, errors
    assert torch.all(gw[~keep] == 0)

    benchmark.group = f"masked_gemm fwd+bwd float16 {rows}x{k} batch {batch}"
    benchmark.pedantic(_synced(sparse), rounds=10, iterations=1, warmup_rounds=2)
    dense_s, sparse_s = cuda_paired_seconds(dense, sparse, REPEATS)
    benchmark.extra_info.update(
        kind="triton_masked_fwd_bwd", shape=[rows, k], dtype="float16", batch=batch,
        baseline="torch.matmul dense (cuBLAS), same masked weights", dense_s=dense_s,
        sparse_s=sparse_s, ratio=dense_s / sparse_s, target=MASKED_TARGET,
        mask_density=keep.float().mean().item(), max_rel_err=max(errors), **machine_info())


@pytest.mark.parametrize("batch", DECODE_BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nm_gemm_decode(benchmark, shape, batch):
    from sparsekit import kernels

    rows, k = shape
    dtype = torch.float16
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = sk.compress(torch.randn(rows, k, device="cuda", generator=gen).to(dtype), 2, 4, prune=True)
    dense_w = t.to_dense()
    x = torch.randn(batch, k, device="cuda", generator=gen).to(dtype)

    def sparse():
        return kernels.nm_gemm_forward(x, t.values, t.metadata, None, k, 2, 4)

    def dense():
        return F.linear(x, dense_w)

    y = sparse()
    want = dense()
    err = rel_err(y, want)
    assert err < 1e-2, err

    semi_s = None
    semi_w, semi_error = semi_structured(dense_w)
    if semi_w is not None:
        try:
            semi = lambda: F.linear(x, semi_w)  # noqa: E731
            assert rel_err(semi(), want) < 1e-2
            semi_s, _ = cuda_paired_seconds(semi, sparse, REPEATS)
        except Exception as exc:  # e.g. a batch this torch build cannot multiply
            semi_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

    benchmark.group = f"nm_gemm 2:4 float16 {rows}x{k} batch {batch}"
    benchmark.pedantic(_synced(sparse), rounds=20, iterations=1, warmup_rounds=3)
    dense_s, sparse_s = cuda_paired_seconds(dense, sparse, REPEATS)
    benchmark.extra_info.update(
        kind="triton_nm_forward", shape=[rows, k], dtype="float16", batch=batch,
        baseline="F.linear dense (cuBLAS), same pruned weights", dense_s=dense_s,
        sparse_s=sparse_s, ratio=dense_s / sparse_s, target=NM_TARGET,
        semi_structured_s=semi_s, semi_structured_error=semi_error,
        ratio_vs_semi_structured=None if semi_s is None else semi_s / sparse_s,
        path="gemv" if batch <= kernels.GEMV_MAX_BATCH else "dot",
        weight_bytes_ratio=t.nbytes / dense_w.nbytes, max_rel_err=err, **machine_info())
