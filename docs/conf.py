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
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "torch": ("https://pytorch.org/docs/stable", None),
}
# No network in CI: intersphinx inventories cannot be fetched, so references stay plain text instead of warnings.
intersphinx_disabled_reftypes = ["*"]
intersphinx_timeout = 1
nitpicky = False
html_theme = "furo"
html_title = "mpseg"
exclude_patterns = ["_build"]
