"""Sphinx configuration for the Flask-Cloakroom documentation.

Build it (warnings are errors, as in ``scripts/test``)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The pages are Markdown (MyST), written to read well on GitHub too; the API
reference (``api.md``) is generated from the docstrings by autodoc.
"""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

from blinker import NamedSignal
from sphinx.application import Sphinx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Document the source tree, not whatever copy of the package happens to be installed.
sys.path.insert(0, str(ROOT / "src"))

from flask_cloakroom import __version__  # noqa: E402

project = "Flask-Cloakroom"
author = "The Flask-Cloakroom developers"
copyright = f"{date.today().year}, {author}"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

root_doc = "index"
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "README.md"]
# Pages that may not exist in every checkout: index.md names them, and the lines that
# name a missing one are dropped before Sphinx reads index.md (see _drop_missing_pages).
OPTIONAL_PAGES = ("performance", "reliability")

# -- MyST: GitHub-flavoured Markdown ---------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
# Links such as [x](encryption.md#cookie-mode-no-store-at-all) work on GitHub and here.
myst_heading_anchors = 4
# Fences without a language (diagrams, terminal output) are shown as they are.
highlight_language = "text"

# -- autodoc ---------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
add_module_names = False


def _signal_repr(signal: NamedSignal) -> str:
    return f"NamedSignal({signal.name!r})"


# autodoc shows a module variable's repr; blinker's includes a memory address, which
# would make every build differ. Only this Sphinx process sees the change.
setattr(NamedSignal, "__repr__", _signal_repr)  # noqa: B010

# -- HTML ------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"Flask-Cloakroom {release}"
html_static_path: list[str] = []
html_show_sourcelink = False


# The generated configuration reference must be current before Sphinx reads it.
sys.path.insert(0, str(HERE))
import gen_config  # noqa: E402

if gen_config.TARGET.read_text() != gen_config.render():
    raise RuntimeError("docs/configuration.md is stale: run `python docs/gen_config.py`")


def _drop_missing_pages(app: Sphinx, docname: str, source: list[str]) -> None:
    """Remove index.md's lines (toctree entries, links) that name an optional page not here."""
    if docname != root_doc:
        return
    missing = [name for name in OPTIONAL_PAGES if not (HERE / f"{name}.md").exists()]
    if not missing:
        return
    lines = source[0].splitlines(keepends=True)
    kept = [
        line
        for line in lines
        if not any(line.strip() == name or f"({name}.md" in line for name in missing)
    ]
    source[0] = "".join(kept)


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("source-read", _drop_missing_pages)
    return {"parallel_read_safe": True}
