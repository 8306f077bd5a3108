# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Builds the ``mpseg._C`` extension from ``csrc/``. Metadata lives in ``pyproject.toml``.

The extension uses only PyTorch's stable ABI and Python's limited API (see ``csrc/stable_api.h``): one build loads on
every torch from the supported minimum on and every CPython >= 3.10, so the wheel is tagged ``cp310-abi3`` and build
isolation (which builds against whatever torch pip picks) cannot produce a mismatch.
Environment: ``MPSEG_NO_EXT=1`` (pure Python), ``FORCE_CUDA=1`` / ``MPSEG_NO_CUDA=1``, ``TORCH_CUDA_ARCH_LIST``,
``CUDA_HOME``, ``MPSEG_SANITIZE=1`` (AddressSanitizer + UBSan, CPU only), ``MAX_JOBS``.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_mpseg_build_config", ROOT / "mpseg" / "_build_config.py")
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)


class BuildPyWithSources(build_py):
    """Ships ``csrc/`` inside the package (``mpseg/_csrc``) so the just-in-time fallback works from a wheel."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "mpseg" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target)


def extensions():
    if os.environ.get("MPSEG_NO_EXT", "0") == "1":
        return [], {}
    cuda_home = cfg.find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cfg.want_cuda(torch.version.cuda, cuda_home)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Without a GPU torch cannot guess the architectures and fails: pick a sensible default.
        os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.DEFAULT_CUDA_ARCH_LIST
    csrc = ROOT / "csrc"
    kind = CUDAExtension if with_cuda else CppExtension
    ext = kind(
        name="mpseg._C",
        sources=[os.path.relpath(s, ROOT) for s in cfg.sources(csrc, with_cuda)],
        include_dirs=[str(csrc)],
        # -fopenmp in both lists (from _build_config): without it at::parallel_for silently runs one thread.
        extra_compile_args=cfg.compile_args(with_cuda),
        extra_link_args=cfg.link_args(),
        py_limited_api=True,
    )
    print(f"mpseg: building mpseg._C ({'C++ + CUDA' if with_cuda else 'C++ only'}; CUDA_HOME={cuda_home}; "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
cmdclass["build_py"] = BuildPyWithSources
# abi3: the wheel's tag says "any CPython >= 3.10" (a pure-Python build, MPSEG_NO_EXT=1, stays py3-none-any).
options = {"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {}
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
