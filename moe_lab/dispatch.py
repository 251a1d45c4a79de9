"""Dispatch and combine: send tokens to their experts and mix the results back, three ways.

All implementations take the same routing decision and return the same output:

    y[t] = sum_j keep[t, j] * weights[t, j] * Expert_{indices[t, j]}(x[t])

- ``loop``: for each expert, gather its tokens, run it, scatter-add back. Easiest to read.
- ``einsum``: GShard's one-hot dispatch and combine tensors of shape (T, E, C). Dense, static
  shapes (good for TPUs), but memory grows as T * E * C.
- ``sort``: sort assignments by expert, gather once, run each expert on a contiguous block,
  weighted scatter-add back (MegaBlocks-style permute/unpermute). What production code does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_lab.experts import Experts, GroupedMM
from moe_lab.routing import expert_positions

DispatchFn = Callable[..., torch.Tensor]


def dispatch_loop(x_TD, weights_Tk, indices_Tk, keep_Tk, experts: Experts, capacity=None):
    """Per-expert loop: for each expert, the (token, slot) pairs routed to it."""
    y_TD = torch.zeros_like(x_TD)
    selected_Tk = indices_Tk if keep_Tk is None else indices_Tk.masked_fill(~keep_Tk, -1)
    for e in range(experts.num_experts):
        tok, slot = torch.where(selected_Tk == e)  # (n_e,), (n_e,)
        if tok.numel() == 0:
            continue
        out_nD = experts.forward_expert(e, x_TD[tok])
        y_TD = y_TD.index_add(0, tok, out_nD * weights_Tk[tok, slot].unsqueeze(-1))
    return y_TD


def dispatch_einsum(x_TD, weights_Tk, indices_Tk, keep_Tk, experts: Experts, capacity=None):
    """GShard: one-hot dispatch (T, E, C) in, batched experts, weighted combine (T, E, C) out.

    With capacity=None (dropless), C is the busiest expert's load, so nothing is dropped.
    """
    T, k = indices_Tk.shape
    E = experts.num_experts
    pos_Tk = expert_positions(indices_Tk, E)
    if keep_Tk is None:
        keep_Tk = torch.ones_like(indices_Tk, dtype=torch.bool)
    if capacity is None:
        capacity = int(torch.bincount(indices_Tk.reshape(-1), minlength=E).max()) if T else 0
    C = capacity
    tok = torch.arange(T, device=x_TD.device).unsqueeze(1).expand(T, k)[keep_Tk]  # (n,)
    e_idx, c_idx = indices_Tk[keep_Tk], pos_Tk[keep_Tk]  # (n,), (n,)
    w = weights_Tk[keep_Tk]  # (n,)
    dispatch_TEC = x_TD.new_zeros(T, E, C).index_put((tok, e_idx, c_idx), torch.ones_like(w))
    combine_TEC = x_TD.new_zeros(T, E, C).index_put((tok, e_idx, c_idx), w)
    x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
    h_ECD = experts.forward_batched(x_ECD)
    return torch.einsum("tec,ecd->td", combine_TEC, h_ECD)


def permute(indices_Tk: torch.Tensor, keep_Tk: torch.Tensor | None, num_experts: int):
    """Sort the kept assignments by expert (stable): returns (order, token_of, counts_E).

    ``order`` indexes the flattened (T*k,) assignments; ``token_of[i]`` is the token of the i-th
    sorted assignment; ``counts_E[e]`` how many sorted rows belong to expert e.
    """
    k = indices_Tk.shape[1]
    flat_e = indices_Tk.reshape(-1)  # (T*k,) token-major
    if keep_Tk is not None:
        flat_e = flat_e.masked_fill(~keep_Tk.reshape(-1), num_experts)  # dropped sort last
    order = torch.argsort(flat_e, stable=True)
    counts_E = torch.bincount(flat_e, minlength=num_experts + 1)[:num_experts]
    if keep_Tk is not None:
        order = order[: int(counts_E.sum())]
    return order, order // k, counts_E


class _PermuteRows(torch.autograd.Function):
    """rows of x in the order ``perm``; the backward gathers with the inverse permutation
    instead of scatter-adding (what plain indexing would do), which is faster on CPU."""

    @staticmethod
    def forward(ctx, x_ND, perm_N, inv_N):
        ctx.save_for_backward(inv_N)
        return x_ND.index_select(0, perm_N)

    @staticmethod
    def backward(ctx, g_ND):
        (inv_N,) = ctx.saved_tensors
        return g_ND.index_select(0, inv_N), None, None


class _GatherTokens(torch.autograd.Function):
    """x_TD rows for the sorted assignments (each token k times); since every token has exactly
    k rows, the backward is a gather with the inverse permutation and a sum over k."""

    @staticmethod
    def forward(ctx, x_TD, token_of_N, inv_N, k):
        ctx.save_for_backward(inv_N)
        ctx.k = k
        return x_TD.index_select(0, token_of_N)

    @staticmethod
    def backward(ctx, g_ND):
        (inv_N,) = ctx.saved_tensors
        g_TkD = g_ND.index_select(0, inv_N).view(-1, ctx.k, g_ND.shape[-1])
        return g_TkD.sum(1), None, None, None


class _WeightedSum(torch.autograd.Function):
    """y_TD = sum_j w_Tk[:, j] * h_TkD[:, j]: one batched matmul forward; the backward is two
    broadcast products, as bmm's own backward over T tiny (1, k) x (k, D) matrices is slow on
    CPU (a loop over the batch)."""

    @staticmethod
    def forward(ctx, w_Tk, h_TkD):
        ctx.save_for_backward(w_Tk, h_TkD)
        return torch.bmm(w_Tk.unsqueeze(1), h_TkD).squeeze(1)

    @staticmethod
    def backward(ctx, g_TD):
        w_Tk, h_TkD = ctx.saved_tensors
        g_w = (h_TkD * g_TD.unsqueeze(1)).sum(-1) if ctx.needs_input_grad[0] else None
        g_h = w_Tk.unsqueeze(-1) * g_TD.unsqueeze(1) if ctx.needs_input_grad[1] else None
        return g_w, g_h


def _dispatch_sort_dropless(x_TD, weights_Tk, indices_Tk, experts: Experts, mm):
    """Dropless sort: every token has k rows, so gather and un-gather are permutations."""
    T, k = indices_Tk.shape
    D = x_TD.shape[-1]
    order, token_of, counts_E = permute(indices_Tk, None, experts.num_experts)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    x_ND = _GatherTokens.apply(x_TD, token_of, inv, k)  # (T*k, D) grouped by expert
    h_ND = experts.forward_sorted(x_ND, counts_E, mm=mm)
    h_TkD = _PermuteRows.apply(h_ND, inv, order).view(T, k, D)  # back to token-major
    return _WeightedSum.apply(weights_Tk, h_TkD)  # (T, D) weighted sum


def dispatch_sort(
    x_TD,
    weights_Tk,
    indices_Tk,
    keep_Tk,
    experts: Experts,
    capacity=None,
    mm: GroupedMM | None = None,
):
    """Sort-and-permute: one gather, contiguous per-expert blocks, one weighted scatter-add."""
    if keep_Tk is None:
        return _dispatch_sort_dropless(x_TD, weights_Tk, indices_Tk, experts, mm)
    order, token_of, counts_E = permute(indices_Tk, keep_Tk, experts.num_experts)
    # index_select, not x_TD[token_of]: its backward is one index_add, not an accumulating
    # index_put.
    x_ND = x_TD.index_select(0, token_of)  # (N, D) gathered, grouped by expert
    h_ND = experts.forward_sorted(x_ND, counts_E, mm=mm)
    w_N = weights_Tk.reshape(-1)[order]
    return torch.zeros_like(x_TD).index_add(0, token_of, h_ND * w_N.unsqueeze(-1))


IMPLEMENTATIONS: dict[str, DispatchFn] = {
    "loop": dispatch_loop,
    "einsum": dispatch_einsum,
    "sort": dispatch_sort,
}


def get_dispatch(impl: str) -> DispatchFn:
    """The dispatch function for ``impl``; the Triton one is imported only when asked for."""
    if impl == "triton":
        from moe_lab.kernels import grouped_gemm

        return lambda *args, **kw: dispatch_sort(*args, mm=grouped_gemm, **kw)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {(*IMPLEMENTATIONS, 'triton')}, got {impl!r}")
    return IMPLEMENTATIONS[impl]
