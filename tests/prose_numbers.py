"""Find hand-written measured numbers in a chapter's prose.

The book's promise: every measured or derived number in prose is glued from the cell that
computed it (``{glue:text}``), printed by a cell, or cited in the same sentence. This module
strips what is not prose (front matter, code cells, math, inline code, roles, headings,
directive options, comments), splits the rest into sentences, and reports each number that is
neither in a sentence with a ``{cite}`` nor a definitional constant from ``ALLOWED``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Definitional constants that may be written by hand, each with its reason. Everything else
# that looks like a measurement (a decimal, a ratio, a percentage, a size) must be glued or cited.
SMALL_INTEGERS = range(0, 11)  # counts in the set-up: k = 2, 3 seeds, 4 layers, 8 experts
POWERS_OF_TWO = {2**i for i in range(4, 21)}  # chosen widths, batch and window sizes, E and T
YEARS = range(1950, 2031)  # publication years next to author names
NUMBERED_THINGS = (  # "chapter 11", "exercise 12": references to parts of the book or code
    "chapter", "chapters", "exercise", "exercises", "section", "figure", "table", "appendix",
    "equation", "issue", "rank", "ranks", "layer", "layers", "seed", "seeds", "python",
    "pytorch", "triton", "version", "cpython",
)


def preset_constants() -> set[int]:
    """The integers that define the committed experiments (widths, step counts, batch sizes)."""
    from moe_lab.train import PRESETS

    values: set[int] = set()
    for preset in PRESETS.values():
        for part in preset.values():
            values.update(v for v in part.values() if isinstance(v, int) and v > 0)
    # own-schedule runs: 0.8x the preset's steps ("fine on its own 3200-step schedule")
    values.update(int(0.8 * p["train"]["steps"]) for p in PRESETS.values())
    # the fixed validation set's window counts and the FFN widths of the variants
    from moe_lab.data import VAL_WINDOWS

    values.update(VAL_WINDOWS.values())
    values.add(sum(VAL_WINDOWS.values()))
    return values


@dataclass(frozen=True)
class Finding:
    line: int
    number: str
    sentence: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.number!r} in: {self.sentence.strip()[:160]}"


NON_PROSE_DIRECTIVES = {"code-cell", "code", "code-block", "math", "raw", "bibliography",
                        "glue:figure", "glue:math", "list-table", "csv-table"}
FENCE = re.compile(r"^(`{3,}|:{3,})\s*(\{([\w:-]+)\})?")
ROLE = re.compile(r"\{[\w:-]+\}`[^`]*`")
INLINE_CODE = re.compile(r"``.+?``|`[^`]*`")
INLINE_MATH = re.compile(r"(?<![\\$])\$(?!\$)[^$]+?\$")
LINK = re.compile(r"\]\([^)]*\)")
CITE = re.compile(r"\{cite(:\w+)?\}`")
NUMBER = re.compile(
    r"(?<![\w.])(?P<num>\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)"
    r"(?P<unit>\s?(?:%|x(?![\w])|×|[kKMBT](?![a-z])|[KMGT]i?B|GB/s|ms|µs|s(?![a-z])))?"
)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) for every line of prose: no front matter, code, math, or headings."""
    lines = text.split("\n")
    out: list[tuple[int, str]] = []
    i = 0
    if lines and lines[0].strip() == "---":  # front matter
        i = 1
        while i < len(lines) and lines[i].strip() != "---":
            i += 1
        i += 1
    stack: list[tuple[str, bool]] = []  # open fences: (marker, is prose inside)
    in_math = False
    in_comment = False
    while i < len(lines):
        raw = lines[i]
        s = raw.strip()
        i += 1
        if in_comment:
            in_comment = "-->" not in s
            continue
        if s.startswith("<!--"):
            in_comment = "-->" not in s
            continue
        if in_math:
            in_math = not s.endswith("$$")
            continue
        m = FENCE.match(s)
        if m:
            marker, name = m.group(1), m.group(3)
            if stack and s == stack[-1][0][: len(marker)] and len(marker) >= len(stack[-1][0]):
                stack.pop()  # closing fence
                continue
            if stack and not stack[-1][1]:
                continue  # a fence-like line inside code
            prose = name is not None and name not in NON_PROSE_DIRECTIVES
            stack.append((marker, prose))
            continue
        if stack and not stack[-1][1]:
            continue
        if s.startswith("$$"):
            in_math = not (len(s) > 2 and s.endswith("$$"))
            continue
        if s.startswith("#") or s.startswith("+++") or re.match(r"^:[\w-]+:", s):
            continue  # heading, cell separator, directive option
        if s.startswith("(") and s.endswith(")="):
            continue  # a label
        out.append((i, raw))
    return out


def sentences(lines: list[tuple[int, str]]):
    """Split prose into sentences; yields (first line number, sentence text)."""
    buf, start = [], None
    for n, raw in lines:
        if not raw.strip():
            if buf:
                yield start, " ".join(buf)
            buf, start = [], None
            continue
        if buf and re.match(r"^\s*(?:[-*+]|\d+\.)\s", raw):
            yield start, " ".join(buf)  # a new list item starts a new sentence
            buf, start = [], None
        if start is None:
            start = n
        buf.append(raw.strip())
        joined = " ".join(buf)
        parts = re.split(r"(?<=[.!?])\s+(?=[A-Z(\[*_])", joined)
        for part in parts[:-1]:
            yield start, part
        buf = [parts[-1]]
    if buf:
        yield start, " ".join(buf)


def allowed(value: str, unit: str, before: str, constants: set[int]) -> bool:
    """A definitional number: small count, power of two, year, preset constant, or a label."""
    if unit.strip():
        return False
    if "," in value or "." in value:
        return False
    v = int(value)
    if v in SMALL_INTEGERS or v in POWERS_OF_TWO or v in YEARS or v in constants:
        return True
    word = re.findall(r"([A-Za-z]+)\W*$", before)
    if bool(word) and word[0].lower() in NUMBERED_THINGS:
        return True
    # the later numbers of a list of labels: "chapters 9 to 11", "exercises 2, 3 and 12"
    sep = r"\s*(?:,|and|or|to|-|–)\s*"
    listed = re.search(rf"([A-Za-z]+)\s+\d+(?:{sep}\d+)*{sep}$", before)
    return bool(listed) and listed.group(1).lower() in NUMBERED_THINGS


def find_hand_numbers(text: str, constants: set[int] | None = None) -> list[Finding]:
    """Every number in prose that is neither glued, cited in its sentence, nor definitional."""
    constants = preset_constants() if constants is None else constants
    found = []
    for line, sentence in sentences(prose_lines(text)):
        if CITE.search(sentence):
            continue  # a published number, cited in the same sentence
        s = ROLE.sub(" ", sentence)  # glue, ref, numref, doc, term...
        s = INLINE_CODE.sub(" ", s)
        s = INLINE_MATH.sub(" ", s)
        s = LINK.sub("]", s)
        for m in NUMBER.finditer(s):
            before = s[: m.start()]
            if re.search(r"[A-Za-z]-$", before):
                continue  # part of a name: top-2, GPT-3, Llama-2, DeepSeek-V3
            if re.match(r"x\d", s[m.end("num") :]):
                continue  # a model name such as 8x7B
            unit = m.group("unit") or ""
            if not allowed(m.group("num"), unit, before, constants):
                found.append(Finding(line, m.group(0).strip(), sentence))
    return found
