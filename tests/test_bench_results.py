"""Rules in the code that rest on committed measurements are checked against those data."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_auto_backend_on_cpu_is_the_measured_best_or_close():
    """backend="auto" runs the per-expert loop on a CPU (moe_lab.backends.choose_auto): at
    every shape of the committed granularity sweep that backend, timed pinned ("sort+loop"),
    is within 10% of the fastest CPU backend, and padding (bmm) never beats it. ("sort+auto"
    runs the same code; its gap to "sort+loop" is the machine's noise, not a rule's.)"""
    sweep = json.loads((ROOT / "benchmarks/results/dispatch_shapes_cpu.json").read_text())
    assert len(sweep["shapes"]) >= 6
    for row in sweep["shapes"]:
        r = row["paired_ratio"]
        assert row["auto_chose"]["sort+auto"] == "loop", row["auto_chose"]
        best = min(r["sort+loop"], r["sort+bmm"], r["sort+grouped_mm"])
        assert r["sort+loop"] <= 1.1 * best, row
        assert r["sort+bmm"] >= r["sort+loop"], row
