"""The book keeps its promises in text: prose numbers are computed or cited, cells fit the page."""

import re

import pytest

from tests.chapters import toc_files
from tests.prose_numbers import find_hand_numbers, preset_constants

PAGES = [p for p in toc_files() if p.suffix == ".md"]
CONSTANTS = preset_constants()
WIDTH = 80  # characters a code line may take in the theme's column


@pytest.mark.parametrize("path", PAGES, ids=[p.stem for p in PAGES])
def test_prose_numbers_are_glued_or_cited(path):
    found = find_hand_numbers(path.read_text(), CONSTANTS)
    assert not found, f"{path.name}: hand-written numbers in prose:\n" + "\n".join(
        str(f) for f in found
    )


PLANTED = [
    "The MoE step costs 1.3x a dense one.",
    "It reached the loss in 37% fewer steps.",
    "Each run took 412 seconds.",
    "The layer moves 2.5 GB per step.",
    "Fine reaches it at 0.72-0.73x the steps.",
]


@pytest.mark.parametrize("path", PAGES, ids=[p.stem for p in PAGES])
@pytest.mark.parametrize("planted", PLANTED)
def test_a_planted_number_is_caught(path, planted):
    """Appending a hand-written measurement to any page makes the check fail."""
    text = path.read_text() + "\n\n" + planted + "\n"
    found = find_hand_numbers(text, CONSTANTS)
    assert any(f.sentence.strip().startswith(planted[:12]) for f in found), planted


def test_what_passes_and_what_does_not():
    ok = (
        "---\nkernelspec: x\n---\n# 7. Title 1.5\n\nTop-2 routing over 8 experts with a `d_model`"
        " of 64 and $1.25$ in math, {glue:text}`ratio:.2f`x measured, chapter 12, chapters 9 to 11"
        " and exercises 12 and 13, GPT-3 and"
        " Mixtral 8x7B (2024). Switch used 2048 experts and 1.6T parameters"
        " {cite}`fedus2022switch`."
        "\n\n```{code-cell} ipython3\nx = 3.14159\n```\n\n$$\ny = 2.5 x\n$$\n"
    )
    assert find_hand_numbers(ok, CONSTANTS) == []
    bad = ("The step costs 1.27x dense. We saw 15% of the code. It took 29 bytes per parameter."
           " Runs 3 to 17 took 41 and 53 minutes.")
    assert [f.number for f in find_hand_numbers(bad, CONSTANTS)] == [
        "1.27x", "15%", "29", "17", "41", "53"]


def code_cells(text: str):
    """(line number, line) of every line inside a code cell."""
    inside = False
    for n, line in enumerate(text.split("\n"), 1):
        if line.startswith("```{code-cell}"):
            inside = True
        elif inside and line.startswith("```"):
            inside = False
        elif inside and not re.match(r"^:[\w-]+:", line):
            yield n, line


@pytest.mark.parametrize("path", PAGES, ids=[p.stem for p in PAGES])
def test_code_cells_fit_the_column(path):
    wide = [f"line {n}: {len(s)} chars" for n, s in code_cells(path.read_text()) if len(s) > WIDTH]
    assert not wide, f"{path.name}: code lines wider than {WIDTH} characters: {wide}"
