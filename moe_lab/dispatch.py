"""Dispatchers: send tokens to their experts and mix the results back, three ways.

A dispatcher is called as ``dispatcher(x_TD, routing, experts) -> y_TD`` with a
``RoutingDecision`` and an ``Experts`` module, and returns

    y[t] = sum_j keep[t, j] * weights[t, j] * Expert_{indices[t, j]}(x[t])

The experts run on rows grouped by expert through their backend (``moe_lab.backends``); the
dispatcher decides only how rows get there and back. ``reduce_load`` turns this process's
expert loads into the global ones (the identity here; a sum over ranks in
``moe_lab.parallel``).

- ``loop``: for each expert, gather its tokens, run it, scatter-add back. Easiest to read.
- ``einsum``: GShard's one-hot dispatch and combine tensors of shape (T, E, C). Dense, static
  shapes (good for TPUs), but memory grows as T * E * C.
- ``sort``: sort assignments by expert, gather once, run each expert on a contiguous block,
  weighted scatter-add back (MegaBlocks-style permute/unpermute). What production code does.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moe_lab.experts import Experts
from moe_lab.router import RoutingDecision
from moe_lab.routing import expert_counts, expert_positions

DISPATCHERS = ("loop", "einsum", "sort")


class Dispatcher(Protocol):
    """How tokens reach their experts and come back."""

    def __call__(
        self, x_TD: torch.Tensor, routing: RoutingDecision, experts: Experts
    ) -> torch.Tensor: ...

    def reduce_load(self, tokens_per_expert: torch.Tensor) -> torch.Tensor: ...


class LocalDispatcher:
    """A dispatcher whose experts all live in this process."""

    name = "local"

    def __call__(self, x_TD, routing: RoutingDecision, experts: Experts) -> torch.Tensor:
        return self.dispatch(x_TD, routing.weights_Tk.to(x_TD.dtype), routing.indices_Tk,
                             routing.keep_Tk, experts, capacity=routing.capacity,
                             counts_E=routing.tokens_per_expert)

    def reduce_load(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return tokens_per_expert

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def dispatch_loop(x_TD, weights_Tk, indices_Tk, keep_Tk, experts: Experts, capacity=None,
                  counts_E=None):
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


def dispatch_einsum(x_TD, weights_Tk, indices_Tk, keep_Tk, experts: Experts, capacity=None,
                    counts_E=None):
    """GShard: one-hot dispatch (T, E, C) in, batched experts, weighted combine (T, E, C) out.

    With capacity=None (dropless), C is the busiest expert's load (``counts_E``, the routing's
    kept assignments per expert, when given), so nothing is dropped.
    """
    T, k = indices_Tk.shape
    E = experts.num_experts
    if keep_Tk is None:
        keep_Tk = torch.ones_like(indices_Tk, dtype=torch.bool)
        pos_Tk = expert_positions(indices_Tk, E)
    else:  # slots among the kept assignments only (unkept ones queue in a bin of their own)
        pos_Tk = expert_positions(indices_Tk.masked_fill(~keep_Tk, E), E + 1)
    if capacity is None:  # host sync: the busiest expert's load sizes the slab
        counts_E = expert_counts(indices_Tk, E) if counts_E is None else counts_E
        capacity = int(counts_E.max())
    C = capacity
    # Every (token, slot) writes its one-hot entry; an unkept one writes 0 to a clamped slot
    # (a token names each expert at most once, so it cannot land on a kept entry). Static
    # shapes: no boolean indexing.
    tok_N = torch.arange(T, device=x_TD.device).repeat_interleave(k)  # (T*k,)
    e_N, c_N = indices_Tk.reshape(-1), pos_Tk.reshape(-1).clamp(max=C - 1)
    keep_N = keep_Tk.reshape(-1).to(x_TD.dtype)
    where = (tok_N, e_N, c_N)
    dispatch_TEC = x_TD.new_zeros(T, E, C).index_put(where, keep_N, accumulate=True)
    combine_TEC = x_TD.new_zeros(T, E, C).index_put(
        where, weights_Tk.reshape(-1) * keep_N, accumulate=True
    )
    x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
    if experts.backend in ("auto", "bmm"):  # the slab is already padded: batched matmuls
        if experts.backend == "auto":
            experts.last_backend = "bmm"
        h_ECD = experts.forward_batched(x_ECD)
    else:  # any other backend runs the slab as E groups of C rows
        counts_E = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
        h_ECD = experts.forward_sorted(x_ECD.reshape(E * C, -1), counts_E).view(E, C, -1)
    return torch.einsum("tec,ecd->td", combine_TEC, h_ECD)


def permute(indices_Tk: torch.Tensor, keep_Tk: torch.Tensor | None, num_experts: int,
            counts_E: torch.Tensor | None = None):
    """Sort the kept assignments by expert (stable): returns (order, token_of, counts_E).

    ``order`` indexes the flattened (T*k,) assignments; ``token_of[i]`` is the token of the i-th
    sorted assignment; ``counts_E[e]`` how many sorted rows belong to expert e (counted here
    unless the routing's own count of kept assignments is passed in).
    """
    k = indices_Tk.shape[1]
    flat_e = indices_Tk.reshape(-1)  # (T*k,) token-major
    if keep_Tk is not None:
        flat_e = flat_e.masked_fill(~keep_Tk.reshape(-1), num_experts)  # dropped sort last
    order = torch.argsort(flat_e, stable=True)
    if counts_E is None:  # dropped ones sit in bin E, not counted
        counts_E = expert_counts(flat_e, num_experts)
    if keep_Tk is not None:
        order = order[: int(counts_E.sum())]
    return order, order // k, counts_E


class _Combine(torch.autograd.Function):
    """y_TD[t] = sum_j w_Tk[t, j] * h_ND[inv[t * k + j]]: back to token order and mixed, in one
    step. Forward: one gather and one batched matmul. Backward, in the experts' (sorted) order:
    one gather of g_TD by token gives both the weights' gradient (a row-wise dot with h) and,
    scaled in place, h's gradient; no (T, k, D) temporary and no second permutation."""

    @staticmethod
    def forward(ctx, h_ND, w_Tk, inv_N, order_N, token_of_N):
        T, k = w_Tk.shape
        h_TkD = h_ND.index_select(0, inv_N).view(T, k, h_ND.shape[-1])
        ctx.save_for_backward(h_ND, w_Tk, inv_N, order_N, token_of_N)
        return torch.bmm(w_Tk.unsqueeze(1), h_TkD).squeeze(1)

    @staticmethod
    def backward(ctx, g_TD):
        h_ND, w_Tk, inv_N, order_N, token_of_N = ctx.saved_tensors
        g_ND = g_TD.index_select(0, token_of_N)  # each row's token's gradient, sorted order
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = (h_ND * g_ND).sum(-1).index_select(0, inv_N).view(w_Tk.shape)
        g_h = None
        if ctx.needs_input_grad[0]:
            g_h = g_ND.mul_(w_Tk.reshape(-1).index_select(0, order_N).unsqueeze(-1))
        return g_h, g_w, None, None, None


def _combine_dropless(x_TD, weights_Tk, indices_Tk, order, token_of, counts_E, experts,
                      backend):
    """Dropless: every token has k rows, so gather and un-gather are permutations."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    # (T*k, D) grouped by expert; index_select's backward is one index_add over tokens, which
    # measured 4x faster here than gathering with the inverse permutation and summing over k
    x_ND = x_TD.index_select(0, token_of)
    h_ND = experts.forward_sorted(x_ND, counts_E, backend=backend)
    return _Combine.apply(h_ND, weights_Tk, inv, order, token_of)  # (T, D) mixed


def combine(x_TD, h_ND, token_of_N, w_N):
    """y_TD = sum over rows n of token t: w_N[n] * h_ND[n] (zero for tokens with no rows)."""
    return torch.zeros_like(x_TD).index_add(0, token_of_N, h_ND * w_N.unsqueeze(-1))


def dispatch_sort(x_TD, weights_Tk, indices_Tk, keep_Tk, experts: Experts, capacity=None,
                  counts_E=None):
    """Sort-and-permute: one gather, contiguous per-expert blocks, one weighted scatter-add.

    With the loop backend the three are fused per expert (``Experts.forward_routed``): each
    expert gathers its own rows and adds its weighted output into y, so no (T*k, D) buffer is
    written; that measured fastest on CPU at every shape of the granularity sweep.
    """
    order, token_of, counts_E = permute(indices_Tk, keep_Tk, experts.num_experts, counts_E)
    backend = experts.resolve_backend(x_TD, counts_E)
    if backend == "loop":
        w_N = weights_Tk.reshape(-1).index_select(0, order)
        return experts.forward_routed(x_TD, token_of, w_N, counts_E)
    if keep_Tk is None:
        return _combine_dropless(x_TD, weights_Tk, indices_Tk, order, token_of, counts_E,
                                 experts, backend)
    # index_select, not x_TD[token_of]: its backward is one index_add, not an accumulating
    # index_put.
    x_ND = x_TD.index_select(0, token_of)  # (N, D) gathered, grouped by expert
    h_ND = experts.forward_sorted(x_ND, counts_E, backend=backend)
    return combine(x_TD, h_ND, token_of, weights_Tk.reshape(-1)[order])


class LoopDispatcher(LocalDispatcher):
    """For each expert, gather its tokens, run it, scatter-add back. Easiest to read."""

    name = "loop"
    dispatch = staticmethod(dispatch_loop)


class EinsumDispatcher(LocalDispatcher):
    """GShard's one-hot (T, E, C) dispatch and combine tensors around an (E, C, D) slab."""

    name = "einsum"
    dispatch = staticmethod(dispatch_einsum)


class SortDispatcher(LocalDispatcher):
    """Sort assignments by expert, run contiguous blocks, weighted scatter-add back."""

    name = "sort"
    dispatch = staticmethod(dispatch_sort)


def make_dispatcher(name: str) -> LocalDispatcher:
    """The local dispatcher called ``name`` ("loop", "einsum" or "sort")."""
    classes = {c.name: c for c in (LoopDispatcher, EinsumDispatcher, SortDispatcher)}
    if name not in classes:
        raise ValueError(f"dispatcher must be one of {DISPATCHERS}, got {name!r}")
    return classes[name]()
