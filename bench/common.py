"""Shared by the benchmarks: timing the yardstick in the same run, and the set-up a
figure was measured on (machine, torch version, thread count)."""

from __future__ import annotations

import platform

import torch

from sparsekit.timing import paired_seconds  # noqa: F401  (the benchmarks use it)


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
