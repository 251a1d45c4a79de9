"""How long an MoE layer's all-to-all takes: bytes over NVLink and over the network, per GPU.

Expert parallelism (EP) spreads the experts of a layer over `ep` GPUs, `g` per node on
`n = ep / g` nodes. Each token is *dispatched* to the GPUs holding its top_k experts and the
results are *combined* back: two all-to-alls forward, two more backward. We assume routing is
uniform over experts (chapter 6 is about making it so) and that the node-level and GPU-level
hops are pipelined, so the slower link sets the time (as DeepEP's kernels do):

    t = alpha + max(inter_bytes / rdma_bw, intra_bytes / nvlink_bw).

alpha (`Interconnect.latency_us`) is the fixed cost of one all-to-all: a GPU sends its
messages to all peers at once (GPU-initiated RDMA), so it pays the latency once per dispatch or
combine, not once per peer. It is a parameter of the interconnect, never a constant in the
formula; the defaults come from a least-squares fit of t = alpha + bytes / B to DeepEP's
published low-latency timings (`DEEPEP_LOW_LATENCY_US`, `fit_latency_bandwidth`). It is what
prices decode-sized all-to-alls: a few tokens per GPU cost alpha, not bytes / B.

Two ways of sending a token:
* naive: one message per (token, expert) pair, as a plain all_to_all does;
* dedup: one copy per destination *node* over the network, then one NVLink hop per distinct
  destination GPU (DeepSeek-V3, DeepEP). With node-limited routing a token's experts lie on at
  most `max_nodes` nodes (DeepSeek-V3 uses 4), capping the network copies per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from ._checks import by_name, number

# DeepEP V1 low-latency (pure RDMA) kernels on H800 with one CX7 400 Gb/s NIC per GPU
# (deepep2025, docs/legacy.md): 128 tokens per GPU, hidden 7168, top-8 experts, FP8 dispatch
# (plus one FP32 scale per 128 values), BF16 combine. {EP: (dispatch us, combine us)}.
DEEPEP_LOW_LATENCY_US: dict[int, tuple[float, float]] = {
    8: (77.0, 114.0), 16: (118.0, 195.0), 32: (155.0, 273.0), 64: (173.0, 314.0),
    128: (192.0, 369.0), 256: (194.0, 360.0),
}
DEEPEP_LL_SHAPE = {"tokens": 128, "hidden": 7168, "top_k": 8}


def deepep_low_latency_bytes(kind: str) -> float:
    """Bytes one GPU sends in one DeepEP low-latency call, counted as DeepEP counts them
    (tokens x top_k x bytes per token; its reported bandwidths are these bytes / time)."""
    t, h, k = (DEEPEP_LL_SHAPE[n] for n in ("tokens", "hidden", "top_k"))
    if kind == "dispatch":
        return t * k * (h + 4 * (h // 128))  # FP8 values + one FP32 scale per 128
    if kind == "combine":
        return t * k * 2 * h  # BF16
    raise ValueError(f"kind must be 'dispatch' or 'combine', got {kind!r}")


def fit_latency_bandwidth(nbytes, seconds) -> tuple[float, float]:
    """Least-squares fit of seconds = alpha + nbytes / B; returns (alpha in s, B in GB/s)."""
    x = np.asarray(nbytes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError("nbytes and seconds must be 1-D arrays of the same length >= 2")
    if np.ptp(x) == 0:
        raise ValueError("nbytes must take at least two distinct values to separate alpha and B")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("nbytes and seconds must be positive")
    slope, alpha = np.polyfit(x, y, 1)
    if not slope > 0:
        raise ValueError("the fit gives a non-positive time per byte")
    return float(alpha), float(1.0 / slope / 1e9)


def deepep_fit(eps=(64, 128, 256)) -> tuple[float, float]:
    """(alpha s, B GB/s) fitted to DeepEP's low-latency dispatch and combine at the given EP
    sizes. The default keeps EP >= 64 (8+ nodes), where nearly every copy leaves the node."""
    xs, ys = [], []
    for ep in eps:
        if ep not in DEEPEP_LOW_LATENCY_US:
            raise ValueError(f"no DeepEP measurement at EP={ep}")
        for kind, us in zip(("dispatch", "combine"), DEEPEP_LOW_LATENCY_US[ep], strict=True):
            xs.append(deepep_low_latency_bytes(kind))
            ys.append(us * 1e-6)
    return fit_latency_bandwidth(xs, ys)


# alpha of an H800 all-to-all: deepep_fit() rounded (tests/test_scaling.py checks it).
H800_ALLTOALL_LATENCY_US = 14.6


@dataclass(frozen=True, kw_only=True)
class Interconnect:
    """Per-GPU, one-direction bandwidths (GB/s = 1e9 B/s), the fixed latency of one all-to-all
    (alpha, microseconds), where they come from, and the GPU whose links they are (`gpu`, a
    `GPU.name`; None: not tied to one GPU). A `ClusterPlan` refuses an interconnect of another
    GPU than its own."""

    name: str
    nvlink_GBps: float
    rdma_GBps: float
    gpus_per_node: int = 8
    latency_us: float = 0.0
    source: str = ""
    gpu: str | None = None

    def __post_init__(self):
        for n in ("name", "source"):
            if not isinstance(getattr(self, n), str):
                raise TypeError(f"Interconnect.{n} must be a str, "
                                f"got {type(getattr(self, n)).__name__}")
        number("Interconnect.nvlink_GBps", self.nvlink_GBps)
        number("Interconnect.rdma_GBps", self.rdma_GBps)
        number("Interconnect.latency_us", self.latency_us, strict=False)
        if not (isinstance(self.gpus_per_node, int) and not isinstance(self.gpus_per_node, bool)
                and self.gpus_per_node >= 1):
            raise ValueError("Interconnect.gpus_per_node must be a positive int, "
                             f"got {self.gpus_per_node!r}")
        if self.gpu is not None and not isinstance(self.gpu, str):
            raise TypeError(f"Interconnect.gpu must be a GPU name or None, "
                            f"got {type(self.gpu).__name__}")


INTERCONNECTS: dict[str, Interconnect] = {
    "H800 (peak)": Interconnect(
        name="H800 (peak)", nvlink_GBps=160.0, rdma_GBps=50.0,
        latency_us=H800_ALLTOALL_LATENCY_US, gpu="H800",
        source="deepseekai2024v3 (NVLink 160 GB/s, InfiniBand 50 GB/s per GPU); alpha fitted "
               "to deepep2025's low-latency timings"),
    "H800 (DeepEP measured)": Interconnect(
        name="H800 (DeepEP measured)", nvlink_GBps=153.0, rdma_GBps=43.0,
        latency_us=H800_ALLTOALL_LATENCY_US, gpu="H800",
        source="deepep2025 (V1 normal kernels: EP8 dispatch 153 GB/s NVLink, "
               "EP16 dispatch 43 GB/s RDMA; alpha fitted to its low-latency timings)"),
    # NVLink 4: 18 links x 25 GB/s in each direction = 450 GB/s per direction, the
    # "900 GB/s total" of the spec sheet counting both directions (nvidia2022hopper).
    "H100 SXM (peak)": Interconnect(
        name="H100 SXM (peak)", nvlink_GBps=450.0, rdma_GBps=50.0,
        latency_us=H800_ALLTOALL_LATENCY_US, gpu="H100-SXM",
        source="nvidia2022hopper (18 NVLink links x 25 GB/s per direction = 450 GB/s; "
               "900 GB/s counts both directions); one 400 Gb/s NIC per GPU and alpha as "
               "on the H800 (deepep2025)"),
}


def as_interconnect(net, arg: str = "net") -> Interconnect:
    """`net` itself, or the entry of `INTERCONNECTS` it names (ValueError listing the names)."""
    return by_name(arg, net, INTERCONNECTS, Interconnect, "INTERCONNECTS")


def expected_distinct_groups(n_groups: int, per_group: int, k: int) -> float:
    """Expected number of groups hit when k distinct items are drawn uniformly from
    n_groups groups of per_group items each (hypergeometric: 1 - C(N-m, k) / C(N, k))."""
    n_items = n_groups * per_group
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be in [1, {n_items}], got {k}")
    miss = comb(n_items - per_group, k) / comb(n_items, k)
    return n_groups * (1.0 - miss)


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends in one all-to-all, and the copies per token behind them."""

    intra_bytes: float
    inter_bytes: float
    intra_copies: float  # NVLink copies per token
    inter_copies: float  # network copies per token

    def time_s(self, net: Interconnect | str) -> float:
        """alpha + the slower link's bytes / bandwidth (alpha = net.latency_us); zero when
        nothing moves (EP = 1 issues no all-to-all)."""
        net = as_interconnect(net)
        if self.intra_bytes == self.inter_bytes == 0:
            return 0.0
        t_intra = self.intra_bytes / (net.nvlink_GBps * 1e9)
        t_inter = self.inter_bytes / (net.rdma_GBps * 1e9)
        return net.latency_us * 1e-6 + max(t_intra, t_inter)

    def bottleneck(self, net: Interconnect | str) -> str:
        net = as_interconnect(net)
        t_intra = self.intra_bytes / net.nvlink_GBps
        t_inter = self.inter_bytes / net.rdma_GBps
        if t_intra == t_inter == 0:
            return "none"
        return "network" if t_inter >= t_intra else "NVLink"


