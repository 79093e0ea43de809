"""Mask-while-training: a bool mask attached to a module's weight, applied in forward.

The weight stays one tensor (the parametrization's `original`); the mask is a bool buffer
(no float copy); forward sees weight * mask, so pruned entries get zero gradient and the
optimizer cannot revive them. `remove_mask` bakes the zeros in and leaves a plain
parameter, so the state_dict looks like the unpruned module's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["attach_mask", "get_mask", "remove_mask", "is_masked"]


class _BoolMask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


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
        parametrize.register_parametrization(module, name, _BoolMask(mask))


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The attached bool mask (the live buffer)."""
    if not is_masked(module, name):
        raise ValueError(f"module.{name} has no mask attached")
    return next(p for p in module.parametrizations[name] if isinstance(p, _BoolMask)).mask


def remove_mask(module: nn.Module, name: str = "weight") -> None:
    """Bakes the mask into the weight (pruned entries become 0) and detaches it."""
    if not is_masked(module, name):
        raise ValueError(f"module.{name} has no mask attached")
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
