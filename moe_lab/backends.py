"""Expert backends: which GEMMs run E experts on rows already grouped by expert.

Every backend computes the same thing: rows ``x_ND`` sorted by expert (``counts_E[e]`` rows for
expert e) in, each block through its own expert FFN, rows out in the same order. They differ
only in the matmul calls:

- ``loop``: one set of matmuls per expert (E launches per weight; no padding).
- ``bmm``: pad every expert to the busiest one's count, one batched matmul per weight.
- ``grouped_mm``: ``torch.nn.functional.grouped_mm``, one call per weight, no padding
  (float32 on CPU; bfloat16 on CUDA; row strides a multiple of 16 bytes).
- ``triton``: this package's grouped GEMM kernel (chapter 10).
- ``auto``: on CUDA, ``grouped_mm`` where it applies; on CPU, ``loop`` (measured fastest there;
  see ``choose_auto``).

Host syncs: ``loop`` reads the counts (split sizes) and ``bmm`` the busiest count; ``grouped_mm``
and ``triton`` take the counts as a device tensor (the Triton kernel works out its own tiles
from them on the device). Under ``torch.compile`` those reads are the graph breaks; on CPU,
``grouped_mm`` (which compiles for bfloat16 only) runs eagerly between graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("loop", "bmm", "grouped_mm", "triton")

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


def _grouped_mm_eager(x_NK: torch.Tensor, w_EKM: torch.Tensor, offs_E: torch.Tensor):
    out_NM = F.grouped_mm(x_NK, w_EKM, offs=offs_E)
    if out_NM.requires_grad:
        # its backward rejects a broadcast gradient (e.g. from out.sum()): hand it a dense one
        out_NM.register_hook(lambda g: g.contiguous())
    return out_NM


_OUTSIDE_COMPILE: list = []  # the compiler-disabled wrapper, made on first use


def _grouped_mm_outside_compile(x_NK, w_EKM, offs_E):
    """torch.compile traces grouped_mm for bfloat16 only; on CPU (float32) it runs eagerly,
    one graph break per call, instead of failing to trace. The wrapper is made on first use:
    making it imports torch._dynamo (and with it triton), which ``import moe_lab`` must not."""
    if not torch.compiler.is_compiling():
        return _grouped_mm_eager(x_NK, w_EKM, offs_E)
    if not _OUTSIDE_COMPILE:
        _OUTSIDE_COMPILE.append(torch.compiler.disable(_grouped_mm_eager))
    return _OUTSIDE_COMPILE[0](x_NK, w_EKM, offs_E)


def grouped_mm_torch(
    x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """PyTorch's own grouped matmul (``F.grouped_mm``): every expert's block in one call."""
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)  # (E,) end row of each expert's block
    if x_NK.device.type == "cpu":
        return _grouped_mm_outside_compile(x_NK, w_EKM, offs_E)  # (N, M)
    return _grouped_mm_eager(x_NK, w_EKM, offs_E)  # (N, M)


def torch_grouped_mm_applies(x_NK: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether ``grouped_mm_torch`` runs here: float32 on CPU or bfloat16 on CUDA, contiguous
    rows, and every inner dimension's row a multiple of 16 bytes (its alignment rule)."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype_ok = {"cpu": torch.float32, "cuda": torch.bfloat16}.get(x_NK.device.type)
    if x_NK.dtype != dtype_ok:
        return False
    per_16_bytes = 16 // x_NK.element_size()
    dims = [x_NK.shape[-1]] + [d for w in weights if w is not None for d in w.shape[1:]]
    return x_NK.is_contiguous() and all(d % per_16_bytes == 0 for d in dims)


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


def run_bmm(experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Pad to the busiest expert's count and run ``experts.forward_batched`` (3 bmm calls)."""
    N = x_ND.shape[0]
    E = counts_E.shape[0]
    C = int(counts_E.max())  # host sync: the slab's size
    slot_C = torch.arange(C, device=x_ND.device)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    valid_EC = slot_C < counts_E.unsqueeze(1)  # (E, C) slots holding a real row
    rows_EC = (starts_E.unsqueeze(1) + slot_C).clamp(max=N - 1)  # row each slot reads
    # slab slot of each row: its expert's first slot plus its rank in the expert's block
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E,
                                       output_size=N)
    pos_N = expert_N * C + torch.arange(N, device=x_ND.device) - starts_E[expert_N]
    x_ECD = _PadRows.apply(x_ND, rows_EC, pos_N)
    return _UnpadRows.apply(experts.forward_batched(x_ECD), rows_EC, pos_N, valid_EC)


