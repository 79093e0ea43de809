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


def _find_chains(model: nn.Module, example_input: torch.Tensor, report: SlimReport) -> list[_Chain]:
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    shapes = {}
    fx.passes.shape_prop.ShapeProp(traced).propagate(example_input)
    for node in traced.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node] = tuple(meta.shape)
    chains = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        bn_name = node.target
        src = node.args[0]
        if not (src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)
                and modules[src.target].groups == 1 and len(src.users) == 1):
            report.left_alone[bn_name] = "not fed by its own Conv2d (groups=1)"
            continue
        consumers, why = [], None
        frontier = list(node.users)
        while frontier and why is None:
            user = frontier.pop()
            mod = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(mod, _CHANNELWISE_MODULES) or (
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
                for flat_user in user.users:
                    fmod = modules.get(flat_user.target) if flat_user.op == "call_module" else None
                    if isinstance(fmod, nn.Linear) and fmod.in_features == before[1] * before[2] * before[3]:
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
    return chains


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
    parent, _, child = name.rpartition(".")
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


def slim(model: nn.Module, ratio: float, example_input: torch.Tensor, min_channels: int = 1) -> SlimReport:
    """Removes the `ratio` of BatchNorm channels with the smallest |gamma| (one global
    threshold over the slimmable BNs, at least `min_channels` kept per layer), rebuilding
    each Conv -> BN -> ... -> Conv/Linear chain smaller, in place. Returns a SlimReport."""
    report = SlimReport(params_before=sum(p.numel() for p in model.parameters()))
    was_training = model.training
    model.eval()
    chains = _find_chains(model, example_input, report)
    keep = select_channels(model, ratio, [c.bn for c in chains], min_channels)
    # Consumers may be shared by several chains (not in the supported patterns), so slice
    # input channels per consumer once, with the union of what feeds it.
    for chain in chains:
        mask = keep[chain.bn]
        report.kept[chain.bn] = (int(mask.sum()), mask.numel())
        if bool(mask.all()):
            continue
        conv = model.get_submodule(chain.conv)
        _set(model, chain.conv, _slice_conv(conv, out_keep=mask))
        bn = model.get_submodule(chain.bn)
        new_bn = nn.BatchNorm2d(int(mask.sum()), bn.eps, bn.momentum, bn.affine,
                                bn.track_running_stats, device=bn.weight.device, dtype=bn.weight.dtype)
        with torch.no_grad():
            new_bn.weight.copy_(bn.weight[mask])
            new_bn.bias.copy_(bn.bias[mask])
            if bn.track_running_stats:
                new_bn.running_mean.copy_(bn.running_mean[mask])
                new_bn.running_var.copy_(bn.running_var[mask])
                new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        _set(model, chain.bn, new_bn)
        for name, kind, spatial in chain.consumers:
            layer = model.get_submodule(name)
            if kind == "conv":
                _set(model, name, _slice_conv(layer, in_keep=mask))
            else:
                cols = mask.repeat_interleave(spatial)  # flatten order: channel-major
                new = nn.Linear(int(cols.sum()), layer.out_features, layer.bias is not None,
                                device=layer.weight.device, dtype=layer.weight.dtype)
                with torch.no_grad():
                    new.weight.copy_(layer.weight[:, cols])
                    if layer.bias is not None:
                        new.bias.copy_(layer.bias)
                _set(model, name, new)
    model.train(was_training)
    report.params_after = sum(p.numel() for p in model.parameters())
    return report
