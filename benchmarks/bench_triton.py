"""Time the Triton grouped GEMM against dense torch.matmul and a per-expert matmul loop.

On a CUDA GPU: TFLOP/s of the three at small and Mixtral-like expert GEMMs (d_model 4096,
d_ff 14336, E=8, top-2, 4k-32k tokens), forward and forward+backward; variants interleaved
in one process, repeated, medians and ratios to the dense baseline of the same run. Writes
benchmarks/results/triton_<device>.json. `--tune` also sweeps a few tile sizes and writes
benchmarks/results/tiles_<device>.json, an entry ready for moe_lab/kernels/tile_configs.json.
Without a GPU: runs the correctness check in Triton's interpreter, says timings need a GPU,
exits 0. Each JSON records the command line and the machine (CPU, load average, versions,
code revision) before and after its timings.

    python benchmarks/bench_triton.py [--quick] [--repeats 7] [--iters 3] [--tune] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Imported before triton: with no GPU, moe_lab.kernels switches Triton's interpreter on.
import moe_lab.kernels as K  # noqa: E402
from moe_lab.kernels.timing import time_interleaved  # noqa: E402
from moe_lab.provenance import machine_record  # noqa: E402

# (shape name, d_model, d_ff, experts, top_k, token counts); --quick keeps the first count.
SHAPES = [
    ("small", 1024, 4096, 8, 2, (2048, 8192)),
    ("mixtral", 4096, 14336, 8, 2, (4096, 8192, 16384, 32768)),
]
VARIANTS = ("triton", "loop", "dense")
TUNE_FORWARD = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                (128, 128, 32, 4, 4), (256, 128, 64, 8, 3), (64, 256, 32, 4, 4)]
TUNE_DW = [(64, 128, 128, 8, 3), (32, 128, 128, 8, 4), (64, 128, 64, 4, 3), (128, 128, 128, 8, 2)]


def check_correctness(device: torch.device) -> list[dict]:
    """Forward and gradients against a float64 loop over experts, small shapes, every dtype."""
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    cases = [([5, 0, 33, 12], 40, 24), ([0, 17, 1], 70, 130)]
    if device.type == "cuda":
        cases.append(([700, 0, 1300, 45, 1, 2000, 0, 50], 512, 1024))
    report = []
    for dtype, (counts, k, m) in ((d, c) for d in tol for c in cases):
        g = torch.Generator().manual_seed(0)
        n = sum(counts)
        x = torch.randn(n, k, generator=g).to(device, dtype).requires_grad_(True)
        w = (torch.randn(len(counts), k, m, generator=g) / k**0.5).to(device, dtype)
        w.requires_grad_(True)
        dy = torch.randn(n, m, generator=g).to(device, dtype)
        counts_E = torch.tensor(counts, device=device)
        y = K.grouped_gemm(x, w, counts_E)
        y.backward(dy)
        x64 = x.detach().double().requires_grad_(True)
        w64 = w.detach().double().requires_grad_(True)
        y64 = K.grouped_gemm_reference(x64, w64, counts_E)
        y64.backward(dy.double())
        errors = {}
        pairs = (("y", y, y64), ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad))
        for name, got, want in pairs:
            # Elementwise error over tol * (1 + |want|), the bound the tests use.
            got, want = got.detach().double(), want.detach()
            errors[name] = float(((got - want).abs() / (1 + want.abs())).max()) / tol[dtype]
        row = {"dtype": str(dtype).removeprefix("torch."), "counts": counts, "K": k, "M": m,
               "worst_error_over_tolerance": max(errors.values())}
        report.append(row)
        print(f"  {row['dtype']:9s} counts={counts} K={k} M={m}: "
              f"worst error / tolerance = {row['worst_error_over_tolerance']:.3f}")
        if row["worst_error_over_tolerance"] > 1:
            raise AssertionError(f"grouped_gemm disagrees with the float64 reference: {row}")
    return report


def route(tokens: int, experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """Tokens per expert from a random router: top-k of Gaussian logits (about balanced)."""
    logits = torch.randn(tokens, experts, generator=gen)
    indices = logits.topk(top_k, dim=-1).indices
    return torch.bincount(indices.flatten(), minlength=experts)


def loop_matmul(x_NK, w_EKM, counts_E, out_NM):
    """The baseline: one cuBLAS matmul per expert into its slice of the output."""
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        torch.matmul(x_NK[start:start + count], w_EKM[e], out=out_NM[start:start + count])
        start += count
    return out_NM


def make_runners(n, k, m, experts, counts_E, device, backward):
    """One closure per variant computing the same FLOPs: grouped, per-expert loop, one dense."""
    dtype = torch.bfloat16
    x = torch.randn(n, k, device=device, dtype=dtype, requires_grad=backward)
    w = (torch.randn(experts, k, m, device=device, dtype=dtype) / k**0.5).requires_grad_(backward)
    w_dense = w.detach()[0].clone().requires_grad_(backward)
    dy = torch.randn(n, m, device=device, dtype=dtype)
    out = torch.empty(n, m, device=device, dtype=dtype)
    looped = K.grouped_gemm_reference  # differentiable loop for the backward pass

    def finish(y):
        if backward:
            y.backward(dy)
            x.grad = w.grad = w_dense.grad = None

    return {
        "triton": lambda: finish(K.grouped_gemm(x, w, counts_E)),
        "loop": (lambda: finish(looped(x, w, counts_E))) if backward
        else (lambda: loop_matmul(x, w, counts_E, out)),
        "dense": lambda: finish(x @ w_dense),
    }


def summarize(case: dict, samples: dict) -> list[dict]:
    """Median ms, TFLOP/s and ratios to dense and loop (TFLOP/s over TFLOP/s) for one case."""
    flops = 2.0 * case["N"] * case["K"] * case["M"] * (3 if case["pass"] == "fwd+bwd" else 1)
    median = {name: statistics.median(ms) for name, ms in samples.items()}
    tflops = {name: flops / (ms * 1e-3) / 1e12 for name, ms in median.items()}
    return [
        dict(case, variant=name, median_ms=median[name], tflops=tflops[name],
             vs_dense=tflops[name] / tflops["dense"], vs_loop=tflops[name] / tflops["loop"],
             samples_ms=samples[name])
        for name in samples
    ]


def run_timings(device, repeats, iters, quick) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape, d_model, d_ff, experts, top_k, token_counts in SHAPES:
        for tokens in token_counts[:1] if quick else token_counts:
            counts_E = route(tokens, experts, top_k, gen).to(device)
            n = tokens * top_k
            for gemm, k, m in (("up", d_model, d_ff), ("down", d_ff, d_model)):
                for pass_ in ("fwd", "fwd+bwd"):
                    case = {"shape": shape, "tokens": tokens, "top_k": top_k, "E": experts,
                            "gemm": gemm, "N": n, "K": k, "M": m, "pass": pass_,
                            "tokens_per_expert": counts_E.tolist()}
                    runners = make_runners(n, k, m, experts, counts_E, device, pass_ != "fwd")
                    samples = time_interleaved(runners, repeats, iters, seed=len(rows))
                    for row in summarize(case, samples):
                        rows.append(row)
                        if row["variant"] == "triton":
                            print(f"  {shape:7s} {tokens:6d} tok {gemm:4s} {pass_:7s} triton "
                                  f"{row['tflops']:7.1f} TFLOP/s  x{row['vs_dense']:.2f} dense  "
                                  f"x{row['vs_loop']:.2f} loop")
                    del runners
                    torch.cuda.empty_cache()
    return rows


def tune(device, repeats, iters) -> dict:
    """Sweep a few tile sizes at a Mixtral-like GEMM; return the fastest per kernel."""
    _, d_model, d_ff, experts, top_k, token_counts = SHAPES[1]
    tokens = token_counts[2]
    counts_E = route(tokens, experts, top_k, torch.Generator().manual_seed(1)).to(device)
    n = tokens * top_k
    x = torch.randn(n, d_model, device=device, dtype=torch.bfloat16)
    w = torch.randn(experts, d_model, d_ff, device=device, dtype=torch.bfloat16) / d_model**0.5
    dy = torch.randn(n, d_ff, device=device, dtype=torch.bfloat16)
    grouped = K.grouped
    best = {}
    for kind, table in (("forward", TUNE_FORWARD), ("dw", TUNE_DW)):
        runners = {}
        for bm, bn, bk, warps, stages in table:
            t = K.Tiles(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            if kind == "forward":
                runners[json.dumps(t.as_dict())] = (lambda t=t: grouped._launch_forward(
                    x, w, counts_E, t))
            else:
                runners[json.dumps(t.as_dict())] = (lambda t=t: grouped._launch_dw(
                    x, dy, counts_E, t))
        for name in list(runners):  # a tile that needs more shared memory than the GPU has
            try:
                runners[name]()
            except Exception as err:  # triton's OutOfResources and kin
                print(f"  {kind:7s} {name}: skipped ({type(err).__name__})")
                del runners[name]
        samples = time_interleaved(runners, repeats, iters, seed=7)
        medians = {name: statistics.median(ms) for name, ms in samples.items()}
        for name, ms in sorted(medians.items(), key=lambda item: item[1]):
            print(f"  {kind:7s} {name}: {ms:.3f} ms")
        best[kind] = json.loads(min(medians, key=medians.get))
    return best


def command_line(argv: list[str] | None) -> str:
    """The command that produced a result: this script and its arguments, shell-quoted."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "benchmarks/bench_triton.py", *args])


