# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Placeholder: being written."""

__all__ = ["HungarianMatcher", ]



class HungarianMatcher:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("HungarianMatcher is not implemented yet")
