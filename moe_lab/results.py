"""Read committed training logs and compare runs fairly: chapter 7's result loaders.

Each log is the JSON ``python -m moe_lab.train`` writes. Runs are compared seed by seed
against the dense run with the same seed and schedule, on the fixed validation set, so a
difference between two runs is a paired difference over the same windows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def load_runs(preset: str, results_dir: str | Path = RESULTS_DIR) -> dict[tuple, dict]:
    """The committed logs of one preset, keyed by (variant, seed, steps)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results_dir {results_dir} is not a folder")
    logs = {}
    for path in sorted(results_dir.glob(f"tinylm_{preset}_*.json")):
        log = json.loads(path.read_text())
        if log.get("preset") == preset:  # benchmark files share the prefix
            logs[(log["variant"], log["config"]["seed"], log["config"]["steps"])] = log
    return logs


def reach(evals: list[dict], target: float, clock: str = "step") -> float | None:
    """The ``clock`` value (step, wall_s or cpu_s) where validation loss first reaches
    ``target``, linearly interpolated between evaluations; None if it never does."""
    if clock not in ("step", "wall_s", "cpu_s"):
        raise ValueError(f"clock must be 'step', 'wall_s' or 'cpu_s', got {clock!r}")
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None:
                return float(e[clock])
            l0, l1 = prev["val_loss"], e["val_loss"]
            return prev[clock] + (l0 - target) / (l0 - l1) * (e[clock] - prev[clock])
        prev = e
    return None


def paired_difference(log: dict, base: dict) -> tuple[float, float]:
    """Mean per-window loss difference ``log - base`` at the end, and its standard error.

    Both runs were scored on the same windows, so the window-to-window spread of difficulty
    cancels: this standard error is far smaller than either run's own.
    """
    a, b = log["val_window_losses"], base["val_window_losses"]
    if len(a) != len(b):
        raise ValueError(f"the runs were scored on different sets ({len(a)} vs {len(b)} windows)")
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


@dataclass(frozen=True)
class Comparison:
    """One run against the dense run of the same seed and schedule."""

    variant: str
    seed: int
    final: float  # final validation loss (nats per byte)
    sem: float  # its standard error over the validation windows
    diff: float  # paired difference to dense at the end (negative: better than dense)
    diff_se: float  # standard error of that difference
    steps_ratio: float | None  # steps to reach dense's final loss / dense's steps
    cpu_ratio: float | None  # CPU seconds to reach it / dense's CPU seconds for all its steps
    dense_steps_ratio: float | None  # steps dense needs to reach this run's final loss


def compare(logs: dict[tuple, dict], steps: int) -> list[Comparison]:
    """Every run of ``steps`` steps that has a dense partner of the same seed, dense first."""
    rows = []
    ordered = sorted(logs.items(), key=lambda kv: (kv[0][0] != "dense", kv[0]))
    for (variant, seed, n), log in ordered:
        dense = logs.get(("dense", seed, steps))
        if n != steps or dense is None:
            continue
        d_evals, evals = dense["evals"], log["evals"]
        target = d_evals[-1]["val_loss"]
        diff, diff_se = paired_difference(log, dense)
        s = reach(evals, target)
        c = reach(evals, target, "cpu_s")
        back = reach(d_evals, evals[-1]["val_loss"])
        rows.append(
            Comparison(
                variant=variant,
                seed=seed,
                final=evals[-1]["val_loss"],
                sem=evals[-1]["val_sem"],
                diff=diff,
                diff_se=diff_se,
                steps_ratio=None if s is None else s / steps,
                cpu_ratio=None if c is None else c / d_evals[-1]["cpu_s"],
                dense_steps_ratio=None if back is None else back / steps,
            )
        )
    return rows
