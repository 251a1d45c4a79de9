"""Time one training step of the long-run tiny LM, dense vs each MoE variant, interleaved.

    PYTHONPATH=. python benchmarks/bench_tinylm_step.py --threads 2 --repeats 30
    PYTHONPATH=. python benchmarks/bench_tinylm_step.py --threads 1 --repeats 30 \
        --out benchmarks/results/tinylm_step_time_1thread.json
    PYTHONPATH=. python benchmarks/bench_tinylm_step.py --config wide --repeats 30 \
        --out benchmarks/results/tinylm_wide_step_time.json

Every variant has the dense model's active FFN FLOPs per token, so the ratio to dense is the
price of routing, dispatch, many small expert matmuls and an optimizer step over more
parameters (timed apart: forward+backward, then AdamW). Variants run in rotation in one
process (so machine load hits them alike); medians and the ratio to the dense median are saved,
with the command line and the machine (load average included) before and after the timings.

A variant named ``<variant>_fixed`` (e.g. ``fine_fixed``) is a diagnostic, not a model one
would train: the variant's experts with the routing taken away (``FixedAssignment``). Its step
prices the experts themselves (their small products, their optimizer state); its gap to the
routed variant is what routing costs (router, sort, gathers and scatter-adds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from moe_lab import MoE
from moe_lab.data import get_batch, load_corpus
from moe_lab.model import TinyLM
from moe_lab.provenance import cpu_model, machine_record, quartiles
from moe_lab.train import make_config, make_optimizer


class FixedAssignment(nn.Module):
    """An MoE layer's experts with no router: every token goes to k experts fixed by its
    position, all equally loaded, and gets the mean of their outputs.

    The T tokens, repeated k times, are cut into E contiguous blocks of T*k/E rows, block e for
    expert e (so each token reaches k distinct experts): no router, no sort, no gathers, and
    the experts' own backend on balanced blocks. A diagnostic for the step benchmark only.
    """

    def __init__(self, moe: MoE):
        super().__init__()
        if moe.shared is not None:
            raise ValueError("FixedAssignment takes an MoE without a shared expert")
        self.experts, self.top_k = moe.experts, moe.cfg.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        D, E, k = x.shape[-1], self.experts.num_experts, self.top_k
        x_TD = x.reshape(-1, D)
        T = x_TD.shape[0]
        if (T * k) % E or E % k:
            raise ValueError(f"tokens * top_k = {T * k} must split into {E} blocks, "
                             f"each within one copy of the tokens")
        x_ND = x_TD.repeat(k, 1)  # row j*T + t: token t's j-th copy
        counts_E = torch.full((E,), T * k // E, dtype=torch.long)
        h_ND = self.experts.forward_sorted(x_ND, counts_E)
        return h_ND.view(k, T, D).mean(0).view(x.shape)


def build_model(config: str, variant: str):
    """(TrainConfig, TinyLM) for a variant; ``<variant>_fixed`` swaps each MoE layer for its
    ``FixedAssignment``."""
    base = variant.removesuffix("_fixed")
    cfg = make_config(config, base)
    torch.manual_seed(0)
    model = TinyLM(cfg.model)
    if base != variant:
        for block in model.blocks:
            if not isinstance(block.ffn, MoE):
                raise ValueError(f"{variant!r}: {base!r} has no MoE layers to fix")
            block.ffn = FixedAssignment(block.ffn)
    return cfg, model


def command_line(argv: list[str] | None) -> str:
    """The command that produced a result: this script and its arguments, shell-quoted."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "benchmarks/bench_tinylm_step.py", *args])


def load_1min(record: dict) -> float | None:
    """The 1-minute load average of a machine record (None where the OS has none)."""
    return record["load_average"][0] if record["load_average"] else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="long")
    p.add_argument(
        "--variants", default="dense,moe8,fine,fine32,moe16,fine32k4,shared,top1,nobal"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--max-code-bytes", type=int, default=1_000_000, help="corpus size (speed)")
    p.add_argument("--out", default="benchmarks/results/tinylm_step_time.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_corpus(max_code_bytes=args.max_code_bytes)
    runs = {}
    for v in args.variants.split(","):
        cfg, model = build_model(args.config, v)
        runs[v] = (cfg, model, make_optimizer(model, cfg), [])
    machine_start = machine_record()
    rng = random.Random(0)
    for rep in range(args.repeats + 2):  # the first two rounds are warm-up
        order = list(runs)
        rng.shuffle(order)  # no variant always runs first, or right after the same one
        for cfg, model, opt, times in (runs[v] for v in order):
            x, y, _ = get_batch(corpus, "train", cfg.batch, seed=0, step=rep)
            t0 = time.perf_counter()
            loss = model(x, y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if rep >= 2:
                times.append((t2 - t0, t1 - t0, t2 - t1))  # step, forward+backward, AdamW
    machine_end = machine_record()
    med = {v: [statistics.median(t[i] for t in r[3]) for i in range(3)] for v, r in runs.items()}
    base = med["dense"][0]
    # each round's step time over dense's in that round (variants ran back to back)
    per_round = {v: [t[0] / d[0] for t, d in zip(r[3], runs["dense"][3], strict=True)]
                 for v, r in runs.items()}
    result = {
        "config": args.config,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {cpu_model()}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        # other jobs on the machine, before and after the timings (as in older result files)
        "load_average_1min": [load_1min(machine_start), load_1min(machine_end)],
        "median_step_s": {v: m[0] for v, m in med.items()},
        "median_fwd_bwd_s": {v: m[1] for v, m in med.items()},
        "median_optimizer_s": {v: m[2] for v, m in med.items()},
        "ratio_to_dense": {v: m[0] / base for v, m in med.items()},
        # the per-round ratios' median and spread (first and third quartiles)
        "per_round_ratio_to_dense": {v: statistics.median(r) for v, r in per_round.items()},
        "per_round_ratio_quartiles": {v: quartiles(r) for v, r in per_round.items()},
        "command": command_line(argv),
        "machine_start": machine_start,
        "machine_end": machine_end,
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
