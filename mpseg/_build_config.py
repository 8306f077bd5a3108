# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""How the ``mpseg._C`` extension is compiled: one place for ``setup.py`` and the just-in-time loader.

Only the standard library is imported here, so ``setup.py`` can load this file by path before torch's
``cpp_extension`` module is imported (which reads ``CUDA_HOME`` once, at import time).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "DEFAULT_CUDA_ARCH_LIST",
    "STABLE_ABI_TARGET",
    "PY_LIMITED_API",
    "find_csrc",
    "find_cuda_home",
    "sources",
    "compile_args",
    "link_args",
    "want_cuda",
]

# Turing to Hopper plus PTX for newer GPUs (CUDA 13 dropped everything before Turing). Every architecture adds nvcc
# time; set TORCH_CUDA_ARCH_LIST to just your GPU for a faster build.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"

# The extension is built against PyTorch's stable ABI (csrc/stable_api.h): TORCH_TARGET_VERSION makes the headers offer
# only what torch 2.10 already had (torch::stable::parallel_for, empty, new_zeros, ...), so the binary calls no shim
# that an older supported torch lacks. The oldest torch the package supports (pyproject.toml) is newer still: 2.10 is
# what the code needs, the lower bound is what the install test proves.
STABLE_ABI_TARGET = (2, 10)
# CPython's limited API (abi3) from 3.10 on: one wheel for every CPython >= 3.10.
PY_LIMITED_API = "0x030A0000"


def find_csrc() -> Path | None:
    """The ``csrc/`` folder: next to the package in a source checkout, or shipped inside it (``mpseg/_csrc``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if (candidate / "mpseg.cpp").is_file():
            return candidate
    return None


def _is_cuda_root(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> str | None:
    """Locate the CUDA toolkit root, also when ``nvcc`` on PATH is a wrapper script or a symlink.

    Order: ``CUDA_HOME`` / ``CUDA_PATH``; the resolved ``nvcc`` on PATH; the ``TOP=`` that ``nvcc --dryrun`` reports (it
    names the real toolkit even behind a wrapper); ``/usr/local/cuda`` and ``/usr/local/cuda-*``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value and _is_cuda_root(Path(value)):
            return str(Path(value).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(nvcc).resolve().parent.parent
        if _is_cuda_root(root):
            return str(root)
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60, check=False,
            )
            match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if match and _is_cuda_root(Path(match.group(1).strip())):
                return str(Path(match.group(1).strip()).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
    for candidate in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _is_cuda_root(Path(candidate)):
            return str(Path(candidate).resolve())
    return None


def want_cuda(torch_cuda_version: str | None, cuda_home: str | None) -> bool:
    """CUDA sources are built when torch is a CUDA build and a toolkit is found, or when ``FORCE_CUDA=1``.

    ``MPSEG_NO_CUDA=1`` turns CUDA off (used for the sanitizer build). No GPU is needed to compile.
    """
    if os.environ.get("MPSEG_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch_cuda_version is not None and cuda_home is not None


def sources(csrc: Path, with_cuda: bool) -> list[str]:
    files = sorted(str(p) for p in csrc.rglob("*.cpp"))
    if with_cuda:
        files += sorted(str(p) for p in csrc.rglob("*.cu"))
    return files


def _sanitize() -> bool:
    return os.environ.get("MPSEG_SANITIZE", "0") == "1"


def _abi_defines() -> list[str]:
    major, minor = STABLE_ABI_TARGET
    return [f"-DTORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000", f"-DPy_LIMITED_API={PY_LIMITED_API}"]


def compile_args(with_cuda: bool) -> dict[str, list[str]]:
    """Compiler flags. No ``-std`` is forced: torch's build helpers choose the standard its headers need (C++20)."""
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if _sanitize():
        cxx = ["-O1", "-g", "-fopenmp", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
               "-fno-sanitize-recover=undefined", "-DMPSEG_SANITIZE"]
    cxx += _abi_defines()
    if with_cuda:
        cxx.append("-DMPSEG_WITH_CUDA")
    args = {"cxx": cxx}
    if with_cuda:
        # USE_CUDA: torch's stable C shim declares its CUDA calls (the current stream) under it.
        args["nvcc"] = ["-O3", "-DMPSEG_WITH_CUDA", "-DUSE_CUDA", "--expt-relaxed-constexpr", "-lineinfo",
                        *_abi_defines()]
    return args


def link_args() -> list[str]:
    args = ["-fopenmp"]
    if _sanitize():
        args += ["-fsanitize=address,undefined"]
    return args
