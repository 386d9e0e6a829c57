"""Sphinx configuration for graphc's API reference (built from the docstrings).

Build:  python -m sphinx -b html docs/api build/docs-html
(tests/test_docs.py builds it into a temporary folder and fails on any import error.)
"""
import os
import sys

# Document the checkout this file sits in, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

project = "graphc"
author = "graphc contributors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
# graphc's docstrings are prose with `code` in single backticks; render those as inline code.
default_role = "code"
