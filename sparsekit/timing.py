"""Timing helpers shared by the demo and the benchmarks."""

from __future__ import annotations

import time

__all__ = ["paired_seconds"]


def paired_seconds(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best wall times of fn_a and fn_b, called alternately after one warm-up each, so that
    both see the same machine state (caches, other tenants, allocator) rather than one noisy
    stretch each."""
    best_a = best_b = float("inf")
    fn_a(), fn_b()
    for _ in range(repeats):
        start = time.perf_counter()
        fn_a()
        mid = time.perf_counter()
        fn_b()
        best_a, best_b = min(best_a, mid - start), min(best_b, time.perf_counter() - mid)
    return best_a, best_b
