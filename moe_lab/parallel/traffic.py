"""Communication accounting: who sends how many bytes to whom in one expert-parallel step.

The analytic count needs only the routing decision: a kept assignment of a token to expert e
sends one row of D numbers to rank e // (E/W) in the dispatch, and one row back in the combine.
The measured count comes from the split sizes the layer really passed to all_to_all
(``TrafficLog``); tests check that the two agree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_lab.config import check_positive_int


def dispatch_rows(
    indices_Tk: torch.Tensor, keep_Tk: torch.Tensor | None, num_experts: int, world_size: int
) -> torch.Tensor:
    """Rows this rank sends to each rank in the dispatch: (W,) int64, from routing alone."""
    check_positive_int("world_size", world_size)
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by world_size={world_size}")
    dest_Tk = indices_Tk // (num_experts // world_size)
    kept = dest_Tk if keep_Tk is None else dest_Tk[keep_Tk]
    return torch.bincount(kept.reshape(-1), minlength=world_size)


def step_matrix(rows_WW: torch.Tensor, row_bytes: int, backward: bool = True) -> torch.Tensor:
    """Bytes rank i sends rank j in one step, (W, W): dispatch M, combine M^T, x2 for backward.

    ``rows_WW[i, j]`` is how many rows rank i dispatches to rank j.
    """
    m = rows_WW.to(torch.int64) * row_bytes
    return (m + m.t()) * (2 if backward else 1)


def gather_rows(rows_W: torch.Tensor, group=None) -> torch.Tensor:
    """Stack every rank's (W,) send counts into the (W, W) matrix; row i is rank i's sends."""
    world = dist.get_world_size(group)
    out = [torch.empty_like(rows_W) for _ in range(world)]
    dist.all_gather(out, rows_W.contiguous(), group=group)
    return torch.stack(out)


def node_matrix(m_WW: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """Sum a (W, W) rank matrix into (N, N) node blocks; off-diagonal = cross-node traffic."""
    W = m_WW.shape[0]
    if W % ranks_per_node:
        raise ValueError(f"world size {W} must be divisible by ranks_per_node={ranks_per_node}")
    N = W // ranks_per_node
    return m_WW.reshape(N, ranks_per_node, N, ranks_per_node).sum(dim=(1, 3))


def cross_node_fraction(m_WW: torch.Tensor, ranks_per_node: int) -> float:
    """Share of all bytes that leave their node."""
    n = node_matrix(m_WW, ranks_per_node).double()
    return float((n.sum() - n.diagonal().sum()) / n.sum().clamp_min(1))


def dedup_node_rows(
    indices_Tk: torch.Tensor,
    keep_Tk: torch.Tensor | None,
    num_experts: int,
    num_nodes: int,
) -> torch.Tensor:
    """Token copies this rank sends to each node if each token crosses to a node only once.

    That is DeepSeek-V3's two-level dispatch: one copy per (token, node) over the network, then
    forwarded to the node's GPUs over NVLink. Returns (N,) int64; node-limited routing caps a
    token's copies at M nodes.
    """
    node_Tk = indices_Tk // (num_experts // num_nodes)
    if keep_Tk is not None:
        node_Tk = node_Tk.masked_fill(~keep_Tk, num_nodes)  # dropped: a dummy node, cut below
    hit_TN = torch.zeros(indices_Tk.shape[0], num_nodes + 1, dtype=torch.bool,
                         device=indices_Tk.device)
    hit_TN.scatter_(1, node_Tk, True)
    return hit_TN[:, :num_nodes].sum(0)
