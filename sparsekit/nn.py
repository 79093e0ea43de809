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

__all__ = ["SparseLinear"]


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
