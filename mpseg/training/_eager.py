# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Host-side steps of the training blocks that ``torch.compile`` should run as plain Python, in one piece.

The Hungarian assignment (SciPy on CPU numbers) and the pilot assignment (reading ``target_index`` back) cannot be
traced. Left to Dynamo, every ``bool(tensor)``, ``.numpy()`` and SciPy call inside them would be a graph break of its
own, with tiny graphs in between; called through :func:`run_eagerly` each is one graph break at the call site.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["run_eagerly"]

_DISABLED: dict[Callable, Callable] = {}


def _make_disabled(fn: Callable) -> None:
    # torch.compiler.disable imports torch._dynamo (~3 s), so the uncompiled wrapper is made on the first compiled
    # call, never at `import mpseg`. Run as Python at trace time (marked below as torch.compiler.assume_constant_result
    # does); the traced code then finds the wrapper in _DISABLED, a global Dynamo can guard on.
    if fn not in _DISABLED:
        _DISABLED[fn] = torch.compiler.disable(fn, reason=f"mpseg: {fn.__qualname__} runs on the host")


_make_disabled._dynamo_marked_constant = True


def run_eagerly(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; under ``torch.compile`` a single graph break, ``fn`` running uncompiled.

    ``fn`` must be a plain function (pass ``type(self).method, self`` for a method), the key of its wrapper.
    """
    if torch.compiler.is_compiling():
        _make_disabled(fn)
        return _DISABLED[fn](*args, **kwargs)
    return fn(*args, **kwargs)
