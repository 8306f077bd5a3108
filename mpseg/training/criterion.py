# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Placeholder: being written."""

__all__ = ["SetCriterion", ]



class SetCriterion:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("SetCriterion is not implemented yet")