def _int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def dispatch_traffic(
    *, tokens: int, d_model: int, top_k: int, n_experts: int, ep: int, gpus_per_node: int,
    bytes_per_elem: float, max_nodes: int | None = None, dedup: bool = True,
) -> Traffic:
    """Per-GPU traffic of one dispatch (a combine moves the same volume back)."""
    for name, v in (("tokens", tokens), ("d_model", d_model), ("top_k", top_k),
                    ("n_experts", n_experts), ("ep", ep), ("gpus_per_node", gpus_per_node)):
        _int(name, v)
    if top_k > n_experts:
        raise ValueError(f"top_k ({top_k}) exceeds n_experts ({n_experts})")
    if n_experts % ep:
        raise ValueError(f"ep ({ep}) must divide n_experts ({n_experts})")
    if ep > gpus_per_node and ep % gpus_per_node:
        raise ValueError(f"ep ({ep}) must be a multiple of gpus_per_node ({gpus_per_node}) "
                         "when it spans nodes")
    if not bytes_per_elem > 0:
        raise ValueError(f"bytes_per_elem must be positive, got {bytes_per_elem!r}")
    g = min(ep, gpus_per_node)
    n = ep // g
    m = n
    if max_nodes is not None:
        _int("max_nodes", max_nodes)
        m = min(max_nodes, n)
    if m * (n_experts // n) < top_k:
        raise ValueError(f"max_nodes ({max_nodes}) leaves fewer than top_k experts to choose")
    if dedup:
        # The token's experts lie on m nodes (chosen uniformly); by symmetry a fraction
        # (n - 1) / n of the nodes / (ep - 1) / ep of the GPUs it reaches are not its own.
        nodes = expected_distinct_groups(m, n_experts // n, top_k)
        gpus = expected_distinct_groups(m * g, n_experts // ep, top_k)
        inter_copies = nodes * (n - 1) / n
        intra_copies = gpus * (ep - 1) / ep
    else:
        inter_copies = top_k * (ep - g) / ep
        intra_copies = top_k * (g - 1) / ep
    per_copy = d_model * bytes_per_elem * tokens
    return Traffic(intra_copies * per_copy, inter_copies * per_copy, intra_copies, inter_copies)


def moe_layer_comm_time(
    *, tokens: int, d_model: int, top_k: int, n_experts: int, ep: int, net: Interconnect | str,
    dispatch_bytes: float = 1.0, combine_bytes: float = 2.0, max_nodes: int | None = None,
    dedup: bool = True, training: bool = True,
) -> float:
    """Seconds of all-to-all per MoE layer per micro-batch: dispatch + combine, forward only
    or forward and backward (the backward of a dispatch is a combine and vice versa).
    Defaults follow DeepSeek-V3: FP8 dispatch (1 byte), BF16 combine (2 bytes). `net` is an
    Interconnect or the name of one in INTERCONNECTS."""
    net = as_interconnect(net)
    kw = dict(tokens=tokens, d_model=d_model, top_k=top_k, n_experts=n_experts, ep=ep,
              gpus_per_node=net.gpus_per_node, max_nodes=max_nodes, dedup=dedup)
    fwd = (dispatch_traffic(bytes_per_elem=dispatch_bytes, **kw).time_s(net)
           + dispatch_traffic(bytes_per_elem=combine_bytes, **kw).time_s(net))
    # Backward moves the same volumes (gradients in BF16 both ways in DeepSeek-V3).
    bwd = 2 * dispatch_traffic(bytes_per_elem=combine_bytes, **kw).time_s(net)
    return fwd + bwd if training else fwd
