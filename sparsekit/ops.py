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

import functools
import warnings
import weakref

import torch

from . import _ext, reference

__all__ = ["SCHEMAS", "nm_mask", "nm_compress", "nm_decompress", "nm_decompress_into",
           "nm_linear", "nm_linear_grad_input", "nm_sddmm", "nm_conv2d", "masked_linear",
           "masked_linear_grad_input", "masked_linear_grad_weight", "explain",
           "registered_kernels", "set_cpu_isa", "set_cuda_backend", "bitmask_compress",
           "bitmask_decompress", "bitmask_decompress_into", "bitmask_linear",
           "bitmask_linear_grad_input", "bitmask_sddmm"]

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
    "nm_conv2d": "nm_conv2d(Tensor x, Tensor values, Tensor metadata, Tensor? bias, int in_channels, "
                 "int kh, int kw, int[2] stride, int[2] padding, int[2] dilation, int n, int m) "
                 "-> Tensor",
    "masked_linear": "masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias, int n=0, "
                     "int m=0) -> Tensor",
    "masked_linear_grad_input": "masked_linear_grad_input(Tensor grad_out, Tensor weight, "
                                "Tensor mask, int n=0, int m=0) -> Tensor",
    "masked_linear_grad_weight": "masked_linear_grad_weight(Tensor grad_out, Tensor x, Tensor mask, "
                                 "int n=0, int m=0) -> Tensor",
    "bitmask_compress": "bitmask_compress(Tensor w) -> (Tensor, Tensor, Tensor)",
    "bitmask_decompress": "bitmask_decompress(Tensor values, Tensor mask, Tensor offsets, int k) "
                          "-> Tensor",
    "bitmask_linear": "bitmask_linear(Tensor x, Tensor values, Tensor mask, Tensor offsets, "
                      "Tensor? bias, int k) -> Tensor",
    "bitmask_linear_grad_input": "bitmask_linear_grad_input(Tensor grad_out, Tensor values, "
                                 "Tensor mask, Tensor offsets, int k) -> Tensor",
    "bitmask_sddmm": "bitmask_sddmm(Tensor grad_out, Tensor x, Tensor mask, Tensor offsets, "
                     "int k) -> Tensor",
}

# Internal ops of a compiled build (no reference; csrc/sparsekit.cpp declares them too):
# the 2:4 sparse tensor-core path. Used by the CUDA dispatch at the end of this module.
INTERNAL_SCHEMAS = {
    "nm_decompress_into": "nm_decompress_into(Tensor values, Tensor metadata, int k, int n, int m, "
                          "Tensor(a!) out) -> ()",
    "bitmask_decompress_into": "bitmask_decompress_into(Tensor values, Tensor mask, Tensor offsets, "
                               "int k, Tensor(a!) out) -> ()",
    "sp24_pack": "sp24_pack(Tensor values, Tensor metadata, int k) -> (Tensor, Tensor)",
    "sp24_linear": "sp24_linear(Tensor x, Tensor packed_values, Tensor packed_meta, Tensor? bias, "
                   "int rows, int k) -> Tensor",
    "sp24_emulate_linear": "sp24_emulate_linear(Tensor x, Tensor packed_values, Tensor packed_meta, "
                           "Tensor? bias, int rows, int k, bool staged=False) -> Tensor",
}

_REFERENCE = {
    "nm_mask": reference.nm_mask,
    "nm_compress": reference.nm_compress,
    "nm_decompress": reference.nm_decompress,
    "nm_linear": reference.nm_linear,
    "nm_linear_grad_input": reference.nm_linear_grad_input,
    "nm_sddmm": reference.nm_sddmm,
    "nm_conv2d": reference.nm_conv2d,
    "masked_linear": reference.masked_linear,
    "masked_linear_grad_input": reference.masked_linear_grad_input,
    "masked_linear_grad_weight": reference.masked_linear_grad_weight,
    "bitmask_compress": reference.bitmask_compress,
    "bitmask_decompress": reference.bitmask_decompress,
    "bitmask_linear": reference.bitmask_linear,
    "bitmask_linear_grad_input": reference.bitmask_linear_grad_input,
    "bitmask_sddmm": reference.bitmask_sddmm,
}

# Ops without a compiled CPU kernel: the reference runs them on the CPU, Triton on CUDA.
REFERENCE_ON_CPU = ("masked_linear", "masked_linear_grad_input", "masked_linear_grad_weight")


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


def _check_one_device(**tensors):
    # The fake impls also serve the Meta dispatch key, which wins over CPU/CUDA when any
    # argument is a meta tensor: without this check, CPU values with meta metadata returned
    # uninitialized CPU memory instead of an error.
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        torch._check_value(t.device == first.device,
                           lambda: f"{name} must be on the device of {first_name} "
                                   f"({first.device}), got {t.device}")


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
    _check_one_device(values=values, metadata=metadata)
    torch._check(values.dim() == 2, lambda: f"values must be 2-D, got {values.dim()}-D")
    torch._check(
        values.shape[1] == _groups(k, m) * n,
        lambda: f"values must have {_groups(k, m) * n} columns for k={k} and {n}:{m}",
    )
    return values.new_empty((values.shape[0], k))


@torch.library.register_fake(f"{NAMESPACE}::nm_linear")
def _nm_linear_fake(x, values, metadata, bias, k, n, m):
    _check_one_device(values=values, metadata=metadata, x=x, bias=bias)
    torch._check(x.shape[-1] == k, lambda: f"x must have k = {k} in its last dim, got {tuple(x.shape)}")
    torch._check(values.dim() == 2, lambda: "values must be 2-D")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::nm_linear_grad_input")
def _nm_linear_grad_input_fake(grad_out, values, metadata, k, n, m):
    _check_one_device(values=values, metadata=metadata, grad_out=grad_out)
    torch._check(grad_out.shape[-1] == values.shape[0],
                 lambda: f"grad_out must have {values.shape[0]} in its last dim")
    return grad_out.new_empty((*grad_out.shape[:-1], k))


