# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Shared pytest configuration."""

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # `make test-sanitize` runs the tests marked `sanitize` against an AddressSanitizer/UBSan build of the C++ ops.
    config.addinivalue_line("markers", "sanitize: op tests that also run under AddressSanitizer/UBSan")
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")
    # Small tensors run 10-100x slower with 2 intra-op threads on 2 busy cores (and `make test` runs 2 pytest workers):
    # one thread per process unless MPSEG_TEST_THREADS says otherwise. Tests about threading set their own counts.
    torch.set_num_threads(int(os.environ.get("MPSEG_TEST_THREADS", "1")))
