"""grouped_gemm and grouped_gemm_gate_up: thin validating wrappers and autograd Functions.

Per call, the wrappers launch the kernels and nothing else: the kernels read the counts on the
device and work out their own tile schedule, so there is no schedule to build, cache or copy.
The one host sync is the optional value check of the counts (``check_counts``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_kernels import (
    experts_pow2,
    grouped_gemm_dw_kernel,
    grouped_gemm_gate_up_kernel,
    grouped_gemm_kernel,
    num_row_tiles,
    tile_schedule_kernel,
)
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


def _check_inputs(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                  check_counts: bool = True, w_name: str = "w") -> None:
    """Raise TypeError/ValueError naming the argument; never let a bad shape reach a kernel."""
    for name, value in (("x", x), (w_name, w), ("tokens_per_expert", counts)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, K), got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"{w_name} must be 3-D (E, K, M), got shape {tuple(w.shape)}")
    if counts.dim() != 1:
        raise ValueError(f"tokens_per_expert must be 1-D (E,), got shape {tuple(counts.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if w.dtype != x.dtype:
        raise TypeError(f"{w_name} must have the dtype of x ({x.dtype}), got {w.dtype}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"tokens_per_expert must be an integer tensor, got {counts.dtype}")
    if w.shape[0] == 0:
        raise ValueError(f"{w_name} must hold at least one expert, got E=0")
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"{w_name}.shape[1] (K={w.shape[1]}) must equal x.shape[1] (K={x.shape[1]})"
        )
    if counts.shape[0] != w.shape[0]:
        raise ValueError(
            f"tokens_per_expert must have one entry per expert (E={w.shape[0]}), "
            f"got {counts.shape[0]}"
        )
    if w.device != x.device:
        raise ValueError(f"{w_name} must be on the device of x ({x.device}), got {w.device}")
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
        raise ValueError(f"{w_name} must be contiguous; call {w_name}.contiguous() first")
    if check_counts:
        # One read-back (a host sync on a GPU) for both value checks.
        smallest, total = torch.stack([counts.min(), counts.sum()]).tolist()
        if smallest < 0:
            raise ValueError(f"tokens_per_expert must be non-negative, got {counts.tolist()}")
        if total != x.shape[0]:
            raise ValueError(
                "tokens_per_expert must sum to the number of rows of x "
                f"(N={x.shape[0]}), got {total}"
            )
    if x.device.type == "cpu" and not interpreter_active():
        raise _interpreter_error()


def _precision_flags(dtype: torch.dtype) -> dict:
    # The interpreter's bf16 tl.dot multiplies raw bits, so bf16 is upcast to fp32 there.
    return {
        "UPCAST": interpreter_active() and dtype == torch.bfloat16,
        "IEEE": dtype == torch.float32,
    }


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels write. The interpreter rounds fp32 to bf16 by truncation (a GPU
    rounds to nearest), so there bf16 results are written as fp32 and rounded by torch."""
    return torch.float32 if dtype == torch.bfloat16 and interpreter_active() else dtype


def _launch_forward(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor,
                    tiles: Tiles) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e]; w may be a strided view (w transposed in backward)."""
    (n, k), (e, _, m) = x_NK.shape, w_EKM.shape
    y_NM = torch.empty((n, m), dtype=_store_dtype(x_NK.dtype), device=x_NK.device)
    if n == 0 or m == 0 or k == 0:
        return y_NM.zero_().to(x_NK.dtype)
    grid = (num_row_tiles(n, e, tiles.block_m), triton.cdiv(m, tiles.block_n))
    grouped_gemm_kernel[grid](
        x_NK, w_EKM, y_NM, counts_E, n, k, m, e,
        *x_NK.stride(), *w_EKM.stride(), *y_NM.stride(),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        E_POW2=experts_pow2(e), **_precision_flags(x_NK.dtype), **tiles.launch_options(),
    )
    return y_NM.to(x_NK.dtype)


def _launch_gate_up(x_NK: torch.Tensor, wg_EKM: torch.Tensor, wu_EKM: torch.Tensor,
                    counts_E: torch.Tensor, tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up = x @ w_gate[e], x @ w_up[e] per expert's rows, in one launch."""
    (n, k), (e, _, m) = x_NK.shape, wg_EKM.shape
    gate_NM = torch.empty((n, m), dtype=_store_dtype(x_NK.dtype), device=x_NK.device)
    up_NM = torch.empty_like(gate_NM)
    if n == 0 or m == 0 or k == 0:
        return gate_NM.zero_().to(x_NK.dtype), up_NM.zero_().to(x_NK.dtype)
    grid = (num_row_tiles(n, e, tiles.block_m), triton.cdiv(m, tiles.block_n))
    grouped_gemm_gate_up_kernel[grid](
        x_NK, wg_EKM, wu_EKM, gate_NM, up_NM, counts_E, n, k, m, e,
        *x_NK.stride(), *wg_EKM.stride(), *gate_NM.stride(),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        E_POW2=experts_pow2(e), **_precision_flags(x_NK.dtype), **tiles.launch_options(),
    )
    return gate_NM.to(x_NK.dtype), up_NM.to(x_NK.dtype)


