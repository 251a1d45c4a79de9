"""A cluster plan: how a model's layers, experts and batch are split over GPUs.

World = TP x PP x DP GPUs (Megatron's layout, narayanan2021megatron): tensor parallelism (TP)
splits each dense matrix, pipeline parallelism (PP) splits the layers into contiguous stages,
data parallelism (DP) replicates the rest. Expert parallelism (EP) splits each MoE layer's
routed experts over `ep` GPUs carved out of the TP x DP GPUs of a stage; experts are not
tensor-split, so each expert weight has TP x DP / EP replicas (its "expert data parallel"
degree, EDP) across which ZeRO shards its optimizer state, as DP does for dense weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_lab.config import check_int

from .arch import Architecture
from .budget import GPU, GPUS
from .comm import INTERCONNECTS, Interconnect


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Bytes per parameter for weights, gradients and optimizer state, and per activation."""

    name: str = "BF16 weights+grads, FP32 Adam"
    param_bytes: float = 2.0
    grad_bytes: float = 2.0
    optimizer_bytes: float = 12.0  # FP32 master copy + Adam first and second moments
    act_bytes: float = 2.0

    def __post_init__(self):
        for n in ("param_bytes", "grad_bytes", "optimizer_bytes", "act_bytes"):
            if not getattr(self, n) >= 0:
                raise ValueError(f"Precision.{n} must be >= 0")


PRECISIONS: dict[str, Precision] = {
    "BF16 weights+grads, FP32 Adam": Precision(),
    "BF16 weights, FP32 grads, FP32 Adam": Precision(
        name="BF16 weights, FP32 grads, FP32 Adam", grad_bytes=4.0),
    # deepseekai2024v3: FP32 master weights and gradients, AdamW moments in BF16.
    "DeepSeek-V3 (FP32 master+grads, BF16 moments)": Precision(
        name="DeepSeek-V3 (FP32 master+grads, BF16 moments)", grad_bytes=4.0,
        optimizer_bytes=8.0),
}


@dataclass(frozen=True, kw_only=True)
class ClusterPlan:
    """Parallel degrees and batch for training `model` on `n_gpus` GPUs; validated."""

    model: Architecture
    n_gpus: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int | None = None  # None: n_gpus / (tp * pp)
    zero_stage: int = 1
    precision: Precision = field(default_factory=Precision)
    micro_batch: int = 1  # sequences per micro-batch per pipeline
    seq_len: int = 4096
    recompute: str = "none"  # "none" or "full" (keep only each layer's input)
    include_mtp: bool = True  # train the MTP modules too (on the last stage)
    max_nodes: int | None = None  # node-limited routing: experts of a token on <= max_nodes
    gpu: GPU = field(default_factory=lambda: GPUS["H800"])
    net: Interconnect = field(default_factory=lambda: INTERCONNECTS["H800 (peak)"])
    compute_efficiency: float = 0.5  # fraction of peak the layer matmuls reach (comm share)
    compute_dtype: str = "bf16"  # "bf16" or "fp8": which peak the layer matmuls run against

    def __post_init__(self):
        if not isinstance(self.model, Architecture):
            raise TypeError(f"model must be an Architecture, got {type(self.model).__name__}")
        for name in ("n_gpus", "tp", "pp", "ep", "micro_batch", "seq_len"):
            check_int(name, getattr(self, name))
        check_int("zero_stage", self.zero_stage, 0)
        if self.zero_stage > 3:
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        m, g = self.model, self.net.gpus_per_node
        if self.n_gpus % (self.tp * self.pp):
            raise ValueError(f"n_gpus ({self.n_gpus}) must be divisible by tp * pp "
                             f"({self.tp} * {self.pp} = {self.tp * self.pp})")
        if self.dp is not None:
            check_int("dp", self.dp)
            if self.tp * self.pp * self.dp != self.n_gpus:
                raise ValueError(f"dp ({self.dp}) must equal n_gpus / (tp * pp) = "
                                 f"{self.n_gpus // (self.tp * self.pp)}")
        if self.n_gpus > g and self.n_gpus % g:
            raise ValueError(f"n_gpus ({self.n_gpus}) must fill whole nodes of {g} GPUs")
        if self.tp > g:
            raise ValueError(f"tp ({self.tp}) must not exceed gpus_per_node ({g}): tensor "
                             "parallelism needs NVLink")
        if m.attention.n_heads % self.tp:
            raise ValueError(f"tp ({self.tp}) must divide the model's n_heads "
                             f"({m.attention.n_heads})")
        if self.pp > m.n_layers:
            raise ValueError(f"pp ({self.pp}) exceeds the model's n_layers ({m.n_layers})")
        if not m.is_moe and self.ep > 1:
            raise ValueError(f"ep ({self.ep}) must be 1 for a dense model")
        if m.is_moe:
            if self.ep > m.n_routed_experts:
                raise ValueError(f"ep ({self.ep}) exceeds the model's n_routed_experts "
                                 f"({m.n_routed_experts})")
            if m.n_routed_experts % self.ep:
                raise ValueError(f"ep ({self.ep}) must divide the model's n_routed_experts "
                                 f"({m.n_routed_experts})")
        if (self.tp * self.dp_size) % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide tp * dp "
                             f"({self.tp} * {self.dp_size}): EP groups live inside a stage")
        span = self.ep * self.tp  # GPUs one EP group spans (EP ranks are strided by TP)
        if (span > g and span % g) or (span < g and g % span):
            raise ValueError(f"ep * tp ({span}) must divide gpus_per_node ({g}) or fill whole "
                             "nodes, so that EP groups tile the nodes")
        if self.recompute not in ("none", "full"):
            raise ValueError(f"recompute must be 'none' or 'full', got {self.recompute!r}")
        if self.max_nodes is not None:
            check_int("max_nodes", self.max_nodes)
        if not 0 < self.compute_efficiency <= 1:
            raise ValueError("compute_efficiency must be in (0, 1]")
        if self.compute_dtype not in ("bf16", "fp8"):
            raise ValueError(f"compute_dtype must be 'bf16' or 'fp8', got {self.compute_dtype!r}")
        self.gpu.peak(self.compute_dtype)  # raises if this GPU has no such peak

    @property
    def dp_size(self) -> int:
        return self.n_gpus // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        """Replicas of each expert weight (expert data parallel degree)."""
        return self.tp * self.dp_size // self.ep

    @property
    def micro_tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def ep_gpus_per_node(self) -> int:
        """GPUs of one EP group on each node (EP ranks are strided by TP within a node)."""
        return max(1, min(self.ep, self.net.gpus_per_node // self.tp))

    def stages(self) -> list[range]:
        """Contiguous layer ranges per pipeline stage, the first stages one layer longer."""
        q, r = divmod(self.model.n_layers, self.pp)
        out, start = [], 0
        for s in range(self.pp):
            n = q + (1 if s < r else 0)
            out.append(range(start, start + n))
            start += n
        return out
