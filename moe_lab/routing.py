"""Routing: router scores, top-k and node-limited selection, noisy gating, capacity, expert choice.

A routing decision is a pair (weights (T, k), indices (T, k)): token t goes to experts
indices[t] with mixing weights weights[t]. Everything downstream (dispatch, losses) reads only
that pair, so a chapter can swap the router without touching the experts.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

from moe_lab.config import (
    SCORES,
    NodeLimit,
    check_capacity_factor,
    check_choice,
    check_int,
    check_positive_int,
)


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape (tokens, num_experts), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert column, got {tuple(logits.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{name} contain NaN or inf; check the router input and its weights")


def _check_indices(indices: torch.Tensor, num_experts: int, name: str = "indices") -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {indices.dtype}")
    if indices.dim() != 2:
        raise ValueError(f"{name} must have shape (tokens, k), got {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_experts):
        raise ValueError(
            f"{name} must lie in [0, num_experts={num_experts}), "
            f"got values in [{int(indices.min())}, {int(indices.max())}]"
        )


def router_probs(logits: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """Per-expert scores in float32 or wider: softmax over experts, or independent sigmoids."""
    check_choice("score", score, SCORES)
    wide = logits if logits.dtype == torch.float64 else logits.float()
    return torch.softmax(wide, dim=-1) if score == "softmax" else torch.sigmoid(wide)


def top_k_routing(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the k best experts per token: logits (T, E) -> (weights (T, k), indices (T, k)).

    Scores are taken over all experts in float32 or wider; the top k are kept and, when
    ``normalize``, rescaled to sum to 1. ``bias`` (E,) shifts which experts are *selected*
    (DeepSeek-V3's auxiliary-loss-free balancing) but not the weights they get.
    """
    _check_logits(logits)
    check_positive_int("k", k)
    num_experts = logits.shape[1]
    if k > num_experts:
        raise ValueError(f"k must be between 1 and num_experts={num_experts}, got {k}")
    check_choice("score", score, SCORES)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (num_experts,):
            raise ValueError(f"bias must have shape ({num_experts},), got {tuple(bias.shape)}")
    return select_top_k(router_probs(logits, score), k, normalize=normalize, bias=bias)


