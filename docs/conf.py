# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Sphinx configuration: API reference from docstrings (Google style), furo theme, doctests for examples."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "mpseg"
author = "mpseg developers"
copyright = "2026, mpseg developers"

import mpseg  # noqa: E402

release = mpseg.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
typehints_fully_qualified = False
always_document_param_types = False
# CI has no network: fetching inventories there fails with a warning (an error under -W) and costs time. Links to
# the Python and PyTorch docs are opt-in: MPSEG_DOCS_INTERSPHINX=1 make docs.
if os.environ.get("MPSEG_DOCS_INTERSPHINX", "0") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable", None),
    }
else:
    intersphinx_mapping = {}
nitpicky = False
html_theme = "furo"
html_title = "mpseg"
exclude_patterns = ["_build", "scripts"]
html_static_path = ["_static"]

# Doctests (`make doctest`): docstring examples are run by pytest --doctest-modules, in their module's namespace as
# they are written; Sphinx runs only the guides' explicit testcode/doctest directives (otherwise every docstring would
# run twice, here without its module's imports). The guides' examples run on CPU with one thread (they are tiny;
# threads only add noise on a loaded machine) and a fixed seed, so printed values are stable.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import torch
import mpseg
torch.manual_seed(0)
torch.set_num_threads(1)
"""