@torch.library.register_fake(f"{NAMESPACE}::nm_sddmm")
def _nm_sddmm_fake(grad_out, x, metadata, k, n, m):
    _check_one_device(metadata=metadata, x=x, grad_out=grad_out)
    torch._check(x.shape[-1] == k, lambda: f"x must have k = {k} in its last dim")
    return x.new_empty((metadata.shape[0], _groups(k, m) * n))


def _register_nm_autograd(name, backward, setup_context):
    # A compiled build registers the autograd of the three N:M product ops in C++
    # (csrc/autograd.cpp: same formulas, no Python on each call); these Python formulas
    # serve builds without the extension. Registering them too would override the C++ ones.
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "Autograd"):
        return
    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context)


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
        grad_bias = grad_out.reshape(grad_out.shape[:-1].numel(), values.shape[0]).sum(0)
    return grad_x, grad_values, None, grad_bias, None, None, None


_register_nm_autograd("nm_linear", _nm_linear_backward, _nm_linear_setup_context)


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


_register_nm_autograd("nm_linear_grad_input", _nm_linear_grad_input_backward, _nm_linear_grad_input_setup)


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


_register_nm_autograd("nm_sddmm", _nm_sddmm_backward, _nm_sddmm_setup)


def _nm_decompress_setup(ctx, inputs, output):
    values, metadata, k, n, m = inputs
    ctx.save_for_backward(metadata)
    ctx.pattern = (k, n, m)


def _nm_decompress_backward(ctx, g):
    # dense = scatter(values): the values' gradient gathers g at the kept columns.
    (metadata,) = ctx.saved_tensors
    k, n, m = ctx.pattern
    return reference.kept_entries(g, metadata, k, n, m), None, None, None, None


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


def conv2d_output_size(height, width, kh, kw, stride, padding, dilation):
    """(H_out, W_out) of a 2-D convolution, as torch.nn.Conv2d computes them."""
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out_h, out_w


@torch.library.register_fake(f"{NAMESPACE}::nm_conv2d")
def _nm_conv2d_fake(x, values, metadata, bias, in_channels, kh, kw, stride, padding, dilation,
                    n, m):
    torch._check(x.dim() == 4, lambda: f"x must be 4-D [batch, C, H, W], got {x.dim()}-D")
    torch._check(x.shape[1] == in_channels,
                 lambda: f"x must have {in_channels} channels, got {tuple(x.shape)}")
    torch._check(values.dim() == 2 and values.shape[1] == _groups(kh * kw * in_channels, m) * n,
                 lambda: "values must be [out, ceil(kh*kw*in_channels/m)*n]")
    out_h, out_w = conv2d_output_size(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
    torch._check(out_h > 0 and out_w > 0, lambda: "x is smaller than the dilated kernel")
    y = x.new_empty((x.shape[0], values.shape[0], out_h, out_w))
    return y.contiguous(memory_format=reference.conv2d_output_format(x))


def _nm_conv2d_setup_context(ctx, inputs, output):
    x, values, metadata, bias, in_channels, kh, kw, stride, padding, dilation, n, m = inputs
    ctx.save_for_backward(x, values, metadata)
    ctx.geometry = (in_channels, kh, kw, tuple(stride), tuple(padding), tuple(dilation), n, m)
    ctx.has_bias = bias is not None


def _nm_conv2d_backward(ctx, grad_out):
    # torch's own convolution backward on the decompressed weight, then the kept values'
    # gradient gathered from the dense weight's at the kept columns (as nm_decompress's
    # backward). Through the compressed weight instead (unfold, nm_linear_grad_input,
    # nm_sddmm, fold) a ResNet-18 training step ran at 0.32x dense, the unfold and fold
    # copies most of it. Every op here is differentiable: double backward works.
    x, values, metadata = ctx.saved_tensors
    channels, kh, kw, stride, padding, dilation, n, m = ctx.geometry
    k, rows = kh * kw * channels, values.shape[0]
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x = grad_values = grad_bias = None
    if x.shape[0] == 0 or k == 0:
        grad_x = torch.zeros_like(x) if need_x else None
        grad_values = torch.zeros_like(values) if need_values else None
    elif need_x or need_values:
        w = torch.ops.sparsekit.nm_decompress(values, metadata, k, n, m)
        w = w.view(rows, kh, kw, channels).permute(0, 3, 1, 2)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
            [need_x, need_values, False])
        if need_values:
            grad_values = reference.kept_entries(grad_w.permute(0, 2, 3, 1).reshape(rows, k),
                                                 metadata, k, n, m)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.sum((0, 2, 3))
    return (grad_x, grad_values, None, grad_bias) + (None,) * 8


torch.library.register_autograd(f"{NAMESPACE}::nm_conv2d", _nm_conv2d_backward,
                                setup_context=_nm_conv2d_setup_context)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_product_inputs(x, values, bias):
    """(x, values, bias) as autocast_linear_inputs gives them on x's device. When autocast
    is off on every device, they are returned after a 0.1 us question, where the full one
    (with x.device) costs about 1 us, and decoding calls hundreds of layers per token. Under
    torch.compile the full question is always asked (it traces it)."""
    if _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast():
        return x, values, bias
    return autocast_linear_inputs(x.device.type, x, values, bias)


def autocast_linear_inputs(device_type: str, *tensors):
    """The tensors as F.linear computes with them under autocast on `device_type`: each
    float32/float16/bfloat16 tensor cast to the autocast dtype (casts are differentiable,
    so gradients reach fp32 parameters in fp32); all unchanged when autocast is off."""
    # CPU and CUDA always have autocast; asking costs a microsecond per call. "meta" has none.
    if not ((device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type))
            and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t
                 for t in tensors)


