"""The sparsekit custom ops: schemas, per-device kernels, fake impls, dispatch.

Schemas are declared once in C++ (csrc/sparsekit.cpp). Each device registers its kernel
there (CPU in csrc/cpu, CUDA in csrc/cuda). This module adds, for every op:
  - the plain-torch reference as the CompositeExplicitAutograd kernel, which the dispatcher
    uses for any device without a kernel of its own (and for all devices when the
    extension is not built: the schemas are then declared here, identically);
  - a fake (meta) implementation, so torch.compile(fullgraph=True) traces through;
  - autograd for every differentiable op (nm_mask returns a bool mask: none), each backward
    itself written with sparsekit ops, so double backward works too.
`explain(op, *args)` tells which implementation a call would run.
"""

from __future__ import annotations

import torch

from . import _ext, reference

__all__ = ["SCHEMAS", "nm_mask", "nm_compress", "nm_decompress", "nm_linear",
           "nm_linear_grad_input", "nm_sddmm", "explain", "registered_kernels", "set_cpu_isa"]

NAMESPACE = "sparsekit"

# Must equal the TORCH_LIBRARY block in csrc/sparsekit.cpp (a test compares them).
SCHEMAS = {
    "nm_mask": "nm_mask(Tensor scores, int n, int m, bool absolute=False) -> Tensor",
    "nm_compress": "nm_compress(Tensor w, int n, int m) -> (Tensor, Tensor)",
    "nm_decompress": "nm_decompress(Tensor values, Tensor metadata, int k, int n, int m) -> Tensor",
    "nm_linear": "nm_linear(Tensor x, Tensor values, Tensor metadata, Tensor? bias, int k, int n, "
                 "int m) -> Tensor",
    "nm_linear_grad_input": "nm_linear_grad_input(Tensor grad_out, Tensor values, Tensor metadata, "
                            "int k, int n, int m) -> Tensor",
    "nm_sddmm": "nm_sddmm(Tensor grad_out, Tensor x, Tensor metadata, int k, int n, int m) -> Tensor",
}

_REFERENCE = {
    "nm_mask": reference.nm_mask,
    "nm_compress": reference.nm_compress,
    "nm_decompress": reference.nm_decompress,
    "nm_linear": reference.nm_linear,
    "nm_linear_grad_input": reference.nm_linear_grad_input,
    "nm_sddmm": reference.nm_sddmm,
}


def _schema_exists(name: str) -> bool:
    try:
        torch._C._get_schema(f"{NAMESPACE}::{name}", "")
    except RuntimeError:
        return False
    return True


_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    if not _schema_exists(_name):
        _lib.define(_schema)
    _lib.impl(_name, _REFERENCE[_name], "CompositeExplicitAutograd")


def _groups(k, m):
    return (k + m - 1) // m


@torch.library.register_fake(f"{NAMESPACE}::nm_mask")
def _nm_mask_fake(scores, n, m, absolute=False):
    torch._check(scores.dim() == 2, lambda: f"scores must be 2-D, got {scores.dim()}-D")
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.register_fake(f"{NAMESPACE}::nm_compress")
def _nm_compress_fake(w, n, m):
    torch._check(w.dim() == 2, lambda: f"w must be 2-D, got {w.dim()}-D")
    rows, k = w.shape
    per_row = _groups(k, m) * n
    meta_bytes = (per_row * reference.index_bits(m) + 7) // 8
    return w.new_empty((rows, per_row)), w.new_empty((rows, meta_bytes), dtype=torch.uint8)


@torch.library.register_fake(f"{NAMESPACE}::nm_decompress")
def _nm_decompress_fake(values, metadata, k, n, m):
    torch._check(values.dim() == 2, lambda: f"values must be 2-D, got {values.dim()}-D")
    torch._check(
        values.shape[1] == _groups(k, m) * n,
        lambda: f"values must have {_groups(k, m) * n} columns for k={k} and {n}:{m}",
    )
    return values.new_empty((values.shape[0], k))


@torch.library.register_fake(f"{NAMESPACE}::nm_linear")
def _nm_linear_fake(x, values, metadata, bias, k, n, m):
    torch._check(x.shape[-1] == k, lambda: f"x must have k = {k} in its last dim, got {tuple(x.shape)}")
    torch._check(values.dim() == 2, lambda: "values must be 2-D")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::nm_linear_grad_input")
