"""Scaling MoE models on paper: parameters, FLOPs, memory, communication, imbalance, budget.

Submodules: arch (architectures), count (parameters), catalog (published models), flops,
budget (GPU-hours, MFU), comm (all-to-all), imbalance (stragglers), plan and memory (clusters).
"""

from .arch import GQA, MHA, MLA, Architecture
from .budget import GPUS, gpu_hours, gpus_needed, implied_mfu, training_flops
from .catalog import CATALOG, CLAIMS, Claim
from .comm import INTERCONNECTS, Interconnect, dispatch_traffic, moe_layer_comm_time
from .count import COMPONENTS, count_params, param_breakdown
from .flops import (
    decode_flops_per_token,
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    training_flops_per_token,
)
from .imbalance import expert_popularity, simulate_step
from .memory import fits, memory_per_gpu, moe_layer_times, stage_memory
from .plan import PRECISIONS, ClusterPlan, Precision

__all__ = [
    "CATALOG", "CLAIMS", "COMPONENTS", "GPUS", "GQA", "INTERCONNECTS", "MHA", "MLA",
    "PRECISIONS", "Architecture", "Claim", "ClusterPlan", "Interconnect", "Precision",
    "count_params", "decode_flops_per_token", "dispatch_traffic", "expert_popularity", "fits",
    "forward_flops_per_token", "gpu_hours", "gpus_needed", "implied_mfu",
    "kv_cache_bytes_per_token", "memory_per_gpu", "moe_layer_comm_time", "moe_layer_times",
    "param_breakdown", "simulate_step", "stage_memory", "training_flops",
    "training_flops_per_token",
]
