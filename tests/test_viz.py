"""Plot and print helpers: labels are enforced, counts read right, tables line up."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moe_lab.lab.viz import finish, human, show, text_table  # noqa: E402


def test_finish_sets_title_labels_and_legend():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="line")
    finish(ax, title="T", xlabel="x (tokens)", ylabel="y (FLOPs)")
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("T", "x (tokens)", "y (FLOPs)")
    assert ax.get_legend() is not None
    plt.close(fig)


@pytest.mark.parametrize("field", ["title", "xlabel", "ylabel"])
def test_finish_rejects_missing_labels(field):
    fig, ax = plt.subplots()
    kwargs = {"title": "T", "xlabel": "x", "ylabel": "y", field: " "}
    with pytest.raises(ValueError, match=field):
        finish(ax, **kwargs)
    plt.close(fig)


@pytest.mark.parametrize(
    "n, text",
    [(0, "0"), (512, "512"), (1_600_000_000_000, "1.6T"), (46_700_000_000, "46.7B"),
     (37e9, "37.0B"), (2048, "2.0K"), (999_960, "1.0M"), (12.5, "12.5")],
)
def test_human_examples(n, text):
    assert human(n) == text


@given(st.integers(min_value=1000, max_value=10**15))
def test_human_reads_back_within_rounding(n):
    text = human(n, digits=2)
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[text[-1]]
    assert abs(float(text[:-1]) * scale - n) <= 0.005 * scale + 1e-9


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (float("inf"), ValueError),
                                      ("5", TypeError), (True, TypeError)])
def test_human_rejects_bad_input(bad, err):
    with pytest.raises(err):
        human(bad)


def test_text_table_aligns_columns():
    out = text_table(["E", "total"], [[1, "1.0K"], [256, "1.6M"]])
    lines = out.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["E", "total"] and lines[3].split() == ["256", "1.6M"]


def test_text_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="row 1"):
        text_table(["a", "b"], [[1, 2], [3]])


def test_show_displays_then_closes(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    fig, ax = plt.subplots()
    show(fig)
    assert len(shown) == 1 and shown[0].data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
