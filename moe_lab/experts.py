"""Expert FFNs: one dense FFN, and E of them stacked into (E, ...) weight tensors.

A SwiGLU expert computes ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``; a GELU expert
computes ``gelu(x @ w_up[e]) @ w_down[e]`` and has no ``w_gate``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_lab.config import ACTIVATIONS, check_choice, check_positive_int

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grouped_mm_loop(
    x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """Reference grouped matmul: rows of x sorted by expert, block e multiplied by w[e]."""
    sizes = [int(c) for c in counts_E.tolist()]
    blocks = torch.split(x_NK, sizes)
    outs = [block @ w_EKM[e] for e, block in enumerate(blocks)]
    if not outs:
        return x_NK.new_zeros(0, w_EKM.shape[-1])
    return torch.cat(outs, dim=0)  # (N, M)


def grouped_mm_torch(
    x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """PyTorch's own grouped matmul (``F.grouped_mm``): every expert's block in one call."""
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)  # (E,) end row of each expert's block
    out_NM = F.grouped_mm(x_NK, w_EKM, offs=offs_E)
    if out_NM.requires_grad:
        # its backward rejects a broadcast gradient (e.g. from out.sum()): hand it a dense one
        out_NM.register_hook(lambda g: g.contiguous())
    return out_NM  # (N, M)


def torch_grouped_mm_applies(x_NK: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether ``grouped_mm_torch`` runs here: float32 CPU tensors, row strides of 16 bytes."""
    if not hasattr(F, "grouped_mm") or x_NK.device.type != "cpu" or x_NK.dtype != torch.float32:
        return False
    dims = [x_NK.shape[-1]] + [d for w in weights if w is not None for d in w.shape[1:]]
    return x_NK.is_contiguous() and all(d % 4 == 0 for d in dims)


class _PadRows(torch.autograd.Function):
    """(N, D) rows sorted by expert -> (E, C, D) slab, expert e's rows in slots [0, counts[e]).

    Slots past an expert's count hold copies of real rows; whatever comes out of them is
    dropped by ``_UnpadRows``, whose backward writes zeros there, so no gradient leaks.
    The two are each other's backward, and both are gathers (no scatter-add).
    """

    @staticmethod
    def forward(ctx, x_ND, rows_EC, pos_N):
        ctx.save_for_backward(pos_N)
        E, C = rows_EC.shape
        return x_ND.index_select(0, rows_EC.reshape(-1)).view(E, C, x_ND.shape[-1])

    @staticmethod
    def backward(ctx, g_ECD):
        (pos_N,) = ctx.saved_tensors
        return g_ECD.reshape(-1, g_ECD.shape[-1]).index_select(0, pos_N), None, None


class _UnpadRows(torch.autograd.Function):
    """(E, C, D) slab -> the (N, D) rows in its valid slots; backward pads with zeros."""

    @staticmethod
    def forward(ctx, h_ECD, rows_EC, pos_N, valid_EC):
        ctx.save_for_backward(rows_EC, valid_EC)
        return h_ECD.reshape(-1, h_ECD.shape[-1]).index_select(0, pos_N)

    @staticmethod
    def backward(ctx, g_ND):
        rows_EC, valid_EC = ctx.saved_tensors
        E, C = rows_EC.shape
        g_ECD = g_ND.index_select(0, rows_EC.reshape(-1)).view(E, C, g_ND.shape[-1])
        return g_ECD * valid_EC.unsqueeze(-1).to(g_ECD.dtype), None, None, None


def _init(w: torch.Tensor, fan_in: int) -> None:
    nn.init.normal_(w, mean=0.0, std=fan_in**-0.5)


