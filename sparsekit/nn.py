"""Drop-in sparse layers: `SparseLinear` keeps an N:M weight compressed and multiplies on it.
With pattern="unstructured" it keeps any pattern of zeros in the bitmask format
(sparsekit.bitmask) instead.

    layer = SparseLinear.from_dense(torch.nn.Linear(4096, 4096), pattern="2:4")
    y = layer(x)                      # the sparse kernel or the dense path, whichever is faster
    layer.to_dense()                  # an equivalent torch.nn.Linear

Each forward runs one of two candidates (sparsekit.dispatch): "sparse", sparsekit's N:M
kernel on the compressed weight (sparsekit.ops.nm_linear), or "dense", the kept values
decompressed into a reused scratch buffer and torch's own F.linear / F.conv2d. The choice
is measured once per (shape, batch bucket, dtype, device) and cached; force it with
`layer.kernel_choice = "sparse"` or `sparsekit.kernel_choice("dense")`, inspect it with
`sparsekit.explain(layer, x)`.

The kept values are the trainable Parameter (`values`); the index metadata is a buffer. A
gradient exists for kept weights only, so pruned weights can never come back and weights,
gradients and optimizer state all stay at N/M of their dense size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import dispatch, masks, ops
from .bitmask import compress_bitmask
from .format import FLOAT_DTYPES, check_metadata, compress, parse_pattern
from .reference import index_bits

__all__ = ["SparseLinear", "SparseConv2d"]

UNSTRUCTURED = "unstructured"


def _dense_weight(rows, k, values, decompress, decompress_into, *inputs):
    """The dense [rows, k] weight for a dense-path call: with autograd (grad enabled and any
    of values / inputs requiring grad) a new differentiable tensor, decompress(), since
    backward keeps it; otherwise decompress_into(out) of this thread's reused scratch
    buffer (sparsekit.dispatch.scratch)."""
    if (torch.compiler.is_compiling() or values.device.type == "meta" or
            (torch.is_grad_enabled() and
             any(t is not None and t.requires_grad for t in (values, *inputs)))):
        return decompress()
    return decompress_into(dispatch.scratch((rows, k), values.dtype, values.device))


def _nm_dense_weight(values, metadata, k, n, m, *inputs):
    """_dense_weight for the N:M format."""
    return _dense_weight(values.shape[0], k, values,
                         lambda: ops.nm_decompress(values, metadata, k, n, m),
                         lambda out: ops.nm_decompress_into(values, metadata, k, n, m, out), *inputs)


class SparseLinear(dispatch.ModuleChoice, nn.Module):
    """y = x @ W^T + b with W [out_features, in_features] N:M sparse along in_features.

    Parameters: `values` [out_features, ceil(in/M)*N] (the kept weights, trainable) and
    `bias`; buffer: `metadata` (uint8, the canonical format of DESIGN.md). A fresh module
    holds the lowest N indices of every group with zero values; use `from_dense`.

    pattern="unstructured": W keeps any set of nonzeros in the bitmask format
    (sparsekit.bitmask): `values` [nnz] is the trainable Parameter, `mask` (int16
    [out_features, ceil(in/16)]) and `offsets` (int64 [out_features + 1]) are buffers, and
    the product runs as sparsekit.ops.bitmask_linear. A fresh module keeps nothing (nnz = 0);
    loading a state_dict takes its nnz.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 pattern: str = "2:4", device=None, dtype=None):
        super().__init__()
        self.unstructured = pattern == UNSTRUCTURED
        n, m = (0, 0) if self.unstructured else parse_pattern(pattern)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_dtype(dtype)
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        factory = {"device": device, "dtype": dtype}
        if self.unstructured:
            empty = compress_bitmask(torch.zeros(out_features, in_features, **factory))
            self.values = nn.Parameter(empty.values)
            self.register_buffer("mask", empty.mask)
            self.register_buffer("offsets", empty.offsets)
            self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
            self._kernel_descriptions = {
                "sparse": "sparsekit bitmask kernel, ops.bitmask_linear",
                "dense": "torch F.linear on the decompressed weight"}
            return
        groups = -(-in_features // m)
        self.values = nn.Parameter(torch.zeros(out_features, groups * n, **factory))
        empty = compress(torch.zeros(out_features, in_features, **factory), n, m)
        self.register_buffer("metadata", empty.metadata)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @property
    def pattern(self) -> str:
        return UNSTRUCTURED if self.unstructured else f"{self.n}:{self.m}"

    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern: str = "2:4", scores: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> "SparseLinear":
        """Prunes `linear.weight` to N:M (the n largest |w|, or `scores`, in every m along
        in_features; or an explicit N:M bool `mask`) and compresses it.

        pattern="unstructured" prunes nothing: it stores the nonzeros of the weight (of
        weight * `mask` when a bool mask is given, e.g. from sparsekit.masks.magnitude)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if pattern == UNSTRUCTURED:
            return cls._from_dense_unstructured(linear, scores, mask)
        n, m = parse_pattern(pattern)
        w = linear.weight.detach()
        if mask is None:
            mask = masks.nm(w, n, m, scores=scores)
        elif scores is not None:
            raise ValueError("give scores or mask, not both")
        elif mask.dtype != torch.bool or mask.shape != w.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(w.shape)}")
        kept = torch.where(mask.to(w.device), w, torch.zeros((), dtype=w.dtype, device=w.device))
        t = compress(kept, n, m)  # raises ValueError naming the group if `mask` is not N:M
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, pattern,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.values.copy_(t.values)
            layer.metadata.copy_(t.metadata)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @classmethod
    def _from_dense_unstructured(cls, linear, scores, mask) -> "SparseLinear":
        if scores is not None:
            raise ValueError("scores select N:M groups; pattern='unstructured' keeps the "
                             "weight's nonzeros (prune first, e.g. sparsekit.masks.magnitude, "
                             "or pass mask=)")
        w = linear.weight.detach()
        t = compress_bitmask(w, mask)  # checks the mask's dtype and shape, and NaN
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    UNSTRUCTURED, device=w.device, dtype=w.dtype)
        layer.values = nn.Parameter(t.values)
        layer.mask, layer.offsets = t.mask, t.offsets
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach())
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The dense [out_features, in_features] weight (a new tensor, not a view)."""
        if self.unstructured:
            return ops.bitmask_decompress(self.values.detach(), self.mask, self.offsets,
                                          self.in_features)
        return ops.nm_decompress(self.values.detach(), self.metadata, self.in_features,
                                 self.n, self.m)

    def to_dense(self) -> nn.Linear:
        """An nn.Linear computing the same function."""
        w = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have in_features = {self.in_features} in its last dim, "
                             f"got {tuple(x.shape)}")
        fn = dispatch.remembered(self, x)
        if fn is not None:
            return fn(self, x)
        return dispatch.run(self, self._kernel_key(x), self._kernel_candidates, (self, x), x)

    def _kernel_key(self, x: torch.Tensor) -> tuple:
        # Parameters and buffers are read from their dicts: nn.Module.__getattr__ costs about
        # a microsecond each, and a decoder makes hundreds of these calls per token.
        return dispatch.make_key("linear", self._format_key(), (self.out_features, self.in_features),
                                 math.prod(x.shape[:-1]), x, self._parameters["values"].dtype)

    def _format_key(self) -> str:
        """The format in kernel-choice keys. Unstructured layers add the kept fraction in
        tenths ("bitmask@0.2": 15-25% kept), since the faster path depends on it."""
        if not self.unstructured:
            return f"nm{self.n}:{self.m}"
        total = self.out_features * self.in_features
        return f"bitmask@{round(10 * self.values.shape[0] / total) / 10:.1f}"

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        p, b = self._parameters, self._buffers  # see _kernel_key
        bias = p["bias"] if "bias" in p else self.bias  # a layer without bias: a plain None
        if self.unstructured:
            return ops.bitmask_linear(x, p["values"], b["mask"], b["offsets"], bias,
                                      self.in_features)
        return ops.nm_linear(x, p["values"], b["metadata"], bias, self.in_features,
                             self.n, self.m)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._call_dense_weight(x), self.bias)

    def _call_dense_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The dense weight for a dense-path call (see _nm_dense_weight; unstructured: the
        same with the bitmask ops)."""
        if self.unstructured:
            v, mask, offsets, k = self.values, self.mask, self.offsets, self.in_features
            return _dense_weight(mask.shape[0], k, v,
                                 lambda: ops.bitmask_decompress(v, mask, offsets, k),
                                 lambda out: ops.bitmask_decompress_into(v, mask, offsets, k, out),
                                 x, self.bias)
        return _nm_dense_weight(self.values, self.metadata, self.in_features, self.n, self.m,
                                x, self.bias)

    # The kernels dispatch.run chooses from, {name: fn(module, x)}. Called by method name,
    # so a subclass (or another format's forward) that overrides a method is the one run.
    _kernel_candidates = {"sparse": lambda self, x: self._sparse_forward(x),
                          "dense": lambda self, x: self._dense_forward(x)}
    _kernel_descriptions = {"sparse": "sparsekit N:M kernel, ops.nm_linear",
                            "dense": "torch F.linear on the decompressed weight"}

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the compressed weight (values + metadata; unstructured: values + mask +
        offsets)."""
        if self.unstructured:
            return self.values.nbytes + self.mask.nbytes + self.offsets.nbytes
        return self.values.nbytes + self.metadata.nbytes

    @property
    def dense_weight_nbytes(self) -> int:
        return self.in_features * self.out_features * self.values.element_size()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern}, weight "
                f"{self.weight_nbytes} bytes ({self.weight_nbytes / self.dense_weight_nbytes:.4f} "
                f"of dense)")

    # The pattern and logical width travel with the state_dict, and loading checks them.
    def get_extra_state(self):
        return {"pattern": self.pattern, "in_features": self.in_features}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "pattern" not in state:
            raise ValueError("state_dict holds no SparseLinear extra state (pattern)")
        if state["pattern"] != self.pattern or state.get("in_features") != self.in_features:
            raise ValueError(
                f"state_dict is for a {state['pattern']} SparseLinear with in_features="
                f"{state.get('in_features')}, this module is {self.pattern} with in_features="
                f"{self.in_features}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The pattern first: a state_dict of another pattern fails with that, not a shape.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
        if self.unstructured:
            self._adopt_unstructured_shapes(state_dict, prefix)
            return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        meta = state_dict.get(prefix + "metadata")
        if meta is not None:
            groups = -(-self.in_features // self.m)
            expected = (self.out_features, (groups * self.n * index_bits(self.m) + 7) // 8)
            if (not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8
                    or tuple(meta.shape) != expected):
                got = (f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, torch.Tensor)
                       else type(meta).__name__)
                raise ValueError(f"{prefix}metadata must be uint8 of shape {expected}, got {got}")
        _check_loaded_pair(state_dict, prefix, meta, self.metadata, self.values.shape,
                           self.in_features, self.n, self.m)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _adopt_unstructured_shapes(self, state_dict, prefix):
        # nnz belongs to the weight, not to the module's shape: take the incoming one, after
        # checking that the triple is consistent (bitmask_decompress validates every row).
        values = state_dict.get(prefix + "values")
        mask = state_dict.get(prefix + "mask")
        offsets = state_dict.get(prefix + "offsets")
        if values is None or mask is None or offsets is None:
            return  # load_state_dict reports the missing keys
        expected = (self.out_features, -(-self.in_features // 16))
        if mask.dtype != torch.int16 or tuple(mask.shape) != expected:
            raise ValueError(f"{prefix}mask must be int16 of shape {expected}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        ops.bitmask_decompress(values.detach().cpu(), mask.cpu(), offsets.cpu(), self.in_features)
        if values.shape != self.values.shape:
            self.values = nn.Parameter(self.values.new_empty(values.shape),
                                       requires_grad=self.values.requires_grad)


def _check_dtype(dtype):
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype (float32, float16, bfloat16 or float64) "
                        f"for the kept weights, got {dtype}")


def _check_loaded_pair(state_dict, prefix, meta, own_meta, values_shape, k, n, m):
    """Validates the metadata (and the kept values in K's padding) a state_dict brings, once,
    at load: forward then trusts it. Errors name the state_dict key, the row and the group.
    A pair held only partly by the state_dict is checked against the module's other half."""
    values = state_dict.get(prefix + "values")
    if values is not None and (not isinstance(values, torch.Tensor) or values.shape != values_shape):
        return  # torch's own loading reports the size mismatch of the values first
    if meta is None and values is None:
        return
    metadata = meta if meta is not None else own_meta
    if metadata.device.type == "meta" or (values is not None and values.device.type == "meta"):
        return  # no data to check (a module being materialised)
    if values is not None:
        values = values.detach().to(metadata.device)
    meta_name = prefix + "metadata" + ("" if meta is not None else " (the module's own)")
    check_metadata(metadata, k, n, m, name=meta_name, values=values,
                   values_name=prefix + "values")


def _pair(v, name, minimum):
    def is_int(e):
        return isinstance(e, int) and not isinstance(e, bool)

    if is_int(v):
        v = (v, v)
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(is_int(e) for e in v):
        v = tuple(v)
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


# What a SparseConv2d checkpoint must agree on besides the compressed weight's own shape:
# kh*kw*C_in alone lets a (3, 1) kernel load into a (1, 3) one, or into a 1x1 of 3x C_in.
_CONV_GEOMETRY = ("pattern", "in_channels", "out_channels", "kernel_size", "stride", "padding",
                  "dilation")


class SparseConv2d(dispatch.ModuleChoice, nn.Module):
    """2-D convolution with an N:M weight, groups of M along the reduction dim.

    The weight [out, C_in, kh, kw] is permuted to [out, kh, kw, C_in] and flattened to
    [out, K = kh*kw*C_in], so a group holds M consecutive input channels at one kernel
    position (when C_in % M == 0; otherwise groups continue into the next position). Two
    candidates compute it (sparsekit.dispatch chooses per call): "sparse", the
    implicit-GEMM convolution sparsekit.ops.nm_conv2d (no unfold; 1x1 kernels the direct
    N:M product sparsekit.ops.nm_linear over channels-last pixels); "dense", the weight
    decompressed to [out, C_in, kh, kw] and torch's F.conv2d. Supports stride, padding
    (ints or 'same'), dilation and bias; groups=1 only.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 pattern: str = "2:4", device=None, dtype=None):
        super().__init__()
        if groups != 1:
            raise ValueError(f"groups={groups} (grouped or depthwise convolution) is not supported "
                             "by SparseConv2d: only groups=1")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode={padding_mode!r} is not supported: only 'zeros'")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_dtype(dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride, self.dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError("padding='same' needs stride=1 (as in torch.nn.Conv2d)")
            self.padding = "same"
        elif padding == "valid":
            self.padding = (0, 0)
        else:
            self.padding = _pair(padding, "padding", 0)
        self.groups = 1
        self.reduction = self.kernel_size[0] * self.kernel_size[1] * in_channels
        self.linear = SparseLinear(self.reduction, out_channels, bias, pattern, device, dtype)

    @property
    def pattern(self) -> str:
        return self.linear.pattern

    @property
    def values(self) -> nn.Parameter:
        return self.linear.values

    @property
    def metadata(self) -> torch.Tensor:
        return self.linear.metadata

    @property
    def bias(self):
        return self.linear.bias

    @staticmethod
    def _flatten(weight: torch.Tensor) -> torch.Tensor:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, pattern: str = "2:4", scores: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> "SparseConv2d":
        """Prunes conv.weight to N:M along (kh, kw, C_in)-flattened input channels (the n
        largest |w|, or `scores` of the weight's shape, or an explicit bool `mask` of the
        weight's shape) and compresses it."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, pattern, device=w.device, dtype=w.dtype)
        for name, t in (("scores", scores), ("mask", mask)):
            if t is not None and t.shape != w.shape:
                raise ValueError(f"{name} must have the conv weight's shape {tuple(w.shape)}")
        flat = nn.Linear(layer.reduction, conv.out_channels, conv.bias is not None,
                         device=w.device, dtype=w.dtype)
        with torch.no_grad():
            flat.weight.copy_(cls._flatten(w))
            if conv.bias is not None:
                flat.bias.copy_(conv.bias.detach())
        layer.linear = SparseLinear.from_dense(
            flat, pattern, scores=None if scores is None else cls._flatten(scores),
            mask=None if mask is None else cls._flatten(mask))
        return layer

    def dense_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = self.linear.dense_weight().view(self.out_channels, kh, kw, self.in_channels)
        return w.permute(0, 3, 1, 2).contiguous()

    def to_dense(self) -> nn.Conv2d:
        w = self.dense_weight()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, 1, self.bias is not None,
                         device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        return conv

    def _same_padding(self, x: torch.Tensor):
        """(x, padding) for padding='same': symmetric padding goes to the kernel; an odd
        total (an even dilated kernel) pads x explicitly, the extra row/column at the end as
        torch.nn.Conv2d does."""
        pads, symmetric = [], []
        for k, d in zip(reversed(self.kernel_size), reversed(self.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
            symmetric.insert(0, total // 2)
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return x, tuple(symmetric)
        return nn.functional.pad(x, pads), (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[0] == self.in_channels:  # unbatched, as nn.Conv2d takes
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [batch, {self.in_channels}, H, W] or unbatched "
                             f"[{self.in_channels}, H, W], got {tuple(x.shape)}")
        fn = dispatch.remembered(self, x)
        if fn is not None:
            return fn(self, x)
        return dispatch.run(self, self._kernel_key(x), self._kernel_candidates, (self, x), x)

    def _kernel_key(self, x: torch.Tensor) -> tuple:
        # The input's height and width are bucketed like the batch (powers of two).
        shape = (self.out_channels, self.in_channels, *self.kernel_size, *self.stride,
                 self.padding, *self.dilation, dispatch.batch_bucket(x.shape[2]),
                 dispatch.batch_bucket(x.shape[3]))
        return dispatch.make_key("conv2d", self.linear._format_key(), shape,
                                 x.shape[0], x, self.values.dtype)

    def _nm_product(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear._sparse_forward(x)  # N:M, or bitmask when unstructured

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse candidate: 1x1 kernels without padding as a direct product over
        channels (pixels as the batch; a stride subsamples x first), every other kernel
        through the implicit-GEMM convolution sparsekit.ops.nm_conv2d (N:M), or the bitmask
        product on unfolded patches (unstructured)."""
        padding = self.padding
        if padding == "same":
            x, padding = self._same_padding(x)
        if self.kernel_size == (1, 1) and padding == (0, 0):
            if self.stride != (1, 1):
                x = x[:, :, ::self.stride[0], ::self.stride[1]]
            return self._nm_product(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        kh, kw = self.kernel_size
        lin = self.linear
        if lin.unstructured:  # the bitmask product on unfolded patches
            return self._unfolded_product(x, padding)
        if (x.device.type == "cpu" and lin.values.dtype in (torch.float32, torch.bfloat16)
                and lin.n == 2 and lin.m == 4):
            # The fp32 and bf16 2:4 CPU kernels read x as NHWC and write y channels-last;
            # given a channels-last x they return y so, without a copy back to NCHW, and the
            # layers after them (pooling above all) run faster on channels-last.
            x = x.contiguous(memory_format=torch.channels_last)
        return ops.nm_conv2d(x, lin.values, lin.metadata, lin.bias, self.in_channels, kh, kw,
                             self.stride, padding, self.dilation, lin.n, lin.m)

    def _unfolded_product(self, x: torch.Tensor, padding) -> torch.Tensor:
        """The layer's sparse product on unfold's patches (for formats without a direct
        convolution kernel)."""
        batch, _, height, width = x.shape
        kh, kw = self.kernel_size
        out_h = (height + 2 * padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (width + 2 * padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = nn.functional.unfold(x, self.kernel_size, self.dilation, padding, self.stride)
        # unfold orders a patch (C, kh, kw); the weight is flattened (kh, kw, C).
        cols = cols.view(batch, self.in_channels, kh * kw, out_h * out_w).permute(0, 3, 2, 1)
        y = self._nm_product(cols.reshape(batch, out_h * out_w, self.reduction))  # [batch, L, out]
        return y.transpose(1, 2).reshape(batch, self.out_channels, out_h, out_w)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense candidate: the kept values decompressed (scratch buffer without
        autograd), viewed as [out, C_in, kh, kw], and torch's F.conv2d."""
        lin = self.linear
        w = lin._call_dense_weight(x)
        kh, kw = self.kernel_size
        if kh == kw == 1:
            # [out, C_in] is already [out, C_in, 1, 1] with standard strides: a channels-last
            # looking view would make F.conv2d convert x (and its output) to channels-last.
            w = w.view(self.out_channels, self.in_channels, 1, 1)
        else:
            w = w.view(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2)
        return nn.functional.conv2d(x, w, lin.bias, self.stride, self.padding, self.dilation)

    _kernel_candidates = SparseLinear._kernel_candidates  # by name: _sparse/_dense_forward
    _kernel_descriptions = {"sparse": "sparsekit N:M kernel, ops.nm_conv2d (1x1: ops.nm_linear)",
                            "dense": "torch F.conv2d on the decompressed weight"}

    @property
    def weight_nbytes(self) -> int:
        return self.linear.weight_nbytes

    @property
    def dense_weight_nbytes(self) -> int:
        return self.linear.dense_weight_nbytes

    # The full geometry travels with the state_dict and loading checks it (before the
    # compressed weight, whose shape only fixes kh*kw*C_in).
    def get_extra_state(self):
        return {name: getattr(self, name) for name in _CONV_GEOMETRY}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or not all(name in state for name in _CONV_GEOMETRY):
            raise ValueError("state_dict holds no SparseConv2d geometry (pattern, in_channels, "
                             "out_channels, kernel_size, stride, padding, dilation)")
        def norm(v):
            return tuple(v) if isinstance(v, (tuple, list)) else v

        wrong = [f"{name}={norm(state[name])!r} (this module: {getattr(self, name)!r})"
                 for name in _CONV_GEOMETRY if norm(state[name]) != getattr(self, name)]
        if wrong:
            raise ValueError("state_dict is for another SparseConv2d geometry: " + ", ".join(wrong))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, pattern={self.pattern}")