def nm_linear(x, values, metadata, bias, k: int, n: int, m: int) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W = (values, metadata) N:M compressed, [rows, k].
    Differentiable in x, values and bias. Under torch.autocast it computes in the autocast
    dtype, as nn.Linear does (fp32 values are then cast and repacked on every call: for
    inference speed, convert the model with .half() or .bfloat16() instead)."""
    x, values, bias = _autocast_product_inputs(x, values, bias)
    return torch.ops.sparsekit.nm_linear(x, values, metadata, bias, k, n, m)


def nm_linear_grad_input(grad_out, values, metadata, k: int, n: int, m: int) -> torch.Tensor:
    """grad_x = grad_out @ W with W still compressed."""
    return torch.ops.sparsekit.nm_linear_grad_input(grad_out, values, metadata, k, n, m)


def nm_sddmm(grad_out, x, metadata, k: int, n: int, m: int) -> torch.Tensor:
    """(grad_out^T @ x) at W's kept positions, in the values layout: the values' gradient."""
    return torch.ops.sparsekit.nm_sddmm(grad_out, x, metadata, k, n, m)


def nm_conv2d(x, values, metadata, bias, in_channels: int, kh: int, kw: int, stride=(1, 1),
              padding=(0, 0), dilation=(1, 1), n: int = 2, m: int = 4) -> torch.Tensor:
    """2-D convolution (groups=1) of x [B, in_channels, H, W] (NCHW or channels_last) with
    an N:M weight: (values, metadata) is the conv weight [out, in_channels, kh, kw] permuted
    to [out, kh, kw, in_channels] and compressed along its flattened last three dims
    (DESIGN.md). On the CPU an implicit-GEMM kernel multiplies the kept weights straight
    from the input (no im2col buffer). Returns a contiguous [B, out, H_out, W_out] tensor;
    differentiable in x, values and bias. stride, padding and dilation are (height, width)
    pairs of ints (padding='same' is SparseConv2d's job). Under torch.autocast it computes
    in the autocast dtype."""
    x, values, bias = _autocast_product_inputs(x, values, bias)
    return torch.ops.sparsekit.nm_conv2d(x, values, metadata, bias, in_channels, kh, kw,
                                         list(stride), list(padding), list(dilation), n, m)


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


# A compiled build has the in-place CPU kernel (an internal op, like sp24_*).
@functools.lru_cache(maxsize=None)
def _has_cpu_kernel(name: str) -> bool:
    return _schema_exists(name) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::{name}", "CPU")


# The in-place decompressions of a compiled build (internal ops, like sp24_*): a layer's
# dense path writes into its scratch buffer with them. They return nothing.
for _name in ("nm_decompress_into", "bitmask_decompress_into"):
    if _schema_exists(_name):
        torch.library.register_fake(f"{NAMESPACE}::{_name}")(lambda *args: None)


def _into(name: str, args: tuple, out: torch.Tensor, decompress) -> torch.Tensor:
    """out written by the in-place op `name` on CPU tensors of a compiled build, else by a
    copy of decompress()."""
    if args[0].device.type == "cpu" and _has_cpu_kernel(name):
        getattr(torch.ops.sparsekit, name)(*args, out)
    else:
        out.copy_(decompress())
    return out


def nm_decompress_into(values: torch.Tensor, metadata: torch.Tensor, k: int, n: int, m: int,
                       out: torch.Tensor) -> torch.Tensor:
    """Writes the dense [rows, k] matrix into `out` (contiguous, the values' dtype and
    device) and returns it: the compiled CPU kernel writes in place; other devices, or a
    build without the extension, decompress and copy. Not differentiable (use
    nm_decompress for gradients)."""
    return _into("nm_decompress_into", (values, metadata, k, n, m), out,
                 lambda: torch.ops.sparsekit.nm_decompress(values, metadata, k, n, m))


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


# (op, dispatch key) -> function(*args) -> str, for kernels registered from Python (Triton,
# or a CUDA-side choice among kernels): what `explain` reports for such a call.
_EXPLAINERS: dict = {}


def explain(op, *args) -> str:
    """Says which implementation `torch.ops.sparsekit.<op>(*args)` would run, and why.

    >>> explain("nm_compress", torch.randn(8, 16))
    'sparsekit::nm_compress on cpu (float32): compiled CPU kernel (sparsekit._C)'

    `op` may also be a sparse layer (SparseLinear, SparseConv2d): `explain(layer, x)` says
    which kernel `layer(x)` runs (sparse or dense) and why (measured times, forced, or a
    default); `explain(layer)` says it for the layer's last call. A whole model,
    `explain(model)`, gets a count of the candidates its sparse layers ran on their last
    calls and one such line per layer. See sparsekit.dispatch.
    """
    if isinstance(op, torch.nn.Module):
        from . import dispatch

        if not hasattr(op, "_kernel_key"):  # a whole model: every sparse layer's last call
            if args:
                raise ValueError("explain(model) takes no input: it describes each sparse "
                                 "layer's last call (run the model first)")
            return dispatch.explain_model(op)
        if len(args) > 1:
            raise ValueError("explain(module, x): give at most one input x")
        return dispatch.explain_module(op, *args)
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
    if (op, key) in _EXPLAINERS:  # kernels registered from Python say themselves what runs
        return f"{head}: {_EXPLAINERS[op, key](*args)}"
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key):
        return f"{head}: compiled {key} kernel (sparsekit._C)"
    why = _ext.LOAD_ERROR or f"no {key} kernel is built"
    return f"{head}: plain-torch reference (sparsekit.reference; {why})"


def set_cpu_isa(isa: str) -> bool:
    """Forces the CPU product kernels to "avx512bf16" (AVX-512 plus AVX512-BF16 dot
    products for bf16 2:4), "avx512", "avx2" or "scalar" (for tests and benchmarks).
    Returns False, changing nothing, if this CPU or build lacks it."""
    if _ext.EXTENSION is None:
        return False
    return _ext.EXTENSION.set_cpu_isa(isa)


# ---- masked products: Triton on CUDA ----------------------------------------------------
# masked_linear* run the fused Triton kernels (sparsekit.kernels.masked_gemm) on CUDA when
# triton imports and covers the dtype, else the reference. Fake impls and autograd (written
# with these ops, so double backward works) follow the N:M ops above.

_TRITON = None
_TRITON_ERROR: str | None = None


def _triton_kernels():
    """The sparsekit.kernels module, or None (and _TRITON_ERROR says why) when triton
    cannot be imported. Imported on first use, never at `import sparsekit`."""
    global _TRITON, _TRITON_ERROR
    if _TRITON is None and _TRITON_ERROR is None:
        try:
            from sparsekit import kernels

            _TRITON = kernels
        except Exception as exc:  # ImportError, or a triton that fails to initialise
            _TRITON_ERROR = f"triton is not usable ({type(exc).__name__}: {exc})"
    return _TRITON


def _masked_triton_reason(*tensors) -> str | None:
    """None when the Triton masked kernels cover a call on these tensors, else why not."""
    kernels = _triton_kernels()
    if kernels is None:
        return _TRITON_ERROR
    tensors = [t for t in tensors if t is not None]
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
    if len(dtypes) != 1:
        return f"mixed dtypes {dtypes}"
    if not kernels.masked_gemm_supports(tensors[0]):
        return f"no Triton kernel for {dtypes[0]} on {tensors[0].device.type}"
    return None


def _flat(t):
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _masked_linear_cuda(x, weight, mask, bias=None, n=0, m=0):
    if _masked_triton_reason(x, weight, bias) is None:
        y = _triton_kernels().masked_gemm_forward(_flat(x), weight, mask, bias, n, m)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return reference.masked_linear(x, weight, mask, bias, n, m)


def _masked_linear_grad_input_cuda(grad_out, weight, mask, n=0, m=0):
    if _masked_triton_reason(grad_out, weight) is None:
        gx = _triton_kernels().masked_gemm_grad_input(_flat(grad_out), weight, mask, n, m)
        return gx.reshape(*grad_out.shape[:-1], weight.shape[1])
    return reference.masked_linear_grad_input(grad_out, weight, mask, n, m)


def _masked_linear_grad_weight_cuda(grad_out, x, mask, n=0, m=0):
    if _masked_triton_reason(grad_out, x) is None:
        return _triton_kernels().masked_gemm_grad_weight(_flat(grad_out), _flat(x), mask, n, m)
    return reference.masked_linear_grad_weight(grad_out, x, mask, n, m)


_lib.impl("masked_linear", _masked_linear_cuda, "CUDA")
_lib.impl("masked_linear_grad_input", _masked_linear_grad_input_cuda, "CUDA")
_lib.impl("masked_linear_grad_weight", _masked_linear_grad_weight_cuda, "CUDA")


def _explain_masked(*tensor_positions):
    def explain_call(*args):
        why = _masked_triton_reason(*(args[i] for i in tensor_positions if i < len(args)))
        if why is None:
            return "Triton kernel (sparsekit.kernels.masked_gemm)"
        return f"plain-torch reference (sparsekit.reference; {why})"
    return explain_call


_EXPLAINERS["masked_linear", "CUDA"] = _explain_masked(0, 1, 3)
_EXPLAINERS["masked_linear_grad_input", "CUDA"] = _explain_masked(0, 1)
_EXPLAINERS["masked_linear_grad_weight", "CUDA"] = _explain_masked(0, 1)


def _check_last_dim(t, size, what):
    torch._check(t.shape[-1] == size,
                 lambda: f"{what} must have {size} in its last dim, got {tuple(t.shape)}")


@torch.library.register_fake(f"{NAMESPACE}::masked_linear")
def _masked_linear_fake(x, weight, mask, bias=None, n=0, m=0):
    _check_one_device(weight=weight, mask=mask, x=x, bias=bias)
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    _check_last_dim(x, weight.shape[1], "x")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::masked_linear_grad_input")
def _masked_linear_grad_input_fake(grad_out, weight, mask, n=0, m=0):
    _check_one_device(weight=weight, mask=mask, grad_out=grad_out)
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    _check_last_dim(grad_out, weight.shape[0], "grad_out")
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


@torch.library.register_fake(f"{NAMESPACE}::masked_linear_grad_weight")
def _masked_linear_grad_weight_fake(grad_out, x, mask, n=0, m=0):
    _check_one_device(mask=mask, x=x, grad_out=grad_out)
    torch._check(grad_out.shape[:-1] == x.shape[:-1],
                 lambda: f"grad_out and x must share their batch dims, got {tuple(grad_out.shape)} "
                         f"and {tuple(x.shape)}")
    return grad_out.new_empty((grad_out.shape[-1], x.shape[-1]))


def _masked_linear_setup(ctx, inputs, output):
    x, weight, mask, bias, n, m = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.pattern = (n, m)
    ctx.has_bias = bias is not None


def _masked_linear_backward(ctx, grad_out):
    # The weight's gradient is masked inside the op: pruned weights get exactly 0.
    x, weight, mask = ctx.saved_tensors
    n, m = ctx.pattern
    grad_out = grad_out.contiguous()
    grad_x = grad_w = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.sparsekit.masked_linear_grad_input(grad_out, weight, mask, n, m)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.sparsekit.masked_linear_grad_weight(grad_out, x, mask, n, m)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(grad_out.shape[:-1].numel(), weight.shape[0]).sum(0)
    return grad_x, grad_w, None, grad_bias, None, None


torch.library.register_autograd(f"{NAMESPACE}::masked_linear", _masked_linear_backward,
                                setup_context=_masked_linear_setup)


def _masked_linear_grad_input_setup(ctx, inputs, output):
    grad_out, weight, mask, n, m = inputs
    ctx.save_for_backward(grad_out, weight, mask)
    ctx.pattern = (n, m)


def _masked_linear_grad_input_backward(ctx, g):
    # out = grad_out @ (W*M): d/dgrad_out = g @ (W*M)^T, d/dW = (grad_out^T @ g) * M.
    grad_out, weight, mask = ctx.saved_tensors
    n, m = ctx.pattern
    d_gy = d_w = None
    if ctx.needs_input_grad[0]:
        d_gy = torch.ops.sparsekit.masked_linear(g, weight, mask, None, n, m)
    if ctx.needs_input_grad[1]:
        d_w = torch.ops.sparsekit.masked_linear_grad_weight(grad_out, g, mask, n, m)
    return d_gy, d_w, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::masked_linear_grad_input",
                                _masked_linear_grad_input_backward,
                                setup_context=_masked_linear_grad_input_setup)


def _masked_linear_grad_weight_setup(ctx, inputs, output):
    grad_out, x, mask, n, m = inputs
    ctx.save_for_backward(grad_out, x, mask)
    ctx.pattern = (n, m)


def _masked_linear_grad_weight_backward(ctx, g):
    # out = (grad_out^T @ x) * M, with G = g * M: d/dgrad_out = x @ G^T, d/dx = grad_out @ G.
    grad_out, x, mask = ctx.saved_tensors
    n, m = ctx.pattern
    d_gy = d_x = None
    if ctx.needs_input_grad[0]:
        d_gy = torch.ops.sparsekit.masked_linear(x, g, mask, None, n, m)
    if ctx.needs_input_grad[1]:
        d_x = torch.ops.sparsekit.masked_linear_grad_input(grad_out, g, mask, n, m)
    return d_gy, d_x, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::masked_linear_grad_weight",
                                _masked_linear_grad_weight_backward,
                                setup_context=_masked_linear_grad_weight_setup)


def masked_linear(x, weight, mask, bias=None, n: int = 0, m: int = 0) -> torch.Tensor:
    """y = x @ (weight * mask)^T (+ bias), the mask packed as bits (n = m = 0; see
    sparsekit.reference.pack_mask_bits) or given as N:M metadata. Differentiable in x,
    weight (0 wherever the mask prunes) and bias; fused Triton kernels on CUDA."""
    return torch.ops.sparsekit.masked_linear(x, weight, mask, bias, n, m)


def masked_linear_grad_input(grad_out, weight, mask, n: int = 0, m: int = 0) -> torch.Tensor:
    """grad_x = grad_out @ (weight * mask)."""
    return torch.ops.sparsekit.masked_linear_grad_input(grad_out, weight, mask, n, m)


def masked_linear_grad_weight(grad_out, x, mask, n: int = 0, m: int = 0) -> torch.Tensor:
    """grad_W = (grad_out^T @ x) * mask, exactly 0 at every pruned entry."""
    return torch.ops.sparsekit.masked_linear_grad_weight(grad_out, x, mask, n, m)


# ---- CUDA dispatch: sparse tensor cores, Triton, reference ------------------------------
# nm_linear, nm_linear_grad_input and nm_sddmm have one CUDA implementation each, here. It
# picks, per call:
#   "sp24"      the CUDA extension's mma.sp kernels (csrc/cuda/sp24_linear.cu): forward
#               only, 2:4, fp16/bf16, sm_80+; the packed layout is cached per weight;
#   "triton"    sparsekit.kernels.nm_gemm (any pattern it supports, any GPU Triton runs on);
#   "reference" plain torch, when neither covers the call.
# set_cuda_backend() (or SPARSEKIT_CUDA_BACKEND) restricts the choice, for benchmarks.

_CUDA_BACKENDS = ("auto", "sp24", "triton", "reference")
_cuda_backend = "auto"


def set_cuda_backend(name: str) -> str:
    """Restricts the CUDA N:M product ops to one backend: "sp24" (sparse tensor cores),
    "triton", "reference", or "auto" (the default: the fastest that covers a call). A
    backend that does not cover a call still falls back, so results never change, only
    speed. Returns the previous setting."""
    global _cuda_backend
    if name not in _CUDA_BACKENDS:
        raise ValueError(f"name must be one of {_CUDA_BACKENDS}, got {name!r}")
    previous, _cuda_backend = _cuda_backend, name
    return previous


def _sp24_reason(x, values, n, m) -> str | None:
    """None when the sparse tensor-core kernel covers this forward call, else why not."""
    try:
        built = torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::sp24_linear", "CUDA")
    except RuntimeError:  # the extension is not loaded: the op does not exist
        built = False
    if not built:
        return _ext.LOAD_ERROR or "the CUDA extension is not built"
    if (n, m) != (2, 4):
        return f"sparse tensor cores take 2:4 only, not {n}:{m}"
    if x.dtype not in (torch.float16, torch.bfloat16) or values.dtype != x.dtype:
        return f"sparse tensor cores take float16/bfloat16 x and values, not {x.dtype}/{values.dtype}"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major < 8:
        return f"sparse tensor cores need sm_80 or newer, this GPU is sm_{major}{minor}"
    return None


def _triton_nm_reason(x, values, n, m) -> str | None:
    kernels = _triton_kernels()
    if kernels is None:
        return _TRITON_ERROR
    if values.dtype != x.dtype:
        return f"mixed dtypes {x.dtype} and {values.dtype}"
    if not kernels.supports(x, n, m):
        return f"no Triton kernel for {n}:{m} in {str(x.dtype).replace('torch.', '')}"
    return None


# The sparse tensor-core kernel checks itself once per GPU and dtype before the dispatcher
# relies on it: a small 2:4 product through every kernel path (both small-batch variants,
# the tiled kernel, split K, padded rows and K, bias) on integer inputs, whose result must
# equal the float64 reference exactly. Its two kernels are judged apart: calls with up to
# _SP24_SMALL_MAX_BATCH rows of x run the small-batch kernel, larger ones the tiled kernel,
# and a GPU where one of them fails (no kernel image, too little shared memory for the
# tiled pipeline, a layout read differently) keeps the other. A failed path costs speed
# (Triton runs those calls), never correctness.
_SP24_SMALL_MAX_BATCH = 16  # = sp24::kSmallMaxBatch (csrc/sp24_layout.h; a test compares)
_SP24_PATHS = ("small", "tiled")
_SP24_CHECKED: dict = {}  # (device, dtype) -> {path: None (passed) or why it failed}


def _sp24_path(rows: int) -> str:
    """The sparse tensor-core kernel a forward call with `rows` rows of x runs."""
    return "small" if rows <= _SP24_SMALL_MAX_BATCH else "tiled"


def _sp24_self_check(device, dtype) -> dict:
    """{"small": why, "tiled": why}: None where that kernel of sp24_linear reproduces the
    reference on `device` in `dtype`, else why not (and a RuntimeWarning, once). Runs
    kernels and synchronises: never inside graph capture."""
    key = (torch.device(device), dtype)
    if key in _SP24_CHECKED:
        return _SP24_CHECKED[key]
    gen = torch.Generator().manual_seed(0)
    # 40 rows: 3 row tiles, the last partial. k = 1064: 34 K tiles (packed to 36), enough
    # for split K in both kernels. k = 91: K padded on chip and x copied to aligned rows.
    rows, failures = 40, {path: [] for path in _SP24_PATHS}

    def integers(*shape, low=-3):
        return torch.randint(low, 4, shape, generator=gen).to(torch.float64)

    for k, batches in ((1064, (3, 13, 150)), (91, (1, 40))):
        sign = torch.where(torch.rand(rows, k, generator=gen) < 0.5, -1.0, 1.0)
        dense = integers(rows, k, low=1) * sign  # no zeros: every kept value counts
        dense = dense * reference.nm_mask(dense, 2, 4, absolute=True)
        values64, metadata = reference.nm_compress(dense, 2, 4)
        values = values64.to(device=device, dtype=dtype)
        metadata = metadata.to(device)
        bias = integers(rows).to(device=device, dtype=dtype)
        try:
            packed_values, packed_meta = torch.ops.sparsekit.sp24_pack(values, metadata, k)
        except Exception as exc:  # e.g. no kernel image for this GPU: both paths fail
            for path in _SP24_PATHS:
                failures[path].append(f"packing: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        for batch in batches:
            path = _sp24_path(batch)
            x64 = integers(batch, k)
            try:
                y = _sp24_linear(x64.to(device=device, dtype=dtype), packed_values, packed_meta,
                                 bias, rows, k)
            except Exception as exc:  # e.g. the tiled pipeline's shared memory
                failures[path].append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            want = reference.nm_linear(x64, values64, metadata.cpu(),
                                       bias.cpu().to(torch.float64), k, 2, 4).to(dtype)
            if not torch.equal(y.cpu(), want):
                err = (y.cpu().double() - want.double()).abs().max().item()
                failures[path].append(f"k={k}, batch {batch}: max error {err:g} where the "
                                      "result must be exact")
    result = {}
    for path in _SP24_PATHS:
        why = None
        if failures[path]:
            rows_of_x = (f"up to {_SP24_SMALL_MAX_BATCH}" if path == "small"
                         else f"more than {_SP24_SMALL_MAX_BATCH}")
            why = (f"the sparse tensor-core {path} kernel failed its self-check on this GPU ("
                   + "; ".join(failures[path][:3]) + ")")
            warnings.warn(f"sparsekit: {why}; 2:4 products with {rows_of_x} rows of x on "
                          f"{key[0]} in {str(dtype).replace('torch.', '')} run the Triton "
                          "kernels instead. Please report this with sparsekit.build_info().",
                          RuntimeWarning, stacklevel=3)
        result[path] = why
    _SP24_CHECKED[key] = result
    return result


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    return torch.cuda.is_available()  # asked once: _capturing runs on every call


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return _cuda_available() and torch.cuda.is_current_stream_capturing()


# Decisions depend only on the device, the dtypes, the pattern and the backend setting:
# made once per combination, so a decode step pays a dictionary lookup, not the checks.
_CHOICES: dict = {}


def _nm_choice(forward: bool, x, values, n, m) -> tuple[str, str]:
    """(backend, why) for one CUDA call."""
    # Forward calls go to one of two sparse tensor-core kernels by their rows of x, and a
    # GPU may pass the self-check for one and not the other.
    path = None
    if forward:
        path = _sp24_path(x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0)
    key = (forward, path, x.device, x.dtype, values.dtype, n, m, _cuda_backend)
    choice = _CHOICES.get(key)
    if choice is None:
        backend, why, final = _decide(forward, x, values, n, m, path)
        choice = (backend, why)
        if final:
            _CHOICES[key] = choice
    return choice


def _decide(forward: bool, x, values, n, m, path: str | None = None) -> tuple[str, str, bool]:
    """(backend, why, final): final is False when the choice may change on a later call
    (the sparse tensor cores not yet checked, because this call is inside graph capture)."""
    reasons, final = [], True
    if forward and _cuda_backend in ("auto", "sp24"):
        why = _sp24_reason(x, values, n, m)
        if why is None:
            if (x.device, x.dtype) not in _SP24_CHECKED and _capturing():
                why = ("sparse tensor cores not yet checked on this GPU, and the first call "
                       "is inside CUDA graph capture: call once outside capture first")
                final = False
            else:
                why = _sp24_self_check(x.device, x.dtype)[path or "small"]
        if why is None:
            return "sp24", "sparse tensor-core kernel (sparsekit._C, mma.sp)", True
        reasons.append(why)
    if _cuda_backend in ("auto", "triton") or (_cuda_backend == "sp24" and not forward):
        why = _triton_nm_reason(x, values, n, m)
        if why is None:
            triton_why = "Triton kernel (sparsekit.kernels.nm_gemm)"
            return "triton", "; ".join([triton_why, *reasons]) if reasons else triton_why, final
        reasons.append(why)
    if _cuda_backend == "reference":
        reasons.append("set_cuda_backend('reference')")
    return ("reference", f"plain-torch reference (sparsekit.reference; {'; '.join(reasons)})",
            final)


# The packed mma.sp layout of a weight, derived once and reused until the weight changes
# (an optimizer step bumps the values' version counter). Keyed by the values tensor's id
# and checked by identity through a weak reference (tensors compare elementwise, so they
# cannot be dictionary keys themselves); a dropped weight drops its packed copy.
_SP24_CACHE: dict = {}


def _sp24_forget(key, ref):
    entry = _SP24_CACHE.get(key)
    if entry is not None and entry[0] is ref:
        del _SP24_CACHE[key]


def _sp24_cached(values):
    """The cached (packed_values, packed_meta) of this values tensor, or None."""
    entry = _SP24_CACHE.get(id(values))
    return entry[2] if entry is not None and entry[0]() is values else None


def _sp24_packed(values, metadata, k):
    if values.requires_grad and _capturing():
        # Inside CUDA graph capture the packing is recorded as well, so every replay packs
        # the weight as it is then: a trainable weight changes between replays, and a copy
        # cached now would be read stale by the graph. Frozen weights use the cache.
        return torch.ops.sparsekit.sp24_pack(values, metadata, k)
    try:
        stamp = (values.data_ptr(), values._version, metadata.data_ptr(), metadata._version, k)
    except RuntimeError:  # inference tensors carry no version counter: do not cache
        return torch.ops.sparsekit.sp24_pack(values, metadata, k)
    key = id(values)
    entry = _SP24_CACHE.get(key)
    if entry is not None and entry[0]() is values and entry[1] == stamp:
        return entry[2]
    packed = torch.ops.sparsekit.sp24_pack(values, metadata, k)
    ref = weakref.ref(values, lambda r, key=key: _sp24_forget(key, r))
    _SP24_CACHE[key] = (ref, stamp, packed)
    return packed


def _sp24_linear(x2d, packed_values, packed_meta, bias, rows, k):
    # One indirection, so tests without a GPU can put the CPU emulation of the kernel here
    # and exercise the dispatch around it.
    return torch.ops.sparsekit.sp24_linear(x2d, packed_values, packed_meta, bias, rows, k)


def _nm_linear_cuda(x, values, metadata, bias, k, n, m):
    backend, _ = _nm_choice(True, x, values, n, m)
    if backend == "reference":
        return reference.nm_linear(x, values, metadata, bias, k, n, m)
    if x.shape[-1] != k:
        raise ValueError(f"x must have k = {k} in its last dim, got {tuple(x.shape)}")
    rows = values.shape[0]
    if backend == "sp24":
        packed_values, packed_meta = _sp24_packed(values, metadata, k)
        y = _sp24_linear(_flat(x), packed_values, packed_meta, bias, rows, k)
    else:
        y = _triton_kernels().nm_gemm_forward(_flat(x).contiguous(), values.contiguous(),
                                              metadata.contiguous(), bias, k, n, m)
    return y.reshape(*x.shape[:-1], rows)


def _nm_linear_grad_input_cuda(grad_out, values, metadata, k, n, m):
    backend, _ = _nm_choice(False, grad_out, values, n, m)
    if backend == "reference":
        return reference.nm_linear_grad_input(grad_out, values, metadata, k, n, m)
    gx = _triton_kernels().nm_gemm_grad_input(_flat(grad_out).contiguous(), values.contiguous(),
                                              metadata.contiguous(), k, n, m)
    return gx.reshape(*grad_out.shape[:-1], k)


def _nm_sddmm_cuda(grad_out, x, metadata, k, n, m):
    backend, _ = _nm_choice(False, grad_out, x, n, m)
    if backend == "reference":
        return reference.nm_sddmm(grad_out, x, metadata, k, n, m)
    return _triton_kernels().nm_gemm_grad_values(_flat(grad_out).contiguous(),
                                                 _flat(x).contiguous(), metadata.contiguous(),
                                                 k, n, m)


_lib.impl("nm_linear", _nm_linear_cuda, "CUDA")
_lib.impl("nm_linear_grad_input", _nm_linear_grad_input_cuda, "CUDA")
_lib.impl("nm_sddmm", _nm_sddmm_cuda, "CUDA")

_EXPLAINERS["nm_linear", "CUDA"] = lambda x, values, *rest: _nm_choice(
    True, x, values, rest[-2], rest[-1])[1]
_EXPLAINERS["nm_linear_grad_input", "CUDA"] = lambda gy, values, *rest: _nm_choice(
    False, gy, values, rest[-2], rest[-1])[1]
_EXPLAINERS["nm_sddmm", "CUDA"] = lambda gy, x, *rest: _nm_choice(
    False, gy, x, rest[-2], rest[-1])[1]


# ---- bitmask format (unstructured sparsity): fake impls, autograd, wrappers --------------
# The same three product ops as N:M, with (values [nnz], mask, offsets) for the weight;
# each backward is written with these ops, so double backward works.

@torch.library.register_fake(f"{NAMESPACE}::bitmask_compress")
def _bitmask_compress_fake(w):
    torch._check(w.dim() == 2, lambda: f"w must be 2-D, got {w.dim()}-D")
    rows, k = w.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (w.new_empty((nnz,)), w.new_empty((rows, -(-k // 16)), dtype=torch.int16),
            w.new_empty((rows + 1,), dtype=torch.int64))


def _check_bitmask_fake(values, mask, offsets, k):
    torch._check(values.dim() == 1, lambda: f"values must be 1-D, got {values.dim()}-D")
    torch._check(mask.dim() == 2 and mask.shape[1] == -(-k // 16),
                 lambda: f"mask must be [rows, {-(-k // 16)}] for k={k}, got {tuple(mask.shape)}")
    torch._check(offsets.dim() == 1 and offsets.shape[0] == mask.shape[0] + 1,
                 lambda: "offsets must have rows + 1 entries")


@torch.library.register_fake(f"{NAMESPACE}::bitmask_decompress")
def _bitmask_decompress_fake(values, mask, offsets, k):
    _check_bitmask_fake(values, mask, offsets, k)
    return values.new_empty((mask.shape[0], k))


@torch.library.register_fake(f"{NAMESPACE}::bitmask_linear")
def _bitmask_linear_fake(x, values, mask, offsets, bias, k):
    _check_bitmask_fake(values, mask, offsets, k)
    _check_last_dim(x, k, "x")
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::bitmask_linear_grad_input")
def _bitmask_linear_grad_input_fake(grad_out, values, mask, offsets, k):
    _check_bitmask_fake(values, mask, offsets, k)
    _check_last_dim(grad_out, mask.shape[0], "grad_out")
    return grad_out.new_empty((*grad_out.shape[:-1], k))


@torch.library.register_fake(f"{NAMESPACE}::bitmask_sddmm")
def _bitmask_sddmm_fake(grad_out, x, mask, offsets, k):
    _check_last_dim(x, k, "x")
    _check_last_dim(grad_out, mask.shape[0], "grad_out")
    nnz = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((nnz,))


def _bitmask_linear_setup(ctx, inputs, output):
    x, values, mask, offsets, bias, k = inputs
    ctx.save_for_backward(x, values, mask, offsets)
    ctx.k = k
    ctx.has_bias = bias is not None


def _bitmask_linear_backward(ctx, grad_out):
    # Gradients reach x, the kept values and the bias only: pruned weights have no slot.
    x, values, mask, offsets = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.sparsekit.bitmask_linear_grad_input(grad_out, values, mask, offsets, ctx.k)
    if ctx.needs_input_grad[1]:
        grad_values = torch.ops.sparsekit.bitmask_sddmm(grad_out, x, mask, offsets, ctx.k)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_out.reshape(-1, mask.shape[0]).sum(0)
    return grad_x, grad_values, None, None, grad_bias, None


torch.library.register_autograd(f"{NAMESPACE}::bitmask_linear", _bitmask_linear_backward,
                                setup_context=_bitmask_linear_setup)


def _bitmask_grad_input_setup(ctx, inputs, output):
    grad_out, values, mask, offsets, k = inputs
    ctx.save_for_backward(grad_out, values, mask, offsets)
    ctx.k = k


def _bitmask_grad_input_backward(ctx, g):
    # out = grad_out @ W: d/dgrad_out = g @ W^T, d/dvalues = sddmm(grad_out, g).
    grad_out, values, mask, offsets = ctx.saved_tensors
    d_gy = d_values = None
    if ctx.needs_input_grad[0]:
        d_gy = torch.ops.sparsekit.bitmask_linear(g, values, mask, offsets, None, ctx.k)
    if ctx.needs_input_grad[1]:
        d_values = torch.ops.sparsekit.bitmask_sddmm(grad_out, g, mask, offsets, ctx.k)
    return d_gy, d_values, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::bitmask_linear_grad_input",
                                _bitmask_grad_input_backward, setup_context=_bitmask_grad_input_setup)


def _bitmask_sddmm_setup(ctx, inputs, output):
    grad_out, x, mask, offsets, k = inputs
    ctx.save_for_backward(grad_out, x, mask, offsets)
    ctx.k = k


def _bitmask_sddmm_backward(ctx, g):
    # out = (grad_out^T @ x) at kept positions; with G the dense form of g:
    # d/dgrad_out = x @ G^T, d/dx = grad_out @ G.
    grad_out, x, mask, offsets = ctx.saved_tensors
    d_gy = d_x = None
    if ctx.needs_input_grad[0]:
        d_gy = torch.ops.sparsekit.bitmask_linear(x, g, mask, offsets, None, ctx.k)
    if ctx.needs_input_grad[1]:
        d_x = torch.ops.sparsekit.bitmask_linear_grad_input(grad_out, g, mask, offsets, ctx.k)
    return d_gy, d_x, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::bitmask_sddmm", _bitmask_sddmm_backward,
                                setup_context=_bitmask_sddmm_setup)


def _bitmask_decompress_setup(ctx, inputs, output):
    values, mask, offsets, k = inputs
    ctx.save_for_backward(mask)
    ctx.k = k


def _bitmask_decompress_backward(ctx, g):
    (mask,) = ctx.saved_tensors
    return g[reference.bitmask_kept(mask, ctx.k)], None, None, None


torch.library.register_autograd(f"{NAMESPACE}::bitmask_decompress", _bitmask_decompress_backward,
                                setup_context=_bitmask_decompress_setup)


def bitmask_compress(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, mask, offsets) of a 2-D matrix in the bitmask format (sparsekit.bitmask)."""
    return torch.ops.sparsekit.bitmask_compress(w)


def bitmask_decompress_into(values, mask, offsets, k: int, out: torch.Tensor) -> torch.Tensor:
    """Writes the dense [rows, k] matrix of the bitmask triple into `out` (contiguous, the
    values' dtype and device) and returns it: the compiled CPU kernel writes in place;
    other devices, or a build without the extension, decompress and copy. Not
    differentiable (use bitmask_decompress for gradients)."""
    return _into("bitmask_decompress_into", (values, mask, offsets, k), out,
                 lambda: torch.ops.sparsekit.bitmask_decompress(values, mask, offsets, k))


def bitmask_decompress(values, mask, offsets, k: int) -> torch.Tensor:
    """Dense [rows, k] matrix of a bitmask triple."""
    return torch.ops.sparsekit.bitmask_decompress(values, mask, offsets, k)


def bitmask_linear(x, values, mask, offsets, bias, k: int) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W = (values, mask, offsets) in the bitmask format, [rows, k].
    Differentiable in x, values and bias; honours torch.autocast like nm_linear."""
    x, values, bias = _autocast_product_inputs(x, values, bias)
    return torch.ops.sparsekit.bitmask_linear(x, values, mask, offsets, bias, k)


def bitmask_linear_grad_input(grad_out, values, mask, offsets, k: int) -> torch.Tensor:
    """grad_x = grad_out @ W with W in the bitmask format."""
    return torch.ops.sparsekit.bitmask_linear_grad_input(grad_out, values, mask, offsets, k)


def bitmask_sddmm(grad_out, x, mask, offsets, k: int) -> torch.Tensor:
    """(grad_out^T @ x) at W's kept positions, [nnz]: the kept values' gradient."""
    return torch.ops.sparsekit.bitmask_sddmm(grad_out, x, mask, offsets, k)
