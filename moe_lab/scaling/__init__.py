"""Scaling MoE models on paper: parameters, FLOPs, memory, communication, imbalance, budget."""

from .arch import GQA, MHA, MLA, Architecture
from .catalog import CATALOG, CLAIMS, Claim
from .count import COMPONENTS, count_params, param_breakdown

__all__ = [
    "CATALOG", "CLAIMS", "COMPONENTS", "GQA", "MHA", "MLA", "Architecture", "Claim",
    "count_params", "param_breakdown",
]
