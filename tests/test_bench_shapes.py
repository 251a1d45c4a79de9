"""The granularity sweep benchmark runs at a tiny size and records what it measured."""

import importlib.util
import json
from pathlib import Path

from moe_lab.provenance import quartiles

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    """benchmarks/bench_shapes.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_shapes",
                                                  ROOT / "benchmarks" / "bench_shapes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_sweep_at_a_tiny_size_writes_a_complete_record(tmp_path):
    bench = load_bench()
    out = tmp_path / "r.json"
    bench.main(["--tokens", "64", "--d-model", "16", "--repeats", "2", "--warmup", "0",
                "--threads", "1", "--shapes", "4:2:16,8:4:8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(s["E"], s["k"], s["d_ff"]) for s in saved["shapes"]] == [(4, 2, 16), (8, 4, 8)]
    for s in saved["shapes"]:
        assert {"dense", "sort+auto", "sort+bmm", "sort+grouped_mm", "loop"} <= set(s["total_s"])
        assert s["paired_ratio"]["dense"] == 1.0
        assert {"matmuls", "dense_matmuls"} <= set(s["total_s"]) and s["matmul_ratio"] > 0
        for n, (q1, q3) in s["paired_ratio_quartiles"].items():
            assert q1 <= s["paired_ratio"][n] <= q3
        for n in s["total_s"]:
            assert abs(s["forward_s"][n] + s["backward_s"][n] - s["total_s"][n]) < 1.0
    assert "bench_shapes.py" in saved["command"] and saved["machine_start"]["cpu"]


def test_matmuls_only_does_the_ffn_products_of_its_shape():
    """The matmul floor allocates E blocks of the given rows and runs without error, and its
    dense form is one block (E=1) of all the rows."""
    bench = load_bench()
    experts = bench.MatmulsOnly(4, 8, 16, 6)
    assert experts.x.shape == (4, 8, 16) and experts.w_down.shape == (4, 6, 16)
    assert experts.forward_s() > 0 and experts.backward_s() > 0
    assert list(experts.parameters()) == []


def test_quartiles_bracket_the_median():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 4.0]
    assert quartiles([1.5]) == [1.5, 1.5]
