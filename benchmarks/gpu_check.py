"""Every GPU check chapter 10 needs, in one run: `bash benchmarks/gpu_check.sh` on one GPU.

(a) correctness: the compiled Triton kernels (grouped GEMM, fused gate+up, and the expert
    backend built on them) against float64, gradients included, in fp32, fp16 and bf16;
(b) GEMM throughput, forward: the Triton grouped GEMM against one dense bf16 torch.matmul of
    the same FLOPs, F.grouped_mm and a per-expert loop of matmuls, at small and Mixtral-like
    shapes (d_model 4096, d_ff 14336, E=8, top-2, 4k-32k tokens); the fused gate+up kernel
    against two launches;
(c) the whole MoE layer, forward+backward, bf16, sort dispatch, backends grouped_mm and
    triton, against a dense SwiGLU FFN of equal active FLOPs (d_ff_dense = top_k * d_ff);
(d) host syncs of one forward and one backward of the layer per backend, counted as the
    warnings of torch.cuda.set_sync_debug_mode("warn").

Timings use CUDA events around `iters` calls, after warm-up calls, with the variants of a case
interleaved in a shuffled order in every repeat; the result is the median over repeats.
FLOPs count the expert GEMMs only (the router's 2 T d_model E is under 0.1% here).
A time budget (--budget-s) skips the largest shapes when the run goes long; skipped cases are
listed in the result. The result, benchmarks/results/gpu/gpu_check_<device>.json, is written
after every check, so an interrupted run keeps what it measured. Without CUDA the script says
that it needs a GPU and exits 0. It installs nothing and needs only torch and triton.

    python benchmarks/gpu_check.py [--quick] [--budget-s 390] [--repeats 7] [--iters 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Imported before triton: with no GPU, moe_lab.kernels switches Triton's interpreter on.
import moe_lab.kernels as K  # noqa: E402
from moe_lab import backends  # noqa: E402
from moe_lab.kernels.results import GPU_CHECK_KIND, gpu_check_problems  # noqa: E402
from moe_lab.kernels.tile_configs import KINDS as TILE_KINDS  # noqa: E402
from moe_lab.kernels.timing import time_interleaved  # noqa: E402

SCHEMA = 1
OUT_DIR = ROOT / "benchmarks" / "results" / "gpu"
NO_GPU_MESSAGE = (
    "gpu_check needs a CUDA GPU (one H100 or H200 runs every check in under 8 minutes); "
    "none found, so nothing ran and no result was written."
)
# (shape name, d_model, d_ff, experts, top_k, token counts); --quick keeps the first count.
GEMM_SHAPES = [
    ("small", 1024, 4096, 8, 2, (2048, 8192)),
    ("mixtral", 4096, 14336, 8, 2, (4096, 8192, 16384, 32768)),
]
LAYER_SHAPES = [
    ("small", 1024, 4096, 8, 2, (8192,)),
    ("mixtral", 4096, 14336, 8, 2, (4096, 16384, 32768)),
]
SYNC_SHAPE = {"d_model": 256, "d_ff": 512, "num_experts": 8, "top_k": 2, "tokens": 2048}
SYNC_BACKENDS = ("loop", "bmm", "grouped_mm", "triton")
LAYER_BACKENDS = ("grouped_mm", "triton")
GEMM_SHARE = 0.55  # of the budget left after correctness and syncs; the layer gets the rest
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SYNC_WARNING = "synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says


# --- FLOPs ----------------------------------------------------------------------------------


def gemm_flops(rows: int, k: int, m: int) -> float:
    """FLOPs of a (rows, k) x (k, m) matmul: a multiply and an add per term."""
    return 2.0 * rows * k * m


def expert_ffn_flops(rows: int, d_model: int, d_ff: int, activation: str = "swiglu") -> float:
    """FLOPs of the expert FFN's GEMMs on `rows` token-expert rows (3 for SwiGLU, 2 for GELU)."""
    return (3 if activation == "swiglu" else 2) * gemm_flops(rows, d_model, d_ff)


