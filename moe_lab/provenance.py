"""What ran where: machine, load, versions and code revision, recorded next to every result.

Results files (training logs, benchmark JSONs) carry this record so a reader can tell which
machine and how busy it was, and rerun the exact code.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def quartiles(values: list[float]) -> list[float]:
    """First and third quartiles (inclusive method), the spread a result records next to its
    median; one value gives itself twice."""
    if len(values) == 1:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (runnable processes); [] where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_revision() -> str | None:
    """The commit of the checkout this package was imported from (+ '-dirty' if modified)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev or None


def machine_record() -> dict:
    """CPU, core count, load average, Python/torch versions, date and code revision, now."""
    return {
        "cpu": f"{platform.machine()} {cpu_model()}",
        "cores": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": git_revision(),
    }
