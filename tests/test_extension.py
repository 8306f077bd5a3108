# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Loading the compiled ops: what happens without them, what `python -m mpseg.info` reports, environment switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import mpseg
from mpseg import _extension

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # conftest's
    environment.update(env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=environment, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_import_without_extension_falls_back_with_one_warning():
    result = run_python(
        """
        import warnings
        import torch
        import mpseg

        assert mpseg.available_backends() == ["reference"], mpseg.available_backends()
        shapes = torch.tensor([[4, 5], [2, 2]])
        starts = torch.tensor([0, 20])
        value = torch.randn(2, 24, 2, 3)
        locations = torch.rand(2, 6, 2, 2, 3, 2)
        weights = torch.rand(2, 6, 2, 2, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = mpseg.ms_deform_attn(value, shapes, starts, locations, weights)
            second = mpseg.ms_deform_attn(value, shapes, starts, locations, weights)
        fallback = [w for w in caught if "compiled ops unavailable" in str(w.message)]
        assert len(fallback) == 1, [str(w.message) for w in caught]
        assert "MPSEG_EXTENSION=none" in str(fallback[0].message)
        expected = mpseg.ms_deform_attn_reference(value, shapes, starts, locations, weights)
        assert torch.equal(first, expected) and torch.equal(second, expected)
        try:
            mpseg.ms_deform_attn(value, shapes, starts, locations, weights, backend="cpu")
        except RuntimeError as exc:
            print("ERROR:", exc)
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        """,
        MPSEG_EXTENSION="none",
    )
    error = result.stdout.split("ERROR:", 1)[1]
    assert "'cpu' cannot run" in error
    assert "cpu: compiled ops not loaded" in error and "cuda: compiled ops not loaded" in error
    assert "reference: can run" in error


def test_info_reports_build_and_backends():
    result = subprocess.run([sys.executable, "-m", "mpseg.info"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300, check=True)
    info = json.loads(result.stdout)
    assert info["extension"]["loaded"], info["extension"]
    built = info["built_with"]
    assert built["torch_version"] == torch.__version__.split("+")[0]
    assert built["openmp"] is True and built["num_threads"] >= 1
    assert isinstance(built["with_cuda"], bool) and isinstance(built["cuda_archs"], list)
    assert built["with_cuda"] == bool(built["cuda_archs"])
    assert info["backends"][0] == "cpu" and info["backends"][-1] == "reference"


def test_build_info_in_process_matches_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set by conftest without a GPU: Triton would list for CPU
    assert _extension.load().loaded
    built = _extension.build_info()
    assert built["torch_version"] == torch.__version__.split("+")[0]
    assert mpseg.available_backends("cpu") == ["cpu", "reference"]


def test_environment_backend_is_read_and_validated():
    run_python(
        """
        import torch
        import mpseg
        from mpseg import _config

        assert _config.msda_backend() == "reference"
        with _config.use_backend("cpu"):
            assert _config.msda_backend() == "cpu"
        assert _config.msda_backend() == "reference"
        """,
        MPSEG_MSDA_BACKEND="reference",
    )
    result = run_python(
        """
        import torch
        import mpseg  # an invalid value must not break the import

        try:
            mpseg.ms_deform_attn(torch.zeros(1, 1, 1, 1), torch.tensor([[1, 1]]), torch.tensor([0]),
                                 torch.zeros(1, 1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 1))
        except ValueError as exc:
            print("ERROR:", exc)
        """,
        MPSEG_MSDA_BACKEND="fastest",
    )
    assert "MPSEG_MSDA_BACKEND must be one of auto, cpu, cuda, triton, reference; got 'fastest'" in result.stdout


def test_kernels_are_registered_for_every_dispatch_key():
    # The CUDA kernels are compiled and linked in CI without a GPU; this at least proves they registered (a CUDA build
    # whose .cu registration went missing would otherwise only be noticed on a GPU machine).
    assert _extension.load().loaded
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    expected = ["CPU", "Meta", "Autograd"] + (["CUDA"] if _extension.build_info()["with_cuda"] else [])
    for key in expected:
        assert has_kernel("mpseg::ms_deform_attn", key), key
        assert has_kernel("mpseg::_ms_deform_attn_backward", key), key
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert has_kernel("mpseg::ms_deform_attn", key), key
