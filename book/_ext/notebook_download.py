"""Offer every chapter as a Jupyter notebook (.ipynb) in its page's download menu.

sphinx-book-theme 1.3.0 adds an ".ipynb" entry to the download menu of a MyST-Markdown notebook
only when a launch button (Binder, JupyterHub, Colab, JupyterLite or Thebe) is configured: its
launch-button handler is what copies the notebook into ``_sources`` and sets the page context's
``ipynb_source``. This book has no launch button, so its pages offered only the ``.md`` source.

MyST-NB already writes each notebook page, as the build saw it, to
``_build/jupyter_execute/<page>.ipynb`` (with its outputs when the build executes, the converted
source when execution is off). This extension copies that file to
``_build/html/_sources/<page>.ipynb`` and sets ``ipynb_source``, so the theme's own menu offers it
next to the ``.md`` source. Pages that are not notebooks (no kernelspec) and pages whose source
already is an ``.ipynb`` (the theme offers those as the source) are left alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx

# Where MyST-NB writes the notebooks it built, next to the builder's output folder.
JUPYTER_EXECUTE = "jupyter_execute"


def built_notebook(outdir: Path, pagename: str) -> Path:
    """The notebook MyST-NB wrote for ``pagename`` (it may not exist)."""
    return Path(outdir).parent / JUPYTER_EXECUTE / f"{pagename}.ipynb"


def offer_notebook(app: Sphinx, pagename: str, templatename, context: dict, doctree) -> None:
    """Copy the page's notebook into ``_sources`` and name it in the context for the theme."""
    if getattr(app.builder, "format", None) != "html" or doctree is None:
        return
    if context.get("ipynb_source") or "ipynb" in context.get("page_source_suffix", ""):
        return
    if "kernelspec" not in app.env.metadata.get(pagename, {}):
        return  # a plain Markdown page, not a notebook
    notebook = built_notebook(Path(app.outdir), pagename)
    if not notebook.is_file():
        return
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(notebook, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def setup(app: Sphinx) -> dict:
    # Before sphinx-book-theme builds the header buttons (its handlers run at priority 501).
    app.connect("html-page-context", offer_notebook, priority=450)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
