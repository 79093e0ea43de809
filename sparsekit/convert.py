"""Whole-model conversion: `sparsify` swaps eligible nn.Linear / nn.Conv2d layers for
SparseLinear / SparseConv2d in place and reports what it did; `densify` swaps them back.

Both plan, then build, then apply: every check runs and every replacement is built before
the model is touched, so an error leaves the model as it was."""

from __future__ import annotations

import ast
import fnmatch
import inspect
import textwrap
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .format import parse_pattern
from .nn import SparseConv2d, SparseLinear

__all__ = ["SparsifyReport", "sparsify", "densify"]


@dataclass
class SparsifyReport:
    """What `sparsify` did: converted and skipped layers (with reasons), the sizes, and any
    other change made to keep the model correct (`notes`)."""

    pattern: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"sparsify {self.pattern}: {len(self.converted)} layers converted, "
                 f"{len(self.skipped)} skipped",
                 f"  parameters {self.params_before:,} -> {self.params_after:,}",
                 f"  converted weights {self.weight_bytes_before:,} -> {self.weight_bytes_after:,} bytes"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  note {note}" for note in self.notes]
        return "\n".join(lines)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# -- what makes a layer unsafe to replace ---------------------------------------------------

# Methods that read a child's weight only to initialise or describe it: harmless.
_INIT_METHODS = {"__init__", "reset_parameters", "_reset_parameters", "_init_weights", "extra_repr"}
_weight_reads_cache: dict[type, frozenset] = {}


def _class_weight_reads(klass: type) -> frozenset:
    """Dotted paths P for which a method of `klass` (its own source) reads `self.P.weight`
    outside initialisation. A class without source (C extension, REPL) reads nothing."""
    if klass in _weight_reads_cache:
        return _weight_reads_cache[klass]
    found = set()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        tree = None
    if tree is not None:
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in _INIT_METHODS:
                continue
            for node in ast.walk(fn):
                if not (isinstance(node, ast.Attribute) and node.attr == "weight"):
                    continue
                path, value = [], node.value
                while isinstance(value, ast.Attribute):
                    path.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id == "self" and path:
                    found.add(".".join(reversed(path)))
    _weight_reads_cache[klass] = frozenset(found)
    return _weight_reads_cache[klass]


def _weight_reads(module: nn.Module, besides: type | None = None) -> frozenset:
    """Paths P (relative to `module`) whose `.weight` the code of the module's classes
    (other than `besides`) reads."""
    reads = set()
    for klass in type(module).__mro__:
        if klass is besides or klass.__module__ in ("builtins", "torch.nn.modules.module",
                                                    "torch.nn.modules.container"):
            continue
        reads |= _class_weight_reads(klass)
    return frozenset(reads)


def _fastpath_off(module, args):
    """A no-op forward pre-hook: its presence turns TransformerEncoderLayer's fast path off."""
    return None


# Reads of a child's weight that happen only on torch's fused inference fast path, which
# sparsify turns off (the regular path calls the child module, so the output is unchanged).
_FASTPATH_READS = {"linear1", "linear2"}


def _disable_fastpaths(model: nn.Module, converted: set[int]) -> list[str]:
    """TransformerEncoderLayer skips its fast path when a submodule has a forward hook;
    TransformerEncoder reads its first layer's weights only while use_nested_tensor is set.
    Both fast paths read linear1/linear2.weight directly. Returns the notes for the report."""
    notes = []
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in sorted(_FASTPATH_READS):
                sub = getattr(module, child, None)
                if id(sub) in converted and _fastpath_off not in sub._forward_pre_hooks.values():
                    sub.register_forward_pre_hook(_fastpath_off)
                    notes.append(f"{prefix}{child}: a no-op forward pre-hook turns off "
                                 "TransformerEncoderLayer's fused fast path")
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            first = module.layers[0]
            if any(id(getattr(first, c, None)) in converted for c in _FASTPATH_READS):
                module.use_nested_tensor = False
                notes.append(f"{name or '(model)'}: use_nested_tensor=False (its fast path "
                             "reads the first layer's weights directly)")
    return notes


