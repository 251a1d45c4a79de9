"""MoEConfig: every knob of an MoE layer, keyword-only and validated on construction."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

SCORES = ("softmax", "sigmoid")
IMPLS = ("loop", "einsum", "sort", "triton")  # "triton": sort dispatch + the Triton backend
BACKENDS = ("auto", "loop", "bmm", "grouped_mm", "triton")
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


@dataclass(kw_only=True, frozen=True)
class NodeLimit:
    """Route each token to experts in at most ``max_groups`` of ``num_groups`` expert groups.

    DeepSeek-V3's node-limited routing: experts are split into ``num_groups`` equal, contiguous
    groups (the experts of one node), and a token's k experts span at most ``max_groups``.
    """

    num_groups: int
    max_groups: int

    def __post_init__(self):
        check_positive_int("num_groups", self.num_groups)
        check_positive_int("max_groups", self.max_groups)
        if self.max_groups > self.num_groups:
            raise ValueError(
                f"max_groups must be between 1 and num_groups={self.num_groups}, "
                f"got {self.max_groups}"
            )

    def check(self, num_experts: int, k: int) -> None:
        """Raise ValueError unless E experts split evenly into groups and M groups can hold k."""
        if num_experts % self.num_groups:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by num_groups={self.num_groups}"
            )
        per_group = num_experts // self.num_groups
        if k > self.max_groups * per_group:
            raise ValueError(
                f"top_k={k} cannot fit in max_groups={self.max_groups} groups of {per_group} "
                "experts; raise max_groups"
            )


@dataclass(kw_only=True)
class MoEConfig:
    """Configuration of one MoE layer: sizes, routing, capacity, dispatch implementation.

    ``capacity_factor=None`` means dropless. Loss coefficients live here and are applied by the
    training code; the layer itself returns the unweighted losses. ``shared_d_ff > 0`` adds a
    shared expert (DeepSeekMoE): an FFN of that hidden size that every token goes through.

    Two independent choices say how the experts run: ``impl``, the dispatcher (how tokens reach
    their experts: "loop", "einsum" or "sort"), and ``backend``, which GEMMs run the experts on
    rows grouped by expert ("loop": one matmul per expert, "bmm": padded batched matmul,
    "grouped_mm": ``torch.nn.functional.grouped_mm``, "triton": this package's kernel, "auto":
    chosen per call and recorded on the experts module). ``impl="triton"`` is shorthand for
    sort dispatch with the Triton backend. ``node_limit`` restricts each token's experts to a
    few expert groups (DeepSeek-V3).

    Capacity, per call of T tokens: top-k gives each expert C = ceil(cf * k * T / E) slots
    (GShard); expert choice lets each expert pick C = min(T, ceil(cf * T / E)) tokens (Zhou et
    al.), so expert choice at cf = k does the compute of top-k at cf = 1. Expert choice reads
    neither ``top_k`` nor ``normalize_weights``, refuses sigmoid scores, bias balancing and
    node limits. A single token (decoding) goes to all E experts: each picks its C = 1 tokens
    from the only one there is, so expert choice is a training-time router.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    score: str = "softmax"
    normalize_weights: bool = True
    capacity_factor: float | None = None
    impl: str = "sort"
    backend: str = "auto"
    activation: str = "swiglu"
    router: str = "top_k"
    noisy_gating: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    shared_d_ff: int = 0
    node_limit: NodeLimit | None = None

    @property
    def dispatcher(self) -> str:
        """The dispatch algorithm: "loop", "einsum" or "sort" ("triton" dispatches by sort)."""
        return "sort" if self.impl == "triton" else self.impl

    @property
    def expert_backend(self) -> str:
        """The expert backend ``backend`` names, with ``impl="triton"`` resolved."""
        return "triton" if self.impl == "triton" else self.backend

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
        check_choice("backend", self.backend, BACKENDS)
        if self.impl == "triton" and self.backend not in ("auto", "triton"):
            raise ValueError(
                f"impl='triton' is shorthand for impl='sort', backend='triton'; "
                f"got backend={self.backend!r} with it"
            )
        if self.impl == "loop" and self.backend not in ("auto", "loop"):
            raise ValueError(
                "impl='loop' runs one expert at a time with plain matmuls, so backend must be "
                f"'auto' or 'loop', got {self.backend!r}"
            )
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("router", self.router, ROUTERS)
        check_capacity_factor(self.capacity_factor)
        if self.router == "expert_choice":
            if self.capacity_factor is None:
                raise ValueError(
                    "router='expert_choice' needs a capacity_factor (tokens per expert)"
                )
            if self.score != "softmax":
                raise ValueError("router='expert_choice' scores with score='softmax' only")
            if self.bias_update_rate or self.node_limit is not None:
                raise ValueError(
                    "router='expert_choice' is balanced by construction: bias_update_rate "
                    "must be 0 and node_limit None"
                )
        if self.node_limit is not None:
            if not isinstance(self.node_limit, NodeLimit):
                raise TypeError(f"node_limit must be a NodeLimit or None, got {self.node_limit!r}")
            self.node_limit.check(self.num_experts, self.top_k)
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
