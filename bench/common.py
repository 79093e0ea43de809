"""Shared by the benchmarks: timing the yardstick in the same run, and the set-up a
figure was measured on (machine, torch version, thread count)."""

from __future__ import annotations

import platform
import time

import torch


def min_seconds(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def paired_seconds(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best wall times of fn_a and fn_b, called alternately so that both see the same
    machine state (other tenants, caches, frequency) rather than one noisy stretch each."""
    best_a = best_b = float("inf")
    fn_a(), fn_b()
    for _ in range(repeats):
        start = time.perf_counter()
        fn_a()
        mid = time.perf_counter()
        fn_b()
        best_a, best_b = min(best_a, mid - start), min(best_b, time.perf_counter() - mid)
    return best_a, best_b


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
    }
