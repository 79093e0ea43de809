"""Shared by the CPU kernel tests: running a test once per compiled ISA variant, and the
relative error against an fp64 reference."""

import pytest

import sparsekit as sk
from sparsekit import ops

COMPILED_ISAS = [isa for isa in ("avx512bf16", "avx512", "avx2", "scalar")
                 if isa in sk.build_info().get("cpu_isa_compiled", [])]


def run_on_isa(name, check=None):
    """Generator for an `isa` fixture: forces the CPU kernels to `name` (skipping the test
    when this CPU lacks it, or when `check()` returns a reason), then restores the best."""
    if not ops.set_cpu_isa(name):
        pytest.skip(f"this CPU has no {name}")
    reason = check() if check is not None else None
    if reason:
        pytest.skip(reason)
    yield name
    # The best variant this CPU runs, as at import (an AVX-512 CPU without BF16 gets avx512).
    next(isa for isa in COMPILED_ISAS + ["scalar"] if ops.set_cpu_isa(isa))


def rel_err(out, ref):
    ref = ref.double()
    if ref.numel() == 0:
        return 0.0
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