def _unsafe_reason(names: list[str], module: nn.Module, by_name: dict) -> str | None:
    """Why replacing `module` (reached under `names`) would break or change the model."""
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    kind = type(module)
    if kind.forward is not base.forward or (
            base is nn.Conv2d and kind._conv_forward is not nn.Conv2d._conv_forward):
        return (f"{kind.__qualname__} overrides {base.__name__}'s forward: the replacement "
                "would compute something else")
    forward = module.__dict__.get("forward")
    if forward is not None and getattr(forward, "__name__", "") != "_masked_linear_forward":
        return "its forward was replaced on the instance: the replacement would compute something else"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "it has hooks, which the replacement would lose"
    for name in names:
        parts = name.split(".")
        for depth in range(len(parts)):  # every ancestor that reads <path>.weight itself
            owner_name, rel = ".".join(parts[:depth]), ".".join(parts[depth:])
            owner = by_name[owner_name]
            if rel in _weight_reads(owner):
                if (isinstance(owner, nn.TransformerEncoderLayer) and rel in _FASTPATH_READS
                        and rel not in _weight_reads(owner, besides=nn.TransformerEncoderLayer)):
                    continue  # read on torch's fast path only, which sparsify turns off
                return (f"{type(owner).__qualname__} {owner_name or '(model)'} reads "
                        f"self.{rel}.weight directly")
    return None


def _weight_param(module: nn.Module):
    """The Parameter behind module.weight (under a parametrization, its `original`); the
    module itself when there is none (weight_norm's two tensors): nothing to be tied to."""
    if parametrize.is_parametrized(module, "weight"):
        return getattr(module.parametrizations.weight, "original", module)
    weight = module._parameters.get("weight")
    return module if weight is None else weight


@dataclass
class _Group:
    """One replacement: the module(s) holding one weight Parameter, and all their names."""

    names: list[str]
    modules: list[nn.Module]


def _plan(model, include, exclude, min_features, report) -> list[_Group]:
    """Decides what sparsify converts (and why the rest is skipped) without changing anything."""
    named = list(model.named_modules(remove_duplicate=False))
    by_name = dict(named)
    names_of: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in named:
        if name and isinstance(module, (nn.Linear, nn.Conv2d)):
            names_of.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    reason: dict[int, str | None] = {}
    for key, module in modules.items():
        names = names_of[key]
        if include is not None and not any(_matches(nm, include) for nm in names):
            reason[key] = "not included"
        elif any(_matches(nm, exclude) for nm in names):
            reason[key] = "excluded"
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            reason[key] = (f"groups={module.groups} (grouped or depthwise convolution) is "
                           "not supported")
        elif isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            reason[key] = f"padding_mode={module.padding_mode!r} is not supported"
        else:
            reduction = (module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                         if isinstance(module, nn.Conv2d) else module.in_features)
            reason[key] = (f"too small (reduction dim {reduction} < {min_features})"
                           if reduction < min_features else _unsafe_reason(names, module, by_name))

    # Tied weights: the modules holding one weight Parameter convert as one shared sparse
    # module (so they stay tied), or none of them does.
    holders: dict[int, set[str]] = {}
    for name, module in named:
        for pname, p in module._parameters.items():
            if p is not None:  # a parametrized weight lives in <owner>.parametrizations.weight
                owner = name.rsplit(".parametrizations.", 1)[0] if pname == "original" else name
                holders.setdefault(id(p), set()).add(owner)
    tied: dict[int, list[int]] = {}
    for key, module in modules.items():
        tied.setdefault(id(_weight_param(module)), []).append(key)
    plan = []
    for wid, keys in tied.items():
        others = sorted(h for h in holders.get(wid, ()) if id(by_name[h]) not in modules)
        first = modules[keys[0]]
        blocked = [k for k in keys if reason[k] is not None]
        differ = not all(type(modules[k]) is type(first) and modules[k].bias is first.bias
                         and repr(modules[k]) == repr(first) for k in keys)
        for k in keys:
            if reason[k] is not None:
                continue
            other = next((names_of[j][0] for j in keys if j != k), None)
            if others:
                reason[k] = f"weight is tied to {others[0]!r}, which is not a Linear or Conv2d"
            elif blocked:
                reason[k] = (f"weight is tied to {names_of[blocked[0]][0]!r}, which is not "
                             f"converted ({reason[blocked[0]]})")
            elif differ:
                reason[k] = (f"weight is tied to {other!r}, which has another bias or "
                             "configuration: one shared sparse module would change one of "
                             "them, two would untie them")
        if not any(reason[k] for k in keys):
            plan.append(_Group([nm for k in keys for nm in names_of[k]], [modules[k] for k in keys]))
    for key, why in reason.items():
        if why is not None:
            for name in names_of[key]:
                report.skipped[name] = why
    return plan


