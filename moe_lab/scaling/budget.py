"""Compute budgets: training FLOPs ~ 6 N D, GPU-hours, and the utilisation (MFU) they imply.

MFU (model FLOPs utilisation, PaLM) is the model's FLOPs per second divided by the hardware's
peak. Peak rates are data with a source, never constants inside a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import number
from .comm import INTERCONNECTS


@dataclass(frozen=True, kw_only=True)
class GPU:
    """An accelerator's dense (no sparsity) peaks and memory, with where the numbers come from,
    and the name of the interconnect its nodes usually have (a key of `INTERCONNECTS`): the one
    a `ClusterPlan` on this GPU assumes unless it is given another."""

    name: str
    bf16_dense_tflops: float
    memory_gib: float
    source: str
    fp8_dense_tflops: float | None = None  # None: no FP8 Tensor Cores
    interconnect: str | None = None  # None: a ClusterPlan on this GPU must be given its net

    def __post_init__(self):
        for n in ("name", "source"):
            if not isinstance(getattr(self, n), str):
                raise TypeError(f"GPU.{n} must be a str, got {type(getattr(self, n)).__name__}")
        number("GPU.bf16_dense_tflops", self.bf16_dense_tflops)
        number("GPU.memory_gib", self.memory_gib)
        if self.fp8_dense_tflops is not None:
            number("GPU.fp8_dense_tflops", self.fp8_dense_tflops)
        if self.interconnect is not None:
            if not isinstance(self.interconnect, str):
                raise TypeError("GPU.interconnect must be the name of an entry of INTERCONNECTS"
                                f" or None, got {type(self.interconnect).__name__}")
            if self.interconnect not in INTERCONNECTS:
                raise ValueError(f"GPU.interconnect {self.interconnect!r} is not in "
                                 f"INTERCONNECTS; known: {', '.join(map(repr, INTERCONNECTS))}")

    @property
    def peak_flops(self) -> float:
        """The dense BF16 peak, FLOP/s: the reference for MFU in this book."""
        return self.bf16_dense_tflops * 1e12

    def peak(self, dtype: str = "bf16") -> float:
        """Dense peak FLOP/s of the matmuls in `dtype` ('bf16' or 'fp8')."""
        if dtype == "bf16":
            return self.peak_flops
        if dtype == "fp8":
            if self.fp8_dense_tflops is None:
                raise ValueError(f"{self.name} has no FP8 peak")
            return self.fp8_dense_tflops * 1e12
        raise ValueError(f"dtype must be 'bf16' or 'fp8', got {dtype!r}")


GPUS: dict[str, GPU] = {
    # FP8 runs at twice the 16-bit Tensor Core rate per SM on Hopper (nvidia2022hopper, 2.1).
    "H100-SXM": GPU(name="H100-SXM", bf16_dense_tflops=989.4, fp8_dense_tflops=1978.9,
                    memory_gib=80, interconnect="H100 SXM (peak)",
                    source="nvidia2022hopper: H100 SXM5, BF16 and FP8 Tensor Core, dense"),
    # The H800 is the export variant of the H100 SXM: same Tensor Cores, NVLink cut to 400 GB/s.
    "H800": GPU(name="H800", bf16_dense_tflops=989.4, fp8_dense_tflops=1978.9, memory_gib=80,
                interconnect="H800 (peak)",
                source="assumed equal to the H100 SXM (nvidia2022hopper)"),
}


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def training_flops(active_params: float, tokens: float) -> float:
    """6 N D: 2 FLOPs per weight per token forward, 4 backward; attention ignored."""
    _positive("active_params", active_params)
    _positive("tokens", tokens)
    return 6.0 * active_params * tokens


def gpu_hours(flops: float, *, peak_flops: float, mfu: float) -> float:
    """GPU-hours to do `flops` at utilisation `mfu` of `peak_flops` per GPU."""
    _positive("flops", flops)
    _positive("peak_flops", peak_flops)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    return flops / (peak_flops * mfu) / 3600.0


def implied_mfu(flops: float, *, gpu_hours: float, peak_flops: float) -> float:
    """The utilisation at which `gpu_hours` of GPUs at `peak_flops` do `flops`."""
    _positive("flops", flops)
    _positive("gpu_hours", gpu_hours)
    _positive("peak_flops", peak_flops)
    return flops / (gpu_hours * 3600.0 * peak_flops)


def gpus_needed(flops: float, *, days: float, peak_flops: float, mfu: float) -> float:
    """How many GPUs finish `flops` in `days` of wall-clock time."""
    _positive("days", days)
    return gpu_hours(flops, peak_flops=peak_flops, mfu=mfu) / (24.0 * days)


def cluster_flops(*, n_gpus: float, days: float, peak_flops: float, mfu: float) -> float:
    """Model FLOPs `n_gpus` GPUs do in `days` at utilisation `mfu` of `peak_flops`: the
    inverse of `gpus_needed`, and divided by 6 D the active parameters a run can afford."""
    _positive("n_gpus", n_gpus)
    _positive("days", days)
    _positive("peak_flops", peak_flops)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    return n_gpus * days * 24.0 * 3600.0 * peak_flops * mfu


# DeepSeek-V3's reported training cost (deepseekai2024v3, Table 1), in H800 GPU-hours.
DEEPSEEK_V3_GPU_HOURS = {"pre-training": 2_664e3, "context extension": 119e3,
                         "post-training": 5e3}
DEEPSEEK_V3_TOKENS = 14.8e12  # pre-training tokens (deepseekai2024v3)
