"""Mask-while-training: a bool mask attached to a module's weight, applied in forward.

The weight stays one tensor (the parametrization's `original`); the mask is a bool buffer
(no float copy); forward sees the weight with pruned entries selected to 0 (not multiplied:
inf or NaN at a pruned position still gives 0), so pruned entries get zero gradient and the
optimizer cannot revive them. `remove_mask` bakes the zeros in and leaves a plain
parameter, so the state_dict looks like the unpruned module's.

On CUDA, a masked nn.Linear runs the fused Triton kernel instead (sparsekit.ops.masked_linear
with the mask packed as bits): the masked weight is never materialised, and pruned weights
still get exactly zero gradient. The packed bits are cached and repacked only when the mask
changes. On the CPU, and wherever Triton does not cover the dtype, forward is nn.Linear's.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import ops, reference

__all__ = ["attach_mask", "get_mask", "remove_mask", "is_masked"]


class _BoolMask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Select, never multiply: inf * 0 and NaN * 0 are NaN, but a pruned weight is 0
        # whatever it held (as in the fused CUDA kernel, and what remove_mask bakes in).
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype,
                                                          device=weight.device))

    def packed_bits(self) -> torch.Tensor:
        """The mask as packed bits (uint8 [R, ceil(K/8)]) for the fused kernels. Cached (not
        in the state_dict); repacked when the mask was changed in place (its version counter
        moves), replaced, or moved to another device."""
        mask = self.mask
        if torch.compiler.is_compiling():
            return reference.pack_mask_bits(mask)
        try:
            key = (mask._version, mask.data_ptr(), mask.device)
        except RuntimeError:  # inference tensors keep no version counter: always repack
            return reference.pack_mask_bits(mask)
        cache = self.__dict__.get("_packed")
        # The cache holds the mask itself, so its address cannot be reused while cached.
        if cache is None or cache[0] is not mask or cache[1] != key:
            cache = (mask, key, reference.pack_mask_bits(mask))
            self.__dict__["_packed"] = cache
        return cache[2]


def _masked_linear_forward(self, input: torch.Tensor) -> torch.Tensor:
    """forward of a masked nn.Linear: the fused masked GEMM on CUDA when Triton covers the
    call and the mask is the weight's only parametrization; nn.Linear's forward otherwise."""
    chain = self.parametrizations.weight
    if input.is_cuda and len(chain) == 1 and isinstance(chain[0], _BoolMask):
        weight, bias = chain.original, self.bias
        input, weight, bias = ops.autocast_linear_inputs("cuda", input, weight, bias)
        if ops._masked_triton_reason(input, weight, bias) is None:
            return ops.masked_linear(input, weight, chain[0].packed_bits(), bias)
    return nn.functional.linear(input, self.weight, self.bias)


def _takes_fused_forward(module: nn.Module, name: str) -> bool:
    # Only a Linear whose forward is nn.Linear's own (a subclass may compute differently).
    return (name == "weight" and isinstance(module, nn.Linear)
            and type(module).forward is nn.Linear.forward)


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, _BoolMask) for p in module.parametrizations[name])


def _check(module, name, mask):
    if not isinstance(module, nn.Module) or not hasattr(module, name):
        raise ValueError(f"module has no parameter {name!r}")
    weight = getattr(module, name)
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != weight.shape):
        raise ValueError(f"mask must be a bool tensor of the {name}'s shape {tuple(weight.shape)}")
    return weight


def attach_mask(module: nn.Module, name: str = "weight", mask: torch.Tensor | None = None) -> None:
    """Attaches (or replaces) the bool mask of `module.<name>`; None keeps everything."""
    weight = _check(module, name, mask)
    if mask is None:
        mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    mask = mask.to(weight.device)
    if is_masked(module, name):
        get_mask(module, name).copy_(mask)
    else:
        fused = _takes_fused_forward(module, name)
        parametrize.register_parametrization(module, name, _BoolMask(mask))
        if fused:
            module.forward = types.MethodType(_masked_linear_forward, module)


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The attached bool mask (the live buffer)."""
    if not is_masked(module, name):
        raise ValueError(f"module.{name} has no mask attached")
    return next(p for p in module.parametrizations[name] if isinstance(p, _BoolMask)).mask


def remove_mask(module: nn.Module, name: str = "weight") -> None:
    """Bakes the mask into the weight (pruned entries become 0) and detaches it."""
    if not is_masked(module, name):
        raise ValueError(f"module.{name} has no mask attached")
    forward = module.__dict__.get("forward")
    if getattr(forward, "__func__", None) is _masked_linear_forward:
        del module.forward
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
