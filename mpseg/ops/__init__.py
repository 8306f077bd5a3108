# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Functional ops. Nothing here imports a layer."""

from ._reference import ms_deform_attn_reference
from .ms_deform_attn import available_backends, level_metadata, ms_deform_attn, use_backend
from .point_sampling import point_sample, sample_masks_at_points, sample_uncertain_points

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "available_backends",
    "use_backend",
    "level_metadata",
    "point_sample",
    "sample_uncertain_points",
    "sample_masks_at_points",
]
