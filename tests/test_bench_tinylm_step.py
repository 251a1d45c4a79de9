"""The tiny-LM step benchmark runs end to end on the short preset and records what it promises."""

import json

import pytest

from tests.chapters import load_benchmark


def load_bench():
    return load_benchmark("bench_tinylm_step")


def test_bench_short_preset_writes_result(tmp_path):
    out = tmp_path / "r.json"
    res = load_bench().main(
        ["--config", "short", "--variants", "dense,moe8", "--threads", "1", "--repeats", "2",
         "--max-code-bytes", "100000", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["date"] and saved["machine"] and saved["threads"] == 1
    start, end = saved["machine_start"], saved["machine_end"]
    for key in ("cpu", "cores", "load_average", "torch", "date", "revision"):
        assert key in start and key in end
    # the older field, still written: the 1-minute load before and after the timings
    assert saved["load_average_1min"] == [
        r["load_average"][0] if r["load_average"] else None for r in (start, end)
    ]
    assert saved["command"].startswith("python benchmarks/bench_tinylm_step.py --config short")
    assert saved["ratio_to_dense"]["dense"] == 1.0 == saved["per_round_ratio_to_dense"]["dense"]
    for v in ("dense", "moe8"):
        step, parts = saved["median_step_s"][v], saved["median_fwd_bwd_s"][v]
        assert 0 < parts < step
        assert saved["median_optimizer_s"][v] > 0
        assert saved["ratio_to_dense"][v] == pytest.approx(step / saved["median_step_s"]["dense"])