def _nm_linear_grad_input_fake(grad_out, values, metadata, k, n, m):
    torch._check(grad_out.shape[-1] == values.shape[0],
                 lambda: f"grad_out must have {values.shape[0]} in its last dim")
    return grad_out.new_empty((*grad_out.shape[:-1], k))


@torch.library.register_fake(f"{NAMESPACE}::nm_sddmm")
def _nm_sddmm_fake(grad_out, x, metadata, k, n, m):
    torch._check(x.shape[-1] == k, lambda: f"x must have k = {k} in its last dim")
    return x.new_empty((metadata.shape[0], _groups(k, m) * n))


def _nm_linear_setup_context(ctx, inputs, output):
    x, values, metadata, bias, k, n, m = inputs
    ctx.save_for_backward(x, values, metadata)
    ctx.pattern = (k, n, m)
    ctx.has_bias = bias is not None


def _nm_linear_backward(ctx, grad_out):
    # Gradients reach x, the kept values and the bias only: pruned weights have no slot.
    x, values, metadata = ctx.saved_tensors
    k, n, m = ctx.pattern
    grad_out = grad_out.contiguous()
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.sparsekit.nm_linear_grad_input(grad_out, values, metadata, k, n, m)
    if ctx.needs_input_grad[1]:
        grad_values = torch.ops.sparsekit.nm_sddmm(grad_out, x, metadata, k, n, m)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, values.shape[0]).sum(0)
    return grad_x, grad_values, None, grad_bias, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::nm_linear", _nm_linear_backward,
                                setup_context=_nm_linear_setup_context)


def _nm_linear_grad_input_setup(ctx, inputs, output):
    grad_out, values, metadata, k, n, m = inputs
    ctx.save_for_backward(grad_out, values, metadata)
    ctx.pattern = (k, n, m)


def _nm_linear_grad_input_backward(ctx, g):
    # out = grad_out @ W, linear in both: d/dgrad_out = g @ W^T, d/dvalues = sddmm(grad_out, g).
    grad_out, values, metadata = ctx.saved_tensors
    k, n, m = ctx.pattern
    d_gy = d_values = None
    if ctx.needs_input_grad[0]:
        d_gy = torch.ops.sparsekit.nm_linear(g, values, metadata, None, k, n, m)
    if ctx.needs_input_grad[1]:
        d_values = torch.ops.sparsekit.nm_sddmm(grad_out, g, metadata, k, n, m)
    return d_gy, d_values, None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::nm_linear_grad_input", _nm_linear_grad_input_backward,
                                setup_context=_nm_linear_grad_input_setup)


def _nm_sddmm_setup(ctx, inputs, output):
    grad_out, x, metadata, k, n, m = inputs
    ctx.save_for_backward(grad_out, x, metadata)
    ctx.pattern = (k, n, m)


def _nm_sddmm_backward(ctx, g):
    # out[r, j] = sum_b grad_out[b, r] x[b, col(r, j)]; with G the dense form of g:
    # d/dgrad_out = x @ G^T, d/dx = grad_out @ G.
    grad_out, x, metadata = ctx.saved_tensors
    k, n, m = ctx.pattern
    d_gy = d_x = None
    if ctx.needs_input_grad[0]:
        d_gy = torch.ops.sparsekit.nm_linear(x, g, metadata, None, k, n, m)
    if ctx.needs_input_grad[1]:
        d_x = torch.ops.sparsekit.nm_linear_grad_input(grad_out, g, metadata, k, n, m)
    return d_gy, d_x, None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::nm_sddmm", _nm_sddmm_backward,
                                setup_context=_nm_sddmm_setup)


def _nm_decompress_setup(ctx, inputs, output):
    values, metadata, k, n, m = inputs
    ctx.save_for_backward(metadata)
    ctx.pattern = (k, n, m)


def _nm_decompress_backward(ctx, g):
    # dense = scatter(values): the values' gradient gathers g at the kept columns.
    (metadata,) = ctx.saved_tensors
    k, n, m = ctx.pattern
    cols, inside = reference.kept_columns(metadata, k, n, m)
    if k == 0:
        return g.new_zeros(cols.shape), None, None, None, None
    return torch.gather(g, 1, cols) * inside, None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::nm_decompress", _nm_decompress_backward,
                                setup_context=_nm_decompress_setup)


