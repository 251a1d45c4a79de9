"""Translate the table of contents' part captions ("Building an MoE layer", "At scale", ...).

The captions come from _toc.yml, and sphinx-external-toc inserts them into the root page as
toctree nodes when the page has been read (doctree-read). Sphinx translates a page's messages
earlier, in its Locale transform, so the captions were extracted into the root page's catalog
(the gettext builder reads the final page) but never translated: the Chinese edition's sidebar
kept its English part names. This handler translates them from the same catalog, the way the
Locale transform translates everything else, after sphinx-external-toc has inserted them.
"""

from __future__ import annotations

from os import path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.locale import init as init_locale
from sphinx.util.i18n import docname_to_domain


def translate_captions(app: Sphinx, doctree: nodes.document) -> None:
    """Replace each toctree caption of the page by its translation, when the catalog has one."""
    language = app.config.language
    if not language or language == "en" or not any(doctree.findall(addnodes.toctree)):
        return
    domain = docname_to_domain(app.env.docname, app.config.gettext_compact)
    dirs = [path.join(app.srcdir, d) for d in app.config.locale_dirs]
    catalog, has_catalog = init_locale(dirs, language, domain)
    if not has_catalog:
        return
    for toctree in doctree.findall(addnodes.toctree):
        caption = toctree.get("caption")
        if caption:
            translated = catalog.gettext(caption)
            if translated and translated != caption:
                toctree["caption"] = translated


def setup(app: Sphinx) -> dict:
    # After sphinx_external_toc's doctree-read handler (default priority 500) inserted them.
    app.connect("doctree-read", translate_captions, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
