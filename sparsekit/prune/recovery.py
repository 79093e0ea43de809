"""Recovery after one-shot pruning: distillation of the sparsified student against its
dense teacher.

    teacher = copy.deepcopy(model)
    sk.prune.oneshot(model, calibration, pattern="2:4", convert=True)
    sk.prune.distill(model, teacher, calibration, steps=200)

Only what cannot lose the pattern is trained: the kept values of SparseLinear /
SparseConv2d (their ``values``), biases, and the weights of normalization layers. Dense
Linear weights, embeddings and everything else stay frozen, so the N:M pattern (and the
compressed bytes) are exactly those that one-shot pruning chose.
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SparseConv2d, SparseLinear

__all__ = ["DistillReport", "distill", "recovery_parameters"]


@dataclass
class DistillReport:
    """Loss (KL divergence of the student's next-token distribution from the teacher's)
    at each step, the number of trained parameters, and the seconds."""

    steps: int
    trained_parameters: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        first = sum(self.losses[:10]) / max(len(self.losses[:10]), 1)
        last = sum(self.losses[-10:]) / max(len(self.losses[-10:]), 1)
        return (f"distill: {self.steps} steps, {self.trained_parameters:,} trained parameters, "
                f"KL {first:.4f} (first 10) -> {last:.4f} (last 10), {self.seconds:.0f} s")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def recovery_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters `distill` trains: SparseLinear values, biases (of every layer) and the
    parameters of normalization layers (nn.LayerNorm, GroupNorm, BatchNorm, *RMSNorm)."""
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, SparseLinear):
            chosen[id(module.values)] = module.values
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                chosen[id(p)] = p
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            chosen[id(bias)] = bias
    return list(chosen.values())


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}: distill needs logits")


def distill(student: nn.Module, teacher: nn.Module, data, steps: int = 100, lr: float = 1e-4,
            batch_size: int = 4, temperature: float = 1.0, max_grad_norm: float = 1.0,
            weight_decay: float = 0.0, progress: bool = True,
            max_seconds: float | None = None) -> DistillReport:
    """Fine-tunes `student` (pruned, sparsified) to match `teacher` (the dense model) with
    the KL divergence between their softened output distributions (``temperature``),
    AdamW on `recovery_parameters(student)` only, gradients clipped to ``max_grad_norm``,
    a linear learning-rate decay to 0 over ``steps``.

    max_seconds: a time budget. Training stops after the step that reaches it, and the
    learning rate decays by whichever is further along, steps or time, so that it ends near
    0 either way. The report's ``steps`` is the number of steps taken.

    data: a tensor of model inputs (e.g. token ids [count, length]; cut into batches of
    ``batch_size`` along dim 0 and cycled) or an iterable of such tensors (cycled).
    Returns a `DistillReport`; leaves the student in eval mode.
    """
    from tqdm.auto import tqdm

    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    for name, v in (("lr", lr), ("temperature", temperature), ("max_grad_norm", max_grad_norm)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive float, got {v!r}")
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(f"data is empty: a tensor of shape {tuple(data.shape)}")
        batches = list(data.split(batch_size))
    else:
        batches = list(data)
        if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
            raise ValueError("data must be a non-empty tensor or iterable of tensors")
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, numbers.Real)
                                    or not (max_seconds > 0 and math.isfinite(max_seconds))):
        raise ValueError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")
    params = recovery_parameters(student)
    if not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in student.modules()):
        raise ValueError("student has no SparseLinear / SparseConv2d: sparsify it first "
                         "(sk.sparsify or oneshot(..., convert=True))")
    trained = {id(p) for p in params}
    frozen = [p for p in student.parameters() if id(p) not in trained and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()

    def remaining(step: int) -> float:
        done = step / steps
        if max_seconds is not None:
            done = max(done, (time.perf_counter() - start) / max_seconds)
        return max(0.0, 1.0 - done)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, remaining)
    report = DistillReport(steps, sum(p.numel() for p in params))
    teacher.eval()
    student.train()
    # Steps, or seconds of the time budget when there is one.
    timed = max_seconds is not None
    bar = tqdm(total=math.ceil(max_seconds) if timed else steps, unit="s" if timed else "step",
               desc="distill", disable=not progress)
    try:
        for step, x in zip(range(steps), itertools.cycle(batches)):
            with torch.no_grad():
                target = _logits(teacher(x)).float() / temperature
            out = _logits(student(x)).float() / temperature
            loss = F.kl_div(F.log_softmax(out, -1).flatten(0, -2),
                            F.log_softmax(target, -1).flatten(0, -2),
                            log_target=True, reduction="batchmean") * temperature ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            report.losses.append(loss.item())
            elapsed = time.perf_counter() - start
            if timed:
                bar.update(min(math.floor(elapsed), bar.total) - bar.n)
            else:
                bar.update(1)
            bar.set_postfix(kl=f"{loss.item():.4f}", step=step + 1)
            if timed and elapsed >= max_seconds:
                break
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
        student.eval()
    report.seconds = time.perf_counter() - start
    report.steps = len(report.losses)
    return report
