"""The two Triton kernels of the grouped GEMM, and the tile schedule that feeds the first.

Rows of x are sorted by expert: expert e owns rows [row_offsets[e], row_offsets[e+1]).
The forward kernel computes y_e = x_e @ w[e] for every expert at once; each program owns one
BLOCK_M x BLOCK_N output tile whose rows all belong to a single expert (the schedule makes
sure of it). The dW kernel computes dw[e] = x_e^T @ dy_e, one program per (expert, K tile,
M tile), looping over that expert's rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def tile_schedule(tokens_per_expert_E: torch.Tensor, block_m: int, num_rows: int):
    """Map every row tile to (expert, first row, end row); tiles never straddle two experts.

    Computed with tensor ops on the counts' device, so there is no host sync. The number of
    tiles is a bound known from shapes alone: sum_e ceil(n_e / B) <= (N + E (B - 1)) // B.
    Tiles past the real ones get first row == end row and do nothing.
    """
    counts_E = tokens_per_expert_E.to(torch.int64)
    num_experts = counts_E.numel()
    row_offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=counts_E.device)
    row_offsets_E1[1:] = torch.cumsum(counts_E, 0)
    tiles_E = (counts_E + block_m - 1) // block_m  # row tiles per expert
    tile_end_E = torch.cumsum(tiles_E, 0)  # one past each expert's last tile
    num_tiles = (num_rows + num_experts * (block_m - 1)) // block_m
    tile_T = torch.arange(num_tiles, dtype=torch.int64, device=counts_E.device)
    expert_T = torch.searchsorted(tile_end_E, tile_T, right=True)  # == E for spare tiles
    real_T = expert_T < num_experts
    expert_T = expert_T.clamp(max=num_experts - 1)
    first_tile_T = tile_end_E[expert_T] - tiles_E[expert_T]
    row_start_T = row_offsets_E1[expert_T] + (tile_T - first_tile_T) * block_m
    row_end_T = torch.where(real_T, row_offsets_E1[expert_T + 1], row_start_T)
    return expert_T, row_start_T, row_end_T, row_offsets_E1


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr,  # x (N, K), w (E, K, M), y (N, M)
    expert_ptr, row_start_ptr, row_end_ptr,  # the tile schedule, one entry per row tile
    K, M,
    stride_xn, stride_xk,
    stride_we, stride_wk, stride_wm,
    stride_yn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # multiply in fp32 (bf16 in the interpreter, whose bf16 dot is wrong)
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
):
    # Which output tile is mine: a row tile from the schedule, a column tile from the grid.
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    row_start = tl.load(row_start_ptr + tile)
    row_end = tl.load(row_end_ptr + tile)  # this expert's last row + 1: the row mask
    if row_start >= row_end:  # a spare tile of the bound: nothing to do
        return
    expert = tl.load(expert_ptr + tile).to(tl.int64)

    rows = row_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) columns of w and y
    ks = tl.arange(0, BLOCK_K)  # (BLOCK_K,) offsets along the reduction
    row_ok = rows < row_end
    col_ok = cols < M

    # Pointers to the first K-slab: a (BLOCK_M, BLOCK_K) tile of x, a (BLOCK_K, BLOCK_N) of w[e].
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xn + ks[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # accumulate in fp32 whatever the input
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0  # the last slab may be partial
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :] * stride_ym
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_gemm_dw_kernel(
    x_ptr, dy_ptr, dw_ptr,  # x (N, K), dy (N, M), dw (E, K, M)
    row_offsets_ptr,  # (E + 1,) expert e owns rows [row_offsets[e], row_offsets[e + 1])
    K, M,
    stride_xn, stride_xk,
    stride_dyn, stride_dym,
    stride_dwe, stride_dwk, stride_dwm,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # One (BLOCK_K, BLOCK_N) tile of dw[e] per program: a sum over the rows of expert e.
    expert = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    row_start = tl.load(row_offsets_ptr + expert)
    row_end = tl.load(row_offsets_ptr + expert + 1)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    k_ok = ks < K
    col_ok = cols < M

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # stays zero for an empty expert
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = (r0 + rs).to(tl.int64)
        row_ok = rows < row_end
        # x_e^T slab (BLOCK_K, BLOCK_R): load x transposed by swapping the pointer roles.
        xt = tl.load(x_ptr + ks[:, None] * stride_xk + rows[None, :] * stride_xn,
                     mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        g = tl.load(dy_ptr + rows[:, None] * stride_dyn + cols[None, :] * stride_dym,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            g = g.to(tl.float32)
        if IEEE:
            acc += tl.dot(xt, g, input_precision="ieee")
        else:
            acc += tl.dot(xt, g)

    dw_ptrs = (dw_ptr + expert.to(tl.int64) * stride_dwe
               + ks[:, None] * stride_dwk + cols[None, :] * stride_dwm)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])
