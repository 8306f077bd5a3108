# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The Triton backend: availability, kernel loading (compiled or interpreted) and tuning parameters.

Triton decides between compiling a kernel and interpreting it when the kernel is *decorated* (``@triton.jit`` reads
``TRITON_INTERPRET`` then, in Triton 3.x), not when it is launched. So that the choice follows the environment at call
time instead of import order, the kernel files (:mod:`.msda_kernels`, :mod:`.point_kernels`, which import nothing but
Triton) are loaded up to twice, as separate module objects: once as compiled kernels for GPU tensors, once with the
interpreter switched on, for CPU tensors while ``TRITON_INTERPRET=1`` (the interpreter also runs GPU tensors, copying
them to the host, which is what Triton does for every kernel under ``TRITON_INTERPRET=1``).

Tuning parameters (:data:`TUNING`) are read once from ``MPSEG_TRITON_TUNING`` (``"name=value,name=value"``) and can be
changed at run time; see ``docs/api/triton.rst`` for what they control and why their defaults are what they are.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["TritonTuning", "TUNING", "why_not", "interpreting", "kernels", "load"]


@dataclasses.dataclass
class TritonTuning:
    """GPU-dependent launch parameters of the Triton kernels (no GPU has measured them yet: defaults are starting
    points, see ``docs/api/triton.rst``).

    Attributes:
        msda_forward_block: elements (queries x channels) one program of the forward holds; queries per program =
            this / next_power_of_2(D).
        msda_forward_warps: warps per program of the forward.
        msda_backward_block: the same for the backward (which also holds grad_output's tile, hence smaller).
        msda_backward_warps: warps per program of the backward.
        points_block: points per program of the target-mask reads.
        points_warps: warps per program of the target-mask reads.
        select_block: candidates per loop step of the uncertain-point selection (one program per mask).
        select_radix_bits: bits of the key fixed per radix pass of the selection (1, 2, 4 or 8: 2**bits histogram bins).
        select_warps: warps per program of the selection.
        num_stages: software-pipelining stages of every kernel.
    """

    msda_forward_block: int = 2048
    msda_forward_warps: int = 4
    msda_backward_block: int = 1024
    msda_backward_warps: int = 4
    points_block: int = 1024
    points_warps: int = 4
    select_block: int = 1024
    select_radix_bits: int = 4
    select_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TritonTuning.{field.name} must be a positive int, got {value!r}")
        for name in ("msda_forward_block", "msda_backward_block", "points_block", "select_block"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"TritonTuning.{name} must be a power of 2, got {value}")
        if self.select_radix_bits not in (1, 2, 4, 8):
            raise ValueError(f"TritonTuning.select_radix_bits must be 1, 2, 4 or 8, got {self.select_radix_bits}")


def _parse_tuning(text: str | None) -> TritonTuning:
    if not text:
        return TritonTuning()
    names = {field.name for field in dataclasses.fields(TritonTuning)}
    values = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in names or not value.strip().isdigit():
            raise ValueError(
                f"MPSEG_TRITON_TUNING: expected name=int pairs with names from {sorted(names)}, got {item!r}"
            )
        values[name] = int(value)
    return TritonTuning(**values)


#: The tuning parameters in use (read from ``MPSEG_TRITON_TUNING`` at import; assign fields to change them).
TUNING = _parse_tuning(os.environ.get("MPSEG_TRITON_TUNING"))

_LOCK = threading.Lock()
_MODULES: dict[tuple[str, bool], ModuleType] = {}
_IMPORT_ERROR: str | None = None
_OPS_LOADED = False
_UNSET = object()


def _triton_import_error() -> str | None:
    """None if triton can be imported, else why not. Answered without importing it (a first ``import triton`` costs
    seconds, which a process that never runs the Triton backend should not pay): the import happens in :func:`load`,
    and an import that fails there is recorded here."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR or None
    if "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        return None
    return "ModuleNotFoundError: No module named 'triton'"


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``), read now, as Triton reads it (its knob when triton
    is imported, else the environment variable with Triton's reading of booleans)."""
    triton = sys.modules.get("triton")
    if triton is not None and hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def why_not(device_type: str) -> str | None:
    """None if the Triton backend can run on tensors of ``device_type`` now, else the reason it cannot."""
    error = _triton_import_error()
    if error is not None:
        return f"triton is not importable ({error})"
    if device_type == "cpu":
        if not interpreting():
            return ("inputs are on cpu: Triton compiles for GPUs; set TRITON_INTERPRET=1 to run its kernels on CPU "
                    "tensors with the interpreter (slow; for tests)")
        return None
    if device_type == "cuda":
        if interpreting():
            return None
        if not torch.cuda.is_available():
            return "inputs are on cuda but torch.cuda.is_available() is False"
        return None
    return f"inputs are on {device_type}: Triton runs on cuda (or on cpu under TRITON_INTERPRET=1)"


def kernels(name: str, interpret: bool) -> ModuleType:
    """The kernel module ``name`` (``"msda_kernels"`` or ``"point_kernels"``), compiled or interpreted."""
    key = (name, interpret)
    module = _MODULES.get(key)
    if module is not None:
        return module
    with _LOCK:
        if key not in _MODULES:
            import triton

            path = Path(__file__).with_name(f"{name}.py")
            module_name = f"{__name__}.{name}{'_interpreted' if interpret else ''}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            # @triton.jit reads knobs.runtime.interpret while the module's kernels are decorated. The override is
            # written to the knob's instance dict directly (the knob's setter would also rewrite TRITON_INTERPRET) and
            # removed afterwards, so the knob follows the environment again.
            overrides = triton.knobs.runtime.__dict__
            saved = overrides.get("interpret", _UNSET)
            overrides["interpret"] = interpret
            try:
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            finally:
                if saved is _UNSET:
                    overrides.pop("interpret", None)
                else:
                    overrides["interpret"] = saved
            _MODULES[key] = module
    return _MODULES[key]


def load() -> None:
    """Registers the ``torch.ops.mpseg_triton`` ops (once; needs triton)."""
    global _OPS_LOADED
    if _OPS_LOADED:
        return
    with _LOCK:
        if _OPS_LOADED:
            return
        global _IMPORT_ERROR
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - recorded, and reported as the backend's reason from now on
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
            raise RuntimeError(f"the Triton backend cannot run: triton is not importable ({_IMPORT_ERROR})") from exc
        from . import ops  # noqa: F401 - registers the ops

        _OPS_LOADED = True
