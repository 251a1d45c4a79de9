"""`{{ch0}}` ... `{{ch11}}`: a link to each chapter once it is in _toc.yml, plain text until then.

Pages that name chapters (intro, appendices) write `{{ch5}}`, never a bare link: the build runs
with -W, so a link to a chapter not yet in the table of contents would fail it. Each
substitution becomes "{doc}`chapter 5 </book/05_capacity>`" when book/05_capacity is in the
table of contents and "chapter 5" otherwise, so links appear as chapters land, with no edit.

The words follow the build's language: the Chinese edition (language zh_CN, built from the same
sources through the gettext catalogs) gets "第 5 章". A translated message keeps `{{ch5}}` as
is (tests/po_checks.py checks it), so the substitution is what puts the chapter's name into
the sentence in each language.
"""

from __future__ import annotations

from sphinx.application import Sphinx
from sphinx.config import Config

# The book's chapters (DESIGN.md), by number.
CHAPTERS = {
    0: "00_preface",
    1: "01_one_expert",
    2: "02_soft_mixture",
    3: "03_sparse_routing",
    4: "04_dispatch",
    5: "05_capacity",
    6: "06_load_balancing",
    7: "07_tiny_moe",
    8: "08_inside_moe",
    9: "09_expert_parallelism",
    10: "10_triton_kernel",
    11: "11_scaling",
    12: "12_serving",
    13: "13_in_practice",
}


# How a chapter is named, by the first part of Sphinx's `language` ("zh_CN" -> "zh").
LABELS = {"en": "chapter {n}", "zh": "第 {n} 章"}


def chapter_label(n: int, language: str | None = "en") -> str:
    """How chapter n is named: "chapter 5" in English (and unknown languages), "第 5 章" in zh."""
    base = (language or "en").replace("-", "_").split("_")[0].lower()
    return LABELS.get(base, LABELS["en"]).format(n=n)


def chapter_substitutions(in_toc, language: str | None = "en") -> dict[str, str]:
    """{"ch5": link or plain text, ...} given the docnames in the table of contents."""
    subs = {}
    for n, stem in CHAPTERS.items():
        doc = f"book/{stem}"
        label = chapter_label(n, language)
        subs[f"ch{n}"] = f"{{doc}}`{label} </{doc}>`" if doc in in_toc else label
    return subs


def define_substitutions(app: Sphinx, config: Config) -> None:
    site_map = getattr(config, "external_site_map", None)  # set by sphinx_external_toc
    in_toc = set(site_map) if site_map is not None else set()
    subs = chapter_substitutions(in_toc, config.language)
    config.myst_substitutions = {**subs, **config.myst_substitutions}


def setup(app: Sphinx) -> dict:
    # After sphinx_external_toc has read _toc.yml (its handler runs at the default priority).
    app.connect("config-inited", define_substitutions, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
