"""The Triton kernels of the grouped GEMM, and the tile schedule they compute for themselves.

Rows of x are sorted by expert: expert e owns rows [o_e, o_{e+1}), o the running sum of the
counts. The forward kernel computes y_e = x_e @ w[e] for every expert at once; each program
owns one BLOCK_M x BLOCK_N output tile whose rows all belong to a single expert. Which tile
belongs to which expert (the tile schedule) is worked out by every program in its first lines,
from the E counts in device memory (`_tile_of`): no schedule tensors are built, no launch runs
before the kernel, and nothing is read back to the host. `tile_schedule` is the same
computation in torch, to read and to test against.

The gate-and-up kernel is the forward kernel with two weights: it reads each tile of x once
and keeps two accumulators, one for x @ w_gate[e] and one for x @ w_up[e]. The dW kernel
computes dw[e] = x_e^T @ dy_e, one program per (expert, K tile, M tile), looping over that
expert's rows.

Bad counts cannot make a kernel read or write out of bounds: negative counts are read as
zero and every row offset is clamped to [0, N] (the wrapper checks the counts' values unless
told not to; the result for bad counts is then undefined, but memory-safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def num_row_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """The launch grid's row tiles, from shapes alone: sum_e ceil(n_e/B) <= (N + E(B-1)) // B."""
    return (num_rows + num_experts * (block_m - 1)) // block_m


def experts_pow2(num_experts: int) -> int:
    """The vector length the kernels read the counts into: a power of two >= E (and >= 16)."""
    return max(16, triton.next_power_of_2(num_experts))


def tile_schedule(tokens_per_expert_E: torch.Tensor, block_m: int, num_rows: int):
    """Map every row tile to (expert, first row, end row); tiles never straddle two experts.

    The torch twin of the kernels' `_tile_of`, for reading and testing (the kernels compute it
    themselves). The number of tiles is `num_row_tiles`, a bound known from shapes alone; tiles
    past the real ones get first row == end row and do nothing.
    """
    counts_E = tokens_per_expert_E.to(torch.int64).clamp(min=0)
    num_experts = counts_E.numel()
    row_offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=counts_E.device)
    row_offsets_E1[1:] = torch.cumsum(counts_E, 0).clamp(max=num_rows)
    tiles_E = (row_offsets_E1.diff() + block_m - 1) // block_m  # row tiles per expert
    tile_end_E = torch.cumsum(tiles_E, 0)  # one past each expert's last tile
    num_tiles = num_row_tiles(num_rows, num_experts, block_m)
    tile_T = torch.arange(num_tiles, dtype=torch.int64, device=counts_E.device)
    expert_T = torch.searchsorted(tile_end_E, tile_T, right=True)  # == E for spare tiles
    real_T = expert_T < num_experts
    expert_T = expert_T.clamp(max=num_experts - 1)
    first_tile_T = tile_end_E[expert_T] - tiles_E[expert_T]
    row_start_T = row_offsets_E1[expert_T] + (tile_T - first_tile_T) * block_m
    row_end_T = torch.where(real_T, row_offsets_E1[expert_T + 1], row_start_T)
    return expert_T, row_start_T, row_end_T, row_offsets_E1


@triton.jit
def _expert_rows(counts_ptr, N, E, E_POW2: tl.constexpr):
    """Every expert's rows [start_e, end_e), as vectors of E_POW2 (zero past E), from counts."""
    es = tl.arange(0, E_POW2)
    n_e = tl.load(counts_ptr + es, mask=es < E, other=0).to(tl.int64)
    n_e = tl.maximum(n_e, 0)
    end_e = tl.cumsum(n_e, 0)  # running sum: one past each expert's last row
    return es, tl.minimum(end_e - n_e, N), tl.minimum(end_e, N)


@triton.jit
def _pick(values, es, which):
    """values[which] of a small vector (a masked sum: Triton has no dynamic indexing)."""
    return tl.sum(tl.where(es == which, values, 0), 0)


