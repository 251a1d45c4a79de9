"""Make `{glue:text}` work inside translated messages (the Chinese edition).

Sphinx translates a paragraph by parsing its msgstr as a small document of its own
(sphinx.transforms.i18n.publish_msgstr). MyST-NB parses that small document as plain MyST,
without the page's notebook, so a `{glue:text}` role in a translation finds no glue data
("No key ... found in glue data for this document"), and the -W build of the Chinese edition
fails on the first translated number.

MyST-NB has a second way to paste glue: a reference to another page, `{glue:text}`
`path::key:format`, left pending and filled in after reading from the glue data that page's
parse wrote (jupyter_execute/<page>.glue.json). This extension replaces the `glue:text` role
with one that, only inside a translated message of a notebook page, reads its key as such a
reference to the page being translated. The page's own parse has written the data by then, so
the number pasted is the same as in the English page. Everywhere else the role is MyST-NB's.

Only `{glue:text}` is handled: it is the only glue role in the book's prose. Checked against
myst-nb 1.4.0; the setup stops with a clear error if its glue module changes shape.
"""

from __future__ import annotations

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

TRANSLATED = "<translated>"  # the source path suffix publish_msgstr gives a message


def in_translated_message(document) -> bool:
    """Whether ``document`` is a msgstr being parsed, with no notebook renderer of its own."""
    source = getattr(document, "current_source", None) or ""
    return source.endswith(TRANSLATED) and "nb_renderer" not in document


def as_page_reference(text: str, page_path: str) -> str:
    """`key:fmt` -> `/page_path::key:fmt` (the format is needed: `::` holds a colon too)."""
    if "::" in text:
        return text  # already a reference
    return f"/{page_path}::{text if ':' in text else text + ':s'}"


def text_role_class():
    """A subclass of MyST-NB's `glue:text` role that handles translated messages."""
    try:
        from myst_nb.ext.glue.roles import PasteTextRole
    except ImportError as err:  # pragma: no cover - a MyST-NB that moved its glue roles
        raise ExtensionError(f"translated_glue: MyST-NB's glue roles not found: {err}") from err

    class TranslatedPasteTextRole(PasteTextRole):
        def run(self):
            if in_translated_message(self.document):
                env = self.document.settings.env
                self.text = as_page_reference(self.text, env.doc2path(env.docname, False))
            return super().run()

    return TranslatedPasteTextRole


def setup(app: Sphinx) -> dict:
    app.setup_extension("myst_nb")
    from myst_nb.ext.glue.domain import NbGlueDomain

    if "text" not in NbGlueDomain.roles:
        raise ExtensionError("translated_glue: MyST-NB's glue domain has no 'text' role")
    NbGlueDomain.roles = {**NbGlueDomain.roles, "text": text_role_class()()}
    return {"parallel_read_safe": True, "parallel_write_safe": True}
