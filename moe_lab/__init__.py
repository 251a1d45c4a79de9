"""MoE Lab: the tested package behind the book. Build an MoE layer step by step."""

from moe_lab.config import MoEConfig
from moe_lab.experts import FFN, Experts
from moe_lab.layer import MoE, MoEOutput
from moe_lab.losses import load_balancing_loss, router_z_loss
from moe_lab.routing import capacity_mask, expert_capacity, top_k_routing

__all__ = [
    "FFN",
    "Experts",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "capacity_mask",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "top_k_routing",
]
