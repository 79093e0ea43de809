"""Pruning workflows: bool masks while training, schedules, gradual pruning driven from a
training loop with the final conversion to compressed N:M layers, and network slimming."""

from .masking import attach_mask, get_mask, is_masked, remove_mask
from .pruner import METHODS, Pruner
from .schedules import Schedule, constant, cubic, exponential, linear, stepwise
from .slimming import SlimReport, add_bn_l1_grad, bn_l1_penalty, select_channels, slim

__all__ = ["attach_mask", "get_mask", "is_masked", "remove_mask", "Pruner", "METHODS",
           "Schedule", "constant", "cubic", "exponential", "linear", "stepwise",
           "SlimReport", "add_bn_l1_grad", "bn_l1_penalty", "select_channels", "slim"]