def sparsify(model: nn.Module, pattern: str = "2:4", include=None, exclude=None,
             scores: dict[str, torch.Tensor] | None = None, min_features: int | None = None
             ) -> SparsifyReport:
    """Replaces every eligible nn.Linear / nn.Conv2d of `model` (nested, in Sequential /
    ModuleList, a module shared under several names converted once) by SparseLinear /
    SparseConv2d, in place. Grouped and depthwise convolutions are skipped (reported).

    Atomic: every check runs and every replacement is built before the model is touched, so
    on an error (a bad pattern, a `scores` key naming no converted layer, NaN or inf in a
    weight: the message names the layer) the model is unchanged. A layer that cannot be
    replaced safely is skipped with its reason in the report: a module whose code reads the
    layer's `.weight` directly (nn.MultiheadAttention's out_proj, or any module whose own
    methods read `self.<path>.weight` outside __init__), a subclass with its own forward, a
    layer with hooks, a weight tied to something that stays dense. Layers sharing one weight
    Parameter become one shared sparse module, so they stay tied. nn.TransformerEncoderLayer
    / nn.TransformerEncoder fast paths, which read linear1/linear2.weight, are turned off
    where those were converted (see `report.notes`).

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

    plan = _plan(model, include, exclude, min_features, report)
    unknown = set(scores) - {name for group in plan for name in group.names}
    if unknown:
        why = {k: report.skipped[k] for k in sorted(unknown) if k in report.skipped}
        raise ValueError(f"scores names layers that are not converted: {sorted(unknown)}"
                         + (f" (skipped: {why})" if why else "") + "; sparsify changed nothing")

    built = []  # every replacement, before the model is touched
    for group in plan:
        module, name = group.modules[0], group.names[0]
        w = module.weight.detach()
        if not bool(torch.isfinite(w).all()):
            bad = "NaN" if bool(torch.isnan(w).any()) else "inf"
            raise ValueError(f"layer {name!r}: its weight has {bad} entries; sparsify changed nothing")
        given = [nm for nm in group.names if nm in scores]
        if len(given) > 1:
            raise ValueError(f"scores names one (shared or tied) layer twice: {given}; "
                             "sparsify changed nothing")
        kind = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
        try:
            sparse = kind.from_dense(module, pattern, scores=scores[given[0]] if given else None)
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer {name!r}: {e}; sparsify changed nothing") from e
        built.append((group, sparse))

    for group, sparse in built:
        for name in group.names:
            _replace(model, name, sparse)
        report.converted += group.names
        report.weight_bytes_before += group.modules[0].weight.nbytes
        report.weight_bytes_after += sparse.weight_nbytes
    report.notes = _disable_fastpaths(model, {id(sparse) for _, sparse in built})
    report.params_after = _count_params(model)
    return report


def densify(model: nn.Module) -> nn.Module:
    """Replaces every SparseLinear / SparseConv2d of `model` by an equivalent nn.Linear /
    nn.Conv2d, in place; a shared sparse module becomes one shared dense module. Every
    replacement is built before the model is touched."""
    replaced: dict[int, nn.Module] = {}
    targets: list[tuple[str, int]] = []
    convs: list[str] = []  # a SparseConv2d's own SparseLinear goes with it
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(c + ".") for c in convs):
            continue
        if isinstance(module, SparseConv2d):
            convs.append(name)
        if isinstance(module, (SparseLinear, SparseConv2d)):
            if id(module) not in replaced:
                replaced[id(module)] = module.to_dense()
            targets.append((name, id(module)))
    for name, key in targets:
        _replace(model, name, replaced[key])
    return model
