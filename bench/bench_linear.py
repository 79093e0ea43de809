"""CPU N:M linear against torch's dense linear on the same (pruned) weights, same run.

Forward: y = x @ W^T at batch 1, 8, 64, 256 in fp32 and bf16 on the LLM layer shapes.
Backward at batch 64: grad input + grad of the kept values (sparsekit) against the dense
layer's grad input + grad weight (torch). Ratios are dense time / sparse time (> 1: faster),
each the best of 7 calls made alternately with the other's (bench/common.paired_seconds).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekit as sk

from common import machine_info, paired_seconds

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
BATCHES = [1, 8, 64, 256]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGETS = {("float32", 1): 1.5, ("float32", 8): 1.5, ("bfloat16", 1): 1.5}
REPEATS = 7


def _layer(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    t = sk.compress(torch.randn(shape, generator=gen).to(dtype), 2, 4, prune=True)
    return t, t.to_dense()


def _target(dtype, batch):
    return TARGETS.get((dtype, batch), 1.0 if dtype == "float32" and batch >= 64 else None)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_forward(benchmark, shape, dtype, batch):
    t, dense = _layer(shape, DTYPES[dtype])
    x = torch.randn(batch, shape[1]).to(DTYPES[dtype])
    k = shape[1]

    def sparse():
        return sk.ops.nm_linear(x, t.values, t.metadata, None, k, 2, 4)

    benchmark.group = f"linear 2:4 {dtype} {shape[0]}x{shape[1]} batch {batch}"
    y = benchmark.pedantic(sparse, rounds=REPEATS, iterations=1, warmup_rounds=1)
    dense_s, sparse_s = paired_seconds(lambda: F.linear(x, dense), sparse, REPEATS)
    benchmark.extra_info.update(
        kind="linear_forward", shape=list(shape), dtype=dtype, batch=batch, dense_s=dense_s,
        sparse_s=sparse_s, ratio=dense_s / sparse_s, target=_target(dtype, batch),
        isa=sk.build_info()["cpu_isa_active"],
        weight_bytes_ratio=t.nbytes / dense.nbytes, **machine_info())
    ref = F.linear(x.double(), dense.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() < (1e-5 if dtype == "float32" else 1e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_backward(benchmark, shape):
    batch, k = 64, shape[1]
    t, dense = _layer(shape, torch.float32)
    x, gy = torch.randn(batch, k), torch.randn(batch, shape[0])

    def sparse():
        return (sk.ops.nm_linear_grad_input(gy, t.values, t.metadata, k, 2, 4),
                sk.ops.nm_sddmm(gy, x, t.metadata, k, 2, 4))

    benchmark.group = f"linear 2:4 backward float32 {shape[0]}x{shape[1]} batch {batch}"
    benchmark.pedantic(sparse, rounds=REPEATS, iterations=1, warmup_rounds=1)
    dense_s, sparse_s = paired_seconds(lambda: (gy @ dense, gy.t() @ x), sparse, REPEATS)
    benchmark.extra_info.update(
        kind="linear_backward", shape=list(shape), dtype="float32", batch=batch, dense_s=dense_s,
        sparse_s=sparse_s, ratio=dense_s / sparse_s, target=1.0,
        isa=sk.build_info()["cpu_isa_active"], **machine_info())
