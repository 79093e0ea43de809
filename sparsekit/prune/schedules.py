"""Sparsity schedules: the target sparsity at a training step.

Each schedule is a callable `schedule(step) -> float` in [0, 1], constant before `start`
and after the ramp ends. Steps count calls of `Pruner.step()` (see sparsekit.prune).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Schedule", "cubic", "linear", "exponential", "stepwise", "constant"]


def _check_fraction(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0 or math.isnan(v):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {v!r}")
    return float(v)


def _check_steps(name, v, minimum=0):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _ramp(kind, initial, final, start, steps, every) -> "Schedule":
    # Pruning only ever removes weights: a ramp that goes backwards would ask the masks to
    # revive pruned weights (and the exponential ramp from sparsity 1 divides by density 0).
    initial, final = _check_fraction("initial", initial), _check_fraction("final", final)
    if final < initial:
        raise ValueError(f"final must be >= initial (sparsity only grows), got initial="
                         f"{initial} and final={final}")
    return Schedule(initial, final, _check_steps("start", start), _check_steps("steps", steps),
                    _check_steps("every", every, 1), kind)


_KINDS = ("cubic", "linear", "exponential", "stepwise", "constant")


@dataclass(frozen=True)
class Schedule:
    """A ramp from `initial` to `final` sparsity over steps [start, start + steps * every],
    updated every `every` steps (piecewise constant in between), shaped by `kind`."""

    initial: float
    final: float
    start: int
    steps: int
    every: int
    kind: str

    def __post_init__(self):
        # Built directly or by the functions below: the same checks, so no schedule can
        # divide by zero (every = 0, exponential from density 0) or go backwards at a step.
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        _check_fraction("initial", self.initial), _check_fraction("final", self.final)
        _check_steps("start", self.start), _check_steps("steps", self.steps)
        _check_steps("every", self.every, 1)
        if self.final < self.initial:
            raise ValueError(f"final must be >= initial (sparsity only grows), got initial="
                             f"{self.initial} and final={self.final}")

    def __call__(self, step: int) -> float:
        if step < self.start:
            return self.initial if self.kind != "constant" else self.final
        done = min((step - self.start) // self.every, self.steps)  # updates made so far
        frac = done / self.steps if self.steps else 1.0
        s_i, s_f = self.initial, self.final
        if self.kind == "cubic":  # Zhu & Gupta 2017
            return s_f + (s_i - s_f) * (1.0 - frac) ** 3
        if self.kind == "linear":
            return s_i + (s_f - s_i) * frac
        if self.kind == "exponential":  # density shrinks geometrically
            d_i, d_f = 1.0 - s_i, 1.0 - s_f
            if d_f == 0.0:
                return s_i + (s_f - s_i) * frac if frac < 1 else s_f
            return 1.0 - d_i * (d_f / d_i) ** frac
        if self.kind == "stepwise":  # `steps` holds the increment count, see stepwise()
            return min(s_f, s_i + (s_f - s_i) * frac)
        return s_f  # constant

    @property
    def end(self) -> int:
        """The first step at which the final sparsity holds."""
        return self.start + self.steps * self.every


def cubic(initial: float, final: float, start: int = 0, steps: int = 10, every: int = 1) -> Schedule:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, with n = steps
    updates every dt = `every` steps from t0 = `start`: fast early, gentle near the end."""
    return _ramp("cubic", initial, final, start, steps, every)


def linear(initial: float, final: float, start: int = 0, steps: int = 10, every: int = 1) -> Schedule:
    """Sparsity grows by the same amount at each of `steps` updates."""
    return _ramp("linear", initial, final, start, steps, every)


def exponential(initial: float, final: float, start: int = 0, steps: int = 10, every: int = 1) -> Schedule:
    """The kept fraction (density) shrinks by the same factor at each update."""
    return _ramp("exponential", initial, final, start, steps, every)


def stepwise(initial: float = 0.1, increment: float = 0.05, final: float = 0.5, start: int = 0,
             every: int = 1) -> Schedule:
    """The seed article's rounds: `initial`, then + `increment` per round up to `final`
    (10% then +5% per round to 50% by default); a round is `every` steps."""
    initial, final = _check_fraction("initial", initial), _check_fraction("final", final)
    increment = _check_fraction("increment", increment)
    if increment == 0.0 or final < initial:
        raise ValueError("increment must be > 0 and final >= initial")
    rounds = math.ceil(round((final - initial) / increment, 9))
    return Schedule(initial, final, _check_steps("start", start), rounds,
                    _check_steps("every", every, 1), "stepwise")


def constant(sparsity: float) -> Schedule:
    """The same sparsity at every step (one-shot pruning)."""
    s = _check_fraction("sparsity", sparsity)
    return Schedule(s, s, 0, 0, 1, "constant")
