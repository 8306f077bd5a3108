# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Placeholder: being written."""

__all__ = ["point_sample", ]



def point_sample(*args, **kwargs):
    raise NotImplementedError("point_sample is not implemented yet")
