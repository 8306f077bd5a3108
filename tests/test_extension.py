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


# Symbols the compiled extension may import: PyTorch's stable C shims, CPython's limited API (abi3), and the C/C++
# runtime (libc, libm, libstdc++, libgcc, libgomp, the CUDA runtime). No libtorch C++ symbol (c10::, at::, torch::) and
# no CPython call outside the limited API: the two guarantees behind "one binary for every torch >= 2.13 and every
# CPython >= 3.10".
_RUNTIME_CXX_PREFIXES = ("std::", "vtable for std::", "typeinfo for std::", "VTT for std::", "construction vtable",
                         "__gnu_cxx::", "__cxxabiv1::", "vtable for __cxxabiv1::", "typeinfo for __cxxabiv1::",
                         "operator new", "operator delete")


def _undefined_symbols(path: str) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()})


# The CPython calls the extension makes (csrc/mpseg.cpp), all in the limited API (abi3) since 3.2. Py_LIMITED_API at
# compile time already hides everything else; this list keeps the binary honest too (only limited-API names belong here).
_LIMITED_API_USED = {"PyModule_Create2", "PyUnicode_FromString", "PyErr_SetString", "PyExc_RuntimeError"}


def _disallowed_imports(symbols: list[str]) -> list[str]:
    mangled = [s for s in symbols if s.startswith("_Z")]
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                               check=True).stdout.splitlines() if mangled else []
    bad = [f"{m} ({d})" for m, d in zip(mangled, demangled) if not d.startswith(_RUNTIME_CXX_PREFIXES)]
    for symbol in symbols:
        if symbol.startswith("_Z"):
            continue
        if symbol.startswith(("Py", "_Py")) and symbol not in _LIMITED_API_USED:
            bad.append(f"{symbol} (not in CPython's limited API)")
        elif symbol.startswith(("at_", "c10_", "THP")):
            bad.append(symbol)
    return bad


def test_symbol_check_catches_libtorch_and_full_python_api():
    # The check itself: a libtorch C++ symbol and a CPython call outside the limited API are caught, the shims not.
    symbols = ["aoti_torch_get_sizes", "torch_parallel_for", "memcpy", "PyModule_Create2", "PyUnicode_FromString",
               "_ZNSt13runtime_errorD1Ev", "_ZN3c105ErrorC1ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_"
               "traitsIcESaIcEEE", "_PyObject_GC_New"]
    bad = _disallowed_imports(symbols)
    assert len(bad) == 2, bad
    assert "c10::Error" in bad[0] and bad[1].startswith("_PyObject_GC_New")


def test_extension_imports_only_stable_abi_symbols():
    status = _extension.load()
    assert status.loaded, status.reason()
    path = status.path if status.source == "prebuilt" else str(next(Path(status.path).glob("*.so")))
    symbols = _undefined_symbols(path)
    assert any(s.startswith("aoti_torch_") for s in symbols), symbols[:20]  # the stable shims are what it calls
    assert _disallowed_imports(symbols) == []
    built = _extension.build_info()
    assert built["stable_abi_target"] == "2.10", built
    if status.source == "prebuilt":
        assert Path(path).name.endswith(".abi3.so"), path  # setuptools names limited-API builds so
