"""Serving an MoE: generation with a KV cache, and the costs of decoding (chapter 12).

Submodules: generate (the decode loop), touched (distinct experts per decode batch), roofline
(time per decode step of a published model on a GPU), offload (expert cache simulator),
prefetch (predicting the next layer's experts), numerics (capacity at evaluation, a
low-precision router), layout (EP vs TP serving on paper).
"""

from .generate import Generation, generate, next_tokens
from .layout import LayoutCost, allreduce_time, ep_layout, tp_layout
from .numerics import LowPrecisionRouter, batched_losses, with_moe_config, with_router_dtype
from .offload import POLICIES, CacheResult, routing_trace, simulate_cache
from .prefetch import layer_states, overlap, predict_experts, prefetch_accuracy
from .roofline import DecodeStep, crossover_batch, decode_step, weights_read
from .touched import distinct_per_group, expected_touched, measured_touched, simulate_touched

__all__ = [
    "POLICIES",
    "CacheResult",
    "DecodeStep",
    "Generation",
    "LayoutCost",
    "LowPrecisionRouter",
    "allreduce_time",
    "batched_losses",
    "crossover_batch",
    "decode_step",
    "distinct_per_group",
    "ep_layout",
    "expected_touched",
    "generate",
    "layer_states",
    "measured_touched",
    "next_tokens",
    "overlap",
    "predict_experts",
    "prefetch_accuracy",
    "routing_trace",
    "simulate_cache",
    "simulate_touched",
    "tp_layout",
    "weights_read",
    "with_moe_config",
    "with_router_dtype",
]