def _nm_compress_setup(ctx, inputs, output):
    w, n, m = inputs
    ctx.save_for_backward(output[1])
    ctx.pattern = (w.shape[1], n, m)


def _nm_compress_backward(ctx, g_values, g_metadata):
    # values = gather(w): w's gradient scatters g_values back (slots past k are padding).
    (metadata,) = ctx.saved_tensors
    k, n, m = ctx.pattern
    cols, inside = reference.kept_columns(metadata, k, n, m)
    grad = g_values.new_zeros(metadata.shape[0], max(k, 1))
    grad.scatter_add_(1, cols, g_values * inside)
    return grad[:, :k], None, None


torch.library.register_autograd(f"{NAMESPACE}::nm_compress", _nm_compress_backward,
                                setup_context=_nm_compress_setup)


def nm_linear(x, values, metadata, bias, k: int, n: int, m: int) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W = (values, metadata) N:M compressed, [rows, k].
    Differentiable in x, values and bias."""
    return torch.ops.sparsekit.nm_linear(x, values, metadata, bias, k, n, m)


def nm_linear_grad_input(grad_out, values, metadata, k: int, n: int, m: int) -> torch.Tensor:
    """grad_x = grad_out @ W with W still compressed."""
    return torch.ops.sparsekit.nm_linear_grad_input(grad_out, values, metadata, k, n, m)


def nm_sddmm(grad_out, x, metadata, k: int, n: int, m: int) -> torch.Tensor:
    """(grad_out^T @ x) at W's kept positions, in the values layout: the values' gradient."""
    return torch.ops.sparsekit.nm_sddmm(grad_out, x, metadata, k, n, m)


def nm_mask(scores: torch.Tensor, n: int, m: int, absolute: bool = False) -> torch.Tensor:
    """Bool mask of the n largest scores (|scores| if absolute) in every m along the last
    dim of a 2-D tensor; ties go to the lower index."""
    return torch.ops.sparsekit.nm_mask(scores, n, m, absolute)


def nm_compress(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, metadata) of a 2-D N:M matrix in the canonical compressed form."""
    return torch.ops.sparsekit.nm_compress(w, n, m)


def nm_decompress(values: torch.Tensor, metadata: torch.Tensor, k: int, n: int, m: int) -> torch.Tensor:
    """Dense [rows, k] matrix from the canonical compressed form."""
    return torch.ops.sparsekit.nm_decompress(values, metadata, k, n, m)


def _dispatch_key(device: torch.device) -> str:
    return {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device.type, device.type.upper())


def registered_kernels() -> dict[str, list[str]]:
    """For each op, the dispatch keys that have a compiled kernel of their own."""
    keys = ("CPU", "CUDA")
    return {
        name: [key for key in keys
               if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key)]
        for name in SCHEMAS
    }


def explain(op: str, *args) -> str:
    """Says which implementation `torch.ops.sparsekit.<op>(*args)` would run, and why.

    >>> explain("nm_compress", torch.randn(8, 16))
    'sparsekit::nm_compress on cpu (float32): compiled CPU kernel (sparsekit._C)'
    """
    if op not in SCHEMAS:
        raise ValueError(f"op must be one of {sorted(SCHEMAS)}, got {op!r}")
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        raise ValueError("args must include at least one tensor (it decides the device)")
    device, dtype = tensors[0].device, tensors[0].dtype
    key = _dispatch_key(device)
    head = f"{NAMESPACE}::{op} on {device.type} ({str(dtype).replace('torch.', '')})"
    if key == "Meta":
        return f"{head}: fake implementation (shapes only)"
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key):
        return f"{head}: compiled {key} kernel (sparsekit._C)"
    why = _ext.LOAD_ERROR or f"no {key} kernel is built"
    return f"{head}: plain-torch reference (sparsekit.reference; {why})"


def set_cpu_isa(isa: str) -> bool:
    """Forces the CPU product kernels to "avx512", "avx2" or "scalar" (for tests and
    benchmarks). Returns False, changing nothing, if this CPU or build lacks it."""
    if _ext.EXTENSION is None:
        return False
    return _ext.EXTENSION.set_cpu_isa(isa)
