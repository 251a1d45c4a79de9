"""Appendix B links each term to the chapter that defines it, and that chapter uses the term.

The glossary's last column names chapters as `{{chN}}` substitutions (resolved by
book/_ext/chapter_links.py) or `{doc}` roles. For every term, each linked chapter must exist, be
in the table of contents, and use the term, or one of its stated aliases (the English column
lists alternatives separated by commas or slashes; an upper-case abbreviation in parentheses
counts too), in its prose: code cells do not count. Matching ignores case, markup, hyphens and
line breaks, so "Top-$k$ gating" in a chapter matches "top-k gating" in the glossary; a heading
that contains every word of a term (such as "Total versus active parameters") counts as well.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from tests.chapters import ROOT, toc_files

BOOK = ROOT / "book"
GLOSSARY = BOOK / "appendix_b_glossary.md"


def chapter_stems() -> dict[int, str]:
    """CHAPTERS from book/_ext/chapter_links.py, read without importing Sphinx."""
    tree = ast.parse((BOOK / "_ext" / "chapter_links.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CHAPTERS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("chapter_links.py defines no CHAPTERS")


def split_row(line: str) -> list[str]:
    """Cells of a Markdown table row; a `|` inside `$...$` or backticks is not a separator."""
    cells, buf, in_math, in_code = [], "", False, False
    for ch in line.strip().strip("|"):
        if ch == "$" and not in_code:
            in_math = not in_math
        elif ch == "`":
            in_code = not in_code
        if ch == "|" and not in_math and not in_code:
            cells.append(buf.strip())
            buf = ""
        else:
            buf += ch
    cells.append(buf.strip())
    return cells


def glossary_rows(text: str) -> list[tuple[str, str]]:
    """(English cell, "Defined in" cell) of every term row of the glossary's tables."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.match(r"^\|\s*-", line):
            continue
        cells = split_row(line)
        if len(cells) != 4 or cells[0] == "English":
            continue
        rows.append((cells[0], cells[3]))
    return rows


def link_targets(cell: str, stems: dict[int, str]) -> list[Path]:
    """The chapter files a "Defined in" cell points to, in order."""
    paths = []
    for m in re.finditer(r"\{\{\s*ch(\d+)\s*\}\}|\{doc\}`([^`]*)`", cell):
        if m.group(1) is not None:
            n = int(m.group(1))
            assert n in stems, f"{{{{ch{n}}}}} is not a chapter of the book"
            paths.append(BOOK / f"{stems[n]}.md")
        else:
            role = m.group(2)
            target = re.search(r"<([^>]+)>", role)
            target = (target.group(1) if target else role).strip()
            base = ROOT if target.startswith("/") else BOOK
            paths.append((base / target.lstrip("/")).with_suffix(".md"))
    return paths


def aliases(term: str) -> tuple[list[str], list[str]]:
    """(names, abbreviations) a glossary English cell stands for."""
    abbrevs = re.findall(r"\(([A-Z][A-Za-z]*[A-Z])\)", term)
    rest = re.sub(r"\s*\([A-Z][A-Za-z]*[A-Z]\)", "", term)
    variants = {rest}
    for m in re.finditer(r"\s*\(([^)]*)\)", rest):  # optional words: with and without
        variants = {v.replace(m.group(0), f" {m.group(1)}") for v in variants} | {
            v.replace(m.group(0), "") for v in variants
        }
    names = []
    for v in sorted(variants):
        names += [n.strip() for n in re.split(r",|\s/\s", v) if n.strip()]
    return list(dict.fromkeys(names)), abbrevs


def normalize(text: str) -> str:
    """Lower case, no markup or possessive 's, hyphens and line breaks as single spaces."""
    text = text.lower().replace("'s", "")
    text = re.sub(r"[$`*_\\{}]", "", text)
    return re.sub(r"[-\s]+", " ", text).strip()


@cache
def prose(path: Path) -> str:
    """A chapter's text without front matter, code cells, other code blocks or comments."""
    text = path.read_text()
    if text.startswith("---"):
        text = text.split("\n---", 1)[1]
    text = re.sub(r"^(`{3,}).*?^\1\s*$", "", text, flags=re.S | re.M)
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def contains(haystack: str, needle: str) -> bool:
    """Whether the normalized needle (or its plural) occurs as whole words."""
    return re.search(rf"(?<![a-z0-9]){re.escape(needle)}s?(?![a-z0-9])", haystack) is not None


def headings(text: str) -> list[set[str]]:
    return [set(normalize(h).split()) for h in re.findall(r"^#+\s+(.*)$", text, re.M)]