def layer_flops(tokens: int, d_model: int, d_ff: int, top_k: int, *, backward: bool = True,
                activation: str = "swiglu") -> float:
    """Active expert FLOPs of an MoE layer on `tokens` tokens; a backward pass costs twice the
    forward (dx and dW), so forward+backward is three times it."""
    return expert_ffn_flops(tokens * top_k, d_model, d_ff, activation) * (3 if backward else 1)


def dense_ffn_width(d_ff: int, top_k: int) -> int:
    """The d_ff of the dense FFN with the FLOPs of top_k experts of width d_ff per token."""
    return top_k * d_ff


# --- timing and budget ----------------------------------------------------------------------


class Budget:
    """Wall-clock seconds for a run; a case starts only if its estimate fits in what is left."""

    def __init__(self, seconds: float, clock=time.monotonic):
        if not seconds > 0:
            raise ValueError(f"the budget must be positive, got {seconds!r}")
        self.seconds, self.clock, self.start = float(seconds), clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    def share(self, fraction: float) -> Budget:
        """A budget of `fraction` of the time left (for one phase of the run)."""
        return Budget(max(fraction * self.left(), 1e-9), self.clock)


def estimate_seconds(previous: tuple[float, float] | None, flops: float) -> float:
    """A case's time from the previous case of its phase, (seconds, FLOPs), scaled by FLOPs."""
    if previous is None:
        return 0.0
    seconds, prev_flops = previous
    return seconds * flops / prev_flops


def summarize(case: dict, samples: dict[str, list[float]], flops: float,
              baseline: str) -> list[dict]:
    """One row per variant: median ms, TFLOP/s and the ratio of TFLOP/s to the baseline's."""
    median = {name: statistics.median(ms) for name, ms in samples.items()}
    tflops = {name: flops / (ms * 1e-3) / 1e12 for name, ms in median.items()}
    return [dict(case, variant=name, median_ms=median[name], tflops=tflops[name],
                 vs_dense=tflops[name] / tflops[baseline], samples_ms=samples[name])
            for name in samples]


# --- (a) correctness ------------------------------------------------------------------------


def _worst(pairs, tol) -> float:
    """Largest |got - want| / (1 + |want|) over the pairs, over the tolerance."""
    worst = 0.0
    for got, want in pairs:
        got, want = got.detach().double(), want.detach().double()
        worst = max(worst, float(((got - want).abs() / (1 + want.abs())).max()) / tol)
    return worst


