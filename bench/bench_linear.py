"""2:4 SparseLinear against nn.Linear on the same pruned weights, same run, with the
weights read from memory rather than from the cache.

One weight of these shapes (18-180 MB) would sit wholly or largely in a 32 MiB last-level
cache across repeated calls, which flatters whichever side reads fewer bytes. So every
timed call runs the layer once on each of several copies of the weight (distinct tensors,
the same values), enough copies that the compressed set alone is at least four times the
last-level cache; dense copies hold the same pruned weights. Beside each layer's time the
effective weight bandwidth (bytes of the weight read per second: dense bytes for
nn.Linear, values + metadata for SparseLinear) and a plain streaming read (`torch.sum`
over the dense copies, the same bytes, cycled the same way): the memory system's limit.

Forward at batch 1, 8, 64, 256 (and 512 in bf16), fp32 and bf16, on the LLM layer shapes;
forward + backward at batch 64 in fp32. Only the public modules are timed (SparseLinear
from `from_dense`), so the figures are whatever path the module takes; `sk.explain` names
it in each row. Ratios are dense time / sparse time (> 1: sparse faster), each the best of
REPEATS passes made alternately with the other's (sparsekit.timing.paired_seconds).
"""

from __future__ import annotations

import copy
import functools
import math
import time

import pytest
import torch
from torch import nn

import sparsekit as sk

from common import kernels_used, last_level_cache_bytes, layer_choices, machine_info, paired_seconds

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
BATCHES = {"float32": [1, 8, 64, 256], "bfloat16": [1, 8, 64, 256, 512]}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REPEATS = 4
LLC_BYTES = last_level_cache_bytes()
# The compressed copies cycled per timed call add up to at least this (dense: about twice).
WORKING_SET_BYTES = min(4 * LLC_BYTES, 1 << 30)
CASES = [(shape, dtype, batch) for shape in SHAPES for dtype in DTYPES for batch in BATCHES[dtype]]


def _target(dtype, batch):
    """The issue's targets: bf16 >= 1.3x at batch 8, fp32 >= 1.1x at batch 256, fp32 at
    batch 1-8 as before (1.5x); everywhere else never below 0.95x of dense."""
    return {("bfloat16", 8): 1.3, ("float32", 256): 1.1, ("float32", 1): 1.5,
            ("float32", 8): 1.5}.get((dtype, batch), 0.95)


@functools.lru_cache(maxsize=1)  # one shape's copies alive at a time (CASES go shape by shape)
def _layers(shape, dtype, train=False):
    """(dense nn.Linear copies, SparseLinear copies) of one 2:4-pruned weight, enough copies
    that the compressed ones add up to WORKING_SET_BYTES."""
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen).to(DTYPES[dtype])
    weight.mul_(sk.masks.nm(weight, 2, 4))
    dense = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    dense.weight = nn.Parameter(weight, requires_grad=train)
    sparse = sk.SparseLinear.from_dense(dense, pattern="2:4")
    sparse.requires_grad_(train)
    copies = max(1, math.ceil(WORKING_SET_BYTES / sparse.weight_nbytes))
    dense_layers = [dense] + [copy.deepcopy(dense) for _ in range(copies - 1)]
    sparse_layers = [sparse] + [copy.deepcopy(sparse) for _ in range(copies - 1)]
    return dense_layers, sparse_layers


def _stream_seconds(tensors, repeats):
    """Best time of one streaming read (a sum) over every tensor in turn."""
    views = [t.detach().view(torch.float32) if t.dtype == torch.bfloat16 else t.detach()
             for t in tensors]

    def read():
        return [v.sum() for v in views]

    read()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return best


