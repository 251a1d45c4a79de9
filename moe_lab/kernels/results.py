"""Read the grouped-GEMM benchmark's result files (benchmarks/results/triton_*.json)."""

from __future__ import annotations

import json
from pathlib import Path

KIND = "moe_lab.bench_triton"
HEADER = ("device", "date", "torch", "triton", "rows")
ROW_KEYS = ("shape", "tokens", "gemm", "N", "K", "M", "E", "pass", "variant", "median_ms",
            "tflops", "vs_dense", "vs_loop")


def load_results(directory: str | Path) -> list[dict]:
    """Every benchmark result in `directory`, oldest first; raise if a file lacks a field."""
    results = []
    for path in sorted(Path(directory).glob("triton_*.json")):
        result = json.loads(path.read_text())
        if result.get("kind") != KIND:
            continue
        missing = [key for key in HEADER if key not in result]
        missing += sorted({key for row in result["rows"] for key in ROW_KEYS if key not in row})
        if missing:
            raise ValueError(f"{path.name} lacks the fields {missing}")
        result["file"] = path.name
        results.append(result)
    return sorted(results, key=lambda r: r["date"])


def results_table(result: dict, pass_: str = "fwd") -> str:
    """A Markdown table of one result file's rows for one pass ('fwd' or 'fwd+bwd')."""
    lines = [
        "| shape | tokens | GEMM (N x K x M) | variant | median ms | TFLOP/s | vs dense "
        "| vs loop |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if row["pass"] != pass_:
            continue
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['gemm']} ({row['N']} x {row['K']} x "
            f"{row['M']}) | {row['variant']} | {row['median_ms']:.3f} | {row['tflops']:.1f} | "
            f"{row['vs_dense']:.2f} | {row['vs_loop']:.2f} |"
        )
    return "\n".join(lines)
