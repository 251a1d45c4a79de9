"""The decode roofline of a published MoE model: bytes read, FLOPs done, time per step.

One decode step of B sequences, each with ``context_len`` cached positions, must

- read the weights it multiplies by: attention, dense FFNs, routers, shared experts and the
  output head (every step), the rows of the input embedding it looks up, and in every MoE
  layer each routed expert that at least one of the B tokens picked:
  E (1 - (1 - k/E)^B) of them under uniform routing (``moe_lab.serving.touched``);
- read the KV cache: B x context_len x (KV bytes per position, ``kv_cache_bytes_per_token``);
- do B x ``decode_flops_per_token`` FLOPs (``moe_lab.scaling.flops``: 2 per active weight,
  plus attention scores over context_len positions).

With perfect overlap (the roofline, williams2009roofline) the step takes
max(bytes / HBM bandwidth, FLOPs / peak): memory-bound while the first is larger. Spreading
the model over n GPUs with perfect parallelism divides both by n, so the crossing batch and
the tokens/s per GPU do not depend on n; communication (``moe_lab.serving.layout``) is what
breaks this. Not counted: norms, activations, softmax, the MTP module, and MLA's absorbed
decode form (its attention FLOPs are counted in the expanded form of ``decode_flops_per_token``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lab.config import check_int
from moe_lab.kernels.roofline import DevicePeaks
from moe_lab.scaling._checks import number
from moe_lab.scaling.arch import Architecture, ffn_matmul_params
from moe_lab.scaling.flops import (
    active_matmul_weights,
    decode_flops_per_token,
    kv_cache_bytes_per_token,
)

from .touched import expected_touched


@dataclass(frozen=True)
class DecodeStep:
    """One decode step's traffic, work and roofline time (seconds)."""

    batch: int
    context_len: int
    weight_bytes: float
    kv_bytes: float
    flops: float
    memory_s: float
    compute_s: float
    experts_touched: float  # per MoE layer (0 for a dense model)
    tokens_per_expert: float  # B k / E: tokens each touched-or-not expert gets on average

    @property
    def time_s(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.time_s


def expert_matmul_params(model: Architecture) -> int:
    """Matmul weights of one routed expert."""
    return ffn_matmul_params(model.d_model, model.d_ff_expert, model.expert_glu)


def weights_read(model: Architecture, batch: int) -> float:
    """Weights (count, not bytes) one decode step of ``batch`` tokens reads.

    Everything a single token multiplies by, with its top_k experts per MoE layer replaced by
    the expected distinct experts of the batch, plus one embedding row per token (at most V)."""
    if not isinstance(model, Architecture):
        raise TypeError(f"model must be an Architecture, got {type(model).__name__}")
    check_int("batch", batch, 1)
    w = float(active_matmul_weights(model))
    if model.is_moe:
        touched = expected_touched(model.n_routed_experts, model.top_k, batch)
        w += model.n_moe_layers * (touched - model.top_k) * expert_matmul_params(model)
    return w + min(batch, model.vocab_size) * model.d_model


def decode_step(
    model: Architecture,
    peaks: DevicePeaks,
    *,
    batch: int,
    context_len: int,
    weight_bytes: float = 2.0,
    kv_bytes: float = 2.0,
) -> DecodeStep:
    """The roofline of one decode step (see the module docstring). ``weight_bytes`` and
    ``kv_bytes``: bytes per weight and per cached element (2 for BF16, 1 for FP8)."""
    if not isinstance(peaks, DevicePeaks):
        raise TypeError(f"peaks must be a DevicePeaks, got {type(peaks).__name__}")
    check_int("batch", batch, 1)
    check_int("context_len", context_len, 1)
    number("weight_bytes", weight_bytes)
    number("kv_bytes", kv_bytes)
    wb = weights_read(model, batch) * weight_bytes
    kvb = batch * context_len * kv_cache_bytes_per_token(model, bytes_per_elem=kv_bytes)
    flops = batch * decode_flops_per_token(model, context_len=context_len)
    touched, per_expert = 0.0, 0.0
    if model.is_moe:
        touched = expected_touched(model.n_routed_experts, model.top_k, batch)
        per_expert = batch * model.top_k / model.n_routed_experts
    return DecodeStep(
        batch=batch,
        context_len=context_len,
        weight_bytes=wb,
        kv_bytes=kvb,
        flops=flops,
        memory_s=(wb + kvb) / peaks.bytes_per_s,
        compute_s=flops / peaks.flops_per_s,
        experts_touched=touched,
        tokens_per_expert=per_expert,
    )


def crossover_batch(
    model: Architecture,
    peaks: DevicePeaks,
    *,
    context_len: int,
    max_batch: int = 2**20,
    **bytes_kw,
) -> int | None:
    """The smallest batch whose step is compute-bound, or None if none up to ``max_batch``.

    Compute time grows linearly in B, memory time more slowly (touched experts saturate at E)
    plus B times the KV read, so once compute wins it keeps winning: bisection is exact.
    ``bytes_kw``: weight_bytes, kv_bytes as in ``decode_step``."""
    check_int("max_batch", max_batch, 1)

    def compute_bound(b: int) -> bool:
        return (
            decode_step(model, peaks, batch=b, context_len=context_len, **bytes_kw).bound
            == "compute"
        )

    if not compute_bound(max_batch):
        return None
    lo, hi = 0, max_batch  # compute_bound(hi) holds; lo is a batch known not to (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if compute_bound(mid):
            hi = mid
        else:
            lo = mid
    return hi
