"""Expert granularity at equal active FLOPs: the MoE layer's time against a dense FFN, per shape.

For each (E, k, d_ff), a top-k MoE layer whose experts have hidden size d_ff does the matmul
FLOPs of a dense SwiGLU FFN of hidden size k * d_ff. Every dispatcher x CPU backend, the dense
FFN and (when transformers is installed) its Mixtral block run forward and backward, timed
apart, interleaved in a shuffled order each round, in one process; the result keeps medians and
each round's ratio to the dense time of that round, with the machine and its load recorded
before and after. In the same rounds, the experts' matrix products alone (balanced blocks, no
routing, gathers or activations) are timed against the dense FFN's: how much of the layer's
cost is the matmuls' shape on this machine, which no dispatcher can remove.

    PYTHONPATH=. python benchmarks/bench_shapes.py --out benchmarks/results/dispatch_shapes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_lab import FFN, MoE, MoEConfig
from moe_lab.provenance import machine_record, quartiles

SHAPES = [(8, 2, 1024), (16, 4, 512), (32, 4, 512), (64, 8, 256), (128, 8, 256), (256, 8, 128)]
# (name, dispatcher, backend)
LAYERS = [("sort+auto", "sort", "auto"), ("sort+bmm", "sort", "bmm"),
          ("sort+grouped_mm", "sort", "grouped_mm"), ("sort+loop", "sort", "loop"),
          ("einsum+auto", "einsum", "auto"), ("loop", "loop", "auto")]
EINSUM_LIMIT_BYTES = 2**28  # skip einsum where one (T, E, C) tensor passes 256 MiB


def mixtral_block(D: int, F: int, E: int, k: int):
    """transformers' Mixtral sparse-MoE block (eager), or None when transformers is absent."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=k)
    return MixtralSparseMoeBlock(cfg)


