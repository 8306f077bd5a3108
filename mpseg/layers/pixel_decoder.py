# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Placeholder: being written."""

__all__ = ["MSDeformAttnPixelDecoder", ]



class MSDeformAttnPixelDecoder:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("MSDeformAttnPixelDecoder is not implemented yet")
