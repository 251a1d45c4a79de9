"""Read committed training logs and compare runs fairly: chapter 7's result loaders.

Each log is the JSON ``python -m moe_lab.train`` writes for one preset of
``moe_lab.lab.presets``. Runs are compared seed by seed against the dense run with the same seed
and schedule, on the fixed validation set, so a difference between two runs is a paired
difference over the same windows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from moe_lab.lab.viz import finish, show, text_table

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


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


def _ratio(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f}x"


def seed_table(rows: list[Comparison]) -> str:
    """One line per run: final loss, paired difference to dense, steps and CPU-time shares."""
    return text_table(
        ("variant", "seed", "final", "vs dense", "steps", "CPU", "dense to it"),
        [
            (r.variant, r.seed, f"{r.final:.4f}", f"{r.diff:+.4f} ±{r.diff_se:.4f}",
             _ratio(r.steps_ratio), _ratio(r.cpu_ratio), _ratio(r.dense_steps_ratio))
            for r in rows
        ],
    )


def plot_curves(logs: dict[tuple, dict], steps: int, title: str, ylim=(None, None)):
    """Validation loss against steps and against CPU time: mean and range over seeds."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    variants = sorted({v for (v, _, n) in logs if n == steps}, key=lambda v: v != "dense")
    for variant in variants:
        runs = [log for (v, _, n), log in sorted(logs.items()) if v == variant and n == steps]
        val = np.array([[e["val_loss"] for e in r["evals"]] for r in runs])
        cpu = np.array([[e["cpu_s"] for e in r["evals"]] for r in runs])
        step = [e["step"] for e in runs[0]["evals"]]
        style = "-" if len(runs) > 1 else "--"
        (line,) = axes[0].plot(step, val.mean(0), style, label=f"{variant} ({len(runs)} seeds)")
        if len(runs) > 1:
            axes[0].fill_between(step, val.min(0), val.max(0), color=line.get_color(), alpha=0.2)
        axes[1].plot(cpu.mean(0), val.mean(0), style, color=line.get_color(), label=variant)
    for ax in axes:
        ax.set_ylim(*ylim)
    ylabel = "validation loss (nats per byte)"
    finish(axes[0], title=f"{title}: mean and range over seeds", xlabel="training step",
           ylabel=ylabel)
    finish(axes[1], title=f"{title}, against CPU time",
           xlabel="training CPU time (s, one thread)", ylabel=ylabel)
    fig.tight_layout()
    show(fig)


def by_variant(rows: list[Comparison]) -> dict[str, list[Comparison]]:
    """Comparisons grouped by variant, in their order."""
    out: dict[str, list[Comparison]] = {}
    for r in rows:
        out.setdefault(r.variant, []).append(r)
    return out


def _span(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return "never" if all(v is None for v in values) else "not all"
    lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
    return f"{lo}x" if lo == hi else f"{lo}-{hi}x"


def summary_table(results: dict[str, list[Comparison]]) -> str:
    """One line per (model, variant): seeds, mean final loss, mean paired difference (with the
    largest standard error), and the range over seeds of the step and CPU-time shares."""
    table = []
    for name, rows in results.items():
        for variant, rs in by_variant(rows).items():
            diff = sum(r.diff for r in rs) / len(rs)
            table.append((
                name, variant, len(rs), f"{sum(r.final for r in rs) / len(rs):.4f}",
                f"{diff:+.4f} ±{max(r.diff_se for r in rs):.4f}",
                _span([r.steps_ratio for r in rs]), _span([r.cpu_ratio for r in rs]),
            ))
    headers = ("model", "variant", "seeds", "final", "vs dense", "steps", "CPU time")
    return text_table(headers, table)


def facts(rows: list[Comparison]) -> dict[str, float]:
    """The numbers prose quotes about one variant's runs: seeds, mean gain over dense, largest
    standard error, smallest gain in standard errors, and step / CPU-time share ranges."""
    out = {
        "n": len(rows),
        "gain": -sum(r.diff for r in rows) / len(rows),
        "se": max(r.diff_se for r in rows),
        "z": min(-r.diff / r.diff_se if r.diff_se > 0 else math.inf for r in rows),
    }
    for what in ("steps", "cpu"):
        vals = [getattr(r, f"{what}_ratio") for r in rows]
        if vals and all(v is not None for v in vals):
            out[f"{what}_lo"], out[f"{what}_hi"] = min(vals), max(vals)
    return out


def ahead_from(logs: dict[tuple, dict], variant: str, steps: int) -> int:
    """The first evaluation step from which ``variant`` stays below dense on every seed."""
    behind, every = 0, None
    for (v, s, n), log in logs.items():
        if v == variant and n == steps:
            evals, dense = log["evals"], logs[("dense", s, steps)]["evals"]
            every = evals[1]["step"] - evals[0]["step"]
            for a, b in zip(evals, dense, strict=True):
                if a["val_loss"] >= b["val_loss"]:
                    behind = max(behind, a["step"])
    if every is None:
        raise ValueError(f"no runs of {variant!r} with {steps} steps")
    return behind + every


def kind_distance(counts_LKE) -> list[float]:
    """Total-variation distance between prose and code routing, per layer: 0 when both kinds
    use the experts alike, 1 when they use disjoint experts."""
    out = []
    for layer in counts_LKE:
        prose, code = (sum(row) for row in layer)
        out.append(0.5 * sum(abs(p / prose - c / code) for p, c in zip(*layer, strict=True)))
    return out
