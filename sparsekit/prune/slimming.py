"""Network slimming (Liu et al. 2017): sparsify BatchNorm scales with an L1 penalty, pick
channels by a global threshold on |gamma|, and rebuild the layers physically smaller.

    loss = task_loss + sk.prune.bn_l1_penalty(model, 1e-4)     # while training
    report = sk.prune.slim(model, ratio=0.5, example_input=x)   # then remove channels

`slim` traces the model with torch.fx to find, for each BatchNorm2d, the Conv2d that feeds
it and every layer its (activated, pooled) output reaches. Channels are removed only where
that chain is fully understood: Conv2d -> BatchNorm2d -> channel-wise ops (activations,
pooling, dropout) -> Conv2d (groups=1) or flatten -> Linear. Channels that reach a residual
addition, a concatenation or anything else are left alone, so the result always runs.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn

__all__ = ["bn_l1_penalty", "add_bn_l1_grad", "select_channels", "slim", "SlimReport"]

# Modules and functions that act on each channel independently (keep channel identity).
_CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                        nn.Hardswish, nn.ELU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)
_CHANNELWISE_FUNCTIONS = {torch.relu, nn.functional.relu, nn.functional.gelu, nn.functional.silu,
                          torch.sigmoid, torch.tanh, nn.functional.max_pool2d,
                          nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d,
                          nn.functional.dropout}
_FLATTENS = {torch.flatten}


def _bns(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]


def bn_l1_penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """lam * sum of |gamma| over every BatchNorm2d: add it to the training loss."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    terms = [bn.weight.abs().sum() for bn in _bns(model)]
    return lam * torch.stack(terms).sum() if terms else torch.zeros(())