def environment(device) -> dict:
    """GPU, versions and tile settings, and the machine record taken now (before timings)."""
    import triton  # after moe_lab.kernels, which decides how triton is set up

    return {
        "kind": "moe_lab.bench_triton",
        "device": torch.cuda.get_device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "tiles": {kind: K.tiles_for(kind, device, False).as_dict() for kind in ("forward", "dw")},
        "machine_start": machine_record(),
    }


def write_json(directory: Path, stem: str, device_name: str, payload: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}_{slug}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one token count per shape")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3, help="calls per timed sample")
    parser.add_argument("--tune", action="store_true", help="also sweep tile sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.iters < 1:
        parser.error("--repeats and --iters must be at least 1")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = "Triton interpreter on CPU" if K.interpreter_active() else f"compiled on {device}"
    print(f"correctness ({mode}):")
    correctness = check_correctness(device)
    if device.type != "cuda":
        print("timings need a CUDA GPU; none found, so only the correctness check ran.")
        return 0

    header = dict(environment(device), command=command_line(argv))
    print(f"timings on {header['device']} (torch {header['torch']}, triton {header['triton']}):")
    rows = run_timings(device, args.repeats, args.iters, args.quick)
    payload = dict(header, repeats=args.repeats, iters=args.iters, quick=args.quick,
                   correctness=correctness, rows=rows, machine_end=machine_record())
    print(f"wrote {write_json(args.out, 'triton', header['device'], payload)}")
    if args.tune:
        tune_start = machine_record()
        best = tune(device, args.repeats, args.iters)
        tuned = dict(header, kind="moe_lab.tile_tuning", best={header["device"]: best},
                     machine_start=tune_start, machine_end=machine_record())
        print(f"wrote {write_json(args.out, 'tiles', header['device'], tuned)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