def select_top_k(
    probs_TE: torch.Tensor, k: int, *, normalize: bool, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k_routing`` on scores already computed and checked (the layer's hot path)."""
    if bias is not None:
        _, indices_Tk = torch.topk(probs_TE + bias.to(probs_TE.dtype), k, dim=-1)
        weights_Tk = probs_TE.gather(1, indices_Tk)
    else:
        weights_Tk, indices_Tk = torch.topk(probs_TE, k, dim=-1)
    return _normalized(weights_Tk, normalize), indices_Tk


def _normalized(weights_Tk: torch.Tensor, normalize: bool) -> torch.Tensor:
    if not normalize:
        return weights_Tk
    return weights_Tk / weights_Tk.sum(dim=-1, keepdim=True).clamp_min(1e-20)


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
    """DeepSeek-V3 node-limited routing: top-k among each token's ``max_groups`` best groups.

    Experts form ``num_groups`` equal, contiguous groups; a group scores the sum of its best
    ceil(k / max_groups) expert scores for the token. Returns (weights (T, k), indices (T, k))
    like ``top_k_routing``; ``bias`` shifts group and expert *selection* only, never the weights.
    With max_groups == num_groups this is plain top-k routing.
    """
    limit = NodeLimit(num_groups=num_groups, max_groups=max_groups)
    _check_logits(logits)
    check_positive_int("k", k)
    limit.check(logits.shape[1], k)
    check_choice("score", score, SCORES)
    return select_node_limited(router_probs(logits, score), k, limit, normalize=normalize,
                               bias=bias)


def select_node_limited(
    probs_TE: torch.Tensor,
    k: int,
    limit: NodeLimit,
    *,
    normalize: bool,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``node_limited_top_k`` on scores already computed and checked."""
    if limit.max_groups == limit.num_groups:  # no restriction: plain top-k
        return select_top_k(probs_TE, k, normalize=normalize, bias=bias)
    T, E = probs_TE.shape
    G, M = limit.num_groups, limit.max_groups
    select_TE = probs_TE if bias is None else probs_TE + bias.to(probs_TE.dtype)
    per_group = E // G
    best_in_group = min(per_group, math.ceil(k / M))
    group_TG = select_TE.view(T, G, per_group).topk(best_in_group, dim=-1).values.sum(-1)
    top_groups_TM = group_TG.topk(M, dim=-1).indices  # (T, M)
    allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, top_groups_TM, True)
    allowed_TE = allowed_TG.repeat_interleave(per_group, dim=1)  # (T, E)
    masked_TE = select_TE.masked_fill(~allowed_TE, float("-inf"))
    indices_Tk = masked_TE.topk(k, dim=-1).indices
    weights_Tk = probs_TE.gather(1, indices_Tk)
    return _normalized(weights_Tk, normalize), indices_Tk


def groups_spanned(indices_Tk: torch.Tensor, num_experts: int, num_groups: int) -> torch.Tensor:
    """How many distinct expert groups each token's experts fall in: (T, k) -> (T,)."""
    group_Tk = indices_Tk // (num_experts // num_groups)
    hit_TG = torch.zeros(
        indices_Tk.shape[0], num_groups, dtype=torch.bool, device=indices_Tk.device
    )
    return hit_TG.scatter(1, group_Tk, True).sum(-1)


def noisy_logits(
    clean_TE: torch.Tensor, noise_std_TE: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shazeer et al. (2017) noisy gating: clean + N(0, 1) * softplus(noise logits).

    The noise lets experts that are never picked get picked now and then during training.
    """
    noise = torch.randn(
        clean_TE.shape, generator=generator, dtype=clean_TE.dtype, device=clean_TE.device
    )
    return clean_TE + noise * F.softplus(noise_std_TE)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * top_k * num_tokens / num_experts)."""
    check_int("num_tokens", num_tokens, 0)
    check_positive_int("num_experts", num_experts)
    check_positive_int("top_k", top_k)
    check_capacity_factor(capacity_factor)
    if capacity_factor is None:
        raise ValueError("capacity_factor must be a number > 0 here (None means no capacity)")
    return capacity_slots(num_tokens, num_experts, top_k, capacity_factor)


def capacity_slots(num_tokens, num_experts: int, top_k: int, capacity_factor: float):
    """``expert_capacity`` without checks, in integer arithmetic: the factor is read as the
    fraction it was written as (1.1 -> 11/10), so 1.1 * 2 * 100 / 4 gives 55, not 56, and a
    symbolic token count (torch.compile) stays symbolic instead of forcing a recompile."""
    cf = Fraction(capacity_factor).limit_denominator(10**6)
    return -(-(cf.numerator * top_k * num_tokens) // (cf.denominator * num_experts))


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``indices`` name each expert: (num_experts,) int64.

    Like ``bincount(minlength=E)``, but its shape never depends on the values (a static shape
    under torch.compile); entries equal to ``num_experts`` (a "dropped" bin) are not counted.
    """
    flat = indices.reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))[:num_experts]


def expert_positions(indices_Tk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Queue position of each assignment in its expert, in GShard priority order: (T, k).

    Every token's first choice, in token order, is queued before any second choice, and so on.
    """
    T, k = indices_Tk.shape
    flat = indices_Tk.t().reshape(-1)  # (k*T,) choice-major: all first choices, then seconds
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts  # (E,) first queue slot of each expert
    pos_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    pos = torch.empty_like(flat)
    pos[order] = pos_sorted
    return pos.view(k, T).t()  # (T, k)


def capacity_mask(indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit in their expert's ``capacity`` slots, GShard priority: bool (T, k)."""
    check_positive_int("num_experts", num_experts)
    _check_indices(indices, num_experts)
    check_int("capacity", capacity, 0)
    return expert_positions(indices.long(), num_experts) < capacity


def expert_choice_routing(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhou et al. (2022): each expert picks its top-``capacity`` tokens by softmax score.

    logits (T, E) -> (weights (E, C), token indices (E, C)). A token may be picked by several
    experts or by none; every expert processes exactly C tokens, so load is balanced by design.
    """
    _check_logits(logits)
    T = logits.shape[0]
    check_positive_int("capacity", capacity)
    if capacity > T:
        raise ValueError(f"capacity must be at most the number of tokens ({T}), got {capacity}")
    return torch.topk(router_probs(logits, "softmax").t(), capacity, dim=-1)