@triton.jit
def _tile_of(counts_ptr, tile, N, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row tile `tile` -> (expert, first row, end row); expert == E for a spare tile."""
    es, start_e, end_e = _expert_rows(counts_ptr, N, E, E_POW2)
    tiles_e = (end_e - start_e + BLOCK_M - 1) // BLOCK_M  # row tiles per expert
    tile_end_e = tl.cumsum(tiles_e, 0)  # one past each expert's last tile
    done = (tile_end_e <= tile) & (es < E)  # experts whose tiles all come before this one
    expert = tl.sum(done.to(tl.int32), 0)
    first_tile = _pick(tile_end_e - tiles_e, es, expert)
    row_start = _pick(start_e, es, expert) + (tile - first_tile) * BLOCK_M
    return expert, row_start, _pick(end_e, es, expert)


@triton.jit
def tile_schedule_kernel(counts_ptr, out_ptr, N, E,
                         BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Write what `_tile_of` gives each row tile: out[t] = (expert, first row, end row)."""
    tile = tl.program_id(0)
    expert, row_start, row_end = _tile_of(counts_ptr, tile, N, E, BLOCK_M, E_POW2)
    tl.store(out_ptr + 3 * tile, expert)
    tl.store(out_ptr + 3 * tile + 1, row_start)
    tl.store(out_ptr + 3 * tile + 2, row_end)


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr,  # x (N, K), w (E, K, M), y (N, M)
    counts_ptr,  # (E,) rows per expert: the kernel derives its tile schedule from these
    N, K, M, E,
    stride_xn, stride_xk,
    stride_we, stride_wk, stride_wm,
    stride_yn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    E_POW2: tl.constexpr,  # a power of two >= E: the counts are read as one vector
    UPCAST: tl.constexpr,  # multiply in fp32 (bf16 in the interpreter, whose bf16 dot is wrong)
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
):
    # Which output tile is mine: a row tile (and its expert) from the counts, a column tile
    # from the grid.
    expert, row_start, row_end = _tile_of(counts_ptr, tl.program_id(0), N, E, BLOCK_M, E_POW2)
    if expert >= E:  # a spare tile of the bound: nothing to do
        return
    pid_n = tl.program_id(1)

    rows = row_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) columns of w and y
    ks = tl.arange(0, BLOCK_K)  # (BLOCK_K,) offsets along the reduction
    row_ok = rows < row_end  # row_end: this expert's last row + 1
    col_ok = cols < M

    # Pointers to the first K-slab: a (BLOCK_M, BLOCK_K) tile of x, a (BLOCK_K, BLOCK_N) of w[e].
    x_ptrs = x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk  # rows are int64
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + ks[:, None] * stride_wk + cols[None, :] * stride_wm)

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

    y_ptrs = y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_ym
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_gemm_gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr,  # x (N, K); w_gate, w_up (E, K, M); gate, up (N, M)
    counts_ptr, N, K, M, E,
    stride_xn, stride_xk,
    stride_we, stride_wk, stride_wm,  # shared by w_gate and w_up (same shape, contiguous)
    stride_yn, stride_ym,  # shared by gate and up
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    E_POW2: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # The forward kernel with two weights: each x tile is loaded once and used twice.
    expert, row_start, row_end = _tile_of(counts_ptr, tl.program_id(0), N, E, BLOCK_M, E_POW2)
    if expert >= E:
        return
    pid_n = tl.program_id(1)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    col_ok = cols < M

    x_ptrs = x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk
    w_offs = expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wm
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read once
        w_ok = k_ok[:, None] & col_ok[None, :]
        bg = tl.load(wg_ptr + w_offs, mask=w_ok, other=0.0)
        bu = tl.load(wu_ptr + w_offs, mask=w_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        if IEEE:
            acc_g += tl.dot(a, bg, input_precision="ieee")
            acc_u += tl.dot(a, bu, input_precision="ieee")
        else:
            acc_g += tl.dot(a, bg)
            acc_u += tl.dot(a, bu)
        x_ptrs += BLOCK_K * stride_xk
        w_offs += BLOCK_K * stride_wk

    y_offs = rows[:, None] * stride_yn + cols[None, :] * stride_ym
    y_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(g_ptr + y_offs, acc_g.to(g_ptr.dtype.element_ty), mask=y_ok)
    tl.store(u_ptr + y_offs, acc_u.to(u_ptr.dtype.element_ty), mask=y_ok)


@triton.jit
def grouped_gemm_dw_kernel(
    x_ptr, dy_ptr, dw_ptr,  # x (N, K), dy (N, M), dw (E, K, M)
    counts_ptr,  # (E,) rows per expert
    N, K, M, E,
    stride_xn, stride_xk,
    stride_dyn, stride_dym,
    stride_dwe, stride_dwk, stride_dwm,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    E_POW2: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # One (BLOCK_K, BLOCK_N) tile of dw[e] per program: a sum over the rows of expert e.
    expert = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    es, start_e, end_e = _expert_rows(counts_ptr, N, E, E_POW2)
    row_start = _pick(start_e, es, expert)
    row_end = _pick(end_e, es, expert)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    k_ok = ks < K
    col_ok = cols < M

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # stays zero for an empty expert
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + rs  # int64, like row_start
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