def emphasised(text: str) -> list[str]:
    spans = re.findall(r"\*\*(.+?)\*\*", text, re.S)
    spans += re.findall(r"(?<![*\w])\*(?![\s*])(.+?)(?<![\s*])\*(?![*\w])", text, re.S)
    return [normalize(s) for s in spans]


def uses(term: str, path: Path) -> bool:
    """Whether the chapter's prose uses the term, an alias, or its abbreviation."""
    text = prose(path)
    names, abbrevs = aliases(term)
    flat = normalize(text)
    if any(contains(flat, normalize(n)) for n in names):
        return True
    if any(set(normalize(n).split()) <= h for n in names for h in headings(text)):
        return True
    return any(re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", text) for a in abbrevs)


def defines(term: str, path: Path) -> bool:
    """Whether the chapter puts the term in a heading or in bold or italics."""
    text = prose(path)
    names, abbrevs = aliases(term)
    keys = [normalize(n) for n in names] + [a.lower() for a in abbrevs]
    if any(set(k.split()) <= h for k in keys for h in headings(text)):
        return True
    return any(contains(span, k) for k in keys for span in emphasised(text))


STEMS = chapter_stems()
ROWS = glossary_rows(GLOSSARY.read_text())
PAIRS = [(term, path) for term, cell in ROWS for path in link_targets(cell, STEMS)]


def test_glossary_parses():
    assert len(ROWS) >= 40, ROWS
    assert len(PAIRS) >= len(ROWS)
    assert all(link_targets(cell, STEMS) for _, cell in ROWS), "a term links no chapter"


def test_linked_chapters_are_in_the_book():
    in_toc = {p.resolve() for p in toc_files()}
    missing = sorted({str(p.relative_to(ROOT)) for _, p in PAIRS if p.resolve() not in in_toc})
    assert not missing, f"glossary links pages missing from _toc.yml: {missing}"


@pytest.mark.parametrize(("term", "path"), PAIRS, ids=[f"{t}->{p.stem[:12]}" for t, p in PAIRS])
def test_linked_chapter_uses_the_term(term, path):
    assert path.exists(), f"{term!r} links {path.relative_to(ROOT)}, which does not exist"
    assert uses(term, path), (
        f"{term!r} links {path.name}, whose prose never uses it or its aliases {aliases(term)}"
    )


# Terms their chapter uses in plain prose, without a heading, bold or italics. Setting a term
# off where it is defined is preferred, so a new glossary term must be set off in a linked
# chapter, or listed here.
PLAIN = {
    "SwiGLU",
    "router",
    "dense model",
    "shared expert",
    "fine-grained experts",
    "top-k routing, top-k gating, token choice",
    "routing weights, gate values",
    "expert choice routing",
    "one-hot (einsum) dispatch",
    "dropless",
    "expert load",
    "expert bias, bias $b_e$",
    "data parallelism (DP)",
    "tensor parallelism (TP)",
    "pipeline parallelism (PP)",
    "roofline model",
    "model FLOPs utilisation (MFU)",
    "straggler",
}


def test_plain_terms_are_glossary_terms():
    assert PLAIN <= {t for t, _ in ROWS}, PLAIN - {t for t, _ in ROWS}


@pytest.mark.parametrize("term", [t for t, _ in ROWS if t not in PLAIN])
def test_some_linked_chapter_defines_the_term(term):
    """At least one linked chapter sets the term off: a heading, bold or italics."""
    cell = dict(ROWS)[term]
    paths = link_targets(cell, STEMS)
    assert any(defines(term, p) for p in paths), (
        f"{term!r}: none of {[p.name for p in paths]} puts it in a heading, bold or italics"
    )


def test_the_matcher_is_not_vacuous():
    ch = {n: BOOK / f"{s}.md" for n, s in STEMS.items()}
    assert set(aliases("noisy top-k (gating)")[0]) == {"noisy top-k gating", "noisy top-k"}
    assert aliases("expert parallelism (EP)") == (["expert parallelism"], ["EP"])
    assert aliases("top-1 / top-2 routing")[0] == ["top-1", "top-2 routing"]
    assert uses("top-k gating", ch[3]) and not uses("grouped GEMM", ch[2])
    assert not uses("a term no chapter uses", ch[5])
    assert link_targets("{{ch4}}, {doc}`A <appendix_a_misconceptions>`", STEMS) == [
        ch[4],
        BOOK / "appendix_a_misconceptions.md",
    ]
