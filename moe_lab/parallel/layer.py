"""Expert parallelism: the MoE layer with an all-to-all dispatcher and a slice of the experts.

Rank r of W holds experts [r*E/W, (r+1)*E/W); the router (and a shared expert) is replicated.
``ExpertParallelMoE`` *is* ``MoE``: the same router, forward and combine; only its dispatcher
and its experts differ. The all-to-all dispatcher:

1. sorts the kept assignments by expert; experts are contiguous per rank, so this also groups
   them by destination rank,
2. exchanges per-expert counts (all-to-all of a (W, E/W) integer table; a host sync: the
   split sizes),
3. dispatch: all-to-all of the token rows with uneven splits,
4. regroups the received rows by local expert and runs the local experts (their backend),
5. combine: all-to-all of the results back (the reverse splits), mixed with the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_lab.config import NodeLimit
from moe_lab.dispatch import combine, permute
from moe_lab.experts import Experts
from moe_lab.layer import MoE, MoEOutput
from moe_lab.parallel.comm import (
    TrafficLog,
    all_to_all,
    exchange_counts,
    group_rank_size,
    run_collective,
)
from moe_lab.router import Router, RoutingDecision


@dataclass
class ExpertParallelOutput(MoEOutput):
    """MoEOutput plus what this rank's exchange looked like.

    ``tokens_per_expert`` (E,) is the *local view*, exactly what the unsharded layer returns for
    this rank's tokens; sum it over ranks (``global_tokens_per_expert``) for the global load.
    ``send_rows`` (W,): rows this rank sent to each rank; ``recv_rows`` (W,): rows it received
    from each rank; ``local_expert_rows`` (E/W,): rows each local expert processed.
    """

    send_rows: list[int] | None = None
    recv_rows: list[int] | None = None
    local_expert_rows: torch.Tensor | None = None


class AllToAllDispatcher:
    """Dispatch over a process group: rows travel to the rank holding their expert and back."""

    name = "all_to_all"

    def __init__(self, group, num_experts: int):
        self.group = group
        self.rank, self.world_size = group_rank_size(group)
        self.num_experts = num_experts
        self.traffic_log: TrafficLog | None = None  # set to a TrafficLog to record bytes sent
        self.last: dict = {}  # the latest exchange: send_rows, recv_rows, local_expert_rows

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(world_size={self.world_size}, rank={self.rank})"

    def __call__(self, x_TD, routing: RoutingDecision, experts: Experts) -> torch.Tensor:
        W, E, El = self.world_size, self.num_experts, experts.num_experts
        # Sorted by global expert id = grouped by destination rank, then by its local expert.
        order_N, token_of_N, counts_E = permute(routing.indices_Tk, routing.keep_Tk, E,
                                            routing.tokens_per_expert)
        send_WEl = counts_E.view(W, El)
        recv_WEl = exchange_counts(send_WEl, self.group)  # row s: rows rank s sends us
        send_rows = [int(c) for c in send_WEl.sum(1).tolist()]
        recv_rows = [int(c) for c in recv_WEl.sum(1).tolist()]

        x_ND = x_TD.index_select(0, token_of_N)
        x_MD = all_to_all(x_ND, recv_rows, send_rows, self.group,
                          log=self.traffic_log, tag="dispatch")
        # Received rows are grouped by source rank, then local expert; regroup by local expert.
        local_e_M = torch.repeat_interleave(
            torch.arange(El, device=x_TD.device).repeat(W), recv_WEl.reshape(-1)
        )
        by_expert_M = torch.argsort(local_e_M, stable=True)
        x_sorted_MD = x_MD[by_expert_M]
        h_sorted_MD = experts.forward_sorted(x_sorted_MD, recv_WEl.sum(0))
        if x_MD.shape[0] == 0 and x_MD.requires_grad:
            # No rows for our experts: still link the received (empty) tensor to the output, or
            # autograd skips the dispatch's backward here while the other ranks wait in it.
            h_sorted_MD = x_sorted_MD * 0
        h_MD = h_sorted_MD[torch.argsort(by_expert_M)]  # back to (source rank, expert) order
        h_ND = all_to_all(h_MD, send_rows, recv_rows, self.group,
                          log=self.traffic_log, tag="combine")
        self.last = {"send_rows": send_rows, "recv_rows": recv_rows,
                     "local_expert_rows": recv_WEl.sum(0)}
        w_N = routing.weights_Tk.to(x_TD.dtype).reshape(-1)[order_N]
        return combine(x_TD, h_ND, token_of_N, w_N)

    def reduce_load(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Sum each rank's load per expert over the group: the global load, (E,)."""
        total_E = tokens_per_expert.clone()
        run_collective("all_reduce of tokens_per_expert",
                       lambda: dist.all_reduce(total_E, group=self.group), self.group)
        return total_E


def config_fingerprint(moe: MoE, world: int, node_limit: NodeLimit | None) -> str:
    """A string that must be identical on every rank for the sharded layer to be consistent."""
    w = moe.router.weight
    return repr((sorted(vars(moe.cfg).items()), world, node_limit, str(w.dtype), tuple(w.shape)))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float64).numpy().tobytes()).hexdigest()[:16]


