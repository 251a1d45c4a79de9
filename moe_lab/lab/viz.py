"""Small plotting and printing helpers for the chapters: labelled axes, readable counts, tables."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

_SUFFIXES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def finish(ax, *, title: str, xlabel: str, ylabel: str, legend: bool = True):
    """Give a matplotlib Axes its title and axis labels (units in the label), a grid, a legend.

    Every figure in the book goes through here, so none can be left without a title or labels.
    """
    for name, value in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend()
    return ax


def show(fig, dpi: int = 100) -> None:
    """Display a finished figure as the cell's output (a PNG), then close it.

    ``plt.show()`` draws nothing when the kernel runs with ``MPLBACKEND=Agg`` (the chapter runner
    and the Makefile set it), so the figure is rendered to PNG bytes here, under any backend.
    """
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


def human(n: float, digits: int = 1) -> str:
    """A count a reader scans: 1.6e12 -> '1.6T', 46_700_000_000 -> '46.7B', 512 -> '512'."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError(f"n must be a number, got {type(n).__name__}")
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"n must be a finite number >= 0, got {n}")
    for scale, suffix in _SUFFIXES:
        if round(n / scale, digits) >= 1:
            return f"{n / scale:.{digits}f}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.{digits}f}"


def text_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table with right-aligned columns, readable in a static page as cell output."""
    width = len(headers)
    cells = [[str(h) for h in headers]]
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"row {i} has {len(row)} cells, expected {width} (one per header)")
        cells.append([str(c) for c in row])
    sizes = [max(len(r[j]) for r in cells) for j in range(width)]
    lines = ["  ".join(c.rjust(s) for c, s in zip(r, sizes, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * s for s in sizes))
    return "\n".join(lines)
