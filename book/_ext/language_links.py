"""Link every page to the same page in the book's other language edition, and give Chinese
pages a font stack that has CJK glyphs.

The book is built twice from the same sources (tools/book_editions.py): English at the site root
(_build/html/) and Chinese, through Sphinx's gettext catalogs, under zh/ (_build/html/zh/). Each
page gets, in its article header before the theme's buttons, a link labelled with the other
edition's name ("中文" on English pages, "English" on Chinese ones) to the same page there, plus a
``<link rel="alternate" hreflang=...>`` in its head. Both are relative URLs, so the site works
from any host, under any path prefix, or from disk.

Chinese pages: the theme's font stack names only Latin fonts, so the browser falls back to
whatever CJK font the system ranks first, which can be a bitmap or serif face mixed into sans
text. static/moe-lab-editions.css puts common system CJK sans fonts (PingFang, Microsoft YaHei,
Noto/Source Han Sans, WenQuanYi) into the stack for pages whose ``<html lang>`` is Chinese. No
web font is downloaded.

Set ``edition_links = False`` (sphinx config) for a build that has no second edition beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

HERE = Path(__file__).resolve().parent
CSS = "moe-lab-editions.css"
TEMPLATE = "edition-switch.html"


@dataclass(frozen=True)
class Edition:
    language: str  # Sphinx's `language`
    folder: str  # where the edition lies under the site root, "" or ending in "/"
    label: str  # the link's text, in the edition's own language
    hreflang: str  # BCP 47, for hreflang and lang attributes
    search_text: str | None = None  # the search box's placeholder, when not Jupyter Book's


EDITIONS = (
    Edition("en", "", "English", "en"),
    Edition("zh_CN", "zh/", "中文", "zh-CN", search_text="搜索本书……"),
)


def edition_of(language: str | None) -> Edition:
    """The edition a build's ``language`` belongs to (None or unknown: the English one)."""
    for edition in EDITIONS:
        if edition.language == (language or "en"):
            return edition
    raise ValueError(f"language {language!r} is none of the editions "
                     f"{[e.language for e in EDITIONS]} (book/_ext/language_links.py)")


def counterpart_url(pagename: str, here: Edition, there: Edition) -> str:
    """Relative URL from ``pagename`` in edition ``here`` to the same page in ``there``."""
    depth = pagename.count("/") + here.folder.count("/")
    return "../" * depth + there.folder + pagename + ".html"


def edition_links(pagename: str, language: str | None) -> list[dict]:
    """The links a page of the ``language`` edition shows to the other editions."""
    here = edition_of(language)
    return [
        {
            "url": counterpart_url(pagename, here, there),
            "label": there.label,
            "hreflang": there.hreflang,
            "title": f"{there.label}: {pagename}",
        }
        for there in EDITIONS
        if there != here
    ]


def configure(app: Sphinx, config: Config) -> None:
    """Register the header template, its place in the header, the font CSS, and the edition's
    search placeholder (Jupyter Book writes its English one into the theme options)."""
    edition = edition_of(config.language)  # fail early on a language with no edition
    config.templates_path = [*config.templates_path, str(HERE / "templates")]
    config.html_static_path = [*config.html_static_path, str(HERE / "static")]
    options = dict(config.html_theme_options or {})
    end = options.get("article_header_end", ["article-header-buttons.html"])
    end = [end] if isinstance(end, str) else list(end)
    if config.edition_links and TEMPLATE not in end:
        options["article_header_end"] = [TEMPLATE, *end]
    if edition.search_text:
        options["search_bar_text"] = edition.search_text
    config.html_theme_options = options


def add_links(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Put the counterpart links into the page context (header template) and head."""
    if getattr(app.builder, "format", None) != "html":
        return
    links = edition_links(pagename, app.config.language) if app.config.edition_links else []
    context["edition_links"] = links
    context["metatags"] = context.get("metatags", "") + "".join(
        f'\n<link rel="alternate" hreflang="{link["hreflang"]}" href="{link["url"]}" />'
        for link in links
    )


def setup(app: Sphinx) -> dict:
    app.add_config_value("edition_links", True, "html", types=[bool])
    app.connect("config-inited", configure)
    app.connect("html-page-context", add_links)
    app.add_css_file(CSS)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
