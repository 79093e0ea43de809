"""Drop-in sparse layers: `SparseLinear` keeps an N:M weight compressed and multiplies on it.

    layer = SparseLinear.from_dense(torch.nn.Linear(4096, 4096), pattern="2:4")
    y = layer(x)                      # sparsekit.ops.nm_linear: C++ kernels on the CPU
    layer.to_dense()                  # an equivalent torch.nn.Linear

The kept values are the trainable Parameter (`values`); the index metadata is a buffer. A
gradient exists for kept weights only, so pruned weights can never come back and weights,
gradients and optimizer state all stay at N/M of their dense size.
"""

from __future__ import annotations

import torch
from torch import nn

from . import masks, ops
from .format import compress, parse_pattern
from .reference import index_bits

__all__ = ["SparseLinear", "SparseConv2d"]


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W [out_features, in_features] N:M sparse along in_features.

    Parameters: `values` [out_features, ceil(in/M)*N] (the kept weights, trainable) and
    `bias`; buffer: `metadata` (uint8, the canonical format of DESIGN.md). A fresh module
    holds the lowest N indices of every group with zero values; use `from_dense`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 pattern: str = "2:4", device=None, dtype=None):
        super().__init__()
        n, m = parse_pattern(pattern)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        factory = {"device": device, "dtype": dtype}
        groups = -(-in_features // m)
        self.values = nn.Parameter(torch.zeros(out_features, groups * n, **factory))
        empty = compress(torch.zeros(out_features, in_features, **factory), n, m)
        self.register_buffer("metadata", empty.metadata)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern: str = "2:4", scores: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> "SparseLinear":
        """Prunes `linear.weight` to N:M (the n largest |w|, or `scores`, in every m along
        in_features; or an explicit N:M bool `mask`) and compresses it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
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

    def dense_weight(self) -> torch.Tensor:
        """The dense [out_features, in_features] weight (a new tensor, not a view)."""
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
        return ops.nm_linear(x, self.values, self.metadata, self.bias, self.in_features,
                             self.n, self.m)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the compressed weight (values + metadata)."""
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
        meta = state_dict.get(prefix + "metadata")
        if meta is not None:
            groups = -(-self.in_features // self.m)
            expected = (self.out_features, (groups * self.n * index_bits(self.m) + 7) // 8)
            if meta.dtype != torch.uint8 or tuple(meta.shape) != expected:
                raise ValueError(f"{prefix}metadata must be uint8 of shape {expected}, got "
                                 f"{meta.dtype} {tuple(meta.shape)}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _pair(v, name):
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return tuple(v)
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


class SparseConv2d(nn.Module):
    """2-D convolution with an N:M weight, groups of M along the reduction dim.

    The weight [out, C_in, kh, kw] is permuted to [out, kh, kw, C_in] and flattened to
    [out, K = kh*kw*C_in], so a group holds M consecutive input channels at one kernel
    position (when C_in % M == 0; otherwise groups continue into the next position). The
    product runs as sparsekit.ops.nm_linear directly on channels-last pixels for 1x1
    kernels, and as the implicit-GEMM convolution sparsekit.ops.nm_conv2d (no unfold)
    otherwise. Supports stride, padding (ints or 'same'),
    dilation and bias; groups=1 only.
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
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError("padding='same' needs stride=1 (as in torch.nn.Conv2d)")
            self.padding = "same"
        elif padding == "valid":
            self.padding = (0, 0)
        else:
            self.padding = _pair(padding, "padding")
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
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [batch, {self.in_channels}, H, W], got {tuple(x.shape)}")
        return self._sparse_forward(x)

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse path: 1x1 kernels without padding as a direct N:M product over channels
        (pixels as the batch; a stride subsamples x first), every other kernel through the
        implicit-GEMM convolution sparsekit.ops.nm_conv2d."""
        padding = self.padding
        if padding == "same":
            x, padding = self._same_padding(x)
        if self.kernel_size == (1, 1) and padding == (0, 0):
            if self.stride != (1, 1):
                x = x[:, :, ::self.stride[0], ::self.stride[1]]
            return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        kh, kw = self.kernel_size
        return ops.nm_conv2d(x, self.values, self.metadata, self.bias, self.in_channels, kh, kw,
                             self.stride, padding, self.dilation, self.linear.n, self.linear.m)

    @property
    def weight_nbytes(self) -> int:
        return self.linear.weight_nbytes

    @property
    def dense_weight_nbytes(self) -> int:
        return self.linear.dense_weight_nbytes

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, pattern={self.pattern}")
