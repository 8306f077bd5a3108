# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Shared pytest configuration."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # `make test-sanitize` runs the tests marked `sanitize` against an AddressSanitizer/UBSan build of the C++ ops.
    config.addinivalue_line("markers", "sanitize: op tests that also run under AddressSanitizer/UBSan")
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")
