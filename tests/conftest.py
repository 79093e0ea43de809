import os

import torch

# Triton kernels run on the CPU under the interpreter when no GPU is visible; this must
# precede any triton import. With a GPU, Triton compiles for it and the `cuda` tests use it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check results, not speed: each Triton kernel runs its first config instead of
# autotuning every shape (a test that exercises the tuner sets this to 1 itself).
os.environ.setdefault("SPARSEKIT_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    # Decided at run time, never at import: collection must work on machines without a GPU.
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (a GPU is visible)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "interpreter" in item.keywords and not INTERPRETED:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