def _launch_dw(x_NK: torch.Tensor, dy_NM: torch.Tensor, counts_E: torch.Tensor,
               tiles: Tiles) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e], zero for an expert with no rows."""
    (n, k), m, e = x_NK.shape, dy_NM.shape[1], counts_E.numel()
    dw_EKM = torch.zeros((e, k, m), dtype=_store_dtype(x_NK.dtype), device=x_NK.device)
    if n == 0 or k == 0 or m == 0:
        return dw_EKM.to(x_NK.dtype)
    grid = (e, triton.cdiv(k, tiles.block_k), triton.cdiv(m, tiles.block_n))
    grouped_gemm_dw_kernel[grid](
        x_NK, dy_NM, dw_EKM, counts_E, n, k, m, e,
        *x_NK.stride(), *dy_NM.stride(), *dw_EKM.stride(),
        BLOCK_R=tiles.block_m, BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n,
        E_POW2=experts_pow2(e), **_precision_flags(x_NK.dtype), **tiles.launch_options(),
    )
    return dw_EKM.to(x_NK.dtype)


def kernel_tile_schedule(counts_E: torch.Tensor, block_m: int, num_rows: int) -> torch.Tensor:
    """(tiles, 3): the (expert, first row, end row) each row tile's program computes for itself.

    Runs the kernels' own schedule code (`_tile_of`) and reads it back, to show and test it;
    the GEMM kernels never write it out. A spare tile has expert == E.
    """
    e = counts_E.numel()
    num_tiles = num_row_tiles(num_rows, e, block_m)
    out_T3 = torch.full((num_tiles, 3), -1, dtype=torch.int64, device=counts_E.device)
    if num_tiles:
        tile_schedule_kernel[(num_tiles,)](counts_E, out_T3, num_rows, e,
                                           BLOCK_M=block_m, E_POW2=experts_pow2(e))
    return out_T3


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


class GroupedGemmGateUp(torch.autograd.Function):
    """Forward: gate_e, up_e = x_e wg_e, x_e wu_e in one launch. Backward: the grouped GEMM's
    kernels, dx_e = dgate_e wg_e^T + dup_e wu_e^T and dw_e = x_e^T d(gate or up)_e."""

    @staticmethod
    def forward(ctx, x_NK, wg_EKM, wu_EKM, counts_E, tiles: Tiles, dx_tiles: Tiles,
                dw_tiles: Tiles):
        ctx.save_for_backward(x_NK, wg_EKM, wu_EKM, counts_E)
        ctx.dx_tiles, ctx.dw_tiles = dx_tiles, dw_tiles
        ctx.set_materialize_grads(False)  # an output not used downstream gets None, not zeros
        return _launch_gate_up(x_NK, wg_EKM, wu_EKM, counts_E, tiles)

    @staticmethod
    def backward(ctx, dgate_NM, dup_NM):
        x_NK, wg_EKM, wu_EKM, counts_E = ctx.saved_tensors
        pairs = [(d.contiguous() if d is not None else None, w)
                 for d, w in ((dgate_NM, wg_EKM), (dup_NM, wu_EKM))]
        dx_NK = None
        if ctx.needs_input_grad[0]:
            for dy_NM, w_EKM in pairs:
                if dy_NM is not None:
                    part = _launch_forward(dy_NM, w_EKM.transpose(1, 2), counts_E, ctx.dx_tiles)
                    dx_NK = part if dx_NK is None else dx_NK.add_(part)
        dws = [
            _launch_dw(x_NK, dy_NM, counts_E, ctx.dw_tiles)
            if ctx.needs_input_grad[1 + i] and dy_NM is not None else None
            for i, (dy_NM, _) in enumerate(pairs)
        ]
        return dx_NK, *dws, None, None, None, None


def _tiles_or_default(x: torch.Tensor, *given: tuple[str, Tiles | None, str]) -> list[Tiles]:
    """Each (argument, value, kind): the value, else the device's tiles of that kind."""
    interpreted = interpreter_active()
    out = []
    for name, value, kind in given:
        if value is not None and not isinstance(value, Tiles):
            raise TypeError(f"{name} must be a moe_lab.kernels.Tiles or None, got {value!r}")
        out.append(value or tiles_for(kind, x.device, interpreted))
    return out


