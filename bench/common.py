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
