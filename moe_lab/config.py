"""MoEConfig: every knob of an MoE layer, keyword-only and validated on construction."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

SCORES = ("softmax", "sigmoid")
IMPLS = ("loop", "einsum", "sort", "triton")
ACTIVATIONS = ("swiglu", "gelu")
ROUTERS = ("top_k", "expert_choice")


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raise TypeError/ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


def check_positive_int(name: str, value) -> None:
    """Raise TypeError/ValueError unless ``value`` is an int (not a bool) greater than zero."""
    check_int(name, value, 1)


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_capacity_factor(value) -> None:
    """``None`` means dropless; otherwise a finite number greater than zero."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"capacity_factor must be a number or None, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {value}")


@dataclass(kw_only=True)
class MoEConfig:
    """Configuration of one MoE layer: sizes, routing, capacity, dispatch implementation.

    ``capacity_factor=None`` means dropless. Loss coefficients live here and are applied by the
    training code; the layer itself returns the unweighted losses. ``shared_d_ff > 0`` adds a
    shared expert (DeepSeekMoE): an FFN of that hidden size that every token goes through.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    score: str = "softmax"
    normalize_weights: bool = True
    capacity_factor: float | None = None
    impl: str = "sort"
    activation: str = "swiglu"
    router: str = "top_k"
    noisy_gating: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    shared_d_ff: int = 0

    def __post_init__(self):
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            check_positive_int(name, getattr(self, name))
        check_int("shared_d_ff", self.shared_d_ff, minimum=0)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k must be between 1 and num_experts={self.num_experts}, got {self.top_k}"
            )
        check_choice("score", self.score, SCORES)
        check_choice("impl", self.impl, IMPLS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("router", self.router, ROUTERS)
        check_capacity_factor(self.capacity_factor)
        if self.router == "expert_choice" and self.capacity_factor is None:
            raise ValueError("router='expert_choice' needs a capacity_factor (tokens per expert)")
        if self.top_k == 1 and self.normalize_weights and self.num_experts > 1:
            warnings.warn(
                "top_k=1 with normalize_weights=True gives every token the weight 1.0, so the "
                "router gets no gradient from the output; Switch-style top-1 routing uses "
                "normalize_weights=False",
                UserWarning,
                stacklevel=3,
            )
        for name in ("normalize_weights", "noisy_gating"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
