# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Placeholder: being written."""

__all__ = ["layer_consistency", ]



def layer_consistency(*args, **kwargs):
    raise NotImplementedError("layer_consistency is not implemented yet")