def _bandwidth_info(dense_layers, sparse_layers, dense_s, sparse_s, stream_s):
    copies = len(dense_layers)
    dense_bytes, sparse_bytes = dense_layers[0].weight.nbytes, sparse_layers[0].weight_nbytes
    return dict(
        copies=copies, dense_set_bytes=copies * dense_bytes, sparse_set_bytes=copies * sparse_bytes,
        llc_bytes=LLC_BYTES, dense_weight_bytes=dense_bytes, sparse_weight_bytes=sparse_bytes,
        weight_bytes_ratio=sparse_bytes / dense_bytes,
        dense_gbps=dense_bytes / dense_s / 1e9, sparse_gbps=sparse_bytes / sparse_s / 1e9,
        stream_gbps=copies * dense_bytes / stream_s / 1e9)


@pytest.mark.parametrize("shape,dtype,batch", CASES,
                         ids=[f"{s[0]}x{s[1]}-{d}-{b}" for s, d, b in CASES])
def test_linear_forward(benchmark, shape, dtype, batch):
    dense_layers, sparse_layers = _layers(shape, dtype)
    copies = len(dense_layers)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])

    def run(layers):
        with torch.no_grad():
            return [layer(x) for layer in layers]

    benchmark.group = f"linear 2:4 {dtype} {shape[0]}x{shape[1]} batch {batch}"
    ys = benchmark.pedantic(run, args=(sparse_layers,), rounds=1, iterations=1, warmup_rounds=0)
    dense_pass, sparse_pass = paired_seconds(lambda: run(dense_layers), lambda: run(sparse_layers),
                                             REPEATS)
    dense_s, sparse_s = dense_pass / copies, sparse_pass / copies
    stream_s = _stream_seconds([layer.weight for layer in dense_layers], REPEATS)
    benchmark.extra_info.update(
        kind="linear_forward", shape=list(shape), dtype=dtype, batch=batch, dense_s=dense_s,
        sparse_s=sparse_s, ratio=dense_s / sparse_s, target=_target(dtype, batch),
        kernels=kernels_used(sparse_layers[0], x),
        layer_choices=layer_choices(sparse_layers[0]), isa=sk.build_info()["cpu_isa_active"],
        **_bandwidth_info(dense_layers, sparse_layers, dense_s, sparse_s, stream_s),
        **machine_info())
    ref = x.double() @ dense_layers[0].weight.double().t()
    err = ((ys[-1].double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == "float32" else 1e-2), err


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_backward(benchmark, shape):
    """Forward + backward (grad input, and the weight's gradient: dense for nn.Linear, the
    kept values' for SparseLinear) at batch 64, fp32; gradients accumulate across passes
    on both sides alike."""
    batch = 64
    dense_layers, sparse_layers = _layers(shape, "float32", train=True)
    copies = len(dense_layers)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, shape[1], generator=gen).requires_grad_()
    gy = torch.randn(batch, shape[0], generator=gen)

    def run(layers):
        for layer in layers:
            layer(x).backward(gy)

    benchmark.group = f"linear 2:4 forward+backward float32 {shape[0]}x{shape[1]} batch {batch}"
    benchmark.pedantic(run, args=(sparse_layers,), rounds=1, iterations=1, warmup_rounds=0)
    dense_pass, sparse_pass = paired_seconds(lambda: run(dense_layers), lambda: run(sparse_layers),
                                             REPEATS)
    dense_s, sparse_s = dense_pass / copies, sparse_pass / copies
    stream_s = _stream_seconds([layer.weight for layer in dense_layers], REPEATS)
    benchmark.extra_info.update(
        kind="linear_backward", shape=list(shape), dtype="float32", batch=batch, dense_s=dense_s,
        sparse_s=sparse_s, ratio=dense_s / sparse_s, target=1.0,
        kernels=kernels_used(lambda: sparse_layers[0](x).backward(gy), grad=True),
        layer_choices=layer_choices(sparse_layers[0]),
        isa=sk.build_info()["cpu_isa_active"],
        **_bandwidth_info(dense_layers, sparse_layers, dense_s, sparse_s, stream_s),
        **machine_info())
