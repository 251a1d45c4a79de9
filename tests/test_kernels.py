"""The Triton grouped GEMM (and its gate-and-up form) equals a float64 per-expert loop,
gradients included (interpreted); a call launches its kernels and does nothing else."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from moe_lab.kernels import (
    Tiles,
    grouped_gemm,
    grouped_gemm_gate_up,
    grouped_gemm_reference,
    interpreter_active,
    kernel_tile_schedule,
    tiles_for,
)
from moe_lab.kernels import grouped as grouped_module
from moe_lab.kernels.gemm_kernels import num_row_tiles, tile_schedule
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


@settings(max_examples=15, deadline=None)
@given(counts=st.lists(st.integers(0, 50), min_size=1, max_size=20),
       block_m=st.sampled_from([16, 32]))
def test_kernels_compute_the_same_schedule_as_tile_schedule(counts, block_m):
    """The schedule each program works out for itself (read back) equals the torch twin."""
    n, e = sum(counts), len(counts)
    got_T3 = kernel_tile_schedule(torch.tensor(counts), block_m, n)
    expert_T, start_T, end_T, _ = tile_schedule(torch.tensor(counts), block_m, n)
    real_T = start_T < end_T
    assert got_T3.shape == (num_row_tiles(n, e, block_m), 3)
    assert torch.equal(got_T3[real_T], torch.stack([expert_T, start_T, end_T], 1)[real_T])
    assert (got_T3[~real_T, 0] == e).all(), "a spare tile is marked expert == E"


class _Launches:
    """Stand-ins for the kernels that record each launch and run it with `mode` paused."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import _disable_current_modes

        interpreted = grouped_module.interpreter_active()  # asks the real kernels
        monkeypatch.setattr(grouped_module, "interpreter_active", lambda: interpreted)
        self.names = []
        for name in ("grouped_gemm_kernel", "grouped_gemm_gate_up_kernel",
                     "grouped_gemm_dw_kernel"):
            kernel = getattr(grouped_module, name)

            def launch(grid, kernel=kernel, name=name):
                def run(*args, **kwargs):
                    self.names.append(name)
                    with _disable_current_modes():  # the interpreter's own copies
                        kernel[grid](*args, **kwargs)
                return run

            monkeypatch.setattr(grouped_module, name, type(name, (), {
                "__getitem__": lambda _, grid, launch=launch: launch(grid)})())


class _TorchOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# What a call may do besides launching kernels: allocate outputs, view w transposed, make a
# broadcast upstream gradient dense (clone), sum the two halves of dx (gate and up), and the
# autograd plumbing of the test itself.
ALLOWED_OPS = {"empty", "empty_like", "zeros", "transpose", "clone", "add_", "ones_like",
               "detach", "mul", "sum", "expand"}


@pytest.mark.parametrize("fused", [False, True], ids=["grouped_gemm", "gate_up"])
def test_a_call_only_launches_kernels_and_repeats_identically(fused, monkeypatch):
    """No per-call schedule (no cumsum, searchsorted, copy) and, unchecked, no read-back."""
    launches = _Launches(monkeypatch)
    x, w, counts_E, _ = make_inputs([7, 0, 9], 20, 17, torch.float32)
    w_up = w.flip(0).contiguous().requires_grad_(True)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def call(check_counts):
        x.grad = w.grad = w_up.grad = None
        with _TorchOps() as mode:
            if fused:
                g, u = grouped_gemm_gate_up(x, w, w_up, counts_E, check_counts=check_counts)
                (g * u).sum().backward()
            else:
                grouped_gemm(x, w, counts_E, check_counts=check_counts).sum().backward()
        return mode.ops

    first, again = call(False), call(False)
    assert first == again
    assert set(first) <= ALLOWED_OPS, set(first) - ALLOWED_OPS
    expected = (["grouped_gemm_gate_up_kernel"] + ["grouped_gemm_kernel"] * 2
                + ["grouped_gemm_dw_kernel"] * 2) if fused else (
        ["grouped_gemm_kernel"] * 2 + ["grouped_gemm_dw_kernel"])
    assert launches.names == expected * 2
    checked = call(True)  # the value check: one min and sum, read back together
    assert [op for op in checked if op not in ALLOWED_OPS] == ["min", "stack"]


