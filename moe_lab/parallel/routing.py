"""Node-limited routing (DeepSeek-V3): a token's k experts span at most M groups (nodes).

Experts are split into G equal, contiguous groups (group g holds experts [g*E/G, (g+1)*E/G),
the experts of one node when ranks are laid out node by node). Each group is scored by the sum
of its best ceil(k/M) expert scores for the token; the token keeps its M best groups and picks
its top k experts among them only. With M = G this is plain top-k routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_lab.config import check_positive_int
from moe_lab.routing import router_probs, top_k_routing


@dataclass(kw_only=True, frozen=True)
class NodeLimit:
    """Route each token to experts in at most ``max_groups`` of ``num_groups`` expert groups."""

    num_groups: int
    max_groups: int

    def __post_init__(self):
        check_positive_int("num_groups", self.num_groups)
        check_positive_int("max_groups", self.max_groups)
        if self.max_groups > self.num_groups:
            raise ValueError(
                f"max_groups must be between 1 and num_groups={self.num_groups}, "
                f"got {self.max_groups}"
            )

    def check(self, num_experts: int, k: int) -> None:
        """Raise ValueError unless E experts split evenly into groups and M groups can hold k."""
        if num_experts % self.num_groups:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by num_groups={self.num_groups}"
            )
        per_group = num_experts // self.num_groups
        if k > self.max_groups * per_group:
            raise ValueError(
                f"top_k={k} cannot fit in max_groups={self.max_groups} groups of {per_group} "
                "experts; raise max_groups"
            )


def node_limited_top_k(
    logits: torch.Tensor,
    k: int,
    num_groups: int,
    max_groups: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing restricted to each token's ``max_groups`` best groups: (T, E) -> (T, k)x2.

    Returns (weights (T, k), indices (T, k)) like ``moe_lab.routing.top_k_routing``; ``bias``
    shifts group and expert *selection* only, never the weights (DeepSeek-V3).
    """
    limit = NodeLimit(num_groups=num_groups, max_groups=max_groups)
    weights_Tk, indices_Tk = top_k_routing(logits, k, score=score, normalize=False, bias=bias)
    T, E = logits.shape
    limit.check(E, k)
    if max_groups == num_groups:  # no restriction: plain top-k
        return _normalized(weights_Tk, normalize), indices_Tk
    probs_TE = router_probs(logits, score)
    select_TE = probs_TE if bias is None else probs_TE + bias.to(probs_TE.dtype)
    per_group = E // num_groups
    best_in_group = min(per_group, math.ceil(k / max_groups))
    group_TG = select_TE.view(T, num_groups, per_group).topk(best_in_group, dim=-1).values.sum(-1)
    top_groups_TM = group_TG.topk(max_groups, dim=-1).indices  # (T, M)
    allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, top_groups_TM, True)
    allowed_TE = allowed_TG.repeat_interleave(per_group, dim=1)  # (T, E)
    masked_TE = select_TE.masked_fill(~allowed_TE, float("-inf"))
    indices_Tk = masked_TE.topk(k, dim=-1).indices
    weights_Tk = probs_TE.gather(1, indices_Tk)
    return _normalized(weights_Tk, normalize), indices_Tk


def _normalized(weights_Tk: torch.Tensor, normalize: bool) -> torch.Tensor:
    if not normalize:
        return weights_Tk
    return weights_Tk / weights_Tk.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def groups_spanned(indices_Tk: torch.Tensor, num_experts: int, num_groups: int) -> torch.Tensor:
    """How many distinct groups each token's experts fall in: (T, k) -> (T,)."""
    group_Tk = indices_Tk // (num_experts // num_groups)
    hit_TG = torch.zeros(
        indices_Tk.shape[0], num_groups, dtype=torch.bool, device=indices_Tk.device
    )
    return hit_TG.scatter(1, group_Tk, True).sum(-1)
