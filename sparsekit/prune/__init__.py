"""Pruning workflows: bool masks while training, schedules, gradual pruning driven from a
training loop with the final conversion to compressed N:M layers, network slimming, and
one-shot pruning from calibration data (SparseGPT, Wanda) with recovery by distillation."""

from .masking import attach_mask, get_mask, is_masked, remove_mask
from .oneshot import ONESHOT_METHODS, LayerReport, OneShotReport, oneshot, sparsegpt_prune, wanda_mask
from .pruner import METHODS, Pruner
from .recovery import DistillReport, distill, recovery_parameters
from .schedules import Schedule, constant, cubic, exponential, linear, stepwise
from .slimming import SlimReport, add_bn_l1_grad, bn_l1_penalty, select_channels, slim

__all__ = ["attach_mask", "get_mask", "is_masked", "remove_mask", "Pruner", "METHODS",
           "Schedule", "constant", "cubic", "exponential", "linear", "stepwise",
           "SlimReport", "add_bn_l1_grad", "bn_l1_penalty", "select_channels", "slim",
           "oneshot", "OneShotReport", "LayerReport", "ONESHOT_METHODS", "sparsegpt_prune",
           "wanda_mask", "distill", "DistillReport", "recovery_parameters"]
