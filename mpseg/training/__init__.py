# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Training blocks: Hungarian matcher and set criterion (with the mask-pilot path)."""

from .criterion import SetCriterion
from .matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion"]