def add_bn_l1_grad(model: nn.Module, lam: float) -> None:
    """The paper's form: after backward(), add lam * sign(gamma) to every BN gamma's grad."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    for bn in _bns(model):
        if bn.weight.grad is not None:
            bn.weight.grad.add_(lam * torch.sign(bn.weight.detach()))


@dataclass
class SlimReport:
    """What `slim` did: channels kept per BatchNorm, the layers left alone and why, sizes."""

    kept: dict[str, tuple[int, int]] = field(default_factory=dict)  # bn name: (kept, total)
    left_alone: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    def __str__(self) -> str:
        lines = [f"slim: parameters {self.params_before:,} -> {self.params_after:,} "
                 f"({self.params_after / max(self.params_before, 1):.1%})"]
        lines += [f"  {name}: {k}/{t} channels" for name, (k, t) in self.kept.items()]
        lines += [f"  {name} left alone: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


@dataclass
class _Chain:
    bn: str
    conv: str
    consumers: list  # (module name, kind: "conv" | "linear", spatial size for linear)


def _target(node):
    return node.target if node.op == "call_module" else None


def _flatten_problem(user, modules, before) -> str | None:
    """Why the flatten `user` (of an [N, C, H, W] tensor) would not follow a change of C: a
    start_dim other than 1, or a view/reshape whose traced shape is a constant (the
    tutorial's x.view(-1, 16 * 5 * 5)), which slimming cannot rewrite in the forward."""
    if user.op == "call_module":
        mod = modules[user.target]
        ok = mod.start_dim == 1 and mod.end_dim in (-1, 3)
    elif user.op == "call_function" or user.target == "flatten":
        start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
        stop = user.args[2] if len(user.args) > 2 else user.kwargs.get("end_dim", -1)
        ok = start == 1 and stop in (-1, 3)
    else:  # view / reshape: only (batch, -1), where -1 absorbs the new C * H * W
        shape = list(user.args[1:])
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        ok = (len(shape) == 2 and shape[1] == -1
              and (isinstance(shape[0], fx.Node) or shape[0] == before[0]))
        if not ok:
            return (f"flattened by {user.format_node()}, whose traced shape is a constant "
                    "that slimming cannot change in the forward")
    return None if ok else f"flattened by {user.format_node()}, not from dim 1 to the end"


def _find_chains(model: nn.Module, example_input: torch.Tensor, report: SlimReport) -> list[_Chain]:
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    shapes = {}
    fx.passes.shape_prop.ShapeProp(traced).propagate(example_input)
    for node in traced.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node] = tuple(meta.shape)
    # A module called more than once (shared between branches, or reached twice) cannot be
    # resized for one of its calls only.
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    chains = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        bn_name = node.target
        src = node.args[0]
        if calls[bn_name] > 1:
            report.left_alone[bn_name] = f"called {calls[bn_name]} times (shared)"
            continue
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules[src.target], nn.Conv2d)
                and modules[src.target].groups == 1 and len(src.users) == 1):
            report.left_alone[bn_name] = "not fed by its own Conv2d (groups=1)"
            continue
        if calls[src.target] > 1:
            report.left_alone[bn_name] = (f"its Conv2d {src.target} is called {calls[src.target]} "
                                          "times (shared)")
            continue
        consumers, why = [], None
        frontier, seen = list(node.users), set()
        while frontier and why is None:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            mod = modules.get(user.target) if user.op == "call_module" else None
            if mod is not None and calls[user.target] > 1 and not isinstance(mod, _CHANNELWISE_MODULES):
                why = f"reaches {user.target}, which is called {calls[user.target]} times (shared)"
            elif isinstance(mod, _CHANNELWISE_MODULES) or (
                    user.op == "call_function" and user.target in _CHANNELWISE_FUNCTIONS):
                frontier += list(user.users)
            elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
                consumers.append((user.target, "conv", None))
            elif (isinstance(mod, nn.Flatten) or (user.op == "call_function" and user.target in _FLATTENS)
                  or (user.op == "call_method" and user.target in ("flatten", "view", "reshape"))):
                before = shapes.get(user.args[0])
                if before is None or len(before) != 4:
                    why = "flattened without a known [N, C, H, W] shape"
                    break
                why = _flatten_problem(user, modules, before)
                for flat_user in user.users:
                    fmod = modules.get(flat_user.target) if flat_user.op == "call_module" else None
                    if why is not None:
                        break
                    if isinstance(fmod, nn.Linear) and fmod.in_features == before[1] * before[2] * before[3]:
                        if calls[flat_user.target] > 1:
                            why = (f"reaches {flat_user.target}, which is called "
                                   f"{calls[flat_user.target]} times (shared)")
                        else:
                            consumers.append((flat_user.target, "linear", before[2] * before[3]))
                    else:
                        why = "flattened into something other than a Linear"
            elif user.op == "call_function" and user.target in (operator.add, torch.add, torch.cat):
                why = "reaches a residual addition or concatenation"
            else:
                why = f"reaches {user.format_node()}, which slimming does not follow"
        if why is None and not consumers:
            why = "its output reaches no Conv2d or Linear"
        if why is not None:
            report.left_alone[bn_name] = why
            continue
        chains.append(_Chain(bn_name, src.target, consumers))
    # A layer that consumes two chains' channels (reached from both) would need the union of
    # two selections: leave both chains alone. (A consumer conv that also produces the next
    # chain is fine: its input and output channels are sliced independently.)
    fed_by: dict[str, list[str]] = {}
    for chain in chains:
        for name in {c[0] for c in chain.consumers}:
            fed_by.setdefault(name, []).append(chain.bn)
    clash = {bn for bns in fed_by.values() if len(bns) > 1 for bn in bns}
    for chain in chains:
        if chain.bn in clash:
            report.left_alone[chain.bn] = "a layer it feeds is also fed by another BatchNorm's channels"
    return [c for c in chains if c.bn not in clash]


