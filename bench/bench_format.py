"""compress / decompress throughput against a plain clone() of the same dense bytes.

Throughput counts the bytes each op must move: compress reads the dense matrix and writes
values + metadata, decompress the reverse. clone() reads and writes the dense bytes once:
the memory-bandwidth yardstick, timed alternately with the op in the same run (target:
>= 0.5 of it).
"""

from __future__ import annotations

import pytest
import torch

import sparsekit as sk

from common import machine_info, paired_seconds

SHAPE = (4096, 4096)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROUNDS = 5


def _nm_weight(dtype):
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.where(sk.masks.nm(w, 2, 4), w, torch.zeros((), dtype=dtype))


@pytest.mark.parametrize("op", ["compress", "decompress"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_format_throughput(benchmark, op, dtype):
    w = _nm_weight(DTYPES[dtype])
    t = sk.compress(w, 2, 4)
    fn = (lambda: sk.ops.nm_compress(w, 2, 4)) if op == "compress" else t.to_dense
    benchmark.group = f"format 2:4 {dtype} {SHAPE[0]}x{SHAPE[1]}"
    out = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    moved = w.nbytes + t.nbytes  # both directions move the dense and the compressed bytes
    # Alternated, so both see the same allocator state (fresh pages or recycled ones).
    op_s, clone_s = paired_seconds(fn, w.clone, ROUNDS)
    op_gbps, clone_gbps = moved / op_s / 1e9, 2 * w.nbytes / clone_s / 1e9
    benchmark.extra_info.update(
        provider="sparsekit", op=op, dtype=dtype, shape=list(SHAPE), pattern="2:4",
        gbps=op_gbps, clone_gbps=clone_gbps, ratio_vs_clone=op_gbps / clone_gbps,
        target_ratio=0.5, **machine_info())
    if op == "compress":
        assert torch.equal(out[0], t.values) and torch.equal(out[1], t.metadata)
    else:
        assert torch.equal(out, w)
