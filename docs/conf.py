"""Sphinx configuration of the maptools documentation.

Build with ``make docs`` or::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import maptools

# -- Project -----------------------------------------------------------------------------------------
project = "maptools"
author = "maptools developers"
copyright = "maptools developers"  # noqa: A001 - Sphinx's name
version = maptools.__version__
release = maptools.__version__

# -- General -----------------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
# No intersphinx: the documentation must build without network access.

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "benchmarks_*.rst"]
nitpicky = False

# -- autodoc / napoleon ------------------------------------------------------------------------------
# Everything maptools imports is installed in the docs environment, so nothing is mocked.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autodoc_default_options = {
    "members": True,
}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False
# Dataclass fields as one compact "Variables" list (with the annotated types) instead of one block each.
napoleon_use_ivar = True
napoleon_attr_annotations = True

# -- HTML --------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"maptools {release}"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": True,
}
