"""The grouped GEMM as a plain PyTorch loop over experts: the reference for the kernel."""

from __future__ import annotations

import torch


def grouped_gemm_reference(x_NK: torch.Tensor, w_EKM: torch.Tensor,
                           tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e], one torch.matmul per expert; differentiable."""
    counts = [int(c) for c in tokens_per_expert_E.tolist()]
    pieces = torch.split(x_NK, counts, dim=0)
    outs = [piece @ w_EKM[e] for e, piece in enumerate(pieces)]
    return torch.cat(outs, dim=0) if outs else x_NK.new_zeros(0, w_EKM.shape[2])
