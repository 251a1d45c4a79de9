"""The dispatch benchmark runs end to end on a tiny shape and records what it promises."""

import json

from tests.chapters import load_benchmark


def load_bench():
    return load_benchmark("bench_dispatch")


def test_bench_tiny_shape_writes_result(tmp_path):
    bench = load_bench()
    out = tmp_path / "r.json"
    res = bench.main(
        ["--tokens", "64", "--d-model", "16", "--d-ff", "32", "--experts", "4",
         "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["median_s"].keys() == {
        "dense", "loop", "einsum", "sort", "sort+loop", "sort+bmm", "sort+grouped_mm",
        "sort_experts_only",
    }
    assert saved["variants"]["sort+bmm"] == {"dispatcher": "sort", "backend": "bmm"}
    assert set(saved["auto_backend_chose"]) == {"loop", "einsum", "sort"}
    assert saved["ratio_to_dense"]["dense"] == 1.0 == saved["paired_ratio_median"]["dense"]
    assert all(len(v) == 2 for v in saved["times_s"].values())
    assert sum(saved["tokens_per_expert"]) == 64 * 2
    for key in ("cpu", "threads", "torch", "date"):
        assert saved["machine"][key]
    # the machine and its load, recorded before and after the timings, and the command
    start, end = saved["machine_start"], saved["machine_end"]
    for key in ("cpu", "cores", "load_average", "torch", "date", "revision"):
        assert key in start and key in end
    assert start["date"] <= end["date"]
    assert saved["command"].startswith("python benchmarks/bench_dispatch.py --tokens 64")
    assert res["shape"]["tokens"] == 64