class FFN(nn.Module):
    """The Transformer feed-forward block: one expert, as a dense layer (chapter 1)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", *, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_ff", d_ff)
        check_choice("activation", activation, ACTIVATIONS)
        self.activation = activation
        kw = {"dtype": dtype}
        self.w_gate = (
            nn.Parameter(torch.empty(d_model, d_ff, **kw)) if activation == "swiglu" else None
        )
        self.w_up = nn.Parameter(torch.empty(d_model, d_ff, **kw))
        self.w_down = nn.Parameter(torch.empty(d_ff, d_model, **kw))
        for w in (self.w_gate, self.w_up):
            if w is not None:
                _init(w, d_model)
        _init(self.w_down, d_ff)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            h_NF = F.silu(x_ND @ self.w_gate) * (x_ND @ self.w_up)
        else:
            h_NF = F.gelu(x_ND @ self.w_up)
        return h_NF @ self.w_down  # (N, D)


class Experts(nn.Module):
    """E expert FFNs with stacked weights: w_gate, w_up (E, D, F) and w_down (E, F, D)."""

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu", *, dtype=None
    ):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            check_positive_int(name, value)
        check_choice("activation", activation, ACTIVATIONS)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        E, D, Fh = num_experts, d_model, d_ff
        self.w_gate = (
            nn.Parameter(torch.empty(E, D, Fh, dtype=dtype)) if activation == "swiglu" else None
        )
        self.w_up = nn.Parameter(torch.empty(E, D, Fh, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(E, Fh, D, dtype=dtype))
        for w in (self.w_gate, self.w_up):
            if w is not None:
                _init(w, D)
        _init(self.w_down, Fh)

    def _act(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up if self.activation == "swiglu" else F.gelu(up)

    def forward_expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on a block of tokens: (N, D) -> (N, D)."""
        gate = x_ND @ self.w_gate[e] if self.w_gate is not None else None
        return self._act(gate, x_ND @ self.w_up[e]) @ self.w_down[e]

    def forward_batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Every expert on its own (C, D) slab at once, as in GShard: (E, C, D) -> (E, C, D)."""
        gate = torch.bmm(x_ECD, self.w_gate) if self.w_gate is not None else None
        return torch.bmm(self._act(gate, torch.bmm(x_ECD, self.w_up)), self.w_down)

    def forward_padded(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, padded to the busiest expert's count and run as one batched
        matmul per weight (as many matmul calls as a dense FFN): (N, D) -> (N, D)."""
        N = x_ND.shape[0]
        if N == 0:
            return x_ND.new_zeros(x_ND.shape)
        C = int(counts_E.max())
        slot_C = torch.arange(C, device=x_ND.device)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        valid_EC = slot_C < counts_E.unsqueeze(1)  # (E, C) slots holding a real row
        rows_EC = (starts_E.unsqueeze(1) + slot_C).clamp(max=N - 1)  # row each slot reads
        pos_N = torch.nonzero(valid_EC.reshape(-1)).squeeze(1)  # slab slot of each row
        x_ECD = _PadRows.apply(x_ND, rows_EC, pos_N)
        return _UnpadRows.apply(self.forward_batched(x_ECD), rows_EC, pos_N, valid_EC)

    def forward_sorted(
        self,
        x_ND: torch.Tensor,
        counts_E: torch.Tensor,
        mm: GroupedMM | None = None,
        pad_limit: float = 1.25,
    ) -> torch.Tensor:
        """Rows of x sorted by expert (counts_E[e] rows for expert e): (N, D) -> (N, D).

        ``mm(x_NK, w_EKM, counts_E)`` is a grouped matmul (the Triton kernel for impl="triton").
        Without one: when padding every expert to the busiest one costs at most ``pad_limit``
        times the real rows, ``forward_padded`` (3 batched matmuls); else, for float32 on CPU,
        PyTorch's grouped matmul; else one set of matmuls per expert.
        """
        if mm is None and x_ND.shape[0]:
            if self.num_experts * int(counts_E.max()) <= pad_limit * x_ND.shape[0]:
                return self.forward_padded(x_ND, counts_E)
            if torch_grouped_mm_applies(x_ND, self.w_gate, self.w_up, self.w_down):
                mm = grouped_mm_torch
        if mm is not None:
            gate = mm(x_ND, self.w_gate, counts_E) if self.w_gate is not None else None
            h_NF = self._act(gate, mm(x_ND, self.w_up, counts_E))
            return mm(h_NF, self.w_down, counts_E)
        sizes = [int(c) for c in counts_E.tolist()]
        # unbind, not w[e]: the backward of E selects would build E zero-filled (E, D, F)
        # gradients and add them up; unbind's backward stacks the E slices once.
        w_gate = self.w_gate.unbind(0) if self.w_gate is not None else None
        w_up, w_down = self.w_up.unbind(0), self.w_down.unbind(0)
        outs = []
        for e, blk_nD in enumerate(torch.split(x_ND, sizes)):
            if sizes[e]:
                gate = blk_nD @ w_gate[e] if w_gate is not None else None
                outs.append(self._act(gate, blk_nD @ w_up[e]) @ w_down[e])
        return torch.cat(outs, dim=0) if outs else x_ND.new_zeros(x_ND.shape)
