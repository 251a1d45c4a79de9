"""Toy data you can see (chapter 2): a 1-D regression whose target is a different line per region.

The input line [-3, 3] is cut at x = -1 and x = 1; each of the three regions has its own slope and
intercept. One linear model cannot fit it; a mixture whose gate learns the regions can.
"""

from __future__ import annotations

import torch

from moe_lab.config import check_positive_int

X_RANGE = (-3.0, 3.0)
BOUNDARIES = (-1.0, 1.0)
PIECES = ((0.8, 2.8), (-1.5, 0.0), (1.0, -2.0))  # (slope, intercept) of regions 0, 1, 2


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def region(x: torch.Tensor) -> torch.Tensor:
    """Which piece each x falls in: 0 for x < -1, 1 for -1 <= x < 1, 2 for x >= 1 (int64)."""
    _check_x(x)
    cuts = torch.tensor(BOUNDARIES, dtype=x.dtype, device=x.device)
    return torch.bucketize(x, cuts, right=True)


def piecewise_target(x: torch.Tensor) -> torch.Tensor:
    """The noise-free target: slope[r] * x + intercept[r] with r = region(x); same shape as x."""
    r = region(x)
    slope = torch.tensor([p[0] for p in PIECES], dtype=x.dtype, device=x.device)[r]
    intercept = torch.tensor([p[1] for p in PIECES], dtype=x.dtype, device=x.device)[r]
    return slope * x + intercept


def piecewise_data(
    n: int, *, noise: float = 0.05, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """n points x ~ U[-3, 3] and y = target(x) + noise * N(0, 1): (x (n, 1), y (n, 1)).

    Seeded with its own generator, so the data never depends on the global RNG state.
    """
    check_positive_int("n", n)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    gen = torch.Generator().manual_seed(seed)
    lo, hi = X_RANGE
    x_N1 = lo + (hi - lo) * torch.rand(n, 1, generator=gen, dtype=dtype)
    y_N1 = piecewise_target(x_N1) + noise * torch.randn(n, 1, generator=gen, dtype=dtype)
    return x_N1, y_N1
