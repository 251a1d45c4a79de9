"""Time the MoE layer's dispatch implementations against a dense FFN of equal active FLOPs.

Every variant runs forward + backward of a whole layer (router and routing included for the MoE
variants). Variants are interleaved in one process (a shuffled order each round), repeated, and
summarised by medians and by the ratio of each median to the dense baseline measured in the same
run, so that other load on the machine hits every variant alike. The result records the
command line and the machine, load average included, before and after the timings.

The dense baseline is a SwiGLU FFN with hidden size k * d_ff: it does the same matmul FLOPs per
token as a top-k MoE whose experts have hidden size d_ff.

    PYTHONPATH=. python benchmarks/bench_dispatch.py --out benchmarks/results/dispatch_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_lab import FFN, MoE, MoEConfig
from moe_lab.dispatch import permute
from moe_lab.provenance import cpu_model, machine_record

# (name, dispatcher, expert backend); "loop", "einsum", "sort" keep backend="auto" (what the
# layer does by default), the "sort+..." variants pin one CPU backend each.
VARIANTS = (
    ("loop", "loop", "auto"),
    ("einsum", "einsum", "auto"),
    ("sort", "sort", "auto"),
    ("sort+loop", "sort", "loop"),
    ("sort+bmm", "sort", "bmm"),
    ("sort+grouped_mm", "sort", "grouped_mm"),
)


def command_line(argv: list[str] | None) -> str:
    """The command that produced a result: this script and its arguments, shell-quoted."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "benchmarks/bench_dispatch.py", *args])


def make_variants(T: int, D: int, Fh: int, E: int, k: int, seed: int = 0):
    """name -> a closure running one forward + backward; plus the MoE's per-expert load."""
    torch.manual_seed(seed)
    x_TD = torch.randn(T, D)
    g_TD = torch.randn(T, D)
    variants = {}

    dense = FFN(D, k * Fh)

    def run_dense():
        x = x_TD.detach().requires_grad_(True)
        (dense(x) * g_TD).sum().backward()

    variants["dense"] = run_dense

    moes = {}
    for name, impl, backend in VARIANTS:
        torch.manual_seed(seed + 1)  # same weights for every variant
        moes[name] = MoE(MoEConfig(d_model=D, d_ff=Fh, num_experts=E, top_k=k, impl=impl,
                                   backend=backend))

        def run_moe(moe=moes[name]):
            x = x_TD.detach().requires_grad_(True)
            out = moe(x)
            ((out.y * g_TD).sum() + 0.01 * out.aux_loss).backward()

        variants[name] = run_moe

    # The expert FFNs alone on tokens already sorted by expert: what sort adds on top is the
    # router, routing, permute (gather) and weighted un-permute (scatter-add).
    sort_moe = moes["sort"]
    with torch.no_grad():
        out = sort_moe(x_TD)
    order, token_of, counts_E = permute(out.indices, None, E)
    x_sorted = x_TD[token_of].contiguous()
    g_sorted = g_TD[token_of].contiguous()

    def run_experts_only():
        x = x_sorted.detach().requires_grad_(True)
        (sort_moe.experts.forward_sorted(x, counts_E) * g_sorted).sum().backward()

    variants["sort_experts_only"] = run_experts_only
    params = [p for m in (dense, *moes.values()) for p in m.parameters()]
    return variants, params, counts_E.tolist(), moes


def bench(T=4096, D=512, Fh=1024, E=8, k=2, repeats=9, warmup=2, threads=2, seed=0):
    """Interleaved timings (seconds) of every variant; returns the result record.

    The machine (CPU, cores, load average, versions, code revision) is recorded just before
    the first timed call and just after the last, so a reader sees how busy it was.
    """
    torch.set_num_threads(threads)
    machine_start = machine_record()
    variants, params, load, moes = make_variants(T, D, Fh, E, k, seed)
    names = list(variants)
    times = {n: [] for n in names}
    rng = random.Random(seed)
    for r in range(warmup + repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(elapsed)
        print(f"round {r + 1}/{warmup + repeats}", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    # each round's own ratio to the dense time of that round: robust to load that drifts
    paired = {
        n: statistics.median(t / d for t, d in zip(v, times["dense"], strict=True))
        for n, v in times.items()
    }
    machine_end = machine_record()
    return {
        "shape": {"tokens": T, "d_model": D, "d_ff": Fh, "num_experts": E, "top_k": k},
        "dense_baseline": f"SwiGLU FFN, hidden size k*d_ff = {k * Fh}",
        "measured": "forward + backward of the whole layer (router and routing included)",
        "variants": {n: {"dispatcher": i, "backend": b} for n, i, b in VARIANTS},
        "auto_backend_chose": {n: m.experts.last_backend for n, m in moes.items()
                               if m.experts.backend == "auto"},
        "tokens_per_expert": load,
        "repeats": repeats,
        "warmup": warmup,
        "times_s": times,
        "median_s": med,
        "ratio_to_dense": {n: med[n] / med["dense"] for n in names},
        "paired_ratio_median": paired,
        "machine": {
            "cpu": cpu_model(),
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "machine_start": machine_start,
        "machine_end": machine_end,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    a = ap.parse_args(argv)
    res = bench(a.tokens, a.d_model, a.d_ff, a.experts, a.top_k, a.repeats, a.warmup, a.threads)
    res["command"] = command_line(argv)
    for n, m in res["median_s"].items():
        print(
            f"{n:>18}: median {m * 1e3:8.1f} ms   x{res['ratio_to_dense'][n]:.2f} of dense"
            f"   (median per-round ratio x{res['paired_ratio_median'][n]:.2f})"
        )
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