def _apply(fn, x: torch.Tensor, *args):
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            return fn.apply(x, *args)
    return fn.apply(x, *args)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor, *,
                 tiles: Tiles | None = None, dw_tiles: Tiles | None = None,
                 check_counts: bool = True) -> torch.Tensor:
    """y (N, M) with y[rows of e] = x[rows of e] @ w[e]; rows of x sorted by expert.

    x (N, K) and w (E, K, M) share a dtype (fp16, bf16 or fp32) and a device; tokens_per_expert
    (E,) holds non-negative integers summing to N. Differentiable in x and w. `tiles` and
    `dw_tiles` override the device's tile sizes (see tile_configs.json). `check_counts=False`
    skips reading the counts back to check their values (a host sync on a GPU), for counts
    that are right by construction; wrong counts then give a wrong result, never an
    out-of-bounds access.
    """
    _check_inputs(x, w, tokens_per_expert, check_counts)
    tiles, dw_tiles = _tiles_or_default(x, ("tiles", tiles, "forward"),
                                       ("dw_tiles", dw_tiles, "dw"))
    counts_E = tokens_per_expert.to(x.device)
    return _apply(GroupedGemm, x, w, counts_E, tiles, dw_tiles)


def grouped_gemm_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         tokens_per_expert: torch.Tensor, *, tiles: Tiles | None = None,
                         dx_tiles: Tiles | None = None, dw_tiles: Tiles | None = None,
                         check_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up), each (N, M): x[rows of e] @ w_gate[e] and x[rows of e] @ w_up[e].

    One launch computes both, reading each tile of x once (a SwiGLU expert's first two
    projections). w_gate and w_up (E, K, M) stay separate tensors of the same shape; the rest
    is as `grouped_gemm`, whose kernels run the backward (`dx_tiles`, `dw_tiles`); `tiles`
    is the fused kernel's (tile_configs.json's "gate_up" entry by default).
    """
    _check_inputs(x, w_gate, tokens_per_expert, check_counts, "w_gate")
    if not isinstance(w_up, torch.Tensor):
        raise TypeError(f"w_up must be a torch.Tensor, got {type(w_up).__name__}")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must have the shape of w_gate {tuple(w_gate.shape)}, "
                         f"got {tuple(w_up.shape)}")
    if w_up.dtype != w_gate.dtype or w_up.device != w_gate.device:
        raise TypeError(f"w_up must have the dtype and device of w_gate ({w_gate.dtype} on "
                        f"{w_gate.device}), got {w_up.dtype} on {w_up.device}")
    if not w_up.is_contiguous():
        raise ValueError("w_up must be contiguous; call w_up.contiguous() first")
    tiles, dx_tiles, dw_tiles = _tiles_or_default(
        x, ("tiles", tiles, "gate_up"), ("dx_tiles", dx_tiles, "forward"),
        ("dw_tiles", dw_tiles, "dw"))
    counts_E = tokens_per_expert.to(x.device)
    return _apply(GroupedGemmGateUp, x, w_gate, w_up, counts_E, tiles, dx_tiles, dw_tiles)
