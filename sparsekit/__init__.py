"""sparsekit: pruning masks, compressed N:M weights and sparse kernels for PyTorch.

    import sparsekit as sk
    mask = sk.masks.nm(layer.weight, 2, 4)          # 2:4 mask (bool)
    t = sk.compress(layer.weight * mask, 2, 4)      # values + metadata
    t.to_dense()                                    # exact inverse

`sk.build_info()` says which kernels this installation carries.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ext, ops, reference  # noqa: E402  (ops registers the kernels)
from . import masks  # noqa: E402
from .format import NMTensor, compress, parse_pattern  # noqa: E402
from .nn import SparseConv2d, SparseLinear  # noqa: E402
from .convert import SparsifyReport, densify, sparsify  # noqa: E402
from . import prune  # noqa: E402
from .ops import explain  # noqa: E402
from . import dispatch  # noqa: E402
from .dispatch import kernel_choice  # noqa: E402

__all__ = ["masks", "ops", "reference", "NMTensor", "compress", "parse_pattern", "explain",
           "dispatch", "kernel_choice",
           "prune", "SparseLinear", "SparseConv2d", "sparsify", "densify", "SparsifyReport", "build_info", "__version__"]


def __getattr__(name):
    # sparsekit.kernels (Triton) loads on first use, so `import sparsekit` never imports
    # triton (and TRITON_INTERPRET may still be set before it is).
    if name == "kernels":
        import importlib

        return importlib.import_module(".kernels", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_info() -> dict:
    """How this installation was built and which kernels it runs.

    Keys: extension_loaded, load_error, torch_version (built against), runtime_torch,
    with_cuda, cuda_version, cuda_arch_list, cpu_isa_compiled, cpu_isa_available,
    kernels ({op: [dispatch keys with a compiled kernel]}).
    """
    import torch

    info = {"extension_loaded": _ext.EXTENSION is not None, "load_error": _ext.LOAD_ERROR,
            "runtime_torch": torch.__version__}
    if _ext.EXTENSION is not None:
        info.update(_ext.EXTENSION.build_info())
    info["kernels"] = ops.registered_kernels()
    return info
