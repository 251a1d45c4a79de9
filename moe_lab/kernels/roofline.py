"""The roofline of one expert's GEMM: when is it limited by memory, when by the tensor cores?

An expert GEMM multiplies its t tokens (t, K) by its weight (K, M). It does 2 t K M FLOPs and,
at best, moves each operand once: b (t K + K M + t M) bytes for b bytes per element. The ratio
(arithmetic intensity) grows with t; the GEMM is compute-bound once it passes the device's
ridge point, peak FLOP/s / peak bytes/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DevicePeaks:
    """Peak rates of one device, with the bibliography key of the datasheet they come from."""

    name: str
    flops_per_s: float  # dense (no sparsity) tensor-core peak at the GEMM's input precision
    bytes_per_s: float  # main-memory (HBM) bandwidth
    source: str

    def __post_init__(self):
        for field in ("flops_per_s", "bytes_per_s"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"DevicePeaks.{field} must be a positive number, got {value!r}")

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which the memory roof meets the compute roof."""
        return self.flops_per_s / self.bytes_per_s


# Dense BF16 tensor-core peaks are half the datasheets' "with sparsity" figures.
H100_SXM = DevicePeaks(name="H100 SXM", flops_per_s=989e12, bytes_per_s=3.35e12,
                       source="nvidia2023h100")
H200_SXM = DevicePeaks(name="H200 SXM", flops_per_s=989e12, bytes_per_s=4.8e12,
                       source="nvidia2024h200")


def gemm_flops(tokens: float, k: int, m: int) -> float:
    """FLOPs of a (tokens, k) x (k, m) matmul: one multiply and one add per term."""
    return 2.0 * tokens * k * m


def gemm_bytes(tokens: float, k: int, m: int, bytes_per_element: int = 2) -> float:
    """Bytes moved if each operand is read once and the output written once."""
    return bytes_per_element * (tokens * k + k * m + tokens * m)


def arithmetic_intensity(tokens: float, k: int, m: int, bytes_per_element: int = 2) -> float:
    """FLOPs per byte of an expert GEMM with `tokens` rows; about 2 t / b while t << K, M."""
    return gemm_flops(tokens, k, m) / gemm_bytes(tokens, k, m, bytes_per_element)


def attainable_flops(intensity: float, peaks: DevicePeaks) -> float:
    """The roofline: min(compute roof, intensity x memory roof), in FLOP/s."""
    return min(peaks.flops_per_s, intensity * peaks.bytes_per_s)


def compute_bound_tokens(k: int, m: int, peaks: DevicePeaks, bytes_per_element: int = 2) -> float:
    """Tokens per expert at which the GEMM's intensity reaches the ridge point (inf if never).

    Solves 2 t K M = R b (t K + K M + t M) for t, with R the ridge point.
    """
    r_b = peaks.ridge * bytes_per_element
    denominator = 2.0 * k * m - r_b * (k + m)
    return r_b * k * m / denominator if denominator > 0 else math.inf
