"""2:4 mask computation: sparsekit.masks.nm against the exhaustive pattern-matmul method.

The baseline is the method most pruning tutorials (and NVIDIA ASP) use: score every one of
the C(m, n) patterns of each group with one matmul and take the argmax. Both providers run on
the same fp32 weights in one group per shape; the sparsekit test also times the baseline in
the same run and records the ratio (target: >= 10x) with the machine and torch set-up.

Run with `make bench` (pytest bench/ --benchmark-only).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsekit import masks

from common import machine_info, paired_seconds

SHAPES = [(4096, 4096), (8192, 8192)]
N, M = 2, 4
ROUNDS = 3
BASELINE_REPEATS = 2


def compute_valid_1d_patterns(m: int, n: int) -> torch.Tensor:
    """Every distinct arrangement of n ones in m slots, one per row: [C(m, n), m]."""
    return torch.tensor(sorted(set(itertools.permutations([1] * n + [0] * (m - n)))), dtype=torch.float32)


def compute_mask(tensor: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The seed article's exhaustive N:M mask: argmax over all patterns of |group| @ pattern."""
    patterns = compute_valid_1d_patterns(m, n).to(tensor.device)
    rows, cols = tensor.shape
    if cols % m:
        mat = tensor.new_zeros(rows, cols + m - cols % m)
        mat[:, :cols] = tensor
    else:
        mat = tensor
    groups = mat.reshape(-1, m)
    pmax = torch.argmax(groups.abs() @ patterns.t(), dim=1)
    return patterns[pmax].view(rows, -1)[:, :cols]


def _weights(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nm_mask_sparsekit(benchmark, shape):
    w = _weights(shape)
    benchmark.group = f"nm-mask {N}:{M} fp32 {shape[0]}x{shape[1]}"
    benchmark.extra_info.update(provider="sparsekit", shape=list(shape), dtype="float32", **machine_info())
    mask = benchmark.pedantic(masks.nm, args=(w, N, M), rounds=ROUNDS, iterations=1, warmup_rounds=1)

    # The ratio from this one run: both providers timed back to back on the same weights.
    sparsekit_s, baseline_s = paired_seconds(lambda: masks.nm(w, N, M),
                                             lambda: compute_mask(w, M, N), BASELINE_REPEATS)
    benchmark.extra_info.update(sparsekit_s=sparsekit_s, baseline_s=baseline_s,
                                speedup_vs_baseline=baseline_s / sparsekit_s, target_speedup=10.0)

    # Correctness: both keep the largest total magnitude in every group.
    absw = w.abs().double()
    kept = (absw * mask).sum()
    kept_baseline = (absw * compute_mask(w, M, N).double()).sum()
    torch.testing.assert_close(kept, kept_baseline, rtol=1e-9, atol=0)
    assert int(mask.sum()) == w.numel() * N // M


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nm_mask_baseline_pattern_matmul(benchmark, shape):
    w = _weights(shape)
    benchmark.group = f"nm-mask {N}:{M} fp32 {shape[0]}x{shape[1]}"
    benchmark.extra_info.update(provider="pattern-matmul baseline", shape=list(shape), dtype="float32",
                                **machine_info())
    mask = benchmark.pedantic(compute_mask, args=(w, M, N), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert int(mask.sum()) == w.numel() * N // M
