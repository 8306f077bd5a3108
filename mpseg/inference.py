# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Placeholder: being written."""

__all__ = ["semantic_inference", "panoptic_inference", "instance_inference", ]



def semantic_inference(*args, **kwargs):
    raise NotImplementedError("semantic_inference is not implemented yet")


def panoptic_inference(*args, **kwargs):
    raise NotImplementedError("panoptic_inference is not implemented yet")


def instance_inference(*args, **kwargs):
    raise NotImplementedError("instance_inference is not implemented yet")
