"""Compute budgets: training FLOPs ~ 6 N D, GPU-hours, and the utilisation (MFU) they imply.

MFU (model FLOPs utilisation, PaLM) is the model's FLOPs per second divided by the hardware's
peak. Peak rates are data with a source, never constants inside a formula.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GPU:
    """An accelerator's dense (no sparsity) peak and memory, with where the numbers come from."""

    name: str
    bf16_dense_tflops: float
    memory_gib: float
    source: str

    def __post_init__(self):
        if self.bf16_dense_tflops <= 0 or self.memory_gib <= 0:
            raise ValueError("GPU.bf16_dense_tflops and GPU.memory_gib must be positive")

    @property
    def peak_flops(self) -> float:
        return self.bf16_dense_tflops * 1e12


GPUS: dict[str, GPU] = {
    "H100-SXM": GPU(name="H100-SXM", bf16_dense_tflops=989.4, memory_gib=80,
                    source="nvidia2022hopper: H100 SXM5, BF16 Tensor Core, dense"),
    # The H800 is the export variant of the H100 SXM: same Tensor Cores, NVLink cut to 400 GB/s.
    "H800": GPU(name="H800", bf16_dense_tflops=989.4, memory_gib=80,
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


# DeepSeek-V3's reported training cost (deepseekai2024v3, Table 1), in H800 GPU-hours.
DEEPSEEK_V3_GPU_HOURS = {"pre-training": 2_664e3, "context extension": 119e3,
                         "post-training": 5e3}
DEEPSEEK_V3_TOKENS = 14.8e12  # pre-training tokens (deepseekai2024v3)