def _expert_backward(e, x_nD, g_nD, gate_nF, up_nF, weights, grads, *, w_n1=None, gw_n=None,
                     gx_out=None):
    """One expert's backward on its n rows, shared by both loop nodes: writes the weights'
    gradients into ``grads[i][e]`` and returns x's (into ``gx_out`` when given).

    With routing weights ``w_n1`` (n, 1) the rows' output was scaled by them: g is scaled too,
    and ``gw_n`` receives their gradient, the row-wise dot of h with g W_down^T.
    """
    (w_gate, w_up, w_down), (g_wgate, g_wup, g_wdown) = weights, grads
    swiglu = gate_nF is not None
    if swiglu:
        act_nF = F.silu(gate_nF)
        h_nF = act_nF * up_nF
    else:
        h_nF = F.gelu(up_nF)
    gh_nF = g_nD @ w_down[e].t()
    if w_n1 is not None:
        if gw_n is not None:
            torch.sum(h_nF * gh_nF, dim=-1, out=gw_n)
        g_nD, gh_nF = g_nD * w_n1, gh_nF.mul_(w_n1)
    torch.mm(h_nF.t(), g_nD, out=g_wdown[e])
    if swiglu:
        gup_nF = gh_nF * act_nF
        ggate_nF = torch.ops.aten.silu_backward(gh_nF.mul_(up_nF), gate_nF)
        torch.mm(x_nD.t(), ggate_nF, out=g_wgate[e])
    else:
        gup_nF = torch.ops.aten.gelu_backward(gh_nF, up_nF)
    torch.mm(x_nD.t(), gup_nF, out=g_wup[e])
    gx_nD = torch.mm(gup_nF, w_up[e].t(), out=gx_out)
    if swiglu:
        gx_nD.addmm_(ggate_nF, w_gate[e].t())
    return gx_nD


def _blocks(sizes, *buffers):
    """Each (N, ...) buffer's per-expert row blocks, from one ``split`` per buffer rather than
    a slice per expert in the loop (a missing buffer gives a list of None)."""
    return [b.split(sizes) if b is not None else [None] * len(sizes) for b in buffers]


def _weight_grads(weights, sizes):
    """Gradients for the three (E, ...) weights, to be written per expert; an expert with no
    rows gets zeros."""
    grads = tuple(torch.empty_like(w) if w is not None else None for w in weights)
    for e, n in enumerate(sizes):
        if n == 0:
            for g_w in grads:
                if g_w is not None:
                    g_w[e].zero_()
    return grads


class _ExpertLoop(torch.autograd.Function):
    """Every expert's FFN on its contiguous block of rows, one set of matmuls per expert,
    each writing into one preallocated output; the backward likewise writes each expert's
    weight gradient into its slice of one (E, ...) tensor. Nothing is concatenated or stacked,
    and autograd sees one node instead of a dozen per expert."""

    @staticmethod
    def forward(ctx, x_ND, w_gate, w_up, w_down, sizes, swiglu):
        N, D = x_ND.shape
        up_NF = x_ND.new_empty(N, w_up.shape[-1])
        gate_NF = torch.empty_like(up_NF) if swiglu else None
        y_ND = x_ND.new_empty(N, D)
        xs, ups, gates, ys = _blocks(sizes, x_ND, up_NF, gate_NF, y_ND)
        w_gates = w_gate.unbind(0) if swiglu else None
        w_ups, w_downs = w_up.unbind(0), w_down.unbind(0)
        for e, n in enumerate(sizes):
            if n == 0:
                continue
            torch.mm(xs[e], w_ups[e], out=ups[e])
            if swiglu:
                torch.mm(xs[e], w_gates[e], out=gates[e])
                h_nF = F.silu(gates[e]).mul_(ups[e])
            else:
                h_nF = F.gelu(ups[e])
            torch.mm(h_nF, w_downs[e], out=ys[e])
        ctx.save_for_backward(x_ND, w_gate, w_up, w_down, gate_NF, up_NF)
        ctx.sizes = sizes
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ND):
        x_ND, w_gate, w_up, w_down, gate_NF, up_NF = ctx.saved_tensors
        sizes, weights = ctx.sizes, (w_gate, w_up, w_down)
        g_ND = g_ND.contiguous()
        gx_ND = torch.empty_like(x_ND)  # every row belongs to one expert: all written below
        grads = _weight_grads(weights, sizes)
        xs, gs, gxs, gates, ups = _blocks(sizes, x_ND, g_ND, gx_ND, gate_NF, up_NF)
        for e, n in enumerate(sizes):
            if n:
                _expert_backward(e, xs[e], gs[e], gates[e], ups[e], weights, grads,
                                 gx_out=gxs[e])
        return gx_ND, *grads, None, None


