"""Gradual pruning driven from a user's own training loop.

    pruner = sk.prune.Pruner(model, sk.prune.cubic(0.0, 0.8, steps=100, every=10))
    for step, batch in enumerate(loader):
        loss = ...; loss.backward(); opt.step()
        pruner.step()               # updates the masks when the schedule says so
    pruner.finalize()               # bakes the zeros in (or converts to SparseLinear: pattern=)

Masks are recomputed from the masked weights, so a pruned weight (now 0) ranks lowest and
stays pruned: sparsity only grows.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import masks as masks_mod
from ..convert import SparsifyReport, sparsify
from ..format import parse_pattern
from .masking import attach_mask, get_mask, remove_mask
from .schedules import Schedule

__all__ = ["Pruner"]

METHODS = ("magnitude", "random", "ln_structured", "block", "nm")


class Pruner:
    """Attaches masks to every Linear / Conv2d weight of `model` and moves them along
    `schedule` (a sparsekit.prune schedule) each time `step()` is called.

    method: "magnitude" (unstructured |w|), "random", "ln_structured" (whole slices along
    `dim` by L`norm`), "block" (`block` = (bh, bw) tiles), or "nm": an unstructured
    magnitude ramp whose last update projects every weight onto the N:M `pattern`
    (schedule.final should be 1 - N/M). scope: "layer" (each weight reaches the sparsity)
    or "global" (one magnitude ranking across all weights; magnitude only).
    """

    def __init__(self, model: nn.Module, schedule: Schedule, method: str = "magnitude",
                 scope: str = "layer", types=(nn.Linear, nn.Conv2d), pattern: str = "2:4",
                 dim: int = 0, norm: float = 2, block=(4, 4), generator: torch.Generator | None = None):
        if not isinstance(schedule, Schedule):
            raise TypeError("schedule must come from sparsekit.prune (cubic, linear, ...)")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if scope == "global" and method != "magnitude":
            raise ValueError("scope='global' ranks magnitudes: use method='magnitude'")
        self.model, self.schedule, self.method, self.scope = model, schedule, method, scope
        self.n, self.m = parse_pattern(pattern)
        self.pattern, self.dim, self.norm, self.block, self.generator = pattern, dim, norm, block, generator
        self.modules = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, types)]
        if not self.modules:
            raise ValueError("model has no layer of the pruned types")
        for _, mod in self.modules:
            attach_mask(mod)
        self.step_count = 0
        self.sparsity = 0.0
        self._apply(schedule(0), force=True)

    def _effective(self, mod):
        return mod.weight.detach()  # the parametrized weight: original * mask

    def _apply(self, sparsity: float, force: bool = False) -> None:
        if sparsity == self.sparsity and not force:
            return
        weights = [self._effective(mod) for _, mod in self.modules]
        if self.scope == "global":
            new = masks_mod.global_magnitude(weights, sparsity)
        else:
            new = [self._layer_mask(w, get_mask(mod), sparsity)
                   for w, (_, mod) in zip(weights, self.modules)]
        for mask, (_, mod) in zip(new, self.modules):
            attach_mask(mod, mask=mask)
        self.sparsity = sparsity

    def _layer_mask(self, w: torch.Tensor, current: torch.Tensor, sparsity: float) -> torch.Tensor:
        if self.method == "magnitude":
            return masks_mod.magnitude(w, sparsity)
        if self.method == "random":
            # Random among the still-kept weights: pruned ones score -1 and go first.
            scores = torch.rand(w.shape, generator=self.generator, device=w.device)
            return masks_mod.magnitude(w, sparsity, scores=torch.where(current, scores, -1.0))
        if self.method == "ln_structured":
            return masks_mod.ln_structured(w, sparsity, n=self.norm, dim=self.dim)
        if self.method == "block":
            return masks_mod.block(w, sparsity, block=self.block)
        # "nm": unstructured ramp, then the N:M projection at the schedule's end.
        if self.step_count >= self.schedule.end:
            flat = w.flatten(1) if w.dim() > 2 else w
            if w.dim() == 4:  # conv: N:M over input channels at each kernel position
                flat = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
            keep = masks_mod.nm(flat, self.n, self.m)
            if w.dim() == 4:
                return keep.view(w.shape[0], w.shape[2], w.shape[3], w.shape[1]).permute(0, 3, 1, 2)
            return keep.view(w.shape)
        return masks_mod.magnitude(w, sparsity)

    def step(self) -> float:
        """Advances one step; updates the masks if the schedule's target changed (or, for
        "nm", when the ramp ends). Returns the sparsity now in force."""
        self.step_count += 1
        target = self.schedule(self.step_count)
        # "nm" projects onto the pattern once, when the ramp ends.
        self._apply(target, force=self.method == "nm" and self.step_count == self.schedule.end)
        return self.sparsity

    def masks(self) -> dict[str, torch.Tensor]:
        """{layer name: its live bool mask}."""
        return {name: get_mask(mod) for name, mod in self.modules}

    def finalize(self, pattern: str | None = None) -> SparsifyReport | None:
        """Bakes the masks into the weights (plain parameters again). With `pattern`
        ("2:4", or "unstructured" to keep any pattern of zeros compressed), then converts the
        pruned layers to SparseLinear / SparseConv2d."""
        for _, mod in self.modules:
            remove_mask(mod)
        if pattern is None:
            return None
        return sparsify(self.model, pattern, include=[name for name, _ in self.modules])