def variants_for(T: int, D: int, E: int, k: int, F: int, seed: int = 0) -> dict:
    """name -> module returning y (a tensor) for x (T, D); MoE layers unwrapped to y."""
    torch.manual_seed(seed)
    out = {"dense": FFN(D, k * F)}
    for name, impl, backend in LAYERS:
        if impl == "einsum" and T * E * (2 * k * T // E) * 4 > EINSUM_LIMIT_BYTES:
            continue
        if impl == "loop" and E > 64:
            continue  # one Python pass per expert: minutes per round, nothing new to learn
        torch.manual_seed(seed + 1)
        out[name] = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, impl=impl,
                                  backend=backend))
    block = mixtral_block(D, F, E, k)
    if block is not None:
        out["mixtral"] = block
    # the floor: the same matmuls alone, E balanced blocks of T*k/E rows against one of T rows
    out["matmuls"] = MatmulsOnly(E, T * k // E, D, F, seed)
    out["dense_matmuls"] = MatmulsOnly(1, T, D, k * F, seed)
    return out


class MatmulsOnly:
    """The matrix products of a SwiGLU FFN's forward and backward and nothing else, for E
    experts of ``rows`` rows each (E=1: the dense FFN): the floor no dispatch can go under
    on this machine, since it has no routing, no gathers and no elementwise work.

    Forward: x W_gate, x W_up, h W_down per expert; backward: g W_down^T, h^T g, x^T g_gate,
    x^T g_up, g_up W_up^T, g_gate W_gate^T, each written into a preallocated buffer.
    """

    def __init__(self, E: int, rows: int, D: int, F: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=gen)

        self.x, self.g, self.h = rand(E, rows, D), rand(E, rows, D), rand(E, rows, F)
        self.w_gate, self.w_up, self.w_down = rand(E, D, F), rand(E, D, F), rand(E, F, D)
        # every product writes its own output, as in a layer (a reused buffer would stay in
        # cache and flatter the floor)
        self.out_F = [torch.empty(E, rows, F) for _ in range(3)]
        self.out_D = [torch.empty(E, rows, D) for _ in range(3)]
        self.grad_DF = [torch.empty(E, D, F) for _ in range(2)]
        self.grad_FD = torch.empty(E, F, D)

    def parameters(self):
        return []

    def forward_s(self) -> float:
        (gate, up, _), (y, _, _) = self.out_F, self.out_D
        t0 = time.perf_counter()
        for e in range(len(self.x)):
            torch.mm(self.x[e], self.w_gate[e], out=gate[e])
            torch.mm(self.x[e], self.w_up[e], out=up[e])
            torch.mm(self.h[e], self.w_down[e], out=y[e])
        return time.perf_counter() - t0

    def backward_s(self) -> float:
        (_, _, g_h), (_, g_x1, g_x2) = self.out_F, self.out_D
        g_gate, g_up = self.grad_DF
        t0 = time.perf_counter()
        for e in range(len(self.x)):
            x, g, h = self.x[e], self.g[e], self.h[e]
            torch.mm(g, self.w_down[e].t(), out=g_h[e])
            torch.mm(h.t(), g, out=self.grad_FD[e])
            torch.mm(x.t(), h, out=g_gate[e])
            torch.mm(x.t(), h, out=g_up[e])
            torch.mm(h, self.w_up[e].t(), out=g_x1[e])
            torch.mm(h, self.w_gate[e].t(), out=g_x2[e])
        return time.perf_counter() - t0


def time_one(module, x_TD, g_TD) -> tuple[float, float]:
    """Seconds of one forward and of its backward."""
    if isinstance(module, MatmulsOnly):
        return module.forward_s(), module.backward_s()
    x = x_TD.detach().requires_grad_(True)
    t0 = time.perf_counter()
    out = module(x)
    y = out.y if hasattr(out, "y") else out
    t1 = time.perf_counter()
    (y * g_TD).sum().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def bench_shape(T, D, E, k, F, repeats, warmup, seed=0) -> dict:
    mods = variants_for(T, D, E, k, F, seed)
    # (1, T, D): the Mixtral block wants (batch, sequence, d_model); the others flatten it
    x_TD, g_TD = torch.randn(1, T, D), torch.randn(1, T, D)
    fwd = {n: [] for n in mods}
    bwd = {n: [] for n in mods}
    rng = random.Random(seed)
    for r in range(warmup + repeats):
        order = list(mods)
        rng.shuffle(order)
        for name in order:
            for p in mods[name].parameters():
                p.grad = None
            f, b = time_one(mods[name], x_TD, g_TD)
            if r >= warmup:
                fwd[name].append(f)
                bwd[name].append(b)
    total = {n: [f + b for f, b in zip(fwd[n], bwd[n], strict=True)] for n in mods}
    paired = {n: [t / d for t, d in zip(v, total["dense"], strict=True)]
              for n, v in total.items()}
    med = statistics.median
    return {
        "E": E, "k": k, "d_ff": F, "tokens": T, "d_model": D,
        "forward_s": {n: med(v) for n, v in fwd.items()},
        "backward_s": {n: med(v) for n, v in bwd.items()},
        "total_s": {n: med(v) for n, v in total.items()},
        "paired_ratio": {n: med(r) for n, r in paired.items()},
        # the spread over rounds: first and third quartiles of the same per-round ratios
        "paired_ratio_quartiles": {n: quartiles(r) for n, r in paired.items()},
        # the experts' matmuls alone against the dense FFN's, per round
        "matmul_ratio": med(e / d for e, d in zip(total["matmuls"], total["dense_matmuls"],
                                                  strict=True)),
        "auto_chose": {n: m.experts.last_backend for n, m in mods.items()
                       if isinstance(m, MoE) and m.experts.backend == "auto"},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_shapes.py", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default=",".join(f"{e}:{k}:{f}" for e, k, f in SHAPES),
                   help="E:k:d_ff,... (default: the six of the sweep)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(":")) for s in a.shapes.split(",")]
    torch.set_num_threads(a.threads)
    start = machine_record()
    rows = []
    for E, k, F in shapes:
        rows.append(bench_shape(a.tokens, a.d_model, E, k, F, a.repeats, a.warmup))
        print(f"E={E:>3} k={k} d_ff={F:>4}: " + ", ".join(
            f"{n} {r:.2f}x" for n, r in rows[-1]["paired_ratio"].items()), flush=True)
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    result = {
        "command": shlex.join(["python", "benchmarks/bench_shapes.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "measured": "forward and backward timed apart; medians over rounds; paired_ratio: "
                    "median over rounds of (fwd+bwd) / dense (fwd+bwd) of that round",
        "dense_baseline": "SwiGLU FFN of hidden size k * d_ff (equal active matmul FLOPs)",
        "matmuls": "the 9 matrix products of a SwiGLU FFN's forward and backward alone, per "
                   "expert on a balanced block of tokens * k / E rows ('matmuls') or on all "
                   "tokens at hidden size k * d_ff ('dense_matmuls'); matmul_ratio: median "
                   "over rounds of matmuls / dense_matmuls",
        "spread": "paired_ratio_quartiles: first and third quartiles over rounds of the "
                  "per-round ratios whose median is paired_ratio",
        "threads": a.threads,
        "transformers": tf_version,
        "shapes": rows,
        "machine_start": start,
        "machine_end": machine_record(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
