"""Execute every chapter in _toc.yml in a fresh kernel; a failing cell fails the test."""

import pytest

from tests.chapters import ROOT, execute_chapter, executed, is_notebook, toc_files

CHAPTERS = [p for p in toc_files() if is_notebook(p)]


def test_toc_lists_chapters():
    assert toc_files(), "_toc.yml lists no chapters"


@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_executes(path):
    executed(path)


def test_failing_cell_fails(tmp_path):
    """The runner must not swallow errors: a deliberately raising cell fails execution."""
    from nbclient.exceptions import CellExecutionError

    bad = tmp_path / "bad.md"
    bad.write_text(
        "---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n"
        "kernelspec:\n  name: python3\n  display_name: Python 3\n---\n\n# Bad\n\n"
        "```{code-cell} ipython3\nraise RuntimeError('deliberate')\n```\n"
    )
    assert is_notebook(bad)
    with pytest.raises(CellExecutionError, match="deliberate"):
        execute_chapter(bad, timeout=120)
    assert ROOT.exists()
