# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Placeholder: being written."""

__all__ = ["MaskPilot", "MaskPilotNoiser", ]



class MaskPilot:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("MaskPilot is not implemented yet")


class MaskPilotNoiser:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("MaskPilotNoiser is not implemented yet")
