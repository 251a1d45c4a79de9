"""benchmarks/gpu_check.{sh,py}: exits cleanly without a GPU; helpers, timing paths and the
result file, run on CPU (Triton's interpreter, wall-clock stand-ins for CUDA events)."""

import json
import subprocess
import time
import warnings

import pytest
import torch

from moe_lab.kernels.results import (
    check_errors,
    gemm_check_table,
    gemm_series,
    gpu_check_problems,
    layer_check_table,
    load_gpu_checks,
    sync_check_table,
)
from tests.chapters import ROOT, load_benchmark

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def gc():
    return load_benchmark("gpu_check")


class _WallClockEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.fixture
def fake_cuda_timing(monkeypatch):
    """CUDA events and syncs replaced by the wall clock, so the timing code runs on CPU."""
    monkeypatch.setattr(torch.cuda, "Event", _WallClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


TINY_GEMM = [("tiny", 16, 24, 3, 2, (10, 40))]
TINY_LAYER = [("tiny", 16, 24, 4, 2, (12, 30))]
TINY_SYNC = {"d_model": 16, "d_ff": 24, "num_experts": 4, "top_k": 2, "tokens": 12}


# --- without a GPU --------------------------------------------------------------------------


@pytest.mark.skipif(not NO_GPU, reason="with a GPU the script runs its checks for minutes")
def test_shell_script_without_gpu_says_so_and_exits_0():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gpu_check needs a CUDA GPU" in proc.stdout
    assert "no result was written" in proc.stdout


@pytest.mark.skipif(not NO_GPU, reason="with a GPU the script runs its checks for minutes")
def test_main_without_gpu_writes_nothing(gc, tmp_path, capsys):
    assert gc.main(["--out", str(tmp_path)]) == 0
    assert gc.NO_GPU_MESSAGE in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_refused(gc):
    with pytest.raises(SystemExit):
        gc.parse_args(["--repeats", "0"])
    with pytest.raises(SystemExit):
        gc.parse_args(["--budget-s", "-1"])


# --- pure helpers ---------------------------------------------------------------------------


def test_flop_counts(gc):
    assert gc.gemm_flops(3, 4, 5) == 120
    assert gc.expert_ffn_flops(3, 4, 5) == 3 * 120
    assert gc.expert_ffn_flops(3, 4, 5, activation="gelu") == 2 * 120
    # forward+backward is three forwards; the MoE's active FLOPs equal the dense FFN's
    tokens, d, f, k = 4096, 4096, 14336, 2
    fwd = gc.layer_flops(tokens, d, f, k, backward=False)
    assert gc.layer_flops(tokens, d, f, k) == 3 * fwd
    assert fwd == gc.expert_ffn_flops(tokens, d, gc.dense_ffn_width(f, k))
    assert fwd == pytest.approx(2 * 3 * tokens * k * d * f)


def test_budget_and_estimates(gc):
    now = [0.0]
    budget = gc.Budget(100, clock=lambda: now[0])
    assert budget.allows(100) and not budget.allows(100.5)
    now[0] = 40.0
    assert budget.elapsed() == 40 and budget.left() == 60
    half = budget.share(0.5)
    assert half.left() == pytest.approx(30)
    now[0] = 71.0
    assert not half.allows(0.0) and budget.allows(29)
    assert gc.estimate_seconds(None, 1e12) == 0
    assert gc.estimate_seconds((2.0, 1e12), 4e12) == 8.0
    with pytest.raises(ValueError, match="budget must be positive"):
        gc.Budget(0)


def test_summarize_ratios(gc):
    rows = gc.summarize({"shape": "s"}, {"dense": [1.0, 3.0, 2.0], "triton": [4.0, 4.0, 5.0]},
                        flops=2e9, baseline="dense")
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["median_ms"] == 2.0 and by["dense"]["vs_dense"] == 1.0
    assert by["dense"]["tflops"] == pytest.approx(1.0)  # 2e9 FLOPs in 2 ms
    assert by["triton"]["vs_dense"] == pytest.approx(0.5)
    assert by["triton"]["shape"] == "s" and by["triton"]["samples_ms"] == [4.0, 4.0, 5.0]


def test_count_syncs_counts_the_debug_modes_warnings(gc):
    modes = []

    def step():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    count, messages = gc.count_syncs(step, set_mode=modes.append)
    assert count == 2 and len(messages) == 2
    assert modes == ["warn", "default"]  # switched off again

    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        gc.count_syncs(fails, set_mode=modes.append)
    assert modes[-1] == "default"


def test_command_line_and_result_path(gc, monkeypatch, tmp_path):
    monkeypatch.delenv("GPU_CHECK_COMMAND", raising=False)
    assert gc.command_line(["--quick"]) == "python benchmarks/gpu_check.py --quick"
    monkeypatch.setenv("GPU_CHECK_COMMAND", "bash benchmarks/gpu_check.sh --quick")
    assert gc.command_line([]) == "bash benchmarks/gpu_check.sh --quick"
    path = gc.result_path(tmp_path, "NVIDIA H200 (141 GB)")
    assert path.name == "gpu_check_NVIDIA_H200_141_GB.json"


# --- the checks, run on CPU -----------------------------------------------------------------


def test_gemm_check_on_cpu(gc, fake_cuda_timing):
    budget = gc.Budget(600)
    check = gc.run_gemm_check(torch.device("cpu"), torch.float32, budget, repeats=2, iters=1,
                              shapes=TINY_GEMM)
    rows = check["rows"]
    assert not check["skipped"]
    # two token counts x (up, down: 4 variants; gate+up: 5 variants)
    assert len(rows) == 2 * (4 + 4 + 5)
    assert {r["variant"] for r in rows if r["gemm"] == "gate+up"} == {
        "triton_fused", "triton", "grouped_mm", "loop", "dense"}
    for r in rows:
        assert r["tflops"] > 0 and len(r["samples_ms"]) == 2
        assert sum(r["tokens_per_expert"]) == r["N"] == 2 * r["tokens"]
        assert (r["vs_dense"] == 1.0) == (r["variant"] == "dense")


def test_runners_compute_what_they_claim(gc):
    """Every GEMM variant gives the same product (the timings compare like with like)."""
    counts_E = torch.tensor([3, 0, 5])
    with torch.no_grad():
        runners = gc.gemm_runners("gate+up", 8, 16, 24, counts_E, torch.device("cpu"),
                                  torch.float32)
        fused = runners["triton_fused"]()
        for name in ("triton", "grouped_mm"):
            for got, want in zip(runners[name](), fused, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        looped = runners["loop"]()
        torch.testing.assert_close(looped[1], fused[1], rtol=1e-5, atol=1e-5)
        assert runners["dense"]().shape == (8, 48)  # one matmul of width 2 M


def test_budget_skips_the_largest_cases(gc, fake_cuda_timing):
    now = [0.0]

    def clock():
        now[0] += 1.0  # every look at the clock costs a second
        return now[0]

    check = gc.run_layer_check(torch.device("cpu"), torch.float32, gc.Budget(3, clock=clock),
                               repeats=1, iters=1, shapes=TINY_LAYER)
    assert check["skipped"] == ["tiny 30 tokens"]
    assert {r["tokens"] for r in check["rows"]} == {12}


def test_layer_check_on_cpu(gc, fake_cuda_timing):
    check = gc.run_layer_check(torch.device("cpu"), torch.float32, gc.Budget(600), repeats=2,
                               iters=1, shapes=TINY_LAYER[:1], quick=True)
    rows = check["rows"]
    assert {r["variant"] for r in rows} == {"moe_grouped_mm", "moe_triton", "dense_ffn"}
    for r in rows:
        assert r["tokens"] == 12 and sum(r["tokens_per_expert"]) == 12 * 2
        assert r["dense_d_ff"] == 2 * 24 and r["tflops"] > 0


def test_sync_check_on_cpu(gc):
    modes = []
    check = gc.run_sync_check(torch.device("cpu"), torch.float32, set_mode=modes.append,
                              shape=TINY_SYNC)
    assert [r["backend"] for r in check["rows"]] == list(gc.SYNC_BACKENDS)
    for r in check["rows"]:  # a CPU has nothing to synchronise with
        assert r["forward"] == r["backward"] == r["total"] == 0
    assert modes == ["warn", "default"] * 2 * len(gc.SYNC_BACKENDS)


def test_a_failing_backend_is_recorded_in_the_sync_check(gc):
    """grouped_mm takes float32 on CPU: in bf16 it fails, and the row says so."""
    check = gc.run_sync_check(torch.device("cpu"), torch.bfloat16, backend_names=("grouped_mm",),
                              set_mode=lambda mode: None, shape=TINY_SYNC)
    (row,) = check["rows"]
    assert row["total"] is None and "backend='grouped_mm' needs float32 on CPU" in row["error"]
    table = sync_check_table({"checks": {"syncs": check}})
    assert "| grouped_mm | failed: ValueError" in table


def test_correctness_check_in_the_interpreter(gc):
    check = gc.check_correctness(torch.device("cpu"), large=False)
    assert check["passed"]
    ops = {(r["op"], r["dtype"]) for r in check["rows"]}
    for dtype in ("float32", "float16", "bfloat16"):
        assert {("grouped_gemm", dtype), ("gate_up", dtype), ("expert_backend", dtype)} <= ops


# --- the whole run and its result file -------------------------------------------------------


def test_run_all_on_cpu_writes_a_result_the_chapter_reads(gc, fake_cuda_timing, monkeypatch,
                                                          tmp_path):
    monkeypatch.setattr(gc, "GEMM_SHAPES", TINY_GEMM)
    monkeypatch.setattr(gc, "LAYER_SHAPES", TINY_LAYER)
    monkeypatch.setattr(gc, "SYNC_SHAPE", TINY_SYNC)
    monkeypatch.setattr(gc, "check_correctness", lambda device, large: {
        "rows": [{"op": "grouped_gemm", "dtype": "float32", "case": "c",
                  "worst_error_over_tolerance": 0.1, "passed": True}], "passed": True})
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    # its CPU path compiles with inductor (a minute): tested on its own, below
    monkeypatch.setattr(gc, "check_compile_autocast",
                        lambda device, backends: {"rows": [], "passed": True})
    args = gc.parse_args(["--out", str(tmp_path), "--repeats", "1", "--iters", "1", "--quick"])
    payload, status = gc.run_all(torch.device("cpu"), args, "bash benchmarks/gpu_check.sh")
    assert status == 0
    assert set(payload["checks"]) == {"correctness", "syncs", "compile_autocast", "gemm",
                                      "layer"}
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("gpu_check_cpu")
    saved = json.loads(path.read_text())
    assert saved["command"] == "bash benchmarks/gpu_check.sh" and saved["machine_end"]
    for key in ("device", "date", "torch", "triton"):
        assert saved[key]

    (loaded,) = load_gpu_checks(tmp_path)
    table = gemm_check_table(loaded).splitlines()
    assert table[0] == "| shape | tokens | GEMM (N x K x M) | triton_fused | triton | grouped_mm " \
        "| loop | dense |"
    assert len(table) == 2 + 3  # --quick: one token count, three GEMMs
    assert table[2].startswith("| tiny | 10 | up (20 x 16 x 24) | - | ")
    assert len(layer_check_table(loaded).splitlines()) == 2 + 3
    assert "| triton | 0 | 0 | 0 |" in sync_check_table(loaded)
    series = gemm_series(loaded, "tiny", "up")
    assert set(series) == {"triton", "grouped_mm", "loop", "dense"}
    assert series["triton"][0] == [10]
    assert check_errors(loaded) == {}


def test_a_failing_check_is_recorded_and_the_rest_still_run(gc, fake_cuda_timing, monkeypatch,
                                                            tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(gc, "check_correctness", broken)
    monkeypatch.setattr(gc, "run_sync_check", lambda *a, **k: {"rows": []})
    monkeypatch.setattr(gc, "run_gemm_check", lambda *a, **k: {"rows": [], "skipped": ["big"]})
    monkeypatch.setattr(gc, "run_layer_check", lambda *a, **k: {"rows": []})
    args = gc.parse_args(["--out", str(tmp_path)])
    payload, status = gc.run_all(torch.device("cpu"), args, "cmd")
    assert status == 1
    assert "no kernel for you" in payload["checks"]["correctness"]["error"]
    (loaded,) = load_gpu_checks(tmp_path)
    notes = check_errors(loaded)
    assert "no kernel for you" in notes["correctness"] and notes["gemm"].endswith("big")


def test_malformed_results_are_refused(gc, tmp_path):
    good = {"kind": "moe_lab.gpu_check", "schema": 1, "device": "d", "date": "2026", "torch": "t",
            "triton": "t", "command": "c", "checks": {"syncs": {"rows": [
                {"backend": "loop", "forward": 1, "backward": 0, "total": 1}]}}}
    assert gpu_check_problems(good) == []
    bad = dict(good, checks={"syncs": {"rows": [{"backend": "loop"}]}, "speed": {}})
    problems = gpu_check_problems(bad)
    assert any("lacks" in p for p in problems) and any("unknown check" in p for p in problems)
    assert gpu_check_problems({"kind": "moe_lab.gpu_check"})  # no header fields
    with pytest.raises(ValueError, match="malformed"):
        gc.write_result(tmp_path, bad)
    (tmp_path / "gpu_check_x.json").write_text(json.dumps(bad))
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="gpu_check_x.json"):
        load_gpu_checks(tmp_path)
    assert load_gpu_checks(tmp_path / "missing") == []


def test_an_interrupted_run_keeps_what_it_measured(gc, monkeypatch, tmp_path):
    """gpu_check.sh's hard limit (SIGINT): the running check is marked, the file is written."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "check_correctness", lambda device, large: {
        "rows": [], "passed": True})
    monkeypatch.setattr(gc, "run_sync_check", interrupted)
    payload, status = gc.run_all(torch.device("cpu"), gc.parse_args(["--out", str(tmp_path)]),
                                 "cmd")
    assert status == 1 and list(payload["checks"]) == ["correctness", "syncs"]
    (loaded,) = load_gpu_checks(tmp_path)
    assert check_errors(loaded) == {"syncs": "interrupted (time limit)"}


@pytest.mark.slow
def test_compile_autocast_check_runs_on_cpu(gc):
    """The phase's CPU path (loop backend, bf16 autocast, compiled with inductor's CPU
    backend) passes; on a GPU the same code checks grouped_mm and triton in bf16 and fp16."""
    res = gc.check_compile_autocast(torch.device("cpu"), ("loop",), tokens=64)
    assert res["passed"], res
    assert [(r["backend"], r["dtype"]) for r in res["rows"]] == [("loop", "bfloat16")]
