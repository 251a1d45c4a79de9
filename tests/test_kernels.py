"""The Triton grouped GEMM equals a float64 per-expert loop, gradients included (interpreted)."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab.kernels import (
    Tiles,
    grouped_gemm,
    grouped_gemm_reference,
    interpreter_active,
    tiles_for,
)
from moe_lab.kernels.gemm_kernels import tile_schedule
from tests.chapters import ROOT, load_benchmark

SMALL = Tiles(block_m=16, block_n=16, block_k=16)  # several tiles even at tiny shapes
# Worst elementwise error allowed against float64 (relative and absolute): the kernel
# accumulates in fp32 and rounds once to the output dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (tokens per expert, K, M, tiles): empty experts, sizes off the tile, one row, N = 0.
CASES = [
    ([5, 0, 33, 12], 40, 24, SMALL),
    ([0, 0, 17], 16, 16, SMALL),
    ([1], 3, 5, SMALL),
    ([16, 16], 32, 32, SMALL),
    ([0, 0, 0], 20, 18, SMALL),
    ([40, 3, 0, 21], 70, 130, None),  # the interpreter's own tile config from tile_configs.json
]


def make_inputs(counts, k, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = (torch.randn(len(counts), k, m, generator=g) / max(k, 1) ** 0.5).to(dtype)
    dy = torch.randn(n, m, generator=g).to(dtype)
    return x, w, torch.tensor(counts), dy


def check_against_reference(counts, k, m, dtype, tiles, seed=0):
    x, w, counts_E, dy = make_inputs(counts, k, m, dtype, seed)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = grouped_gemm(x, w, counts_E, tiles=tiles, dw_tiles=tiles)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = grouped_gemm_reference(x64, w64, counts_E)
    y64.backward(dy.double())

    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (sum(counts), m)
    for name, got, want in (("y", y, y64), ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=name)


def test_interpreter_is_on_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the kernels are compiled, not interpreted")
    assert interpreter_active()
    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("counts,k,m,tiles", CASES, ids=[str(c[0]) for c in CASES])
def test_matches_float64_reference(counts, k, m, tiles, dtype):
    check_against_reference(counts, k, m, dtype, tiles)


@settings(max_examples=8, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       k=st.integers(1, 40), m=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_property_any_counts(counts, k, m, seed):
    check_against_reference(counts, k, m, torch.float32, SMALL, seed)


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(0, 50), min_size=1, max_size=8),
       block_m=st.sampled_from([16, 32, 64]))
def test_schedule_tiles_cover_rows_once_within_one_expert(counts, block_m):
    n = sum(counts)
    expert_T, start_T, end_T, offsets_E1 = tile_schedule(torch.tensor(counts), block_m, n)
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # (N,)
    covered = torch.zeros(n, dtype=torch.int64)
    for e, s, t in zip(expert_T.tolist(), start_T.tolist(), end_T.tolist(), strict=True):
        if s >= t:
            continue  # a spare tile
        rows = torch.arange(s, min(s + block_m, t))
        assert (owner[rows] == e).all(), "a tile straddles two experts"
        assert t == offsets_E1[e + 1]
        covered[rows] += 1
    assert (covered == 1).all(), "every row belongs to exactly one tile"
    real = int((start_T < end_T).sum())
    assert real == sum(-(-c // block_m) for c in counts)


def test_grad_only_for_w_and_non_contiguous_upstream_grad():
    x, w, counts_E, _ = make_inputs([7, 0, 9], 20, 17, torch.float32)
    w.requires_grad_(True)
    grouped_gemm(x, w, counts_E, tiles=SMALL, dw_tiles=SMALL).sum().backward()  # dy expanded
    w64 = w.detach().double().requires_grad_(True)
    grouped_gemm_reference(x.double(), w64, counts_E).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-5, atol=2e-5)
    assert w.grad[1].abs().max() == 0  # an expert with no tokens gets no gradient


def test_counts_on_other_integer_dtype_and_no_grad():
    x, w, _, _ = make_inputs([4, 5], 16, 16, torch.float16)
    with torch.no_grad():
        y = grouped_gemm(x, w, torch.tensor([4, 5], dtype=torch.int32))
    torch.testing.assert_close(y.double(), grouped_gemm_reference(x.double(), w.double(),
                                                                  torch.tensor([4, 5])),
                               rtol=2e-3, atol=2e-3)


def _good():
    x, w, counts_E, _ = make_inputs([3, 2], 16, 8, torch.float32)
    return x, w, counts_E


BAD_INPUTS = {
    "x not a tensor": (lambda x, w, c: (x.tolist(), w, c), TypeError, "x must be a torch.Tensor"),
    "x 1-D": (lambda x, w, c: (x[0], w, c), ValueError, "x must be 2-D"),
    "w 2-D": (lambda x, w, c: (x, w[0], c), ValueError, "w must be 3-D"),
    "counts 2-D": (lambda x, w, c: (x, w, c[None]), ValueError, "tokens_per_expert must be 1-D"),
    "x float64": (lambda x, w, c: (x.double(), w.double(), c), TypeError, "x must be float16"),
    "x int": (lambda x, w, c: (x.long(), w.long(), c), TypeError, "x must be float16"),
    "w other dtype": (lambda x, w, c: (x, w.half(), c), TypeError, "w must have the dtype of x"),
    "counts float": (lambda x, w, c: (x, w, c.float()), TypeError, "must be an integer tensor"),
    "counts bool": (lambda x, w, c: (x, w, c > 0), TypeError, "must be an integer tensor"),
    "no experts": (lambda x, w, c: (x, w[:0], c[:0]), ValueError, "at least one expert"),
    "K differs": (lambda x, w, c: (x[:, :8].contiguous(), w, c), ValueError, r"w\.shape\[1\]"),
    "counts per expert": (lambda x, w, c: (x, w, torch.tensor([5])), ValueError, "one entry per"),
    "counts sum": (lambda x, w, c: (x, w, torch.tensor([3, 3])), ValueError, "must sum to"),
    "negative count": (lambda x, w, c: (x, w, torch.tensor([6, -1])), ValueError, "non-negative"),
    "x not contiguous": (lambda x, w, c: (x.t().contiguous().t(), w, c), ValueError,
                         "x must be contiguous"),
    "w not contiguous": (lambda x, w, c: (x, w.transpose(1, 2).contiguous().transpose(1, 2), c),
                         ValueError, "w must be contiguous"),
    "w other device": (lambda x, w, c: (x, w.to("meta"), c), ValueError,
                       "w must be on the device of x"),
    "counts other device": (lambda x, w, c: (x, w, c.to("meta")), ValueError,
                            "tokens_per_expert must be on the device of x"),
    "x on meta": (lambda x, w, c: (x.to("meta"), w.to("meta"), c), ValueError,
                  "x must be on a CUDA device or on CPU"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case):
    make, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        grouped_gemm(*make(*_good()))


def test_bad_tiles():
    with pytest.raises(TypeError, match="tiles must be"):
        grouped_gemm(*_good(), tiles={"block_m": 16})
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        Tiles(block_m=24, block_n=16, block_k=16)
    with pytest.raises(ValueError, match="kind must be"):
        tiles_for("backward", torch.device("cpu"), True)


SNIPPET = (
    "import torch\n{before}\nimport moe_lab.kernels as K\n"
    "x = torch.randn(3, 16); w = torch.randn(1, 16, 16)\n"
    "y = K.grouped_gemm(x, w, torch.tensor([3]))\n"
    "assert torch.allclose(y, x @ w[0], atol=1e-5)\n"
)


# (code run before `import moe_lab.kernels`, extra environment, expected error or None)
FRESH_PROCESSES = {
    "triton imported first": (
        "import triton", {}, "triton was imported earlier without TRITON_INTERPRET=1"),
    "interpreter switched on late": (
        "import triton, os; os.environ['TRITON_INTERPRET'] = '1'", {},
        "TRITON_INTERPRET=1 was set after triton had been imported"),
    "TRITON_INTERPRET=0": ("", {"TRITON_INTERPRET": "0"}, "TRITON_INTERPRET=0 is set"),
    "clean start": ("import os", {}, None),
}


def test_interpreter_setup_in_fresh_processes():
    """A clean start turns the interpreter on; every wrong set-up gets a clear RuntimeError."""
    if torch.cuda.is_available():
        pytest.skip("with a CUDA device the kernels are compiled and need no interpreter")
    procs = {}
    for name, (before, env, message) in FRESH_PROCESSES.items():  # side by side: ~2 s each
        environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        environ.update(env, PYTHONPATH=str(ROOT))
        code = SNIPPET.format(before=before)
        if message is None:  # the package itself switched the interpreter on
            code += "assert os.environ['TRITON_INTERPRET'] == '1'\n"
        procs[name] = subprocess.Popen([sys.executable, "-c", code], env=environ, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        message = FRESH_PROCESSES[name][2]
        if message is None:
            assert proc.returncode == 0, f"{name}: {stderr[-2000:]}"
            continue
        assert proc.returncode != 0, name
        assert "RuntimeError" in stderr and message in stderr, f"{name}: {stderr[-2000:]}"
        assert "Set TRITON_INTERPRET=1 in the environment before triton is first imported" in stderr


# --- roofline -------------------------------------------------------------------------------


def test_roofline_ridge_tokens():
    from moe_lab.kernels.roofline import (
        H100_SXM,
        DevicePeaks,
        arithmetic_intensity,
        attainable_flops,
        compute_bound_tokens,
    )

    k, m = 4096, 14336
    t = compute_bound_tokens(k, m, H100_SXM)
    assert arithmetic_intensity(t, k, m) == pytest.approx(H100_SXM.ridge, rel=1e-9)
    assert attainable_flops(arithmetic_intensity(t / 2, k, m), H100_SXM) < H100_SXM.flops_per_s
    assert attainable_flops(arithmetic_intensity(2 * t, k, m), H100_SXM) == H100_SXM.flops_per_s
    assert arithmetic_intensity(1, k, m) == pytest.approx(1.0, rel=1e-3)  # about 2 t / b, b = 2
    tiny = DevicePeaks(name="tiny", flops_per_s=1e15, bytes_per_s=1e9, source="none")
    assert compute_bound_tokens(64, 64, tiny) == float("inf")  # the ridge is out of reach
    with pytest.raises(ValueError, match="bytes_per_s must be a positive number"):
        DevicePeaks(name="bad", flops_per_s=1e12, bytes_per_s=0, source="none")


# --- benchmark script, run on CPU with a stand-in for CUDA events ----------------------------


def _load_bench():
    return load_benchmark("bench_triton")


class _WallClockEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        import time

        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_bench_timing_path_and_result_files(tmp_path, monkeypatch):
    from moe_lab.kernels.results import load_results, results_table

    bench = _load_bench()
    monkeypatch.setattr(bench, "SHAPES", [("tiny", 16, 24, 3, 2, (10, 99))])
    monkeypatch.setattr(torch.cuda, "Event", _WallClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = bench.run_timings(torch.device("cpu"), repeats=2, iters=1, quick=True)
    # one token count x (up, down) x (fwd, fwd+bwd) x three variants
    assert len(rows) == 12 and {r["variant"] for r in rows} == set(bench.VARIANTS)
    for row in rows:
        assert len(row["samples_ms"]) == 2 and row["tflops"] > 0
        assert sum(row["tokens_per_expert"]) == row["N"] == 20
        if row["variant"] == "dense":
            assert row["vs_dense"] == 1.0
    header = {"kind": "moe_lab.bench_triton", "device": "Fake GPU 1", "date": "2026-01-01",
              "torch": torch.__version__, "triton": "x"}
    path = bench.write_json(tmp_path, "triton", "Fake GPU 1", dict(header, rows=rows))
    assert path.name == "triton_Fake_GPU_1.json"
    bench.write_json(tmp_path, "tiles", "Fake GPU 1", {"kind": "moe_lab.tile_tuning"})
    (loaded,) = load_results(tmp_path)
    table = results_table(loaded, "fwd+bwd")
    assert len(table.splitlines()) == 2 + 6
    assert "| tiny | 10 | up (20 x 16 x 24) | triton |" in table


def test_bench_without_gpu_checks_correctness_and_exits_0(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the script times for minutes")
    assert _load_bench().main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "worst error / tolerance" in out and "timings need a CUDA GPU" in out
    assert not list(tmp_path.iterdir())


# --- the MoE layer with impl="triton" --------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {},
    {"activation": "gelu", "top_k": 1, "normalize_weights": False},  # Switch-style top-1
    {"capacity_factor": 0.75},  # some assignments dropped: the kernel sees uneven, short groups
], ids=["swiglu-top2", "gelu-top1", "capacity"])
def test_moe_triton_equals_sort(overrides):
    from moe_lab.config import MoEConfig
    from moe_lab.layer import MoE

    torch.manual_seed(0)
    cfg = dict(d_model=20, d_ff=36, num_experts=4, top_k=2) | overrides
    ref = MoE(MoEConfig(impl="sort", **cfg))
    tri = MoE(MoEConfig(impl="triton", **cfg))
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 20)
    outs, grads = [], []
    for moe in (ref, tri):
        xi = x.clone().requires_grad_(True)
        out = moe(xi)
        (out.y * torch.linspace(-1, 1, 20)).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in moe.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[1].y, outs[0].y, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[1].tokens_per_expert, outs[0].tokens_per_expert)
    assert outs[1].dropped == outs[0].dropped
    assert (outs[0].dropped > 0) == ("capacity_factor" in overrides)
    assert len(grads[1]) == len(grads[0]) >= 4
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