def run_loop(experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """One set of matmuls per expert with rows, on its contiguous block (no padding)."""
    sizes = [int(c) for c in counts_E.tolist()]  # host sync: the split sizes
    weights = (experts.w_gate, experts.w_up, experts.w_down)
    if torch.is_autocast_enabled(x_ND.device.type):
        # mm(out=...) is outside autocast's reach: cast here, as autocast would (the casts are
        # differentiable, so float32 weights still get their gradients)
        dt = torch.get_autocast_dtype(x_ND.device.type)
        x_ND = x_ND.to(dt)
        weights = tuple(w.to(dt) if w is not None else None for w in weights)
    return _ExpertLoop.apply(x_ND.contiguous(), *weights, sizes, experts.w_gate is not None)


class _RoutedLoop(torch.autograd.Function):
    """The loop backend fused with the sort dispatcher's gather and combine: for each expert,
    gather its tokens' rows of x, run its FFN, and add the weighted output straight into y.

    Each expert's gathered block (a few hundred rows) stays in cache between the gather and
    its matmuls, so nothing of size (T*k, D) is ever written: no permuted copy of x, no
    permuted output, in the forward or the backward. What is saved for the backward is the
    hidden activations (T*k, F), as for a dense FFN of the same active size. The routing
    weights' gradient, <h_n W_down, g_t>, is the row-wise dot of h with g W_down^T, which the
    backward needs anyway.
    """

    @staticmethod
    def forward(ctx, x_TD, w_N, w_gate, w_up, w_down, token_of_N, sizes, swiglu):
        N = token_of_N.numel()
        up_NF = x_TD.new_empty(N, w_up.shape[-1])
        gate_NF = torch.empty_like(up_NF) if swiglu else None
        y_TD = torch.zeros_like(x_TD)
        toks, ups, gates, ws = _blocks(sizes, token_of_N, up_NF, gate_NF, w_N.unsqueeze(-1))
        w_gates = w_gate.unbind(0) if swiglu else None
        w_ups, w_downs = w_up.unbind(0), w_down.unbind(0)
        for e, n in enumerate(sizes):
            if n == 0:
                continue
            x_nD = x_TD.index_select(0, toks[e])
            torch.mm(x_nD, w_ups[e], out=ups[e])
            if swiglu:
                torch.mm(x_nD, w_gates[e], out=gates[e])
                h_nF = F.silu(gates[e]).mul_(ups[e])
            else:
                h_nF = F.gelu(ups[e])
            y_TD.index_add_(0, toks[e], torch.mm(h_nF, w_downs[e]).mul_(ws[e]))
        ctx.save_for_backward(x_TD, w_N, w_gate, w_up, w_down, token_of_N, gate_NF, up_NF)
        ctx.sizes = sizes
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TD):
        x_TD, w_N, w_gate, w_up, w_down, token_of_N, gate_NF, up_NF = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sizes = ctx.sizes
        g_TD = g_TD.contiguous()
        gx_TD = torch.zeros_like(x_TD) if need_x else None
        gw_N = torch.empty_like(w_N) if need_w else None
        grads = _weight_grads((w_gate, w_up, w_down), sizes)
        toks, ups, gates, ws, gws = _blocks(sizes, token_of_N, up_NF, gate_NF,
                                            w_N.unsqueeze(-1), gw_N)
        for e, n in enumerate(sizes):
            if n == 0:
                continue
            gx_nD = _expert_backward(
                e, x_TD.index_select(0, toks[e]), g_TD.index_select(0, toks[e]), gates[e],
                ups[e], (w_gate, w_up, w_down), grads, w_n1=ws[e], gw_n=gws[e],
            )
            if need_x:
                gx_TD.index_add_(0, toks[e], gx_nD)
        return gx_TD, gw_N, *grads, None, None, None


