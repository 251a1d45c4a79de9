"""How many distinct experts a decode step touches, in expectation and in a real model.

A decode step of B sequences sends B tokens through each MoE layer; the layer must read the
weights of every expert at least one of them picked. If each token picks k of E experts
uniformly without replacement, expert e is missed by one token with probability
C(E-1, k) / C(E, k) = 1 - k/E, by all B tokens (independent) with probability (1 - k/E)^B, so

    E[distinct experts] = E * (1 - (1 - k/E)^B)

by linearity of expectation. A trained router is not uniform: popular experts are shared more
often, so real batches touch fewer experts than this (``measured_touched``).
"""

from __future__ import annotations

import torch

from moe_lab.config import check_int


def _check_ek(num_experts, top_k) -> None:
    check_int("num_experts", num_experts, 1)
    check_int("top_k", top_k, 1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")


def expected_touched(num_experts: int, top_k: int, batch: int) -> float:
    """E (1 - (1 - k/E)^B): distinct experts B uniform top-k tokens touch, on average."""
    _check_ek(num_experts, top_k)
    check_int("batch", batch, 1)
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def simulate_touched(
    num_experts: int, top_k: int, batch: int, *, trials: int = 1000, seed: int = 0
) -> torch.Tensor:
    """(trials,) distinct-expert counts of batches of B tokens, each picking k distinct experts
    uniformly at random (the top k of E random scores)."""
    _check_ek(num_experts, top_k)
    check_int("batch", batch, 1)
    check_int("trials", trials, 1)
    g = torch.Generator().manual_seed(seed)
    scores_NBE = torch.rand(trials, batch, num_experts, generator=g)
    idx_NBk = scores_NBE.topk(top_k, dim=-1).indices
    return distinct_per_group(idx_NBk.reshape(trials, batch * top_k), num_experts)


def distinct_per_group(idx_GM: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(G,) number of distinct values in each row of an integer tensor (G, M) of expert ids."""
    if not isinstance(idx_GM, torch.Tensor) or idx_GM.dtype != torch.long or idx_GM.dim() != 2:
        raise TypeError("idx must be an int64 tensor of shape (groups, assignments)")
    check_int("num_experts", num_experts, 1)
    if idx_GM.numel() and (int(idx_GM.min()) < 0 or int(idx_GM.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts})")
    hit_GE = torch.zeros(idx_GM.shape[0], num_experts, dtype=torch.bool)
    hit_GE.scatter_(1, idx_GM, True)
    return hit_GE.sum(dim=1)


def measured_touched(idx_NLk: torch.Tensor, num_experts: int, batch: int) -> float:
    """Mean distinct experts per decode step of ``batch`` sequences, from real routing.

    idx_NLk: one MoE layer's choices for N sequences of L positions. A decode step at
    position t holds one token from each of B sequences, so sequences are grouped B at a
    time (N // B groups; the rest is left out) and the distinct experts of each (group,
    position) are counted and averaged."""
    if not isinstance(idx_NLk, torch.Tensor) or idx_NLk.dim() != 3:
        raise TypeError("idx must be a tensor of shape (sequences, positions, k)")
    check_int("batch", batch, 1)
    N, L, k = idx_NLk.shape
    groups = N // batch
    if groups < 1:
        raise ValueError(f"batch={batch} exceeds the {N} sequences given")
    idx_GBLk = idx_NLk[: groups * batch].reshape(groups, batch, L, k)
    idx_GLM = idx_GBLk.permute(0, 2, 1, 3).reshape(groups * L, batch * k)
    return float(distinct_per_group(idx_GLM.long(), num_experts).double().mean())
