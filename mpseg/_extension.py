# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Loads the compiled ops (``mpseg._C``) and records what happened.

Order: the prebuilt extension installed with the package; else a just-in-time build of ``csrc/`` with
``torch.utils.cpp_extension.load`` (ninja) into a cache folder; else nothing, and the pure-PyTorch reference runs with a
one-time warning that says why. ``import mpseg`` never fails because of the extension: loading happens on first use of a
kernel (or through :func:`load`), and every failure is recorded in :func:`status`.

Environment (read once, see :mod:`mpseg._config`): ``MPSEG_EXTENSION`` = ``auto`` (default) | ``prebuilt`` | ``jit`` |
``none``; ``MPSEG_CACHE_DIR`` (default ``~/.cache/mpseg``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _build_config, _config

__all__ = ["ExtensionStatus", "load", "status", "is_loaded", "has_kernels", "build_info", "warn_fallback_once"]


@dataclass
class ExtensionStatus:
    """What :func:`load` found. ``source`` is ``"prebuilt"``, ``"jit"`` or ``None`` (not loaded)."""

    attempted: bool = False
    source: str | None = None
    path: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return self.source is not None

    def reason(self) -> str:
        return "; ".join(self.errors) if self.errors else "not attempted"


_STATUS = ExtensionStatus()
_LOCK = threading.Lock()
_WARNED = False
_MODULE = None  # the loaded extension module (mpseg._C, or the just-in-time build's module)


def _mode() -> str:
    return _config.extension_mode()


def _load_prebuilt() -> str:
    global _MODULE
    _MODULE = importlib.import_module("mpseg._C")
    return getattr(_MODULE, "__file__", "mpseg._C")


def _cache_dir(csrc: Path, with_cuda: bool) -> Path:
    digest = hashlib.sha256()
    for path in sorted(csrc.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(csrc).as_posix().encode())
            digest.update(path.read_bytes())
    digest.update(repr(_build_config.compile_args(with_cuda)).encode())
    base = Path(os.environ.get("MPSEG_CACHE_DIR", Path.home() / ".cache" / "mpseg"))
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{'cuda' if with_cuda else 'cpu'}"
    return base / tag / digest.hexdigest()[:16]


def _load_jit() -> str:
    if "torch.utils.cpp_extension" not in sys.modules and not os.environ.get("CUDA_HOME"):
        # cpp_extension reads CUDA_HOME once, at import, and guesses wrong behind an nvcc wrapper script.
        cuda_home = _build_config.find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    csrc = _build_config.find_csrc()
    if csrc is None:
        raise RuntimeError("the C++ sources (csrc/) are not shipped with this installation")
    # Compiling CUDA just in time only pays off when a GPU is there to run it.
    with_cuda = torch.cuda.is_available() and _build_config.want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    build_dir = _cache_dir(csrc, with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"mpseg: compiling the C++{'/CUDA' if with_cuda else ''} ops just in time into {build_dir} "
          "(once; install with `pip install .` to skip this)", file=sys.stderr)
    flags = _build_config.compile_args(with_cuda)
    global _MODULE
    # A Python module (its init function is named after TORCH_EXTENSION_NAME, here mpseg_C) with build_info().
    _MODULE = cpp_extension.load(
        name="mpseg_C",
        sources=_build_config.sources(csrc, with_cuda),
        extra_include_paths=[str(csrc)],
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags.get("nvcc", []),
        extra_ldflags=_build_config.link_args(),
        with_cuda=with_cuda,
        build_directory=str(build_dir),
        is_python_module=True,
        verbose=False,
    )
    return str(build_dir)


def load() -> ExtensionStatus:
    """Load the compiled ops once (thread-safe) and return the :class:`ExtensionStatus`. Never raises."""
    global _STATUS
    if _STATUS.attempted:
        return _STATUS
    with _LOCK:
        if _STATUS.attempted:
            return _STATUS
        result = ExtensionStatus(attempted=True)
        try:
            mode = _mode()
        except ValueError as exc:
            result.errors.append(str(exc))
            mode = "none"
        if mode == "none":
            result.errors.append("disabled by MPSEG_EXTENSION=none")
        loaders = {"auto": ("prebuilt", "jit"), "prebuilt": ("prebuilt",), "jit": ("jit",), "none": ()}[mode]
        for name in loaders:
            try:
                result.path = _load_prebuilt() if name == "prebuilt" else _load_jit()
                result.source = name
                break
            except Exception as exc:  # noqa: BLE001 - any failure is recorded and reported, never swallowed silently
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                result.errors.append(f"{name}: {type(exc).__name__}: {first_line}")
        _STATUS = result
        if result.loaded:
            # The Python registrations (autograd, fake, autocast) need the C++ schema: run them now, once (this
            # block runs once per process, under the lock).
            from .ops.ms_deform_attn import _register_kernels as register_msda
            from .ops.point_sampling import _register_kernels as register_point_ops

            register_msda()
            register_point_ops()
            build_info()
    return _STATUS


def status() -> ExtensionStatus:
    """The :class:`ExtensionStatus` of the last :func:`load` (not attempted yet if no kernel was used)."""
    return _STATUS


def is_loaded() -> bool:
    return load().loaded


def has_kernels(device_type: str) -> bool:
    """Whether the compiled ops can run on tensors of ``device_type`` (``"cpu"``, or ``"cuda"`` in a CUDA build)."""
    if device_type not in ("cpu", "cuda") or not load().loaded:
        return False
    return device_type == "cpu" or bool(build_info().get("with_cuda", False))


# Constant for torch.compile (what torch.compiler.assume_constant_result sets, without importing torch._dynamo): the
# answer is computed once at trace time and becomes part of the graph.
has_kernels._dynamo_marked_constant = True


def warn_fallback_once(what: str) -> None:
    """One warning per process when a kernel was wanted but the reference runs instead."""
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"mpseg: compiled ops unavailable ({load().reason()}); {what} runs the pure-PyTorch reference "
                      "(slower). See `python -m mpseg.info`.", RuntimeWarning, stacklevel=3)


def build_info() -> dict:
    """What the loaded extension was built with, or ``{}`` if none is loaded.

    Keys: ``torch_version`` (the torch whose headers built it), ``stable_abi_target`` (the oldest torch whose stable ABI
    it needs), ``with_cuda``, ``cuda_version``, ``cuda_archs``, ``openmp``, ``num_threads``, ``cpu_kernel`` (which copy
    of the CPU loops of ``ms_deform_attn`` runs: ``"avx2"`` on CPUs with AVX2 and F16C, else ``"generic"``; the
    environment variable ``MPSEG_CPU_KERNEL=generic`` forces the latter), ``sanitize``, ``compiler``. Read anew at
    every call (the thread count and ``cpu_kernel`` can change).
    """
    return json.loads(_MODULE.build_info()) if load().loaded else {}
