"""Whole-model conversion: `sparsify` swaps eligible nn.Linear / nn.Conv2d layers for
SparseLinear / SparseConv2d in place and reports what it did; `densify` swaps them back."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from .format import parse_pattern
from .nn import SparseConv2d, SparseLinear

__all__ = ["SparsifyReport", "sparsify", "densify"]


@dataclass
class SparsifyReport:
    """What `sparsify` did: converted and skipped layers (with reasons) and the sizes."""

    pattern: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def __str__(self) -> str:
        lines = [f"sparsify {self.pattern}: {len(self.converted)} layers converted, "
                 f"{len(self.skipped)} skipped",
                 f"  parameters {self.params_before:,} -> {self.params_after:,}",
                 f"  converted weights {self.weight_bytes_before:,} -> {self.weight_bytes_after:,} bytes"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, pattern: str = "2:4", include=None, exclude=None,
             scores: dict[str, torch.Tensor] | None = None, min_features: int | None = None
             ) -> SparsifyReport:
    """Replaces every eligible nn.Linear / nn.Conv2d of `model` (nested, in Sequential /
    ModuleList, a module shared under several names converted once) by SparseLinear /
    SparseConv2d, in place. Grouped and depthwise convolutions are skipped (reported).

    include / exclude: glob patterns on qualified module names ("encoder.*.fc1"); a layer is
    converted if it matches include (when given) and no exclude. scores: optional
    {name: tensor of the weight's shape} for activation-aware N:M selection.
    min_features: layers whose reduction dim (in_features, or C_in*kh*kw) is below it are
    skipped as too small (default M).

    pattern="unstructured" prunes nothing: each layer keeps the nonzeros of its weight in
    the bitmask format (prune first, e.g. with sparsekit.masks.magnitude, the Pruner or
    one-shot pruning); min_features then defaults to 16, one mask word.
    """
    if pattern == "unstructured":
        if scores:
            raise ValueError("scores select N:M groups; pattern='unstructured' keeps each "
                             "weight's nonzeros")
        m = 16
    else:
        n, m = parse_pattern(pattern)
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else (exclude or [])
    scores = scores or {}
    min_features = m if min_features is None else min_features
    report = SparsifyReport(pattern=pattern, params_before=_count_params(model))
    replaced: dict[int, SparseLinear] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name:
            continue
        if id(module) in replaced:  # a shared module: reuse its one replacement
            _replace(model, name, replaced[id(module)])
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if include is not None and not _matches(name, include):
            report.skipped[name] = "not included"
            continue
        if _matches(name, exclude):
            report.skipped[name] = "excluded"
            continue
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                report.skipped[name] = (f"groups={module.groups} (grouped or depthwise "
                                        "convolution) is not supported")
                continue
            if module.padding_mode != "zeros":
                report.skipped[name] = f"padding_mode={module.padding_mode!r} is not supported"
                continue
            reduction = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        else:
            reduction = module.in_features
        if reduction < min_features:
            report.skipped[name] = f"too small (reduction dim {reduction} < {min_features})"
            continue
        kind = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
        sparse = kind.from_dense(module, pattern, scores=scores.get(name))
        replaced[id(module)] = sparse
        _replace(model, name, sparse)
        report.converted.append(name)
        report.weight_bytes_before += module.weight.nbytes
        report.weight_bytes_after += sparse.weight_nbytes
    unknown = set(scores) - set(report.converted)
    if unknown:
        raise ValueError(f"scores names layers that were not converted: {sorted(unknown)}")
    report.params_after = _count_params(model)
    return report


def densify(model: nn.Module) -> nn.Module:
    """Replaces every SparseLinear / SparseConv2d of `model` by an equivalent nn.Linear /
    nn.Conv2d, in place."""
    replaced: dict[int, nn.Module] = {}
    convs: list[str] = []  # a SparseConv2d's own SparseLinear goes with it
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(c + ".") for c in convs):
            continue
        if isinstance(module, SparseConv2d):
            convs.append(name)
        if isinstance(module, (SparseLinear, SparseConv2d)):
            if id(module) not in replaced:
                replaced[id(module)] = module.to_dense()
            _replace(model, name, replaced[id(module)])
    return model
