"""Serving layouts on paper: expert parallelism vs tensor parallelism for one decode step.

Expert parallelism (EP, with data-parallel attention, as DeepSeek-V3 decodes): each of the
``ep`` GPUs holds every non-expert weight and E / ep routed experts of each MoE layer, and
serves its own ``batch_per_gpu`` sequences, whose KV cache it alone keeps. Each MoE layer
dispatches the tokens to their experts' GPUs and combines the results back: two all-to-alls,
priced by ``moe_lab.scaling.comm.moe_layer_comm_time`` (alpha + bytes / bandwidth).

Tensor parallelism (TP): every weight matrix is split over ``tp`` GPUs, which all work on the
same ``batch`` sequences; each layer ends its attention and its FFN with an all-reduce of the
batch's activations, priced as alpha + 2 (tp - 1) / tp x bytes / NVLink bandwidth (a ring's
volume, with the interconnect's one fixed latency alpha per collective). KV heads split over
TP ranks, except MLA's latent, which all heads share: every rank keeps all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lab.config import check_int
from moe_lab.scaling._checks import number
from moe_lab.scaling.arch import MLA, Architecture
from moe_lab.scaling.comm import Interconnect, as_interconnect, moe_layer_comm_time
from moe_lab.scaling.count import count_params, param_breakdown
from moe_lab.scaling.flops import kv_cache_bytes_per_token

GiB = 2.0**30


@dataclass(frozen=True)
class LayoutCost:
    """Bytes per GPU and communication seconds of one decode step."""

    name: str
    gpus: int
    sequences: int  # served by the whole layout in one step
    weight_bytes: float  # per GPU
    kv_bytes: float  # per GPU
    comm_s: float  # per decode step
    collectives: int  # per decode step

    @property
    def memory_gib(self) -> float:
        return (self.weight_bytes + self.kv_bytes) / GiB


def _split_params(model: Architecture) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of the model (no MTP module)."""
    if not isinstance(model, Architecture):
        raise TypeError(f"model must be an Architecture, got {type(model).__name__}")
    total, _ = count_params(model)
    routed = param_breakdown(model)["routed_experts"][0]
    return total - routed, routed


def ep_layout(
    model: Architecture,
    *,
    ep: int,
    batch_per_gpu: int,
    context_len: int,
    net: Interconnect | str,
    weight_bytes: float = 1.0,
    kv_bytes: float = 2.0,
) -> LayoutCost:
    """EP over ``ep`` GPUs, each serving ``batch_per_gpu`` sequences (module docstring)."""
    for name, v in (("ep", ep), ("batch_per_gpu", batch_per_gpu), ("context_len", context_len)):
        check_int(name, v, 1)
    number("weight_bytes", weight_bytes)
    number("kv_bytes", kv_bytes)
    if not model.is_moe:
        raise ValueError("ep_layout needs an MoE model")
    net = as_interconnect(net)
    dense, routed = _split_params(model)
    weights = (dense + routed / ep) * weight_bytes
    kv = batch_per_gpu * context_len * kv_cache_bytes_per_token(model, bytes_per_elem=kv_bytes)
    per_layer = 0.0
    if ep > 1:
        per_layer = moe_layer_comm_time(
            tokens=batch_per_gpu,
            d_model=model.d_model,
            top_k=model.top_k,
            n_experts=model.n_routed_experts,
            ep=ep,
            net=net,
            training=False,
        )
    n = model.n_moe_layers
    return LayoutCost(
        name=f"EP{ep}",
        gpus=ep,
        sequences=ep * batch_per_gpu,
        weight_bytes=weights,
        kv_bytes=kv,
        comm_s=n * per_layer,
        collectives=2 * n if ep > 1 else 0,
    )


def allreduce_time(nbytes: float, ranks: int, net: Interconnect | str) -> float:
    """alpha + 2 (ranks - 1) / ranks x nbytes / NVLink bandwidth (0 for one rank)."""
    check_int("ranks", ranks, 1)
    number("nbytes", nbytes, strict=False)
    net = as_interconnect(net)
    if ranks == 1:
        return 0.0
    return net.latency_us * 1e-6 + 2 * (ranks - 1) / ranks * nbytes / (net.nvlink_GBps * 1e9)


def tp_layout(
    model: Architecture,
    *,
    tp: int,
    batch: int,
    context_len: int,
    net: Interconnect | str,
    weight_bytes: float = 1.0,
    kv_bytes: float = 2.0,
    act_bytes: float = 2.0,
) -> LayoutCost:
    """TP over ``tp`` GPUs of one node, serving ``batch`` sequences together."""
    for name, v in (("tp", tp), ("batch", batch), ("context_len", context_len)):
        check_int(name, v, 1)
    for name, v in (
        ("weight_bytes", weight_bytes),
        ("kv_bytes", kv_bytes),
        ("act_bytes", act_bytes),
    ):
        number(name, v)
    net = as_interconnect(net)
    if tp > net.gpus_per_node:
        raise ValueError(f"tp={tp} exceeds the {net.gpus_per_node} GPUs of one node")
    dense, routed = _split_params(model)
    weights = (dense + routed) * weight_bytes / tp
    kv = batch * context_len * kv_cache_bytes_per_token(model, bytes_per_elem=kv_bytes)
    if not isinstance(model.attention, MLA):  # K/V heads split over ranks
        kv /= min(tp, model.attention.n_kv_heads)
    n_reduce = 2 * model.n_layers
    one = allreduce_time(batch * model.d_model * act_bytes, tp, net)
    return LayoutCost(
        name=f"TP{tp}",
        gpus=tp,
        sequences=batch,
        weight_bytes=weights,
        kv_bytes=kv,
        comm_s=n_reduce * one,
        collectives=n_reduce if tp > 1 else 0,
    )
