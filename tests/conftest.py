# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Shared pytest configuration.

Devices: a test that uses the ``device`` fixture (directly, or a whole module through
``pytestmark = pytest.mark.usefixtures("device")``) runs once per entry of :data:`DEVICES`: on ``cpu`` always, and on
``cuda`` as well whenever a GPU is present, against the same oracles and tolerances. For the ``cuda`` run the test body
executes with CUDA as the default device (``torch.device("cuda")`` as a context), so tensors and modules the test
creates without an explicit device are made on the GPU; generators must follow (``torch.Generator(device)``, or
:func:`generator` below). A test marked ``cpu_only`` (a CPU-kernel or CPU-tool test) runs on the CPU only. A cuda run
that skips fails instead: no test passes silently on a GPU machine by skipping.
"""

import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

if not torch.cuda.is_available():
    # Triton decides between compiled and interpreted language functions (tl.cdiv, ...) once, when triton is first
    # imported. Other tests import it indirectly (torch.compile's Inductor probes for it), so without a GPU the
    # interpreter is switched on for the whole test process before anything can import triton; the Triton tests then
    # run under it whatever the order (tests/test_triton_backend.py). mpseg itself still reads the variable per call.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    # `make test-sanitize` runs the tests marked `sanitize` against an AddressSanitizer/UBSan build of the C++ ops.
    config.addinivalue_line("markers", "sanitize: op tests that also run under AddressSanitizer/UBSan")
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")
    config.addinivalue_line("markers", "cpu_only: runs on the CPU only, also where a GPU is present (say why)")
    # Small tensors run 10-100x slower with 2 intra-op threads on 2 busy cores (and `make test` runs 2 pytest workers):
    # one thread per process unless MPSEG_TEST_THREADS says otherwise. Tests about threading set their own counts.
    torch.set_num_threads(int(os.environ.get("MPSEG_TEST_THREADS", "1")))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        cpu_only = metafunc.definition.get_closest_marker("cpu_only") is not None
        metafunc.parametrize("device", ["cpu"] if cpu_only else DEVICES, indirect=True)


@pytest.fixture
def device(request: pytest.FixtureRequest):
    """``torch.device`` of this run; on cuda the test body runs with CUDA as the default device."""
    dev = torch.device(request.param)
    if dev.type == "cpu":
        yield dev  # no default-device mode on the CPU: it would intercept every torch call for nothing
        return
    with dev:
        yield dev


def generator(seed: int = 0) -> torch.Generator:
    """A seeded generator on the current default device (the test's device inside the ``device`` fixture)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    if report.skipped and callspec is not None and str(callspec.params.get("device", "")).startswith("cuda"):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: skipped on cuda; device-parametrised tests must run on the GPU "
                           f"({call.excinfo})")
