"""The Chinese edition: its catalogs, the tools that keep and build them, and the glossary.

Catalogs (locale/zh_CN/LC_MESSAGES/book/*.po):
- each parses and compiles, and every page of the book has one (`make locale` makes it);
- every translated message keeps the markup of its English (tests/po_checks.py: roles,
  `{{chN}}`, `$...$`, inline code), reported as file:line;
- no message is untranslated or fuzzy: one test, listing file:line of each. It fails while
  the translation is in progress, and a release build needs it to pass;
- Appendix B's Chinese term appears wherever a chapter's English uses the term (see
  GLOSSARY_EXCEPTIONS for the reasoned exceptions).

Tools: the babel merge of tools/locale_tools.py on a tiny fixture catalog, the edition
configuration and catalog compilation of tools/book_editions.py, and the language-aware parts
of book/_ext (chapter names, links between editions).
"""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from babel.messages.catalog import Catalog
from babel.messages.mofile import read_mo, write_mo
from babel.messages.pofile import read_po

from tests import po_checks
from tests.chapters import ROOT, toc_files
from tests.test_glossary import aliases, contains, normalize, split_row

LOCALE = ROOT / "locale"
CATALOG_DIR = LOCALE / "zh_CN" / "LC_MESSAGES"
CATALOGS = sorted(CATALOG_DIR.rglob("*.po"))
GLOSSARY = ROOT / "book" / "appendix_b_glossary.md"

sys.path.insert(0, str(ROOT / "tools"))
import book_editions  # noqa: E402
import locale_tools  # noqa: E402