def select_channels(model: nn.Module, ratio: float, names=None, min_channels: int = 1) -> dict:
    """{BatchNorm name: bool keep mask}: one global threshold on |gamma| prunes `ratio` of
    all channels (of the BNs in `names`, default all), keeping at least `min_channels`
    (largest |gamma|) in every layer."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}
    if names is not None:
        bns = {n: bns[n] for n in names}
    if not bns:
        return {}
    gammas = torch.cat([b.weight.detach().abs().flatten() for b in bns.values()])
    n_prune = round(ratio * gammas.numel())
    threshold = torch.sort(gammas).values[n_prune - 1] if n_prune > 0 else -1.0
    keep = {}
    for name, bn in bns.items():
        g = bn.weight.detach().abs()
        mask = g > threshold
        if int(mask.sum()) < min(min_channels, g.numel()):
            mask = torch.zeros_like(mask)
            mask[torch.topk(g, min(min_channels, g.numel())).indices] = True
        keep[name] = mask
    return keep


def _set(model, name, new):
    """Puts `new` in place of the module at `name`, under every name that module has."""
    old = model.get_submodule(name)
    for alias, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and alias:
            parent, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)


def _slice_conv(conv: nn.Conv2d, out_keep=None, in_keep=None) -> nn.Conv2d:
    w = conv.weight.detach()
    if out_keep is not None:
        w = w[out_keep]
    if in_keep is not None:
        w = w[:, in_keep]
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[out_keep] if out_keep is not None else conv.bias.detach())
    return new


def _slice_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(int(keep.sum()), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device, dtype=bn.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(bn.weight[keep])
        new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _slice_linear(layer: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    new = nn.Linear(int(cols.sum()), layer.out_features, layer.bias is not None,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, cols])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def slim(model: nn.Module, ratio: float, example_input: torch.Tensor, min_channels: int = 1) -> SlimReport:
    """Removes the `ratio` of BatchNorm channels with the smallest |gamma| (one global
    threshold over the slimmable BNs, at least `min_channels` kept per layer), rebuilding
    each Conv -> BN -> ... -> Conv/Linear chain smaller, in place. Returns a SlimReport.

    Plans everything first and changes nothing on failure. Chains that cannot be resized
    consistently are left alone with the reason in the report: modules called more than once
    (one conv on two branches, a shared BatchNorm or consumer), residual additions and
    concatenations, a flatten by view/reshape with a constant shape (x.view(-1, 16 * 5 * 5)).
    The slimmed model is run on `example_input` before returning; if it fails, every layer
    is put back and the error is raised."""
    report = SlimReport(params_before=sum(p.numel() for p in model.parameters()))
    was_training = model.training
    model.eval()
    try:
        chains = _find_chains(model, example_input, report)
        keep = select_channels(model, ratio, [c.bn for c in chains], min_channels)
        # Plan: each layer's new input / output channels, from the original layers.
        out_keep, in_keep, bn_keep = {}, {}, {}
        for chain in chains:
            mask = keep[chain.bn]
            report.kept[chain.bn] = (int(mask.sum()), mask.numel())
            if bool(mask.all()):
                continue
            out_keep[chain.conv], bn_keep[chain.bn] = mask, mask
            for name, kind, spatial in chain.consumers:
                # flatten order is channel-major: a channel owns `spatial` consecutive columns
                in_keep[name] = mask if kind == "conv" else mask.repeat_interleave(spatial)
        # Build every new layer before touching the model.
        new = {}
        for name in dict.fromkeys([*out_keep, *in_keep, *bn_keep]):
            layer = model.get_submodule(name)
            if name in bn_keep:
                new[name] = _slice_bn(layer, bn_keep[name])
            elif isinstance(layer, nn.Conv2d):
                new[name] = _slice_conv(layer, out_keep=out_keep.get(name), in_keep=in_keep.get(name))
            else:
                new[name] = _slice_linear(layer, in_keep[name])
            new[name].train(layer.training)  # eval here: the check below must not move BN stats
        old = {name: model.get_submodule(name) for name in new}
        for name, layer in new.items():
            _set(model, name, layer)
        if new:
            try:
                with torch.no_grad():
                    model(example_input)
            except Exception:
                for name, layer in old.items():
                    _set(model, name, layer)  # `name` now holds the new layer: put the old back
                raise
    finally:
        model.train(was_training)
    report.params_after = sum(p.numel() for p in model.parameters())
    return report
