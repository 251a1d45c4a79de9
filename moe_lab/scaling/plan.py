"""A cluster plan: how a model's layers, experts and batch are split over GPUs.

World = TP x PP x DP GPUs (Megatron's layout, narayanan2021megatron): tensor parallelism (TP)
splits each dense matrix, pipeline parallelism (PP) splits the layers into contiguous stages,
data parallelism (DP) replicates the rest. Expert parallelism (EP) splits each MoE layer's
routed experts over `ep` GPUs carved out of the TP x DP GPUs of a stage; experts are not
tensor-split, so each expert weight has TP x DP / EP replicas (its "expert data parallel"
degree, EDP) across which ZeRO shards its optimizer state, as DP does for dense weights.

The GPU, its interconnect and the precision are objects or the names of catalog entries
(`GPUS`, `INTERCONNECTS`, `PRECISIONS`); an unknown name is refused at once, with the known
ones listed. The interconnect follows the GPU (`GPU.interconnect`) unless one is given, and one
given for another GPU is refused. `plan.summary()` states every assumption in words.
Layout errors (degrees that do not fit the model or the nodes) are `LayoutError`s, which
`feasible_plans` skips; every other error is the caller's to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lab.config import check_int

from ._checks import by_name, number
from .arch import Architecture
from .budget import GPU, GPUS
from .comm import INTERCONNECTS, Interconnect, as_interconnect

_BYTES = ("param_bytes", "grad_bytes", "optimizer_bytes", "act_bytes")


class LayoutError(ValueError):
    """A plan's parallel degrees do not fit its model, GPU count or nodes."""


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Bytes per parameter for weights, gradients and optimizer state, and per activation.

    `name` None: the name of the `PRECISIONS` entry with these bytes, else a description of
    them (so a Precision never carries the name of other numbers)."""

    name: str | None = None
    param_bytes: float = 2.0
    grad_bytes: float = 2.0
    optimizer_bytes: float = 12.0  # FP32 master copy + Adam first and second moments
    act_bytes: float = 2.0

    def __post_init__(self):
        for n in _BYTES:
            number(f"Precision.{n}", getattr(self, n), strict=False)
        if self.name is None:
            def key(p):
                return tuple(getattr(p, n) for n in _BYTES)

            same = [k for k, p in PRECISIONS.items() if key(p) == key(self)]
            name = same[0] if same else (
                f"custom: {self.param_bytes:g} B weights, {self.grad_bytes:g} B grads, "
                f"{self.optimizer_bytes:g} B optimizer state per parameter, "
                f"{self.act_bytes:g} B per activation")
            object.__setattr__(self, "name", name)
        elif not isinstance(self.name, str):
            raise TypeError(f"Precision.name must be a str or None, got {type(self.name).__name__}")


PRECISIONS: dict[str, Precision] = {
    "BF16 weights+grads, FP32 Adam": Precision(name="BF16 weights+grads, FP32 Adam"),
    "BF16 weights, FP32 grads, FP32 Adam": Precision(
        name="BF16 weights, FP32 grads, FP32 Adam", grad_bytes=4.0),
    # deepseekai2024v3: FP32 master weights and gradients, AdamW moments in BF16.
    "DeepSeek-V3 (FP32 master+grads, BF16 moments)": Precision(
        name="DeepSeek-V3 (FP32 master+grads, BF16 moments)", grad_bytes=4.0,
        optimizer_bytes=8.0),
}


@dataclass(frozen=True, kw_only=True)
class ClusterPlan:
    """Parallel degrees and batch for training `model` on `n_gpus` GPUs; validated.

    `gpu`, `net` and `precision` take an object or a catalog name; `net=None` is the GPU's own
    interconnect (`gpu.interconnect`)."""

    model: Architecture
    n_gpus: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int | None = None  # None: n_gpus / (tp * pp)
    zero_stage: int = 1
    precision: Precision | str = "BF16 weights+grads, FP32 Adam"
    micro_batch: int = 1  # sequences per micro-batch per pipeline
    seq_len: int = 4096
    recompute: str = "none"  # "none" or "full" (keep only each layer's input)
    include_mtp: bool = True  # train the MTP modules too (on the last stage)
    max_nodes: int | None = None  # node-limited routing: experts of a token on <= max_nodes
    gpu: GPU | str = "H800"
    net: Interconnect | str | None = None  # None: the GPU's own (gpu.interconnect)
    compute_efficiency: float = 0.5  # fraction of peak the layer matmuls reach (comm share)
    compute_dtype: str = "bf16"  # "bf16" or "fp8": which peak the layer matmuls run against

    def __post_init__(self):
        if not isinstance(self.model, Architecture):
            raise TypeError(f"model must be an Architecture, got {type(self.model).__name__}")
        gpu = by_name("gpu", self.gpu, GPUS, GPU, "GPUS")
        precision = by_name("precision", self.precision, PRECISIONS, Precision, "PRECISIONS")
        if self.net is None:
            if gpu.interconnect is None:
                raise ValueError(f"gpu {gpu.name!r} names no interconnect of its own "
                                 "(GPU.interconnect is None): pass net=, an Interconnect or "
                                 f"one of {', '.join(map(repr, INTERCONNECTS))}")
            net = INTERCONNECTS[gpu.interconnect]
        else:
            net = as_interconnect(self.net)
            if net.gpu is not None and net.gpu != gpu.name:
                own = f"its own, {gpu.interconnect!r}" if gpu.interconnect else "an Interconnect"
                raise ValueError(f"net {net.name!r} is the interconnect of {net.gpu} GPUs, not "
                                 f"of gpu {gpu.name!r}: pass net=None for {own}, or an "
                                 "Interconnect with gpu=None for another network")
        for name, value in (("gpu", gpu), ("precision", precision), ("net", net)):
            object.__setattr__(self, name, value)
        for name in ("n_gpus", "tp", "pp", "ep", "micro_batch", "seq_len"):
            check_int(name, getattr(self, name))
        check_int("zero_stage", self.zero_stage, 0)
        if self.zero_stage > 3:
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        m, g = self.model, self.net.gpus_per_node
        if self.n_gpus % (self.tp * self.pp):
            raise LayoutError(f"n_gpus ({self.n_gpus}) must be divisible by tp * pp "
                             f"({self.tp} * {self.pp} = {self.tp * self.pp})")
        if self.dp is not None:
            check_int("dp", self.dp)
            if self.tp * self.pp * self.dp != self.n_gpus:
                raise LayoutError(f"dp ({self.dp}) must equal n_gpus / (tp * pp) = "
                                 f"{self.n_gpus // (self.tp * self.pp)}")
        if self.n_gpus > g and self.n_gpus % g:
            raise ValueError(f"n_gpus ({self.n_gpus}) must fill whole nodes of {g} GPUs")
        if self.tp > g:
            raise LayoutError(f"tp ({self.tp}) must not exceed gpus_per_node ({g}): tensor "
                             "parallelism needs NVLink")
        if m.attention.n_heads % self.tp:
            raise LayoutError(f"tp ({self.tp}) must divide the model's n_heads "
                             f"({m.attention.n_heads})")
        if self.pp > m.n_layers:
            raise LayoutError(f"pp ({self.pp}) exceeds the model's n_layers ({m.n_layers})")
        if not m.is_moe and self.ep > 1:
            raise LayoutError(f"ep ({self.ep}) must be 1 for a dense model")
        if m.is_moe:
            if self.ep > m.n_routed_experts:
                raise LayoutError(f"ep ({self.ep}) exceeds the model's n_routed_experts "
                                 f"({m.n_routed_experts})")
            if m.n_routed_experts % self.ep:
                raise LayoutError(f"ep ({self.ep}) must divide the model's n_routed_experts "
                                 f"({m.n_routed_experts})")
        if (self.tp * self.dp_size) % self.ep:
            raise LayoutError(f"ep ({self.ep}) must divide tp * dp "
                             f"({self.tp} * {self.dp_size}): EP groups live inside a stage")
        span = self.ep * self.tp  # GPUs one EP group spans (EP ranks are strided by TP)
        if (span > g and span % g) or (span < g and g % span):
            raise LayoutError(f"ep * tp ({span}) must divide gpus_per_node ({g}) or fill whole "
                             "nodes, so that EP groups tile the nodes")
        for name in ("recompute", "compute_dtype"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.include_mtp, bool):
            raise TypeError(f"include_mtp must be a bool, got {type(self.include_mtp).__name__}")
        if self.recompute not in ("none", "full"):
            raise ValueError(f"recompute must be 'none' or 'full', got {self.recompute!r}")
        if self.max_nodes is not None:
            check_int("max_nodes", self.max_nodes)
        number("compute_efficiency", self.compute_efficiency)
        if not self.compute_efficiency <= 1:
            raise ValueError(f"compute_efficiency must be in (0, 1], got {self.compute_efficiency}")
        if self.compute_dtype not in ("bf16", "fp8"):
            raise ValueError(f"compute_dtype must be 'bf16' or 'fp8', got {self.compute_dtype!r}")
        self.gpu.peak(self.compute_dtype)  # raises if this GPU has no such peak

    def __repr__(self) -> str:
        shown = {
            "model": self.model.name or "<unnamed Architecture>", "n_gpus": self.n_gpus,
            "gpu": self.gpu.name, "net": self.net.name, "tp": self.tp, "pp": self.pp,
            "dp": self.dp_size, "ep": self.ep, "zero_stage": self.zero_stage,
            "precision": self.precision.name, "micro_batch": self.micro_batch,
            "seq_len": self.seq_len, "recompute": self.recompute,
            "include_mtp": self.include_mtp, "max_nodes": self.max_nodes,
            "compute_efficiency": self.compute_efficiency, "compute_dtype": self.compute_dtype,
        }
        return "ClusterPlan(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def summary(self) -> str:
        """Every assumption of the plan, in words: hardware, network, layout, batch, precision."""
        m, g, n = self.model, self.gpu, self.net
        nodes = max(1, self.n_gpus // n.gpus_per_node)
        routing = (f"node-limited routing, experts of a token on <= {self.max_nodes} nodes"
                   if self.max_nodes else "routing not node-limited")
        return "\n".join([
            f"{m.name or 'unnamed model'} on {self.n_gpus} {g.name} GPUs ({nodes} node"
            f"{'s' if nodes > 1 else ''} of {n.gpus_per_node}), {g.memory_gib:g} GiB each, "
            f"{g.peak(self.compute_dtype) / 1e12:g} TFLOP/s dense {self.compute_dtype.upper()} "
            f"peak, layer matmuls at {self.compute_efficiency:.0%} of it",
            f"interconnect {n.name!r}: NVLink {n.nvlink_GBps:g} GB/s, network {n.rdma_GBps:g} "
            f"GB/s per GPU and direction, all-to-all latency {n.latency_us:g} us",
            f"layout: TP {self.tp} x PP {self.pp} x DP {self.dp_size}, EP {self.ep} "
            f"(expert replicas {self.edp}), ZeRO-{self.zero_stage}; {routing}",
            f"batch: {self.micro_batch} x {self.seq_len} tokens per micro-batch, recompute "
            f"{self.recompute}, MTP modules {'trained' if self.include_mtp else 'left out'}",
            f"precision: {self.precision.name}",
        ])

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