def _randn(*shape, gen, device, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def check_grouped(counts: list[int], k: int, m: int, device, dtype, gate_up: bool) -> float:
    """Worst error over tolerance of grouped_gemm (or the fused gate+up) and its gradients."""
    gen = torch.Generator().manual_seed(len(counts) * 1000 + k + m)
    n, e = sum(counts), len(counts)
    counts_E = torch.tensor(counts, device=device)
    x = _randn(n, k, gen=gen, device=device, dtype=dtype).requires_grad_(True)
    ws = [_randn(e, k, m, gen=gen, device=device, dtype=dtype, scale=k**-0.5).requires_grad_(True)
          for _ in range(2 if gate_up else 1)]
    dys = [_randn(n, m, gen=gen, device=device, dtype=dtype) for _ in ws]
    outs = K.grouped_gemm_gate_up(x, *ws, counts_E) if gate_up else (
        K.grouped_gemm(x, ws[0], counts_E),)
    torch.autograd.backward(outs, dys)
    x64 = x.detach().double().requires_grad_(True)
    w64s = [w.detach().double().requires_grad_(True) for w in ws]
    want = [K.grouped_gemm_reference(x64, w64, counts_E) for w64 in w64s]
    torch.autograd.backward(want, [dy.double() for dy in dys])
    pairs = [*zip(outs, want, strict=True), (x.grad, x64.grad),
             *((w.grad, w64.grad) for w, w64 in zip(ws, w64s, strict=True))]
    # dx of gate+up adds two rounded halves, as autograd does for two separate GEMMs
    return _worst(pairs, TOL[dtype] * (2 if gate_up else 1))


def check_expert_backend(device, dtype, rows: int = 300) -> tuple[float, float]:
    """The triton expert backend's worst error (output and every gradient) against float64,
    and the loop backend's (PyTorch's matmuls) in the same dtype, for scale."""
    from moe_lab.experts import Experts

    torch.manual_seed(0)
    ref = Experts(4, 64, 96).double().to(device)
    counts_E = torch.tensor([rows // 2, 0, rows // 3, rows - rows // 2 - rows // 3], device=device)
    x64 = torch.randn(rows, 64, dtype=torch.float64, device=device)
    dy64 = torch.randn(rows, 64, dtype=torch.float64, device=device)
    errors = {}
    runs = {}
    for backend, dt in (("reference", torch.float64), ("loop", dtype), ("triton", dtype)):
        experts = Experts(4, 64, 96, backend="loop" if backend == "reference" else backend)
        experts.load_state_dict(ref.state_dict())
        experts = experts.to(device, dt)
        x = x64.to(dt, copy=True).requires_grad_(True)
        y = experts.forward_sorted(x, counts_E)
        y.backward(dy64.to(dt))
        runs[backend] = [y, x.grad] + [p.grad for p in experts.parameters()]
    for backend in ("loop", "triton"):
        errors[backend] = _worst(zip(runs[backend], runs["reference"], strict=True), 1.0)
    return errors["triton"], errors["loop"]


def check_int64_offsets(device) -> float:
    """An up projection whose output passes 2^31 elements: the last rows against float64."""
    n, k, m = 150_000, 4096, 14336  # n * m = 2.15e9 > 2^31
    gen = torch.Generator(device).manual_seed(5)
    counts_E = torch.tensor([n // 2, n - n // 2], device=device)
    x = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16)
    w = torch.randn(2, k, m, generator=gen, device=device, dtype=torch.bfloat16) / k**0.5
    with torch.no_grad():
        y = K.grouped_gemm(x, w, counts_E)
    tail = slice(n - 64, n)
    want = x[tail].double() @ w[1].double()
    error = _worst([(y[tail], want)], TOL[torch.bfloat16])
    del x, w, y
    torch.cuda.empty_cache()
    return error


def check_correctness(device, *, large: bool = True) -> dict:
    """(a): every kernel and the triton backend against float64, in fp32, fp16 and bf16."""
    cases = [([5, 0, 33, 12], 40, 24), ([0, 17, 1], 70, 130)]
    if large:
        cases.append(([700, 0, 1300, 45, 1, 2000, 0, 50], 512, 1024))
    rows = []

    def add(op, dtype, case, worst):
        row = {"op": op, "dtype": str(dtype).removeprefix("torch."), "case": case,
               "worst_error_over_tolerance": worst, "passed": worst <= 1.0}
        rows.append(row)
        print(f"  {op:14s} {row['dtype']:9s} {case}: worst error / tolerance {worst:.3f}"
              + ("" if row["passed"] else "  FAILED"))

    for dtype in TOL:
        for counts, k, m in cases:
            case = f"counts={counts} K={k} M={m}"
            add("grouped_gemm", dtype, case, check_grouped(counts, k, m, device, dtype, False))
            add("gate_up", dtype, case, check_grouped(counts, k, m, device, dtype, True))
        triton_err, loop_err = check_expert_backend(device, dtype)
        tol = max(2 * loop_err, TOL[dtype])  # as accurate as PyTorch's own matmuls, or better
        add("expert_backend", dtype, f"triton vs float64; loop's error {loop_err:.2e}",
            triton_err / tol)
    if large and device.type == "cuda":
        add("int64_offsets", torch.bfloat16, "N=150000 K=4096 M=14336, last 64 rows",
            check_int64_offsets(device))
    return {"rows": rows, "passed": all(r["passed"] for r in rows)}


# --- (b) GEMM throughput --------------------------------------------------------------------


def route(tokens: int, experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """Tokens per expert from a random router: top-k of Gaussian logits (about balanced)."""
    indices = torch.randn(tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    return torch.bincount(indices.flatten(), minlength=experts)


def loop_matmul(x_NK, w_EKM, counts_E, out_NM):
    """The per-expert loop: one matmul per expert into its slice (reads the counts first)."""
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        torch.matmul(x_NK[start:start + count], w_EKM[e], out=out_NM[start:start + count])
        start += count
    return out_NM


def gemm_runners(gemm: str, n: int, k: int, m: int, counts_E, device, dtype) -> dict:
    """Closures computing the same FLOPs: Triton, F.grouped_mm, the loop, one dense matmul.

    gemm is "up" or "down" (one weight), or "gate+up" (two weights of the same shape: the
    fused kernel, then every other variant run twice, the dense one as one matmul of width 2m).
    """
    e = counts_E.numel()
    x = torch.randn(n, k, device=device, dtype=dtype)
    n_w = 2 if gemm == "gate+up" else 1
    ws = [torch.randn(e, k, m, device=device, dtype=dtype) / k**0.5 for _ in range(n_w)]
    w_dense = torch.randn(k, n_w * m, device=device, dtype=dtype) / k**0.5
    outs = [torch.empty(n, m, device=device, dtype=dtype) for _ in ws]
    runners = {}
    if gemm == "gate+up":
        runners["triton_fused"] = lambda: K.grouped_gemm_gate_up(x, *ws, counts_E,
                                                                 check_counts=False)
    runners["triton"] = lambda: [K.grouped_gemm(x, w, counts_E, check_counts=False) for w in ws]
    if backends.torch_grouped_mm_applies(x, *ws):
        runners["grouped_mm"] = lambda: [backends.grouped_mm_torch(x, w, counts_E) for w in ws]
    runners["loop"] = lambda: [loop_matmul(x, w, counts_E, out)
                               for w, out in zip(ws, outs, strict=True)]
    runners["dense"] = lambda: x @ w_dense
    return runners


def run_gemm_check(device, dtype, budget: Budget, repeats: int, iters: int,
                   shapes=None, quick: bool = False) -> dict:
    """(b): forward TFLOP/s of each variant per shape (default GEMM_SHAPES), tokens and GEMM."""
    shapes = GEMM_SHAPES if shapes is None else shapes
    gen = torch.Generator().manual_seed(0)
    rows, skipped, previous = [], [], None
    with torch.no_grad():
        for shape, d_model, d_ff, experts, top_k, token_counts in shapes:
            for tokens in token_counts[:1] if quick else token_counts:
                counts_E = route(tokens, experts, top_k, gen).to(device)
                n = tokens * top_k
                for gemm, k, m in (("up", d_model, d_ff), ("down", d_ff, d_model),
                                   ("gate+up", d_model, d_ff)):
                    flops = gemm_flops(n, k, m) * (2 if gemm == "gate+up" else 1)
                    name = f"{shape} {tokens} tokens {gemm}"
                    if not budget.allows(estimate_seconds(previous, flops)):
                        skipped.append(name)
                        print(f"  {name}: skipped (time budget)")
                        continue
                    started = time.monotonic()
                    case = {"shape": shape, "tokens": tokens, "top_k": top_k, "E": experts,
                            "gemm": gemm, "N": n, "K": k, "M": m, "pass": "fwd",
                            "tokens_per_expert": counts_E.tolist()}
                    runners = gemm_runners(gemm, n, k, m, counts_E, device, dtype)
                    samples = time_interleaved(runners, repeats, iters, seed=len(rows))
                    case_rows = summarize(case, samples, flops, "dense")
                    rows += case_rows
                    print(f"  {name}: " + ", ".join(
                        f"{r['variant']} {r['tflops']:.1f}" for r in case_rows) + " TFLOP/s")
                    del runners
                    torch.cuda.empty_cache()
                    previous = (time.monotonic() - started, flops)
    return {"rows": rows, "skipped": skipped, "dtype": str(dtype).removeprefix("torch.")}


# --- (c) the whole layer --------------------------------------------------------------------


def layer_runners(d_model, d_ff, experts, top_k, tokens, device, dtype,
                  backend_names=LAYER_BACKENDS) -> tuple[dict, list[int]]:
    """Forward+backward closures: the MoE layer (sort dispatch) per backend, the dense FFN."""
    from moe_lab.config import MoEConfig
    from moe_lab.experts import FFN
    from moe_lab.layer import MoE

    torch.manual_seed(0)
    cfg = {"d_model": d_model, "d_ff": d_ff, "num_experts": experts, "top_k": top_k,
           "impl": "sort"}
    modules = {}
    for backend in backend_names:
        if backend == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
            print(f"  backend {backend!r} skipped: this torch has no F.grouped_mm")
            continue
        moe = MoE(MoEConfig(backend=backend, **cfg))
        if modules:  # the same weights for every backend
            moe.load_state_dict(next(iter(modules.values())).state_dict())
        modules[f"moe_{backend}"] = moe.to(device, dtype)
    modules["dense_ffn"] = FFN(d_model, dense_ffn_width(d_ff, top_k)).to(device, dtype)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, d_model, device=device, dtype=dtype)
    with torch.no_grad():
        counts = next(iter(modules.values()))(x).tokens_per_expert.tolist()

    def step(module):
        def run():
            out = module(x)
            (out if isinstance(out, torch.Tensor) else out.y).backward(dy)
            x.grad = None
            for p in module.parameters():
                p.grad = None
        return run

    return {name: step(module) for name, module in modules.items()}, counts


def run_layer_check(device, dtype, budget: Budget, repeats: int, iters: int,
                    shapes=None, quick: bool = False,
                    backend_names=LAYER_BACKENDS) -> dict:
    """(c): the MoE layer's forward+backward per backend against the dense FFN, per shape
    (default LAYER_SHAPES)."""
    shapes = LAYER_SHAPES if shapes is None else shapes
    rows, skipped, previous = [], [], None
    for shape, d_model, d_ff, experts, top_k, token_counts in shapes:
        for tokens in token_counts[:1] if quick else token_counts:
            flops = layer_flops(tokens, d_model, d_ff, top_k)
            name = f"{shape} {tokens} tokens"
            if not budget.allows(estimate_seconds(previous, flops)):
                skipped.append(name)
                print(f"  {name}: skipped (time budget)")
                continue
            started = time.monotonic()
            runners, counts = layer_runners(d_model, d_ff, experts, top_k, tokens, device,
                                            dtype, backend_names)
            case = {"shape": shape, "tokens": tokens, "d_model": d_model, "d_ff": d_ff,
                    "E": experts, "top_k": top_k, "pass": "fwd+bwd", "tokens_per_expert": counts,
                    "dense_d_ff": dense_ffn_width(d_ff, top_k)}
            samples = time_interleaved(runners, repeats, iters, seed=len(rows))
            case_rows = summarize(case, samples, flops, "dense_ffn")
            rows += case_rows
            print(f"  {name}: " + ", ".join(
                f"{r['variant']} {r['median_ms']:.2f} ms" for r in case_rows))
            del runners
            torch.cuda.empty_cache()
            previous = (time.monotonic() - started, flops)
    return {"rows": rows, "skipped": skipped, "dtype": str(dtype).removeprefix("torch.")}


# --- (d) host syncs -------------------------------------------------------------------------


def count_syncs(fn, set_mode=None) -> tuple[int, list[str]]:
    """Run fn under set_sync_debug_mode("warn"); the number of sync warnings, and the first few."""
    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_mode("warn")
        try:
            fn()
        finally:
            set_mode("default")
    messages = [str(w.message) for w in caught if SYNC_WARNING in str(w.message)]
    return len(messages), messages[:3]


def _syncs_of_one_step(moe, x, set_mode):
    """(count, messages) of the forward and of the backward, after a warm-up step."""
    moe(x).y.sum().backward()  # warm-up: compiles, allocates
    out = []
    forward = count_syncs(lambda: out.append(moe(x).y), set_mode)
    backward = count_syncs(lambda: out[0].sum().backward(), set_mode)
    return forward, backward


def run_sync_check(device, dtype, backend_names=SYNC_BACKENDS, set_mode=None,
                   shape=None) -> dict:
    """(d): host syncs in one forward and one backward of the layer (SYNC_SHAPE), per backend."""
    shape = SYNC_SHAPE if shape is None else shape
    from moe_lab.config import MoEConfig
    from moe_lab.layer import MoE

    rows = []
    for backend in backend_names:
        torch.manual_seed(0)
        moe = MoE(MoEConfig(d_model=shape["d_model"], d_ff=shape["d_ff"],
                            num_experts=shape["num_experts"], top_k=shape["top_k"],
                            impl="sort", backend=backend)).to(device, dtype)
        x = torch.randn(shape["tokens"], shape["d_model"], device=device, dtype=dtype,
                        requires_grad=True)
        try:
            (forward, f_msgs), (backward, b_msgs) = _syncs_of_one_step(moe, x, set_mode)
        except Exception as err:  # e.g. a backend this torch lacks: say so, count the rest
            rows.append({"backend": backend, "forward": None, "backward": None, "total": None,
                         "error": f"{type(err).__name__}: {err}"[:500]})
            print(f"  {backend:10s} failed: {rows[-1]['error']}")
            continue
        rows.append({"backend": backend, "forward": forward, "backward": backward,
                     "total": forward + backward, "messages": f_msgs + b_msgs})
        print(f"  {backend:10s} forward {forward}, backward {backward} host syncs")
    return {"rows": rows, "shape": dict(shape), "dtype": str(dtype).removeprefix("torch.")}


# --- the result file ------------------------------------------------------------------------


def check_compile_autocast(device, backends=("grouped_mm", "triton"), tokens: int = 512) -> dict:
    """A float32 layer under autocast (bf16 on CUDA, fp16 too) and compiled: equal to eager
    under the same autocast, output in the autocast dtype, per backend (issue #20)."""
    from moe_lab import MoE, MoEConfig

    rows = []
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.bfloat16,)
    for backend in backends:
        for dt in dtypes:
            torch.manual_seed(0)
            moe = MoE(MoEConfig(d_model=256, d_ff=512, num_experts=8, top_k=2,
                                backend=backend)).to(device)
            x = torch.randn(tokens, 256, device=device)
            with torch.autocast(device.type, dtype=dt):
                eager = moe(x).y
                compiled = torch.compile(moe)(x).y
            diff = float((eager.float() - compiled.float()).abs().max())
            ok = eager.dtype == dt == compiled.dtype
            rows.append({"backend": backend, "dtype": str(dt).removeprefix("torch."),
                         "dtype_ok": ok, "max_abs_diff": diff, "passed": ok and diff < 0.05})
    return {"rows": rows, "passed": all(r["passed"] for r in rows)}


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def result_path(directory: Path, device_name: str) -> Path:
    return Path(directory) / f"gpu_check_{device_slug(device_name)}.json"


def write_result(directory: Path, payload: dict) -> Path:
    """Write the result named after its device, after checking it has every field."""
    problems = gpu_check_problems(payload)
    if problems:
        raise ValueError("the result is malformed: " + "; ".join(problems))
    path = result_path(directory, payload["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def command_line(argv: list[str] | None) -> str:
    """The command that produced the result (gpu_check.sh passes its own in GPU_CHECK_COMMAND)."""
    if os.environ.get("GPU_CHECK_COMMAND"):
        return os.environ["GPU_CHECK_COMMAND"]
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "benchmarks/gpu_check.py", *args])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)" if K.interpreter_active() else "cpu"


def _machine() -> dict:
    try:
        from moe_lab.provenance import machine_record

        return machine_record()
    except Exception as err:  # e.g. an older Python on the GPU machine: record why
        return {"error": repr(err)}


def header(device, args, command: str) -> dict:
    """What ran where: device, date, versions, command, settings and tiles, before timings."""
    import triton  # after moe_lab.kernels, which decides how triton is set up

    return {
        "kind": GPU_CHECK_KIND, "schema": SCHEMA, "device": device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "command": command, "budget_s": args.budget_s, "quick": args.quick,
        "repeats": args.repeats, "iters": args.iters,
        "tiles": {kind: K.tiles_for(kind, device, K.interpreter_active()).as_dict()
                  for kind in TILE_KINDS},
        "machine_start": _machine(), "checks": {},
    }


def run_all(device, args, command: str) -> tuple[dict, int]:
    """Every check in turn, writing the result after each; (result, exit status)."""
    budget = Budget(args.budget_s)
    payload = header(device, args, command)
    print(f"gpu_check on {payload['device']} (torch {payload['torch']}, "
          f"triton {payload['triton']}), budget {args.budget_s:.0f} s")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # grouped_mm's dtypes
    phases = [
        ("correctness", lambda: check_correctness(device, large=device.type == "cuda")),
        ("syncs", lambda: run_sync_check(device, dtype)),
        ("compile_autocast", lambda: check_compile_autocast(
            device, ("grouped_mm", "triton") if device.type == "cuda" else ("loop",))),
        ("gemm", lambda: run_gemm_check(device, dtype, budget.share(GEMM_SHARE), args.repeats,
                                        args.iters, quick=args.quick)),
        ("layer", lambda: run_layer_check(device, dtype, budget, args.repeats, args.iters,
                                          quick=args.quick)),
    ]
    status = 0
    for name, run in phases:
        print(f"({name}) at {budget.elapsed():.0f} s:")
        started = time.monotonic()
        interrupted = False
        try:
            payload["checks"][name] = run()
        except KeyboardInterrupt:  # gpu_check.sh's hard limit: keep what was measured
            payload["checks"][name] = {"error": "interrupted (time limit)"}
            interrupted = True
        except Exception:
            payload["checks"][name] = {"error": traceback.format_exc(limit=4)[-2000:]}
            print(payload["checks"][name]["error"], file=sys.stderr)
        status = status or int("error" in payload["checks"][name])
        payload["checks"][name]["wall_s"] = round(time.monotonic() - started, 1)
        payload["elapsed_s"] = round(budget.elapsed(), 1)
        write_result(args.out, payload)
        if interrupted:
            break
    if not payload["checks"].get("correctness", {}).get("passed", False):
        status = 1
    payload["machine_end"] = _machine()
    path = write_result(args.out, payload)
    print(f"wrote {path} after {budget.elapsed():.0f} s" + (" (with failures)" if status else ""))
    return payload, status


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one token count per shape")
    parser.add_argument("--budget-s", type=float, default=390.0,
                        help="seconds for the whole run; the largest shapes are skipped past it")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3, help="calls per timed sample")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.iters < 1 or not args.budget_s > 0:
        parser.error("--repeats, --iters and --budget-s must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0
    if K.interpreter_active():
        print("TRITON_INTERPRET=1 is set: unset it to check the compiled kernels", file=sys.stderr)
        return 2
    # gpu_check.sh's hard limit sends SIGINT (SIGTERM from others): both stop the check that is
    # running, and the result keeps what was measured. Python ignores SIGINT when started with
    # it ignored (a background job), so the handler is installed here.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    return run_all(torch.device("cuda"), args, command_line(argv))[1]


if __name__ == "__main__":
    sys.exit(main())
