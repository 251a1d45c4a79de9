"""Scaling MoE models on paper: parameters, FLOPs, memory, communication, imbalance, budget.

Submodules: arch (architectures), count (parameters), catalog (published models), flops,
budget (GPU-hours, MFU), comm (all-to-all), imbalance (stragglers), plan and memory (clusters),
search (layouts that fit), laws (MoE vs dense at equal predicted loss).
"""

from .arch import GQA, MHA, MLA, Architecture
from .budget import GPUS, cluster_flops, gpu_hours, gpus_needed, implied_mfu, training_flops
from .catalog import CATALOG, CLAIMS, Claim
from .comm import (
    INTERCONNECTS,
    Interconnect,
    deepep_fit,
    dispatch_traffic,
    fit_latency_bandwidth,
    moe_layer_comm_time,
)
from .count import COMPONENTS, count_params, param_breakdown
from .flops import (
    decode_flops_per_token,
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    training_flops_per_token,
)
from .imbalance import expert_popularity, simulate_step
from .laws import (
    KRAJEWSKI2024,
    cheapest_dense,
    dense_loss,
    dense_params_for_loss,
    law_inputs,
    moe_loss,
)
from .memory import fits, memory_per_gpu, moe_layer_times, stage_memory
from .plan import PRECISIONS, ClusterPlan, LayoutError, Precision
from .search import PlanReport, feasible_plans

__all__ = [
    "CATALOG", "CLAIMS", "COMPONENTS", "GPUS", "GQA", "INTERCONNECTS", "KRAJEWSKI2024", "MHA",
    "MLA", "PRECISIONS", "Architecture", "Claim", "ClusterPlan", "Interconnect", "LayoutError",
    "PlanReport",
    "Precision", "cheapest_dense", "cluster_flops", "count_params", "decode_flops_per_token",
    "deepep_fit", "dense_loss", "dense_params_for_loss", "dispatch_traffic",
    "expert_popularity", "feasible_plans", "fit_latency_bandwidth", "fits",
    "forward_flops_per_token", "gpu_hours", "gpus_needed", "implied_mfu",
    "kv_cache_bytes_per_token", "law_inputs", "memory_per_gpu", "moe_layer_comm_time",
    "moe_layer_times", "moe_loss", "param_breakdown", "simulate_step", "stage_memory",
    "training_flops", "training_flops_per_token",
]
