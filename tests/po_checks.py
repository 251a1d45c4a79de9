"""Checks on the Chinese message catalogs (locale/zh_CN/LC_MESSAGES/book/*.po).

A translation may reword anything except what the build reads: every role (`{glue:text}`,
`{cite}`, `{doc}`, `{ref}`, ...), chapter substitution (`{{ch5}}`), `$...$` math and inline code
of a msgid must appear in its msgstr unchanged (a `{doc}` or `{ref}` role may translate its
visible text, not its target). Run as a script to list the problems of some catalogs:

    .venv/bin/python tests/po_checks.py locale/zh_CN/LC_MESSAGES/book/01_one_expert.po
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parents[1]
CATALOGS = ROOT / "locale" / "zh_CN" / "LC_MESSAGES" / "book"

ROLE = re.compile(r"\{([a-z][\w:-]*)\}`([^`]*)`")
SUBST = re.compile(r"\{\{\s*\w+\s*\}\}")
MATH = re.compile(r"\$\$.+?\$\$|(?<!\\)\$[^$]+?(?<!\\)\$", re.S)
CODE = re.compile(r"(?<![`}])`([^`]+)`")
TEXT_ROLES = {"doc", "ref", "numref", "term"}  # visible text may be translated


def role_key(name: str, body: str) -> str:
    """What must survive of a role: all of it, or only the target of a linking role."""
    if name in TEXT_ROLES:
        m = re.search(r"<([^<>]+)>\s*$", body)
        return f"{name}:{(m.group(1) if m else body).strip()}"
    return f"{name}:{body}"


def protected(text: str) -> Counter:
    """The multiset of pieces of ``text`` a translation must keep."""
    found = Counter(role_key(n, b) for n, b in ROLE.findall(text))
    rest = ROLE.sub(" ", text)
    found.update(f"subst:{s.replace(' ', '')}" for s in SUBST.findall(rest))
    found.update(f"math:{m}" for m in MATH.findall(rest))
    found.update(f"code:{c}" for c in CODE.findall(MATH.sub(" ", rest)))
    return found


def messages(path: Path):
    """(line, msgid, msgstr, fuzzy) of every message of one catalog (header left out)."""
    with path.open("rb") as f:
        catalog = read_po(f)
    for m in catalog:
        if m.id:
            yield m.lineno, m.id, m.string, m.fuzzy


def problems(path: Path) -> list[str]:
    """Broken markup in translated messages of ``path``: 'file:line: what is missing'."""
    out = []
    for line, msgid, msgstr, _fuzzy in messages(path):
        if not msgstr:
            continue
        missing = protected(msgid) - protected(msgstr)
        extra = protected(msgstr) - protected(msgid)
        if missing or extra:
            out.append(f"{path.name}:{line}: missing {sorted(missing)} extra {sorted(extra)}")
    return out


def untranslated(path: Path) -> list[str]:
    """Messages of ``path`` with no translation or marked fuzzy: 'file:line: msgid'."""
    return [f"{path.name}:{line}: {'fuzzy' if fuzzy else 'untranslated'}: {msgid[:60]!r}"
            for line, msgid, msgstr, fuzzy in messages(path) if fuzzy or not msgstr]


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(CATALOGS.glob("*.po"))
    bad = [p for path in paths for p in problems(path)]
    todo = [u for path in paths for u in untranslated(path)]
    print("\n".join(bad) or "markup: no problems")
    print(f"untranslated or fuzzy: {len(todo)}")
    sys.exit(1 if bad else 0)