@pytest.mark.parametrize("counts,n", [([3, 10], 5), ([-2, 5, 1], 5), ([4, 4], 3)])
def test_unchecked_bad_counts_are_clamped_to_the_rows(counts, n):
    """check_counts=False with counts that lie: rows are clamped to [0, N], never overrun."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, 16, generator=g), torch.randn(len(counts), 16, 8, generator=g)
    ends = torch.tensor(counts).clamp(min=0).cumsum(0).clamp(max=n)
    clamped = ends.diff(prepend=torch.zeros(1, dtype=ends.dtype))
    y = grouped_gemm(x, w, torch.tensor(counts), tiles=SMALL, check_counts=False)
    torch.testing.assert_close(y, grouped_gemm_reference(x, w, clamped), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens_per_expert must"):
        grouped_gemm(x, w, torch.tensor(counts))


# --- gate and up in one launch ---------------------------------------------------------------

GATE_UP_CASES = [([5, 0, 33, 12], 40, 24, SMALL), ([0, 17], 16, 20, SMALL),
                 ([40, 3, 0, 21], 70, 130, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("counts,k,m,tiles", GATE_UP_CASES, ids=[str(c[0]) for c in GATE_UP_CASES])
def test_gate_up_matches_float64_reference(counts, k, m, tiles, dtype):
    x, w_gate, counts_E, d_gate = make_inputs(counts, k, m, dtype)
    _, w_up, _, d_up = make_inputs(counts, k, m, dtype, seed=1)
    leaves = [t.requires_grad_(True) for t in (x, w_gate, w_up)]
    gate, up = grouped_gemm_gate_up(x, w_gate, w_up, counts_E, tiles=tiles, dx_tiles=tiles,
                                    dw_tiles=tiles)
    torch.autograd.backward((gate, up), (d_gate, d_up))

    x64, wg64, wu64 = (t.detach().double().requires_grad_(True) for t in leaves)
    want = (grouped_gemm_reference(x64, wg64, counts_E),
            grouped_gemm_reference(x64, wu64, counts_E))
    torch.autograd.backward(want, (d_gate.double(), d_up.double()))

    tol = TOL[dtype]
    pairs = (("gate", gate, want[0]), ("up", up, want[1]), ("dx", x.grad, x64.grad),
             ("dw_gate", w_gate.grad, wg64.grad), ("dw_up", w_up.grad, wu64.grad))
    for name, got, ref in pairs:
        assert got.dtype == dtype
        # dx adds two rounded halves (as autograd does for two separate GEMMs): 2x tolerance
        slack = 2 if name == "dx" else 1
        torch.testing.assert_close(got.double(), ref, rtol=slack * tol, atol=slack * tol, msg=name)


def test_gate_up_with_one_output_unused():
    """Only gate reaches the loss: dx and dw_gate from it alone, no gradient for w_up."""
    x, w_gate, counts_E, _ = make_inputs([6, 0, 11], 20, 18, torch.float32)
    _, w_up, _, _ = make_inputs([6, 0, 11], 20, 18, torch.float32, seed=1)
    for t in (x, w_gate, w_up):
        t.requires_grad_(True)
    gate, _ = grouped_gemm_gate_up(x, w_gate, w_up, counts_E, tiles=SMALL)
    gate.square().sum().backward()
    x64, wg64 = (t.detach().double().requires_grad_(True) for t in (x, w_gate))
    grouped_gemm_reference(x64, wg64, counts_E).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(w_gate.grad.double(), wg64.grad, rtol=2e-5, atol=2e-5)
    assert w_up.grad is None or not w_up.grad.any()


GATE_UP_BAD = {
    "w_up not a tensor": (lambda wu: wu.tolist(), TypeError, "w_up must be a torch.Tensor"),
    "w_up other shape": (lambda wu: wu[:, :, :4].contiguous(), ValueError,
                         "w_up must have the shape of w_gate"),
    "w_up other dtype": (lambda wu: wu.half(), TypeError, "w_up must have the dtype"),
    "w_up not contiguous": (lambda wu: wu.transpose(1, 2).contiguous().transpose(1, 2),
                            ValueError, "w_up must be contiguous"),
}


@pytest.mark.parametrize("case", list(GATE_UP_BAD))
def test_gate_up_bad_input_names_the_argument(case):
    make, error, match = GATE_UP_BAD[case]
    x, w, counts_E = _good()
    w_sq = torch.randn(2, 16, 16)
    with pytest.raises(error, match=match):
        grouped_gemm_gate_up(x, w_sq, make(w_sq.clone()), counts_E)
    with pytest.raises(ValueError, match=r"w_gate\.shape\[1\]"):
        grouped_gemm_gate_up(x[:, :8].contiguous(), w, w, counts_E)
    with pytest.raises(TypeError, match="tiles must be a moe_lab.kernels.Tiles"):
        grouped_gemm_gate_up(x, w, w, counts_E, tiles=(16, 16, 16))


def test_tile_kinds_fall_back_to_default():
    for kind in ("forward", "dw", "gate_up"):
        assert isinstance(tiles_for(kind, torch.device("cpu"), True), Tiles)
    assert tiles_for("gate_up", torch.device("cpu"), True) == tiles_for(
        "forward", torch.device("cpu"), True)


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


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_backend_triton_equals_backend_loop(activation):
    """MoEConfig(backend="triton") (sort dispatch) equals backend="loop", gradients included."""
    from moe_lab.config import MoEConfig
    from moe_lab.layer import MoE

    torch.manual_seed(1)
    cfg = dict(d_model=16, d_ff=24, num_experts=4, top_k=2, activation=activation)
    ref, tri = MoE(MoEConfig(backend="loop", **cfg)), MoE(MoEConfig(backend="triton", **cfg))
    tri.load_state_dict(ref.state_dict())
    assert tri.experts.backend == "triton"
    x = torch.randn(2, 9, 16)
    for moe in (ref, tri):
        moe(x).y.square().sum().backward()
    torch.testing.assert_close(tri(x).y, ref(x).y, rtol=1e-5, atol=1e-5)
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters(), strict=True):
        torch.testing.assert_close(p_tri.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)
