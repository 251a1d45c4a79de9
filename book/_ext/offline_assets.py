"""Serve MathJax 3, require.js and the Jupyter widget manager from the book itself.

`make assets` puts the files under book/_assets/vendor (git-ignored); html_static_path copies
them into _static, and _config.yml points mathjax_path and nb_ipywidgets_js at them, so no page
needs a CDN. This extension fails the build early when the files are missing (instead of a book
whose math shows as raw TeX), and adds the MathJax 2 compatibility shim the widget manager needs
to every page that loads MathJax.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

ASSETS = Path("book/_assets")
SHIM = "mathjax-v2-shim.js"
REQUIRED = (
    "vendor/mathjax/es5/tex-chtml.js",
    "vendor/mathjax/es5/output/chtml/fonts/woff-v2",
    "vendor/requirejs/require.js",
    "vendor/html-manager/dist/embed-amd.js",
    SHIM,
    "widgets-require-config.js",
)


def check_assets(app: Sphinx) -> None:
    """Stop an HTML build whose self-hosted assets were never fetched."""
    if app.builder.format != "html":
        return
    root = Path(app.confdir) / ASSETS
    missing = [name for name in REQUIRED if not (root / name).exists()]
    if missing:
        raise ExtensionError(
            f"self-hosted page assets missing under {ASSETS}: {', '.join(missing)}; "
            "run `make assets` (it fetches them with npm)"
        )
    if not app.config.mathjax_path.startswith("vendor/"):
        raise ExtensionError(
            f"mathjax_path must point into vendor/, got {app.config.mathjax_path!r}"
        )


def add_mathjax_shim(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """On pages that load MathJax, load the shim after Sphinx's MathJax configuration."""
    if app.builder.format != "html":
        return
    names = {getattr(js, "filename", js) for js in context.get("script_files", [])}
    # The builder stores relative script paths under _static/.
    if names & {app.config.mathjax_path, posixpath.join("_static", app.config.mathjax_path)}:
        # Priority 501: after the inline `window.MathJax = {...}` (500), which it extends.
        app.builder.add_js_file(SHIM, priority=501)


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", check_assets)
    # After sphinx.ext.mathjax's own html-page-context handler (priority 500) has run.
    app.connect("html-page-context", add_mathjax_shim, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
