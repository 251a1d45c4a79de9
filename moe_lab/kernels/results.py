"""Read chapter 10's GPU result files: bench_triton.py's (benchmarks/results/triton_*.json)
and gpu_check.py's (benchmarks/results/gpu/gpu_check_<device>.json)."""

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


# --- benchmarks/gpu_check.py: every GPU check of chapter 10, one file per device ----------------

GPU_CHECK_KIND = "moe_lab.gpu_check"
GPU_CHECK_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu"
GPU_CHECK_HEADER = ("kind", "schema", "device", "date", "torch", "triton", "command", "checks")
GPU_CHECKS = ("correctness", "syncs", "compile_autocast", "gemm", "layer")
# The fields every row of each check carries (a check that failed carries "error" instead).
GPU_CHECK_ROWS = {
    "correctness": ("op", "dtype", "case", "worst_error_over_tolerance", "passed"),
    "syncs": ("backend", "forward", "backward", "total"),
    "compile_autocast": ("backend", "dtype", "dtype_ok", "max_abs_diff", "passed"),
    "gemm": ("shape", "tokens", "gemm", "N", "K", "M", "E", "variant", "median_ms", "tflops",
             "vs_dense"),
    "layer": ("shape", "tokens", "d_model", "d_ff", "E", "top_k", "variant", "median_ms",
              "tflops", "vs_dense"),
}


def gpu_check_problems(result: dict) -> list[str]:
    """What a gpu_check result lacks or gets wrong; [] for a well-formed one."""
    problems = [f"no field {key!r}" for key in GPU_CHECK_HEADER if key not in result]
    if result.get("kind", GPU_CHECK_KIND) != GPU_CHECK_KIND:
        problems.append(f"kind is {result['kind']!r}, not {GPU_CHECK_KIND!r}")
    checks = result.get("checks", {})
    if not isinstance(checks, dict):
        return problems + ["checks is not a mapping"]
    for name, check in checks.items():
        if name not in GPU_CHECK_ROWS:
            problems.append(f"unknown check {name!r}")
            continue
        if "error" in check:
            continue
        if not isinstance(check.get("rows"), list):
            problems.append(f"check {name!r} has no list of rows")
            continue
        for i, row in enumerate(check["rows"]):
            missing = [key for key in GPU_CHECK_ROWS[name] if key not in row]
            if missing:
                problems.append(f"check {name!r} row {i} lacks {missing}")
    return problems


def load_gpu_checks(directory: str | Path = GPU_CHECK_DIR) -> list[dict]:
    """Every gpu_check result in `directory` (none if it does not exist), oldest first."""
    results = []
    for path in sorted(Path(directory).glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("kind") != GPU_CHECK_KIND:
            continue
        problems = gpu_check_problems(result)
        if problems:
            raise ValueError(f"{path.name}: " + "; ".join(problems))
        result["file"] = path.name
        results.append(result)
    return sorted(results, key=lambda r: r["date"])


def _rows(result: dict, check: str) -> list[dict]:
    return result["checks"].get(check, {}).get("rows", [])


GEMM_VARIANTS = ("triton_fused", "triton", "grouped_mm", "loop", "dense")


def gemm_check_table(result: dict, shape: str | None = None) -> str:
    """Markdown: TFLOP/s of each variant (a column) per shape, tokens and GEMM (a row)."""
    cases: dict[tuple, dict[str, float]] = {}
    for r in _rows(result, "gemm"):
        if shape is None or r["shape"] == shape:
            key = (r["shape"], r["tokens"], f"{r['gemm']} ({r['N']} x {r['K']} x {r['M']})")
            cases.setdefault(key, {})[r["variant"]] = r["tflops"]
    if not cases:
        return "(none measured)"
    seen = {v for by_variant in cases.values() for v in by_variant}
    variants = [v for v in GEMM_VARIANTS if v in seen] + sorted(seen - set(GEMM_VARIANTS))
    lines = ["| shape | tokens | GEMM (N x K x M) | " + " | ".join(variants) + " |",
             "|---|---:|---|" + "---:|" * len(variants)]
    for (shape_, tokens, gemm), by_variant in cases.items():
        cells = [f"{by_variant[v]:.1f}" if v in by_variant else "-" for v in variants]
        lines.append(f"| {shape_} | {tokens} | {gemm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_check_table(result: dict) -> str:
    """Markdown: the whole layer, forward+backward, against the dense FFN of equal FLOPs."""
    if not _rows(result, "layer"):
        return "(none measured)"
    lines = ["| shape | tokens | variant | median ms | TFLOP/s | vs dense FFN |",
             "|---|---:|---|---:|---:|---:|"]
    for r in _rows(result, "layer"):
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['median_ms']:.2f} | "
                     f"{r['tflops']:.1f} | {r['vs_dense']:.2f} |")
    return "\n".join(lines)


def sync_check_table(result: dict) -> str:
    """Markdown: host syncs in one forward+backward of the layer, per expert backend."""
    if not _rows(result, "syncs"):
        return "(none measured)"
    lines = ["| backend | forward | backward | total |", "|---|---:|---:|---:|"]
    for r in _rows(result, "syncs"):
        if r.get("error"):
            lines.append(f"| {r['backend']} | failed: {r['error'][:60]} | | |")
        else:
            lines.append(f"| {r['backend']} | {r['forward']} | {r['backward']} | {r['total']} |")
    return "\n".join(lines)


def gemm_series(result: dict, shape: str, gemm: str) -> dict[str, tuple[list, list]]:
    """{variant: (tokens, TFLOP/s)} of one shape and GEMM, tokens ascending: what to plot."""
    series: dict[str, list] = {}
    for r in _rows(result, "gemm"):
        if r["shape"] == shape and r["gemm"] == gemm:
            series.setdefault(r["variant"], []).append((r["tokens"], r["tflops"]))
    return {v: tuple(map(list, zip(*sorted(pts), strict=True))) for v, pts in series.items()}


def check_errors(result: dict) -> dict[str, str]:
    """{check: error} for the checks that did not finish, and 'skipped' notes of those that did."""
    notes = {}
    for name, check in result["checks"].items():
        if "error" in check:
            notes[name] = check["error"]
        elif check.get("skipped"):
            notes[name] = f"skipped for time: {', '.join(check['skipped'])}"
    return notes
