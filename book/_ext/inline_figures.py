"""Make the kernels that execute the book draw matplotlib figures into the pages.

The Makefile and the helpers' commands export MPLBACKEND=Agg (so scripts and tests never look
for a display). A kernel inherits that variable, and ipykernel then leaves matplotlib on Agg
instead of its inline backend: every `plt.show()` in a chapter drew nothing and the built pages
had no figures. The book's kernels are started by this Sphinx process, so set the inline backend
here, before any chapter executes.
"""

from __future__ import annotations

import os

from sphinx.application import Sphinx
from sphinx.config import Config

INLINE = "module://matplotlib_inline.backend_inline"


def use_inline_backend(app: Sphinx, config: Config) -> None:
    os.environ["MPLBACKEND"] = INLINE


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", use_inline_backend)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
