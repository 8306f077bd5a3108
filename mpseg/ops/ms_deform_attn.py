# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Placeholder dispatch (reference only) until the kernels land."""

from __future__ import annotations

from ._reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "available_backends"]


def available_backends():
    return ["reference"]


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *, backend=None):
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _register_kernels():
    pass