class ExpertParallelMoE(MoE):
    """An MoE layer whose E experts are split over W ranks; forward(x_local) equals MoE(x_local).

    Build it with ``from_moe``. Parameters keep the unsharded names: ``router.weight`` (E, D)
    and a shared expert's ``shared.*`` are replicated; ``experts.w_gate``/``w_up`` (E/W, D, F)
    and ``experts.w_down`` (E/W, F, D) hold this rank's slice. Expert gradients from every
    rank's tokens arrive through the all-to-all's backward (summed over ranks); router and
    shared-expert gradients are local, as in data parallelism.
    """

    def __init__(self, moe: MoE, group=None, *, node_limit: NodeLimit | None = None):
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a moe_lab.MoE, got {type(moe).__name__}")
        if node_limit is not None and not isinstance(node_limit, NodeLimit):
            raise TypeError(f"node_limit must be a NodeLimit or None, got {node_limit!r}")
        torch.nn.Module.__init__(self)
        self.group = group
        self.rank, self.world_size = group_rank_size(group)
        self._check_consistent(moe, node_limit)
        cfg = moe.cfg if node_limit is None else dataclasses.replace(moe.cfg, node_limit=node_limit)
        self.cfg, self.node_limit = cfg, cfg.node_limit
        self.num_local = cfg.num_experts // self.world_size
        self.first_expert = self.rank * self.num_local
        w = moe.router.weight
        self.router = Router(cfg).to(w.device, w.dtype)
        self.router.load_state_dict(moe.router.state_dict())
        self.experts = moe.experts.slice(self.first_expert, self.num_local)
        # a shared expert is replicated, like the router: every rank runs it on its own tokens
        self.shared = copy.deepcopy(moe.shared) if moe.shared is not None else None
        self.dispatcher = AllToAllDispatcher(group, cfg.num_experts)

    @classmethod
    def from_moe(
        cls, moe: MoE, group=None, *, node_limit: NodeLimit | None = None
    ) -> ExpertParallelMoE:
        """Shard an unsharded ``MoE`` (the same one on every rank) over ``group``.

        Raises ValueError on *every* rank when E is not divisible by W, when the config differs
        between ranks, or when the ranks were handed different weights.
        """
        return cls(moe, group, node_limit=node_limit)

    @property
    def traffic_log(self) -> TrafficLog | None:
        """Set to a ``TrafficLog`` to record the bytes each all-to-all sends."""
        return self.dispatcher.traffic_log

    @traffic_log.setter
    def traffic_log(self, log: TrafficLog | None) -> None:
        self.dispatcher.traffic_log = log

    def _check_consistent(self, moe: MoE, node_limit: NodeLimit | None) -> None:
        """Gather every rank's fingerprint first, so a bad rank cannot leave the others hanging."""
        cfg, W = moe.cfg, self.world_size
        problems = []
        if cfg.num_experts % W:
            problems.append(
                f"num_experts={cfg.num_experts} is not divisible by the world size {W}"
            )
        if node_limit is not None:
            try:
                node_limit.check(cfg.num_experts, cfg.top_k)
            except ValueError as err:
                problems.append(f"node_limit: {err}")
            if cfg.router != "top_k":
                problems.append("node_limit needs router='top_k'")
        params = [p for p in moe.parameters()] + [moe.expert_bias]
        mine = {
            "config": config_fingerprint(moe, W, node_limit),
            "weights": _digest(torch.cat([p.reshape(-1) for p in params])),
            "problems": problems,
        }
        gathered: list[dict] = [None] * W  # type: ignore[list-item]
        run_collective(
            "config check (all_gather_object)",
            lambda: dist.all_gather_object(gathered, mine, group=self.group),
            self.group,
        )
        errors = [f"rank {r}: {p}" for r, g in enumerate(gathered) for p in g["problems"]]
        configs = [g["config"] for g in gathered]
        if len(set(configs)) > 1:
            bad = [r for r, c in enumerate(configs) if c != configs[0]]
            errors.append(f"ranks {bad} have a different MoEConfig/dtype/node_limit than rank 0")
        digests = [g["weights"] for g in gathered]
        if len(set(configs)) == 1 and len(set(digests)) > 1:
            bad = [r for r, d in enumerate(digests) if d != digests[0]]
            errors.append(
                f"ranks {bad} were given different MoE weights than rank 0 "
                "(seed the model identically on every rank before from_moe)"
            )
        if errors:
            raise ValueError(
                f"ExpertParallelMoE on rank {self.rank} of {W}: inconsistent setup: "
                + "; ".join(errors)
            )

    def forward(self, x: torch.Tensor) -> ExpertParallelOutput:
        out = super().forward(x)
        return ExpertParallelOutput(**vars(out), **self.dispatcher.last)

    def global_tokens_per_expert(self, out: MoEOutput) -> torch.Tensor:
        """Sum the local ``tokens_per_expert`` over the group: the load of each expert, (E,)."""
        return self.dispatcher.reduce_load(out.tokens_per_expert)
