# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""``python -m mpseg.info``: what was built and what loads (extension, backends, threads, CUDA archs)."""

from __future__ import annotations

import json
import sys

import torch

__all__ = ["collect", "main"]


def collect() -> dict:
    """Everything :func:`main` prints, as a dict."""
    from . import __version__, _extension
    from .ops import available_backends

    status = _extension.load()
    return {
        "mpseg": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension": {"loaded": status.loaded, "source": status.source, "path": status.path,
                      "errors": status.errors},
        "built_with": _extension.build_info(),
        "backends": available_backends(),
        "torch_threads": torch.get_num_threads(),
        "openmp_in_torch": torch.backends.openmp.is_available(),
    }


def main() -> None:
    print(json.dumps(collect(), indent=2))


if __name__ == "__main__":
    main()
