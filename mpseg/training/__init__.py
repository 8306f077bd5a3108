# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Training blocks: Hungarian matcher and set criterion (with the mask-pilot path)."""

from .criterion import DEFAULT_WEIGHT_DICT, SetCriterion
from .losses import dice_loss, sigmoid_ce_loss
from .matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion", "DEFAULT_WEIGHT_DICT", "sigmoid_ce_loss", "dice_loss"]
