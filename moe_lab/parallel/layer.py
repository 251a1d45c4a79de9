"""ExpertParallelMoE: the MoE layer with its experts sharded over a process group.

Rank r of W holds experts [r*E/W, (r+1)*E/W); the router is replicated. A forward pass:

1. route this rank's tokens locally (same router, same capacity rule as the unsharded layer),
2. sort the kept assignments by expert; experts are contiguous per rank, so this also groups
   them by destination rank,
3. exchange per-expert counts (all-to-all of a (W, E/W) integer table),
4. dispatch: all-to-all the token rows with uneven splits,
5. regroup the received rows by local expert and run the local experts,
6. combine: all-to-all the results back (the reverse splits) and mix them with the weights.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_lab.dispatch import permute
from moe_lab.experts import Experts
from moe_lab.layer import MoE, MoEOutput, route_tokens
from moe_lab.parallel.comm import (
    TrafficLog,
    all_to_all,
    exchange_counts,
    group_rank_size,
    run_collective,
)
from moe_lab.parallel.routing import NodeLimit, node_limited_top_k
from moe_lab.routing import noisy_logits, top_k_routing


@dataclass
class ExpertParallelOutput(MoEOutput):
    """MoEOutput plus what this rank's exchange looked like.

    ``tokens_per_expert`` (E,) is the *local view*, exactly what the unsharded layer returns for
    this rank's tokens; sum it over ranks (all_reduce) for the global load. ``send_rows`` (W,):
    rows this rank sent to each rank; ``recv_rows`` (W,): rows it received from each rank;
    ``local_expert_rows`` (E/W,): rows each local expert processed, from all ranks.
    """

    send_rows: list[int] | None = None
    recv_rows: list[int] | None = None
    local_expert_rows: torch.Tensor | None = None


def config_fingerprint(moe: MoE, world: int, node_limit: NodeLimit | None) -> str:
    """A string that must be identical on every rank for the sharded layer to be consistent."""
    w = moe.router.weight
    return repr((sorted(vars(moe.cfg).items()), world, node_limit, str(w.dtype), tuple(w.shape)))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float64).numpy().tobytes()).hexdigest()[:16]


class ExpertParallelMoE(nn.Module):
    """An MoE layer whose E experts are split over W ranks; forward(x_local) equals MoE(x_local).

    Build it with ``from_moe``. Parameters keep the unsharded names: ``router.weight`` (E, D)
    and a shared expert's ``shared.*`` are replicated; ``experts.w_gate``/``w_up`` (E/W, D, F)
    and ``experts.w_down`` (E/W, F, D) hold this rank's slice. Expert gradients from every
    rank's tokens arrive through the all-to-all's backward (summed over ranks); router and
    shared-expert gradients are local, as in data parallelism.
    """

    def __init__(self, moe: MoE, group=None, *, node_limit: NodeLimit | None = None):
        super().__init__()
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a moe_lab.MoE, got {type(moe).__name__}")
        if node_limit is not None and not isinstance(node_limit, NodeLimit):
            raise TypeError(f"node_limit must be a NodeLimit or None, got {node_limit!r}")
        self.group = group
        self.rank, self.world_size = group_rank_size(group)
        self.cfg, self.node_limit = moe.cfg, node_limit
        self._check_consistent(moe)
        cfg, W = moe.cfg, self.world_size
        self.num_local = cfg.num_experts // W
        self.first_expert = self.rank * self.num_local
        w = moe.router.weight
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False, dtype=w.dtype)
        self.router.to(w.device)
        self.experts = Experts(self.num_local, cfg.d_model, cfg.d_ff, cfg.activation, dtype=w.dtype)
        self.experts.to(w.device)
        self.noise = None
        if moe.noise is not None:
            self.noise = nn.Linear(cfg.d_model, cfg.num_experts, bias=False, dtype=w.dtype)
            self.noise.to(w.device)
        # a shared expert is replicated, like the router: every rank runs it on its own tokens
        self.shared = copy.deepcopy(moe.shared) if moe.shared is not None else None
        self.register_buffer("expert_bias", moe.expert_bias.detach().clone())
        sl = slice(self.first_expert, self.first_expert + self.num_local)
        with torch.no_grad():
            self.router.weight.copy_(w)
            if self.noise is not None:
                self.noise.weight.copy_(moe.noise.weight)
            for name in ("w_gate", "w_up", "w_down"):
                src = getattr(moe.experts, name)
                if src is not None:
                    getattr(self.experts, name).copy_(src[sl])
        self._mm = None
        if cfg.impl == "triton":
            from moe_lab.kernels import grouped_gemm

            self._mm = grouped_gemm
        self.traffic_log: TrafficLog | None = None  # set to a TrafficLog to record bytes sent

    @classmethod
    def from_moe(
        cls, moe: MoE, group=None, *, node_limit: NodeLimit | None = None
    ) -> ExpertParallelMoE:
        """Shard an unsharded ``MoE`` (the same one on every rank) over ``group``.

        Raises ValueError on *every* rank when E is not divisible by W, when the config differs
        between ranks, or when the ranks were handed different weights.
        """
        return cls(moe, group, node_limit=node_limit)

    def _check_consistent(self, moe: MoE) -> None:
        """Gather every rank's fingerprint first, so a bad rank cannot leave the others hanging."""
        cfg, W = moe.cfg, self.world_size
        problems = []
        if cfg.num_experts % W:
            problems.append(
                f"num_experts={cfg.num_experts} is not divisible by the world size {W}"
            )
        if cfg.router != "top_k":
            problems.append(f"router={cfg.router!r} is not supported; use router='top_k'")
        if self.node_limit is not None:
            try:
                self.node_limit.check(cfg.num_experts, cfg.top_k)
            except ValueError as err:
                problems.append(f"node_limit: {err}")
        params = [p for p in moe.parameters()] + [moe.expert_bias]
        mine = {
            "config": config_fingerprint(moe, W, self.node_limit),
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

    def _check_input(self, x: torch.Tensor) -> None:
        D = self.cfg.d_model
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point() or x.dtype != self.router.weight.dtype:
            raise TypeError(
                f"x must have the layer's dtype {self.router.weight.dtype}, got {x.dtype}"
            )
        if x.dim() < 1 or x.shape[-1] != D or x.numel() == 0:
            raise ValueError(f"x must be (..., d_model={D}) with >= 1 token, got {tuple(x.shape)}")

    def route(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing decision (weights (T, k), indices (T, k)), node-limited when asked."""
        cfg = self.cfg
        bias = self.expert_bias if cfg.bias_update_rate > 0 else None
        if self.node_limit is None:
            return top_k_routing(
                logits_TE, cfg.top_k, score=cfg.score, normalize=cfg.normalize_weights, bias=bias
            )
        nl = self.node_limit
        return node_limited_top_k(
            logits_TE, cfg.top_k, nl.num_groups, nl.max_groups,
            score=cfg.score, normalize=cfg.normalize_weights, bias=bias,
        )

    def forward(self, x: torch.Tensor) -> ExpertParallelOutput:
        self._check_input(x)
        cfg, W, El = self.cfg, self.world_size, self.num_local
        x_TD = x.reshape(-1, cfg.d_model)
        E = cfg.num_experts
        logits_TE = self.router(x_TD)
        if self.noise is not None and self.training:
            logits_TE = noisy_logits(logits_TE, self.noise(x_TD))
        # capacity from this rank's own T tokens, as in GShard
        r = route_tokens(cfg, logits_TE, self.route)
        weights_Tk, indices_Tk, keep_Tk = r.weights_Tk, r.indices_Tk, r.keep_Tk

        # Sorted by global expert id = grouped by destination rank, then by its local expert.
        order_N, token_of_N, counts_E = permute(indices_Tk, keep_Tk, E)
        send_WEl = counts_E.view(W, El)
        recv_WEl = exchange_counts(send_WEl, self.group)  # row s: rows rank s sends us
        send_rows = [int(c) for c in send_WEl.sum(1).tolist()]
        recv_rows = [int(c) for c in recv_WEl.sum(1).tolist()]

        x_ND = x_TD[token_of_N]
        x_MD = all_to_all(x_ND, recv_rows, send_rows, self.group,
                          log=self.traffic_log, tag="dispatch")
        # Received rows are grouped by source rank, then local expert; regroup by local expert.
        local_e_M = torch.repeat_interleave(
            torch.arange(El, device=x.device).repeat(W), recv_WEl.reshape(-1)
        )
        by_expert_M = torch.argsort(local_e_M, stable=True)
        x_sorted_MD = x_MD[by_expert_M]
        h_sorted_MD = self.experts.forward_sorted(x_sorted_MD, recv_WEl.sum(0), mm=self._mm)
        if x_MD.shape[0] == 0 and x_MD.requires_grad:
            # No rows for our experts: still link the received (empty) tensor to the output, or
            # autograd skips the dispatch's backward here while the other ranks wait in it.
            h_sorted_MD = x_sorted_MD * 0
        h_MD = h_sorted_MD[torch.argsort(by_expert_M)]  # back to (source rank, expert) order
        h_ND = all_to_all(h_MD, send_rows, recv_rows, self.group,
                          log=self.traffic_log, tag="combine")

        w_N = weights_Tk.to(x.dtype).reshape(-1)[order_N]
        y_TD = torch.zeros_like(x_TD).index_add(0, token_of_N, h_ND * w_N.unsqueeze(-1))
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return ExpertParallelOutput(
            y=y_TD.view(x.shape),
            aux_loss=r.aux_loss,
            z_loss=r.z_loss,
            tokens_per_expert=counts_E,
            dropped=r.dropped,
            indices=indices_Tk,
            weights=weights_Tk,
            send_rows=send_rows,
            recv_rows=recv_rows,
            local_expert_rows=recv_WEl.sum(0),
        )

    def global_tokens_per_expert(self, out: MoEOutput) -> torch.Tensor:
        """Sum the local ``tokens_per_expert`` over the group: the load of each expert, (E,)."""
        total_E = out.tokens_per_expert.clone()
        run_collective("all_reduce of tokens_per_expert",
                       lambda: dist.all_reduce(total_E, group=self.group), self.group)
        return total_E

    @torch.no_grad()
    def update_bias(self, out: MoEOutput, rate: float | None = None) -> None:
        """DeepSeek-V3 bias step on the *global* load, so every rank's replica stays equal."""
        rate = self.cfg.bias_update_rate if rate is None else rate
        load_E = self.global_tokens_per_expert(out).to(self.expert_bias.dtype)
        self.expert_bias += rate * torch.sign(load_E.mean() - load_E)
