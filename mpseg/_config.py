# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Global switches, in one place: read from the environment once (at import), changeable with context managers.

=======================  ==========================================================================================
``MPSEG_MSDA_BACKEND``   ``auto`` (default) | ``cpu`` | ``cuda`` | ``triton`` | ``reference``: backend of
                         :func:`mpseg.ms_deform_attn` when the call does not pass ``backend=`` (``triton`` also runs
                         the point kernels of the mask losses on Triton).
``MPSEG_EXTENSION``      ``auto`` (default) | ``prebuilt`` | ``jit`` | ``none``: how :mod:`mpseg._extension` loads the
                         compiled ops.
``MPSEG_CACHE_DIR``      where just-in-time builds go (default ``~/.cache/mpseg``).
=======================  ==========================================================================================

Example:
    >>> from mpseg._config import msda_backend, use_backend
    >>> with use_backend("reference"):
    ...     msda_backend()  # every ms_deform_attn call in here runs the pure-PyTorch reference
    'reference'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["MSDA_BACKENDS", "EXTENSION_MODES", "msda_backend", "set_msda_backend", "use_backend", "extension_mode"]

MSDA_BACKENDS = ("cpu", "cuda", "triton", "reference")
EXTENSION_MODES = ("auto", "prebuilt", "jit", "none")


def _parse_backend(value: str | None, source: str) -> str | None:
    if value is None:
        return None
    name = value.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in MSDA_BACKENDS:
        raise ValueError(f"{source} must be one of auto, {', '.join(MSDA_BACKENDS)}; got {value!r}")
    return name


def _read_env_backend() -> tuple[str | None, str | None]:
    try:
        return _parse_backend(os.environ.get("MPSEG_MSDA_BACKEND"), "MPSEG_MSDA_BACKEND"), None
    except ValueError as exc:
        # Raising at import would break `import mpseg`; the error surfaces at the first ms_deform_attn call instead.
        return None, str(exc)


# None = automatic. Read by mpseg.ops.ms_deform_attn on every call (torch.compile guards on it, so changing it
# recompiles rather than silently reusing a graph built for another backend).
_MSDA_BACKEND, _MSDA_BACKEND_ERROR = _read_env_backend()
_EXTENSION_MODE = os.environ.get("MPSEG_EXTENSION", "auto").strip().lower() or "auto"


def msda_backend() -> str | None:
    """The configured default backend of :func:`mpseg.ms_deform_attn` (``None`` = automatic).

    Raises:
        ValueError: if ``MPSEG_MSDA_BACKEND`` holds an unknown name.
    """
    if _MSDA_BACKEND_ERROR is not None:
        raise ValueError(_MSDA_BACKEND_ERROR)
    return _MSDA_BACKEND


def set_msda_backend(backend: str | None) -> None:
    """Set the default backend (``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``, or ``None``/``"auto"`` for
    automatic)."""
    global _MSDA_BACKEND, _MSDA_BACKEND_ERROR
    _MSDA_BACKEND = _parse_backend(backend, "backend")
    _MSDA_BACKEND_ERROR = None


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Context manager: run :func:`mpseg.ms_deform_attn` with ``backend`` as the default inside the block.

    Args:
        backend: ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``, or ``None``/``"auto"`` for automatic choice.
    """
    global _MSDA_BACKEND, _MSDA_BACKEND_ERROR
    saved = (_MSDA_BACKEND, _MSDA_BACKEND_ERROR)
    set_msda_backend(backend)
    try:
        yield
    finally:
        _MSDA_BACKEND, _MSDA_BACKEND_ERROR = saved


def extension_mode() -> str:
    """How to load the compiled ops (``MPSEG_EXTENSION``).

    Raises:
        ValueError: if ``MPSEG_EXTENSION`` holds an unknown mode.
    """
    if _EXTENSION_MODE not in EXTENSION_MODES:
        raise ValueError(f"MPSEG_EXTENSION must be one of {', '.join(EXTENSION_MODES)}; got {_EXTENSION_MODE!r}")
    return _EXTENSION_MODE