def run_loop_routed(experts, x_TD, token_of_N, w_N, counts_E) -> torch.Tensor:
    """y_TD[t] = sum over rows n of token t of w_N[n] * Expert_e(n)(x_TD[t]), for rows sorted by
    expert (``counts_E[e]`` rows for expert e, ``token_of_N[n]`` the token of row n): the loop
    backend with the gather and the combine fused in (``_RoutedLoop``)."""
    sizes = [int(c) for c in counts_E.tolist()]  # host sync: the split sizes
    weights = (experts.w_gate, experts.w_up, experts.w_down)
    if torch.is_autocast_enabled(x_TD.device.type):  # as run_loop: mm(out=) ignores autocast
        dt = torch.get_autocast_dtype(x_TD.device.type)
        x_TD, w_N = x_TD.to(dt), w_N.to(dt)
        weights = tuple(w.to(dt) if w is not None else None for w in weights)
    return _RoutedLoop.apply(x_TD.contiguous(), w_N.contiguous(), *weights, token_of_N, sizes,
                             experts.w_gate is not None)


def _run_mm(mm: GroupedMM):
    def run(experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        gate = mm(x_ND, experts.w_gate, counts_E) if experts.w_gate is not None else None
        return mm(experts.act(gate, mm(x_ND, experts.w_up, counts_E)), experts.w_down, counts_E)

    return run


def run_grouped_mm(experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm`` for each weight; a clear error where its dtype/alignment rules fail."""
    if not torch_grouped_mm_applies(x_ND, experts.w_gate, experts.w_up, experts.w_down):
        raise ValueError(
            "backend='grouped_mm' needs float32 on CPU or bfloat16 on CUDA, contiguous rows and "
            f"dimensions whose rows are multiples of 16 bytes; got {x_ND.dtype} on "
            f"{x_ND.device.type} with d_model={x_ND.shape[-1]}, d_ff={experts.d_ff}; "
            "use backend='auto'"
        )
    return _run_mm(grouped_mm_torch)(experts, x_ND, counts_E)


def run_triton(experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The chapter-9 Triton kernels (imported only when used): a SwiGLU expert's gate and up
    projections in one launch that reads each tile of x once, then the down projection.

    No host sync: the kernels read the counts on the device, and the counts come from the
    dispatcher, right by construction, so the wrappers' value check (a read-back) is skipped.
    """
    from moe_lab.kernels import grouped_gemm, grouped_gemm_gate_up

    if experts.w_gate is not None:
        gate_NF, up_NF = grouped_gemm_gate_up(x_ND, experts.w_gate, experts.w_up, counts_E,
                                              check_counts=False)
    else:
        gate_NF, up_NF = None, grouped_gemm(x_ND, experts.w_up, counts_E, check_counts=False)
    h_NF = experts.act(gate_NF, up_NF)
    return grouped_gemm(h_NF, experts.w_down, counts_E, check_counts=False)  # (N, D)


RUNNERS = {"loop": run_loop, "bmm": run_bmm, "grouped_mm": run_grouped_mm, "triton": run_triton}


def choose_auto(experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> str:
    """What ``backend="auto"`` runs: ``grouped_mm`` on CUDA where it applies, else ``loop``.

    On CPU the per-expert loop (one output buffer, one autograd node) measured fastest of the
    three CPU backends at every shape of the granularity sweep
    (``benchmarks/results/dispatch_shapes_cpu.json``), padded ``bmm`` slowest as experts grow
    finer; ``tests/test_bench_results.py`` holds the rule to that data.
    """
    weights = (experts.w_gate, experts.w_up, experts.w_down)
    if x_ND.device.type == "cuda" and torch_grouped_mm_applies(x_ND, *weights):
        return "grouped_mm"
    return "loop"
