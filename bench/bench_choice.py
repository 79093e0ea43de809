"""Kernel choice ("auto") against torch's dense layer on the same pruned weights, same run.

For each Linear shape / dtype / batch and a few ResNet-18 convolutions, `auto`
(sparsekit.dispatch) measures sparse against dense on its first call and caches the
winner; this benchmark then times the layer in auto mode, forced sparse, and torch's own
F.linear / F.conv2d on the masked dense weight, alternately. The working set is past the
32 MiB L3 for the Linear layers: each timed call runs every one of its weight copies
(together over WORKING_SET bytes of dense weight, at most MAX_COPIES copies), and a time is
per layer call. Convolutions cycle at most CONV_MAX_COPIES copies: their weights are small
(0.15-9.4 MB) and their activations, not weights, fill the cache. Ratio = dense / auto (> 1:
auto is faster); auto can only lose by the measurement picking wrongly, or by the dense
path's decompression (scratch buffer) on top of torch's product.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit as sk
from sparsekit import dispatch

from common import machine_info, paired_seconds

LINEAR_SHAPES = [(4096, 4096), (1536, 384), (384, 1536)]  # (out, in): LLM, MiniLM FFN
BATCHES = [1, 16, 64, 256]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# ResNet-18 convolutions: (C_in, C_out, kernel, stride, H=W of the input)
CONVS = [(64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7),
         (256, 512, 1, 1, 7)]
CONV_BATCHES = [1, 16]
WORKING_SET = 96 << 20  # bytes of dense weight cycled per timed call: 3x the L3
MAX_COPIES = 64
CONV_MAX_COPIES = 8  # conv weights are small and their activations large: bounded run time
REPEATS = 3


def _copies(dense_bytes: int, most: int = MAX_COPIES) -> int:
    return max(1, min(most, math.ceil(WORKING_SET / dense_bytes)))


def _pairs(make_dense, copies):
    """`copies` (sparse layer, dense twin) pairs, each from its own random weight."""
    pairs = []
    for i in range(copies):
        torch.manual_seed(i)
        dense = make_dense()
        sparse = (sk.SparseLinear if isinstance(dense, nn.Linear) else sk.SparseConv2d).from_dense(dense)
        twin = sparse.to_dense()  # the same pruned weight, stored dense
        pairs.append((sparse, twin))
    return pairs


def _run(pairs, x, mode):
    """A callable running every copy once: its per-call time is the layer time x copies."""
    if mode == "torch":
        layers = [twin for _, twin in pairs]
    else:
        layers = [sparse for sparse, _ in pairs]
        for layer in layers:
            layer.kernel_choice = mode

    def call():
        for layer in layers:
            layer(x)
    return call


def _measure(benchmark, pairs, x, what, extra):
    dispatch.clear()
    with torch.no_grad():
        start = time.perf_counter()
        pairs[0][0](x)  # auto's first call: measures sparse and dense, caches the faster
        first_call_s = time.perf_counter() - start
        auto, sparse, dense = (_run(pairs, x, m) for m in ("auto", "sparse", "torch"))
        benchmark.pedantic(auto, rounds=REPEATS, iterations=1, warmup_rounds=1)
        # After those calls (each over every copy), a close decision is confirmed in place.
        explanation = sk.explain(pairs[0][0], x)
        choice = dispatch.decisions()[pairs[0][0]._kernel_key(x)]
        dense_s, auto_s = paired_seconds(dense, auto, REPEATS)
        _, sparse_s = paired_seconds(dense, sparse, REPEATS)
    copies = len(pairs)
    benchmark.extra_info.update(
        kind="choice", what=what, copies=copies, chose=choice.choice,
        measured_ms={k: v * 1e3 for k, v in (choice.times or {}).items()},
        first_call_ms=first_call_s * 1e3, auto_s=auto_s / copies, dense_s=dense_s / copies,
        sparse_s=sparse_s / copies, ratio=dense_s / auto_s, sparse_ratio=dense_s / sparse_s,
        explain=explanation, **extra, **machine_info())
    print(f"\n{what}: auto chose {choice.choice}; auto {auto_s / copies * 1e3:.3f} ms, "
          f"torch dense {dense_s / copies * 1e3:.3f} ms ({dense_s / auto_s:.2f}x), forced sparse "
          f"{sparse_s / copies * 1e3:.3f} ms ({dense_s / sparse_s:.2f}x), {copies} copies")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_choice_linear(benchmark, shape, dtype, batch):
    out_f, in_f = shape
    torch_dtype = DTYPES[dtype]
    pairs = _pairs(lambda: nn.Linear(in_f, out_f).to(torch_dtype),
                   _copies(out_f * in_f * torch_dtype.itemsize))
    x = torch.randn(batch, in_f).to(torch_dtype)
    benchmark.group = f"choice linear 2:4 {dtype} {out_f}x{in_f} batch {batch}"
    _measure(benchmark, pairs, x, f"linear {dtype} {out_f}x{in_f} batch {batch}",
             dict(shape=list(shape), dtype=dtype, batch=batch))


@pytest.mark.parametrize("batch", CONV_BATCHES)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c[0]}-{c[1]}k{c[2]}s{c[3]}@{c[4]}")
def test_choice_conv(benchmark, conv, batch):
    c_in, c_out, kernel, stride, size = conv
    pairs = _pairs(lambda: nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                   _copies(c_in * c_out * kernel * kernel * 4, CONV_MAX_COPIES))
    x = torch.randn(batch, c_in, size, size)
    what = f"conv {c_in}->{c_out} {kernel}x{kernel}/{stride} at {size}x{size} float32 batch {batch}"
    benchmark.group = f"choice {what}"
    _measure(benchmark, pairs, x, what, dict(shape=list(conv), dtype="float32", batch=batch))