def load_ext(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "book" / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def read(path: Path) -> Catalog:
    with path.open("rb") as f:
        return read_po(f, locale="zh_CN", abort_invalid=True)


# ---------------------------------------------------------------------------------------------
# The catalogs


def test_catalogs_exist():
    assert len(CATALOGS) >= 15, f"expected a catalog per page under {rel(CATALOG_DIR)}"


def test_every_page_has_a_catalog():
    pages = [p.relative_to(ROOT).with_suffix("").as_posix() for p in toc_files()]
    missing = [p for p in pages if not (CATALOG_DIR / f"{p}.po").exists()]
    assert not missing, f"pages without a catalog (run `make locale`): {missing}"


@pytest.mark.parametrize("path", CATALOGS, ids=[p.stem for p in CATALOGS])
def test_catalog_parses_and_compiles(path):
    catalog = read(path)  # raises with the file and line of a syntax error
    assert catalog.locale is not None and str(catalog.locale).startswith("zh")
    mo = io.BytesIO()
    write_mo(mo, catalog, use_fuzzy=False)
    mo.seek(0)
    compiled = read_mo(mo)
    translated = {m.id for m in catalog if m.id and m.string and not m.fuzzy}
    assert translated <= {m.id for m in compiled if m.id}


@pytest.mark.parametrize("path", CATALOGS, ids=[p.stem for p in CATALOGS])
def test_catalog_keeps_markup(path):
    """Every role, {{chN}}, $...$ and code span of a msgid survives in its msgstr.

    tests/po_checks.py's check, except on fuzzy messages: their translation is of an older
    English, the build does not use it, and the fuzzy test below reports them.
    """
    fuzzy = {line for line, _id, _str, is_fuzzy in po_checks.messages(path) if is_fuzzy}
    bad = [p for p in po_checks.problems(path) if int(p.split(":")[1]) not in fuzzy]
    assert not bad, f"{rel(path)}: translations that change markup:\n" + "\n".join(bad)


def test_no_untranslated_or_fuzzy_messages():
    """The release check: every message translated and none fuzzy (fails until they are).

    A fuzzy message (`#, fuzzy`) is one whose English changed since it was translated: check the
    translation against the new msgid (the old one is under `#| msgid`), then delete the flag.
    """
    todo = [line for path in CATALOGS for line in po_checks.untranslated(path)]
    per_file = Counter(line.split(":", 1)[0] for line in todo)
    summary = ", ".join(f"{name} {n}" for name, n in sorted(per_file.items()))
    shown = "\n".join(todo[:60]) + (f"\n... and {len(todo) - 60} more" if len(todo) > 60 else "")
    assert not todo, (
        f"{len(todo)} untranslated or fuzzy messages under {rel(CATALOG_DIR)} ({summary}):\n"
        f"{shown}\n(list them all: .venv/bin/python tests/po_checks.py)"
    )


def test_catalogs_match_the_english(tmp_path):
    """Every catalog holds the messages the English pages have now (`make locale` updates them).

    Builds the templates with the gettext builder (no execution, a few seconds) and merges them
    into a copy of the catalogs; new, changed or removed English must not show up.
    """
    copy = tmp_path / "locale"
    shutil.copytree(LOCALE, copy)
    results = locale_tools.update(ROOT, copy, dry_run=True)
    stale = [r.summary() for r in results if r.created or r.added or r.fuzzy or r.obsolete]
    assert not stale, "catalogs behind the English; run `make locale`:\n" + "\n".join(stale)


# ---------------------------------------------------------------------------------------------
# Glossary terms in the translation
#
# For each Appendix B row, a translated message whose English uses the term (or an alias, as
# tests/test_glossary.py reads the English column) must contain the row's Chinese form. Where
# both columns list the same number of names (comma or " / " separated), each English name
# maps to the Chinese name in the same place ("prefill, decode" / "预填充，解码"); otherwise any
# Chinese name of the row will do. A parenthesis in the Chinese column is optional ("混合专家
# （模型）" accepts 混合专家), and its content is an alternative when it is a name of its own
# (three characters or more: "全对全通信（all-to-all）" accepts all-to-all). An abbreviation
# kept as is (MoE, EP, MFU) counts as the term. The longest English match wins: "capacity
# factor" asks for 容量因子, not also for the 专家容量 of "capacity".


# English terms the check skips everywhere, with the reason. Keep it short: a term listed here
# is not checked at all.
GLOSSARY_EXCEPTIONS: dict[str, str] = {
    "combine": "also the everyday verb ('combine two ideas'); the layer's step is a noun in the "
               "glossary and usually reads as 合并 anyway",
    "dispatch": "also the everyday verb ('dispatch a kernel'); the step itself is checked "
                "through its compound names (sort-based dispatch, one-hot dispatch)",
    "gating, gate": "'gate' is also part of code names and ordinary phrases ('the gate "
                    "projection'); routing weights/gate values cover the sense that matters",
}
# Chinese accepted besides the glossary's for one English name, with the reason: where the
# glossary gives one Chinese name for several English ones, or a count where the English means
# the things counted.
ALSO_ACCEPTED: dict[str, tuple[list[str], str]] = {
    "capacity": (["容量"], "the bare word drops the qualifier 专家 as the English drops 'expert'"),
    "collapse": (["坍塌"], "the bare word drops 路由 as the English drops 'routing'"),
    "dropped assignment": (["丢弃"], "词元丢弃 names the event; the noun phrase reads "
                                     "被丢弃的分配"),
    "sort-and-permute": (["排序"], "names the mechanism of 基于排序的分发 step by step"),
    "active parameters": (["激活参数"], "参数量 is the count; 'the active parameters take "
                                        "14 GB' means the parameters themselves"),
    "total parameters": (["总参数"], "as for active parameters"),
    "Mixture of Experts": (["混合专家"], "模型 is dropped where the English names the technique "
                                         "or a layer, not a model"),
    "top-k gating": (["top-k 门控"], "the row gives 路由 for routing; gating is 门控 (own row)"),
    "noisy top-k": (["带噪声的 top-k"], "the English drops the optional 'gating', so may the "
                                       "Chinese 门控"),
    "straggler": (["掉队"], "掉队者 is the slow device; 'worse stragglers' is the lag, 掉队"),
    "bias $b_e$": (["偏置"], "the symbol already names the expert: 偏置 $b_e$"),
    "experts touched": (["触及的专家"], "每步 and 数 come from the sentence ('per step', "
                                       "'how many') when it has them"),
}
# Single messages where a term is used in another sense, as (catalog, start of the msgid,
# English name, reason). Add one when the check is wrong for that message.
MESSAGE_EXCEPTIONS: list[tuple[str, str, str, str]] = [
    ("13_in_practice.po", "Short, checked answers", "router",
     "'a collapsed router' is rendered as the glossary's 路由坍塌 (routing collapse)"),
    ("03_sparse_routing.po", "**Top-2, GShard**", "expert capacity",
     "'saves that expert capacity' is that expert's capacity: 为该专家节省容量"),
]

CJK = re.compile(r"[\u4e00-\u9fff]")
PAGES_CHECKED = [p for p in CATALOGS if p.stem not in {"appendix_b_glossary", "references"}]


def glossary_terms(text: str) -> list[tuple[str, str]]:
    """(English cell, 中文 cell) of each glossary row, plus the prose rule for *token*."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.match(r"^\|\s*-", line):
            continue
        cells = split_row(line)
        if len(cells) == 4 and cells[0] != "English":
            rows.append((cells[0], cells[1]))
    # "*Token* is 词元 throughout." in the glossary's introduction.
    rows += [(en.lower(), zh) for en, zh in re.findall(r"\*(\w+)\* is (\S+?) throughout", text)]
    return rows


def chinese_forms(cell: str) -> list[str]:
    """The spellings a Chinese name accepts: with and without its parenthesis, or its content."""
    forms = []
    for name in split_names(cell):
        forms.append(name)
        m = re.search(r"（([^（）]*)）", name)
        if m:
            forms.append(name.replace(m.group(0), ""))
            if len(m.group(1).strip()) >= 3:
                forms.append(m.group(1))
    return [f for f in dict.fromkeys(f.strip() for f in forms) if f]


def split_names(cell: str) -> list[str]:
    return [n.strip() for n in re.split(r"[，,]|\s/\s", cell) if n.strip()]


def squash(text: str) -> str:
    """Chinese-side matching: lower case, without spaces, hyphens, Markdown or TeX marks, or
    the particle 的 (the English "expert's load" reads 专家的负载 for the term 专家负载)."""
    return re.sub(r"[\s\-$`*_\\{}的]", "", text).lower()


def term_rules(text: str) -> list[tuple[str, str, str, bool]]:
    """(row's English cell, English name, its Chinese forms joined by '|', is_abbreviation)."""
    rules = []
    for en_cell, zh_cell in glossary_terms(text):
        if en_cell in GLOSSARY_EXCEPTIONS:
            continue
        en_parts, zh_parts = split_names(en_cell), split_names(zh_cell)
        pairs = (list(zip(en_parts, zh_parts, strict=True)) if len(en_parts) == len(zh_parts)
                 else [(part, zh_cell) for part in en_parts])
        for en_part, zh_part in pairs:
            names, abbrevs = aliases(en_part)
            forms = chinese_forms(zh_part)
            for name in names:
                extra = ALSO_ACCEPTED.get(name, ([], ""))[0]
                # A Chinese name that keeps the English word ("all-to-all 通信") accepts the
                # word alone: the noun after it may be elsewhere in the sentence.
                kept = [name] if any(squash(name) in squash(f) for f in forms) else []
                rules.append((en_cell, name, "|".join(dict.fromkeys([*forms, *extra, *kept])),
                              False))
            rules += [(en_cell, a, "|".join(dict.fromkeys([*forms, a])), True) for a in abbrevs]
    # Longest English first, so it masks the shorter names it contains.
    return sorted(rules, key=lambda r: -len(r[1]))


RULES = term_rules(GLOSSARY.read_text(encoding="utf-8"))


def english_prose(msgid: str) -> str:
    """The words of a msgid a reader sees: roles other than link texts and code spans removed."""
    text = re.sub(r"\{(?:doc|ref|numref|term)\}`([^`<]*?)\s*(?:<[^>]*>)?`", r"\1", msgid)
    text = re.sub(r"\{[a-z][\w:-]*\}`[^`]*`", " ", text)
    text = re.sub(r"\$[^$]*\\[^$]*\$", " ", text)  # TeX with commands; `$k$` stays
    return re.sub(r"`[^`]*`", " ", text)


def missing_terms(msgid: str, msgstr: str) -> list[tuple[str, str, list[str]]]:
    """(English cell, name found, Chinese forms) for each term whose Chinese is missing."""
    words = normalize(english_prose(msgid))
    raw = english_prose(msgid)
    target = squash(msgstr)
    out = []
    for cell, name, forms, is_abbrev in RULES:
        if is_abbrev:
            found = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", raw) is not None
        else:
            key = normalize(name)
            found = contains(words, key)
            if found:  # mask it, so the shorter names inside it are not counted again
                words = re.sub(rf"(?<![a-z0-9]){re.escape(key)}s?(?![a-z0-9])", " # ", words)
        options = forms.split("|")
        if found and not any(squash(f) in target for f in options):
            out.append((cell, name, options))
    return out


GLOSSARY_FIXTURE = """*Token* is 词元 throughout.

| English | 中文 | Meaning | Defined in |
|---|---|---|---|
| Mixture of Experts (MoE) | 混合专家（模型） | A layer. | {{ch0}} |
| all-to-all | 全对全通信（all-to-all） | A collective. | {{ch9}} |
| prefill, decode | 预填充，解码 | Two phases. | {{ch12}} |
| expert capacity, capacity | 专家容量 | At most. | {{ch5}} |
"""


def test_glossary_rules_parse():
    assert len({cell for cell, *_ in RULES}) >= 40, "Appendix B's tables were not read"
    forms = {name: f.split("|") for _cell, name, f, _ in term_rules(GLOSSARY_FIXTURE)}
    assert forms["prefill"] == ["预填充"] and forms["decode"] == ["解码"]
    assert forms["Mixture of Experts"] == ["混合专家（模型）", "混合专家"]  # not 模型 alone
    assert forms["MoE"] == ["混合专家（模型）", "混合专家", "MoE"]
    assert forms["all-to-all"] == ["全对全通信（all-to-all）", "全对全通信", "all-to-all"]
    assert forms["expert capacity"] == ["专家容量"] and forms["capacity"] == ["专家容量", "容量"]
    assert forms["token"] == ["词元"]


def test_glossary_check_on_examples():
    assert not missing_terms("The capacity factor is 1.25.", "容量因子为 1.25。")
    assert [m[1] for m in missing_terms("The capacity factor is 1.25.", "容量系数为 1.25。")] \
        == ["capacity factor"]
    assert not missing_terms("Each token picks top-$k$ experts.", "每个词元选择 top-$k$ 个专家。")
    assert not missing_terms("See `router_logits` and {cite}`fedus2022switch`.", "见上文。")
    assert [m[1] for m in missing_terms("A router scores experts.", "一个路由器给专家打分。")] == []
    assert [m[1] for m in missing_terms("Prefill, then decode.", "先预填充，再解码。")] == []
    assert [m[1] for m in missing_terms("Then decode.", "然后预填充。")] == ["decode"]


@pytest.mark.parametrize("path", PAGES_CHECKED, ids=[p.stem for p in PAGES_CHECKED])
def test_glossary_terms_in_translation(path):
    """Each translated message uses Appendix B's Chinese for the glossary terms of its English."""
    skip = {(c, m, t) for c, m, t, _reason in MESSAGE_EXCEPTIONS}
    problems = []
    for line, msgid, msgstr, fuzzy in po_checks.messages(path):
        if not msgstr or fuzzy or msgstr == msgid or CJK.search(msgid):
            continue  # untranslated, kept as is (display math, names), or not English
        for cell, name, forms in missing_terms(msgid, msgstr):
            if any(c == path.name and msgid.startswith(m) and t in (cell, name)
                   for c, m, t in skip):
                continue
            problems.append(
                f"{path.name}:{line}: the English uses {name!r}, so the translation should "
                f"contain {' or '.join(forms)} (Appendix B, row {cell!r})"
            )
    assert not problems, (
        "\n".join(problems) + "\nIf a use is not the glossary's sense, add it to "
        "MESSAGE_EXCEPTIONS in tests/test_translation.py with the reason."
    )


# ---------------------------------------------------------------------------------------------
# tools/locale_tools.py: the merge, on a tiny catalog

FIXTURE_PO = r'''# Chinese (zh_CN) messages of MoE Lab, page book/tiny.
msgid ""
msgstr ""
"Project-Id-Version: MoE Lab \n"
"Language: zh_CN\n"
"Content-Type: text/plain; charset=utf-8\n"

#: ../../book/tiny.md:3
msgid "Kept"
msgstr "保留"

#: ../../book/tiny.md:5
msgid "The router scores every expert for each token."
msgstr "路由器为每个词元给每个专家打分。"

#: ../../book/tiny.md:7
msgid "A paragraph that the English drops."
msgstr "英文删去的一段。"

#: ../../book/tiny.md:9
msgid "Dropped and never translated."
msgstr ""
'''


def template(*ids: str) -> Catalog:
    pot = Catalog(project="MoE Lab")
    for line, msgid in enumerate(ids, start=3):
        pot.add(msgid, locations=[("../../book/tiny.md", line)])
    return pot


def test_merge_marks_changes_and_loses_nothing(tmp_path):
    po = tmp_path / "tiny.po"
    po.write_text(FIXTURE_PO, encoding="utf-8")
    changed = "The router scores every expert for each token, then keeps the best k."
    result = locale_tools.merge(template("Kept", changed, "A new paragraph."), po, "book/tiny")
    catalog = locale_tools.read_catalog(po)
    assert catalog["Kept"].string == "保留" and not catalog["Kept"].fuzzy
    # The changed message is fuzzy, keeps the old translation and the old msgid beside it.
    assert catalog[changed].fuzzy and catalog[changed].string == "路由器为每个词元给每个专家打分。"
    assert catalog[changed].previous_id == ["The router scores every expert for each token."]
    assert catalog["A new paragraph."].string == "" and not catalog["A new paragraph."].fuzzy
    # The dropped translated message is kept as obsolete; the untranslated one is gone.
    assert catalog.obsolete["A paragraph that the English drops."].string == "英文删去的一段。"
    assert "Dropped and never translated." not in catalog.obsolete
    assert result.added == ["A new paragraph."] and result.fuzzy == [changed]
    assert result.obsolete == ["A paragraph that the English drops."] and result.written
    text = po.read_text(encoding="utf-8")
    assert text.startswith("# Chinese (zh_CN) messages of MoE Lab, page book/tiny.")
    assert '#| msgid "The router scores every expert for each token."' in text
    assert '#~ msgid "A paragraph that the English drops."' in text

    # The English comes back: so does its translation. A second identical run writes nothing.
    locale_tools.merge(template("Kept", changed, "A paragraph that the English drops."), po,
                       "book/tiny")
    catalog = read(po)
    assert catalog["A paragraph that the English drops."].string == "英文删去的一段。"
    assert not catalog["A paragraph that the English drops."].fuzzy
    before = po.read_bytes()
    again = locale_tools.merge(template("Kept", changed, "A paragraph that the English drops."),
                               po, "book/tiny")
    assert not again.written and po.read_bytes() == before

    # Still fuzzy on a later run: the old msgid stays beside it, written once.
    locale_tools.merge(template("Kept", changed, "Another new one."), po, "book/tiny")
    assert read(po)[changed].fuzzy
    assert locale_tools.read_catalog(po)[changed].previous_id == [
        "The router scores every expert for each token."]
    assert po.read_text(encoding="utf-8").count("#| msgid") == 1
    assert "# |" not in po.read_text(encoding="utf-8")


def test_long_old_msgids_survive_rewrites(tmp_path):
    """A long or multi-line old msgid is written as PO strings and read back whole."""
    old = "A long paragraph " * 8 + "with a \"quote\" and a line\nbreak."
    po = tmp_path / "long.po"
    po.write_text(FIXTURE_PO.replace("A paragraph that the English drops.", old.replace(
        "\"", "\\\"").replace("\n", "\\n")), encoding="utf-8")
    new = old.replace("break.", "break, changed.")
    locale_tools.merge(template("Kept", new), po, "book/long")
    text = po.read_text(encoding="utf-8")
    assert "\n#| msgid " in text and "# |" not in text
    assert locale_tools.read_catalog(po)[new].previous_id == [old]
    locale_tools.merge(template("Kept", new, "Another."), po, "book/long")  # rewritten again
    assert locale_tools.read_catalog(po)[new].previous_id == [old]
    # babel's own layout (the comment wrapped as plain text) is read back too.
    wrapped = ["| msgid \"A long paragraph A long", "| paragraph with \\\"q\\\"\""]
    assert locale_tools.previous_msgid(wrapped) == 'A long paragraph A long paragraph with "q"'


def test_merge_starts_a_catalog_for_a_new_page(tmp_path):
    po = tmp_path / "book" / "new_page.po"
    result = locale_tools.merge(template("Title", "Body."), po, "book/new_page")
    catalog = read(po)
    assert result.created and [m.id for m in catalog if m.id] == ["Title", "Body."]
    assert all(m.string == "" for m in catalog if m.id)
    assert "page book/new_page" in po.read_text(encoding="utf-8")


def test_merge_rewrites_nothing_in_the_real_catalogs(tmp_path):
    """A template equal to a catalog's own messages changes nothing (layout included)."""
    for path in CATALOGS[:3]:
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes())
        pot = Catalog(project="MoE Lab")
        for m in read(path):
            if m.id:
                pot.add(m.id, locations=m.locations)
        assert not locale_tools.merge(pot, copy, path.stem).written
        assert locale_tools.dump(read(path)) == path.read_bytes(), path.name


def test_locations_are_written_as_from_build_gettext(tmp_path):
    pot = template("Kept")
    pot_root = tmp_path / "tmp" / "_build" / "gettext"
    pot["Kept"].locations = [(f"{Path('../' * 10)}{ROOT.as_posix()}/book/tiny.md", 3)]
    locale_tools.canonical_locations(pot, pot_root, ROOT)
    assert pot["Kept"].locations == [("../../book/tiny.md", 3)]


# ---------------------------------------------------------------------------------------------
# tools/book_editions.py


def test_edition_config_changes_only_what_differs(tmp_path):
    base = yaml.safe_load((ROOT / "_config.yml").read_text())
    zh = book_editions.edition_config(ROOT, "zh_CN", execute="cache",
                                      cache=tmp_path / "cache", locale_dir=tmp_path / "mo")
    assert zh["sphinx"]["config"]["language"] == "zh_CN"
    assert zh["sphinx"]["config"]["locale_dirs"] == [str((tmp_path / "mo").resolve())]
    assert zh["execute"]["execute_notebooks"] == "cache"
    assert zh["execute"]["cache"] == str((tmp_path / "cache").resolve())
    assert zh["execute"]["allow_errors"] is False
    assert zh["sphinx"]["config"]["nb_execution_raise_on_error"] is True
    for name, path in zh["sphinx"]["local_extensions"].items():
        assert Path(path).is_absolute() and (Path(path) / f"{name}.py").exists()
    assert zh["sphinx"]["config"]["extensions"] == base["sphinx"]["config"]["extensions"]
    en = book_editions.edition_config(ROOT, "en", execute="cache", cache=tmp_path / "cache")
    assert en["title"] == base["title"] and en["sphinx"]["config"]["language"] == "en"


def test_config_declares_the_catalogs():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    assert cfg["gettext_compact"] is False and cfg["locale_dirs"] == ["locale/"]
    assert "language_links" in cfg["extensions"]


def test_compile_catalogs_leaves_fuzzy_out(tmp_path):
    src = tmp_path / "locale" / "zh_CN" / "LC_MESSAGES" / "book"
    src.mkdir(parents=True)
    (src / "tiny.po").write_text(FIXTURE_PO.replace(
        '#: ../../book/tiny.md:3\n', '#: ../../book/tiny.md:3\n#, fuzzy\n'), encoding="utf-8")
    [mo] = book_editions.compile_catalogs(tmp_path / "locale", tmp_path / "out")
    assert mo == tmp_path / "out" / "zh_CN" / "LC_MESSAGES" / "book" / "tiny.mo"
    with mo.open("rb") as f:
        compiled = read_mo(f)
    assert "Kept" not in compiled  # fuzzy
    assert compiled["The router scores every expert for each token."].string.startswith("路由器")


def test_numbered_titles_stay_titles():
    """A numbered title ("5. 容量") would parse as a Markdown list: its dot is escaped."""
    assert book_editions.escape_numbered_title("5. Capacity", "5. 容量") == "5\\. 容量"
    assert book_editions.escape_numbered_title("12. Serving", "12. 推理服务") == "12\\. 推理服务"
    assert book_editions.escape_numbered_title("A router.", "5. 路由器") == "5. 路由器"
    assert book_editions.escape_numbered_title("5. Capacity", "第五章 容量") == "第五章 容量"


def test_compile_catalogs_names_a_broken_file(tmp_path):
    src = tmp_path / "locale" / "zh_CN" / "LC_MESSAGES" / "book"
    src.mkdir(parents=True)
    (src / "broken.po").write_text('msgid "a"\nmsgstr "b"\nnot a keyword\n', encoding="utf-8")
    with pytest.raises(book_editions.BuildError, match="broken.po"):
        book_editions.compile_catalogs(tmp_path / "locale", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# book/_ext: chapter names and links between the editions


def test_chapter_links_in_chinese():
    chapter_links = load_ext("chapter_links")
    subs = chapter_links.chapter_substitutions({"book/05_capacity"}, "zh_CN")
    assert subs["ch5"] == "{doc}`第 5 章 </book/05_capacity>`"
    assert subs["ch6"] == "第 6 章"
    assert chapter_links.chapter_substitutions({"book/05_capacity"})["ch5"] == (
        "{doc}`chapter 5 </book/05_capacity>`")
    assert chapter_links.chapter_label(3, None) == "chapter 3"


def test_translated_glue_refers_to_the_page():
    glue = load_ext("translated_glue")
    assert glue.as_page_reference("ch5_x:.2f", "book/05_capacity.md") == (
        "/book/05_capacity.md::ch5_x:.2f")
    assert glue.as_page_reference("ch5_n", "book/05_capacity.md") == "/book/05_capacity.md::ch5_n:s"
    assert glue.as_page_reference("other.md::k:.1f", "book/x.md") == "other.md::k:.1f"


def test_toc_captions_are_translated(tmp_path):
    """The part captions sphinx-external-toc inserts after the Locale transform get translated."""
    from types import SimpleNamespace

    from docutils.utils import new_document
    from sphinx import addnodes

    toc = load_ext("translated_toc")
    src = tmp_path / "locale" / "zh_CN" / "LC_MESSAGES" / "book"
    src.mkdir(parents=True)
    (src / "intro.po").write_text('msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=utf-8'
                                  '\\n"\n\nmsgid "At scale"\nmsgstr "规模化"\n', encoding="utf-8")
    book_editions.compile_catalogs(tmp_path / "locale", tmp_path / "mo")
    doctree = new_document("intro")
    doctree += addnodes.toctree(caption="At scale")
    doctree += addnodes.toctree(caption="Back matter")
    config = SimpleNamespace(language="zh_CN", gettext_compact=False,
                             locale_dirs=[str(tmp_path / "mo")])
    app = SimpleNamespace(config=config, env=SimpleNamespace(docname="book/intro"),
                          srcdir=str(tmp_path))
    toc.translate_captions(app, doctree)
    assert [n["caption"] for n in doctree.findall(addnodes.toctree)] == ["规模化", "Back matter"]
    config.language = "en"
    doctree2 = new_document("intro")
    doctree2 += addnodes.toctree(caption="At scale")
    toc.translate_captions(app, doctree2)
    assert next(doctree2.findall(addnodes.toctree))["caption"] == "At scale"


def test_language_links_are_relative_counterparts():
    links = load_ext("language_links")
    [to_zh] = links.edition_links("book/05_capacity", "en")
    assert to_zh["url"] == "../zh/book/05_capacity.html" and to_zh["label"] == "中文"
    [to_en] = links.edition_links("book/05_capacity", "zh_CN")
    assert to_en["url"] == "../../book/05_capacity.html" and to_en["hreflang"] == "en"
    assert links.edition_links("genindex", "en")[0]["url"] == "zh/genindex.html"
    assert links.edition_links("genindex", "zh_CN")[0]["url"] == "../genindex.html"
    # The folders the links assume are the ones the build writes.
    assert {e.language: e.folder.rstrip("/") for e in links.EDITIONS} == book_editions.FOLDERS
    with pytest.raises(ValueError, match="fr"):
        links.edition_of("fr")
