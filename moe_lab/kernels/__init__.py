"""Triton kernels for the experts: a grouped GEMM over expert-sorted tokens, and a fused
gate-and-up variant for SwiGLU experts.

With no CUDA device the kernels run in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported: triton.language's own helpers (tl.zeros
is one) are @triton.jit functions fixed as compiled or interpreted at that import. So when no
CUDA device is found, triton is not imported yet and TRITON_INTERPRET is unset, this package
sets it before importing triton. In any other mix, grouped_gemm on CPU tensors raises a
RuntimeError that says what to do, instead of Triton's "Cannot call @triton.jit'd outside of
the scope of a kernel".
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_lab.backends import grouped_mm_loop as grouped_gemm_reference  # noqa: E402

from .grouped import (  # noqa: E402
    GroupedGemm,
    GroupedGemmGateUp,
    grouped_gemm,
    grouped_gemm_gate_up,
    interpreter_active,
    kernel_tile_schedule,
)
from .tile_configs import Tiles, tiles_for  # noqa: E402

__all__ = [
    "GroupedGemm",
    "GroupedGemmGateUp",
    "Tiles",
    "grouped_gemm",
    "grouped_gemm_gate_up",
    "grouped_gemm_reference",
    "interpreter_active",
    "kernel_tile_schedule",
    "tiles_for",
]
