"""Router losses, returned as values (never module state): load balancing and z-loss."""

from __future__ import annotations

import torch

from moe_lab.config import check_positive_int
from moe_lab.routing import _check_indices, expert_counts


def load_balancing_loss(
    probs: torch.Tensor, indices: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch Transformer auxiliary loss: E * sum_e f_e * P_e, equal to 1.0 under perfect balance.

    f_e is the share of the T*k assignments sent to expert e (before any capacity dropping);
    P_e is the mean router probability of e. Only P carries a gradient, as in Switch.
    """
    check_positive_int("num_experts", num_experts)
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        raise TypeError(
            "probs must be a floating-point torch.Tensor of shape (tokens, num_experts)"
        )
    if probs.dim() != 2 or probs.shape[1] != num_experts:
        raise ValueError(
            f"probs must have shape (tokens, num_experts={num_experts}), got {tuple(probs.shape)}"
        )
    _check_indices(indices, num_experts)
    if indices.shape[0] != probs.shape[0]:
        raise ValueError(
            f"indices must have one row per token ({probs.shape[0]}), got {indices.shape[0]}"
        )
    if probs.shape[0] == 0:
        raise ValueError("probs must contain at least one token")
    return balancing_loss(probs, indices, num_experts)


def balancing_loss(probs_TE: torch.Tensor, indices_Tk: torch.Tensor, num_experts: int,
                   counts_E: torch.Tensor | None = None):
    """``load_balancing_loss`` without its checks: the layer's hot path (no host sync).
    ``counts_E``: the assignments per expert in ``indices_Tk``, when the caller has them."""
    if counts_E is None:
        counts_E = expert_counts(indices_Tk, num_experts)
    f_E = counts_E.to(probs_TE.dtype) / indices_Tk.numel()
    return num_experts * torch.sum(f_E * probs_TE.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            "logits must be a floating-point torch.Tensor of shape (tokens, num_experts)"
        )
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(
            f"logits must have shape (tokens >= 1, num_experts), got {tuple(logits.shape)}"
        )
    wide = logits if logits.dtype == torch.float64 else logits.float()
    return torch.logsumexp(wide, dim=-1).pow(2).mean()
