# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Checkpoint converters (placeholder: being written)."""

__all__ = []
