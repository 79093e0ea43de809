"""Random N:M matrices for the format tests: nonzero values (never all zeros), groups
holding n, fewer, or no nonzeros, and -0.0 at some pruned positions."""

import os

import torch

from sparsekit import reference


def random_nm(rows, k, n, m, dtype=torch.float32, device="cpu", generator=None):
    # Values bounded away from zero so no kept entry rounds to 0 in fp16/bf16.
    mag = torch.rand(rows, k, generator=generator, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(rows, k, generator=generator) < 0.5, -1.0, 1.0)
    w = (mag * sign).to(dtype)
    if rows == 0 or k == 0:
        return w.to(device)
    keep = reference.nm_mask(torch.rand(rows, k, generator=generator, dtype=torch.float64), n, m)
    # Drop some kept entries too: groups with fewer than n nonzeros must round-trip.
    keep &= torch.rand(rows, k, generator=generator) < 0.8
    # Pruned entries: +0.0, or -0.0 (what w * mask gives for negative w).
    return torch.where(keep, w, w * 0).to(device)


def triton_device() -> str:
    """Where the Triton kernels run in the tests: compiled on a visible GPU, else on the CPU
    under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return "cuda" if torch.cuda.is_available() and not interpreted else "cpu"
