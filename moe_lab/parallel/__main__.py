"""torchrun entry point: build a seeded layer, run EP forward/backward, compare on every rank.

    torchrun --standalone --nproc_per_node=4 -m moe_lab.parallel --check

Every rank prints one line; with ``--check`` the exit status is 1 when any rank differs from
the unsharded layer. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

from moe_lab.parallel.checks import equivalence
from moe_lab.parallel.launch import default_backend, device_for_rank

TOLERANCE = 1e-10  # float64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_lab.parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if EP differs from unsharded")
    p.add_argument("--experts", type=int, default=8, help="number of experts E")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=6, help="tokens on rank 0 (rank r: +3r)")
    p.add_argument("--capacity-factor", type=float, default=1.0,
                   help="capacity case to run besides dropless")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl if CUDA)")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="process-group timeout: a dead rank makes the others fail after this")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("run me under torchrun, e.g. torchrun --standalone --nproc_per_node=2 "
              "-m moe_lab.parallel --check", file=sys.stderr)
        return 2
    backend = args.backend or default_backend()
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    device_for_rank(backend, int(os.environ.get("LOCAL_RANK", rank)))
    common = {"num_experts": args.experts, "top_k": args.top_k, "tokens": args.tokens,
              "seed": args.seed}
    cases = [dict(common), dict(common, capacity_factor=args.capacity_factor)]
    results = equivalence(cases)
    ok = True
    for case, res in zip(cases, results, strict=True):
        worst = max(res[k] for k in ("y", "aux_loss", "z_loss", "x_grad", "expert_grad",
                                     "router_grad"))
        good = worst < TOLERANCE and res["ints_equal"]
        ok &= good
        cap = case.get("capacity_factor")
        print(f"rank {rank}/{world} [{backend}] capacity_factor={cap}: sent rows "
              f"{res['send_rows']}, dropped {res['dropped']}, max|EP - unsharded| = {worst:.1e} "
              f"(outputs, losses, input/expert/router grads) -> {'OK' if good else 'MISMATCH'}",
              flush=True)
    flags = torch.tensor([int(ok)], device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"EP={world} equals the unsharded layer on every rank: {bool(flags.item())}")
    dist.destroy_process_group()
    return 0 if (flags.item() or not args.check) else 1


if __name__ == "__main__":
    sys.exit(main())
