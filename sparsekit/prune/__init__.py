"""Pruning workflows on dense weights with bool masks: schedules, gradual pruning driven
from a training loop, and the final conversion to compressed N:M layers."""

from .masking import attach_mask, get_mask, is_masked, remove_mask
from .pruner import METHODS, Pruner
from .schedules import Schedule, constant, cubic, exponential, linear, stepwise

__all__ = ["attach_mask", "get_mask", "is_masked", "remove_mask", "Pruner", "METHODS",
           "Schedule", "constant", "cubic", "exponential", "linear", "stepwise"]
