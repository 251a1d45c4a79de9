"""grouped_gemm: a thin validating wrapper and an autograd Function over the Triton kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_kernels import grouped_gemm_dw_kernel, grouped_gemm_kernel, tile_schedule
from .tile_configs import Tiles, tiles_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


# A @triton.jit helper inside triton.language: it shows how triton itself was imported.
_TL_ZEROS = getattr(getattr(tl, "standard", None), "zeros", None)


def interpreter_active() -> bool:
    """True when the kernels and triton.language were both set up for the interpreter (CPU)."""
    if not _interpreted(grouped_gemm_kernel):
        return False
    return not hasattr(_TL_ZEROS, "fn") or _interpreted(_TL_ZEROS)


def _interpreter_error() -> RuntimeError:
    if _interpreted(grouped_gemm_kernel):  # kernels interpreted, triton.language compiled
        why = ("TRITON_INTERPRET=1 was set after triton had been imported, so triton.language "
               "was set up for a GPU")
    else:
        why = ("Triton's interpreter was off when moe_lab.kernels was imported (triton was "
               "imported earlier without TRITON_INTERPRET=1, or TRITON_INTERPRET=0 is set)")
    return RuntimeError(
        f"grouped_gemm got CPU tensors, which need Triton's interpreter, but {why}. Set "
        "TRITON_INTERPRET=1 in the environment before triton is first imported, or import "
        "moe_lab.kernels before triton (it sets TRITON_INTERPRET=1 when no CUDA device is found)."
    )


def _check_inputs(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming the argument; never let a bad shape reach a kernel."""
    for name, value in (("x", x), ("w", w), ("tokens_per_expert", counts)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, K), got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"w must be 3-D (E, K, M), got shape {tuple(w.shape)}")
    if counts.dim() != 1:
        raise ValueError(f"tokens_per_expert must be 1-D (E,), got shape {tuple(counts.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if w.dtype != x.dtype:
        raise TypeError(f"w must have the dtype of x ({x.dtype}), got {w.dtype}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"tokens_per_expert must be an integer tensor, got {counts.dtype}")
    if w.shape[0] == 0:
        raise ValueError("w must hold at least one expert, got E=0")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w.shape[1] (K={w.shape[1]}) must equal x.shape[1] (K={x.shape[1]})")
    if counts.shape[0] != w.shape[0]:
        raise ValueError(
            f"tokens_per_expert must have one entry per expert (E={w.shape[0]}), "
            f"got {counts.shape[0]}"
        )
    if w.device != x.device:
        raise ValueError(f"w must be on the device of x ({x.device}), got {w.device}")
    if counts.device not in (x.device, torch.device("cpu")):
        raise ValueError(
            f"tokens_per_expert must be on the device of x ({x.device}) or on CPU, "
            f"got {counts.device}"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"x must be on a CUDA device or on CPU, got {x.device}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous; call x.contiguous() first")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous; call w.contiguous() first")
    # One read-back (a host sync on a GPU) for both value checks.
    smallest, total = torch.stack([counts.min(), counts.sum()]).tolist()
    if smallest < 0:
        raise ValueError(f"tokens_per_expert must be non-negative, got {counts.tolist()}")
    if total != x.shape[0]:
        raise ValueError(
            f"tokens_per_expert must sum to the number of rows of x (N={x.shape[0]}), got {total}"
        )
    if x.device.type == "cpu" and not interpreter_active():
        raise _interpreter_error()


def _precision_flags(dtype: torch.dtype) -> dict:
    # The interpreter's bf16 tl.dot multiplies raw bits, so bf16 is upcast to fp32 there.
    return {
        "UPCAST": interpreter_active() and dtype == torch.bfloat16,
        "IEEE": dtype == torch.float32,
    }


def _launch_forward(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor,
                    tiles: Tiles) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e]; w may be a strided view (w transposed in backward)."""
    (n, k), m = x_NK.shape, w_EKM.shape[2]
    y_NM = torch.empty((n, m), dtype=x_NK.dtype, device=x_NK.device)
    if n == 0 or m == 0:
        return y_NM
    if k == 0:
        return y_NM.zero_()
    expert_T, start_T, end_T, _ = tile_schedule(counts_E, tiles.block_m, n)
    grid = (expert_T.numel(), triton.cdiv(m, tiles.block_n))
    grouped_gemm_kernel[grid](
        x_NK, w_EKM, y_NM, expert_T, start_T, end_T, k, m,
        *x_NK.stride(), *w_EKM.stride(), *y_NM.stride(),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        **_precision_flags(x_NK.dtype), **tiles.launch_options(),
    )
    return y_NM


def _launch_dw(x_NK: torch.Tensor, dy_NM: torch.Tensor, counts_E: torch.Tensor,
               tiles: Tiles) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e], zero for an expert with no rows."""
    (n, k), m, e = x_NK.shape, dy_NM.shape[1], counts_E.numel()
    dw_EKM = torch.zeros((e, k, m), dtype=x_NK.dtype, device=x_NK.device)
    if n == 0 or k == 0 or m == 0:
        return dw_EKM
    row_offsets_E1 = torch.zeros(e + 1, dtype=torch.int64, device=x_NK.device)
    row_offsets_E1[1:] = torch.cumsum(counts_E.to(torch.int64), 0)
    grid = (e, triton.cdiv(k, tiles.block_k), triton.cdiv(m, tiles.block_n))
    grouped_gemm_dw_kernel[grid](
        x_NK, dy_NM, dw_EKM, row_offsets_E1, k, m,
        *x_NK.stride(), *dy_NM.stride(), *dw_EKM.stride(),
        BLOCK_R=tiles.block_m, BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n,
        **_precision_flags(x_NK.dtype), **tiles.launch_options(),
    )
    return dw_EKM


class GroupedGemm(torch.autograd.Function):
    """Forward: y_e = x_e w_e. Backward: dx_e = dy_e w_e^T (same kernel), dw_e = x_e^T dy_e."""

    @staticmethod
    def forward(ctx, x_NK, w_EKM, counts_E, tiles: Tiles, dw_tiles: Tiles):
        ctx.save_for_backward(x_NK, w_EKM, counts_E)
        ctx.tiles, ctx.dw_tiles = tiles, dw_tiles
        return _launch_forward(x_NK, w_EKM, counts_E, tiles)

    @staticmethod
    def backward(ctx, dy_NM):
        x_NK, w_EKM, counts_E = ctx.saved_tensors
        dy_NM = dy_NM.contiguous()
        dx_NK = dw_EKM = None
        if ctx.needs_input_grad[0]:  # the forward kernel against w transposed, as a strided view
            dx_NK = _launch_forward(dy_NM, w_EKM.transpose(1, 2), counts_E, ctx.tiles)
        if ctx.needs_input_grad[1]:
            dw_EKM = _launch_dw(x_NK, dy_NM, counts_E, ctx.dw_tiles)
        return dx_NK, dw_EKM, None, None, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor, *,
                 tiles: Tiles | None = None, dw_tiles: Tiles | None = None) -> torch.Tensor:
    """y (N, M) with y[rows of e] = x[rows of e] @ w[e]; rows of x sorted by expert.

    x (N, K) and w (E, K, M) share a dtype (fp16, bf16 or fp32) and a device; tokens_per_expert
    (E,) holds non-negative integers summing to N. Differentiable in x and w. `tiles` and
    `dw_tiles` override the device's tile sizes (see tile_configs.json).
    """
    _check_inputs(x, w, tokens_per_expert)
    for name, value in (("tiles", tiles), ("dw_tiles", dw_tiles)):
        if value is not None and not isinstance(value, Tiles):
            raise TypeError(f"{name} must be a moe_lab.kernels.Tiles or None, got {value!r}")
    interpreted = interpreter_active()
    tiles = tiles or tiles_for("forward", x.device, interpreted)
    dw_tiles = dw_tiles or tiles_for("dw", x.device, interpreted)
    counts_E = tokens_per_expert.to(x.device)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            return GroupedGemm.apply(x, w, counts_E, tiles, dw_tiles)
    return GroupedGemm.apply(x, w, counts_E, tiles, dw_tiles)
