"""Unstructured sparsity (bitmask format, sparsekit.ops.bitmask_linear) against dense
F.linear and torch's CSR (weight.to_sparse_csr() @ x^T) on the same pruned weights, same run.

Shapes 4096x4096 and 11008x4096 at 80% and 90% sparsity (magnitude pruning of a random
weight); fp32 at batch 1 and 64, bf16 at batch 1. Every provider cycles through enough
copies of its weight to pass 96 MiB (3x the 32 MiB L3), so each call reads its weight from
memory as in a real model. Beside each time: the effective weight bandwidth (weight bytes /
time) and that of a plain streaming read (a sum) of the same number of bytes, also cycled
past the cache. Ratios are dense (or CSR) time / sparse time, each the best of REPEATS calls
made alternately (bench/common.paired_seconds). Run with -s to see the table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekit as sk

from common import machine_info, paired_seconds

SHAPES = [(4096, 4096), (11008, 4096)]
SPARSITIES = [0.8, 0.9]
CASES = [("float32", 1), ("float32", 64), ("bfloat16", 1)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGETS = {  # (dtype, batch, sparsity): (vs dense, vs CSR)
    ("float32", 1, 0.8): (2.5, 1.5), ("float32", 1, 0.9): (4.0, 1.5),
    ("float32", 64, 0.8): (1.0, None), ("float32", 64, 0.9): (1.5, None),
    ("bfloat16", 1, 0.8): (2.0, None), ("bfloat16", 1, 0.9): (None, None)}
PAST_CACHE = 96 << 20
REPEATS = 15


class Cycle:
    """Calls fn(copy) on the next of `copies` each time."""

    def __init__(self, copies, fn):
        self.copies, self.fn, self.i = copies, fn, 0

    def __call__(self):
        c = self.copies[self.i % len(self.copies)]
        self.i += 1
        return self.fn(c)


def _copies(make, nbytes):
    return [make() for _ in range(max(2, -(-PAST_CACHE // max(nbytes, 1))))]


def _csr_nbytes(c):
    return c.values().nbytes + c.col_indices().nbytes + c.crow_indices().nbytes


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype,batch", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_unstructured_linear(benchmark, shape, dtype, batch, sparsity):
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    w = torch.randn(shape)
    w = (w * sk.masks.magnitude(w, sparsity)).to(dt)
    x = torch.randn(batch, shape[1]).to(dt)
    t = sk.compress_bitmask(w)
    k = shape[1]
    sparse_copies = _copies(lambda: t.clone(), t.nbytes)
    dense_copies = _copies(lambda: w.clone(), w.nbytes)
    sparse = Cycle(sparse_copies, lambda c: sk.ops.bitmask_linear(x, c.values, c.mask, c.offsets, None, k))
    dense = Cycle(dense_copies, lambda c: F.linear(x, c))
    y = benchmark.pedantic(sparse, rounds=REPEATS, iterations=1, warmup_rounds=2)
    ref = F.linear(x.double(), w.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() < (1e-5 if dtype == "float32" else 1e-2)
    dense_s, sparse_s = paired_seconds(dense, sparse, REPEATS)
    csr_s = csr_sparse_s = csr_nbytes = None
    if dtype == "float32":  # torch's CSR matmul: fp32 (MKL); its bf16 path is not a yardstick
        csr = w.to_sparse_csr()
        csr_nbytes = _csr_nbytes(csr)
        csr_copies = _copies(lambda: w.to_sparse_csr(), csr_nbytes)
        xt = x.t().contiguous()
        csr_call = Cycle(csr_copies, lambda c: torch.mm(c, xt))
        csr_s, csr_sparse_s = paired_seconds(csr_call, sparse, REPEATS)
    stream_copies = _copies(lambda: torch.randn(t.nbytes // 4), t.nbytes)
    stream_s, _ = paired_seconds(Cycle(stream_copies, torch.sum), sparse, REPEATS)
    ratio = dense_s / sparse_s
    csr_ratio = csr_s / csr_sparse_s if csr_s else None
    target_dense, target_csr = TARGETS[dtype, batch, sparsity]
    info = dict(kind="unstructured_linear", shape=list(shape), dtype=dtype, batch=batch,
                sparsity=sparsity, dense_s=dense_s, sparse_s=sparse_s, csr_s=csr_s,
                ratio=ratio, csr_ratio=csr_ratio, target=target_dense, target_csr=target_csr,
                weight_bytes_ratio=t.nbytes / w.nbytes,
                csr_bytes_ratio=csr_nbytes / w.nbytes if csr_nbytes else None,
                sparse_gbs=t.nbytes / sparse_s / 1e9, stream_gbs=t.nbytes / stream_s / 1e9,
                dense_gbs=w.nbytes / dense_s / 1e9, isa=sk.build_info()["cpu_bitmask_isa_active"],
                copies=(len(sparse_copies), len(dense_copies)), **machine_info())
    benchmark.extra_info.update(info)
    csr_txt = (f"CSR {csr_s * 1e3:8.3f} ms ({csr_ratio:4.2f}x)" if csr_s else "CSR      -")
    print(f"\n{shape[0]}x{shape[1]} {dtype} batch {batch:3d} {int(sparsity * 100)}%: "
          f"bitmask {sparse_s * 1e3:8.3f} ms, dense {dense_s * 1e3:8.3f} ms ({ratio:4.2f}x), "
          f"{csr_txt}; bytes {t.nbytes / w.nbytes:.3f} of dense; weight bandwidth "
          f"{info['sparse_gbs']:5.1f} GB/s vs streaming read {info['stream_gbs']:5.1f} GB/s "
          f"[{info['cpu']}, torch {info['torch']}, {info['threads']} threads]")
