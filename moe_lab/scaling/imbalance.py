"""Routing skew -> stragglers: the busiest device sets the step time of an MoE layer.

With expert parallelism every device waits for the slowest one at the combine all-to-all, so
a layer takes as long as its most loaded device needs. We draw expert popularity from a Zipf
or Dirichlet law, route tokens to top_k distinct experts by that popularity (Gumbel top-k),
and measure the busiest device's load against a perfectly even split. A capacity factor caps
each expert (dropping the excess, GShard); balancing (an auxiliary loss or DeepSeek-V3's bias)
is modelled as mixing the popularity toward uniform: p' = (1 - balance) p + balance / E.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_lab.routing import expert_capacity


def expert_popularity(
    n_experts: int, *, skew: str = "zipf", s: float = 1.0, alpha: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Probabilities (E,) that a routing choice goes to each expert, summing to 1.

    "zipf": p ∝ rank^-s with ranks shuffled over experts (s=0 is uniform);
    "dirichlet": p ~ Dirichlet(alpha, ..., alpha) (large alpha -> uniform); "uniform": 1/E.
    """
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
    rng = np.random.default_rng(seed)
    if skew == "uniform":
        return np.full(n_experts, 1.0 / n_experts)
    if skew == "zipf":
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s}")
        p = rng.permutation(np.arange(1, n_experts + 1, dtype=np.float64) ** -s)
    elif skew == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        p = rng.dirichlet(np.full(n_experts, float(alpha)))
    else:
        raise ValueError(f"skew must be 'zipf', 'dirichlet' or 'uniform', got {skew!r}")
    return p / p.sum()


def route_counts(p_E: np.ndarray, *, n_tokens: int, top_k: int, seed: int = 0) -> np.ndarray:
    """Assignments per expert (E,) when n_tokens tokens each pick top_k distinct experts,
    sampled without replacement in proportion to p_E (Gumbel top-k)."""
    E = p_E.shape[0]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore"):
        keys_TE = np.log(p_E)[None, :] + rng.gumbel(size=(n_tokens, E))
    chosen_Tk = np.argpartition(-keys_TE, top_k - 1, axis=1)[:, :top_k]
    return np.bincount(chosen_Tk.ravel(), minlength=E)


@dataclass(frozen=True)
class StepStats:
    """One MoE layer step: loads after capacity, and what they cost."""

    expert_load: np.ndarray  # (E,) assignments each expert processes
    device_load: np.ndarray  # (N,) assignments each device processes
    dropped: int  # assignments dropped by capacity
    assignments: int  # n_tokens * top_k

    @property
    def straggler(self) -> float:
        """Busiest device's load over an even split: the step-time factor vs. perfect balance."""
        return float(self.device_load.max() / (self.assignments / self.device_load.shape[0]))

    @property
    def drop_fraction(self) -> float:
        return self.dropped / self.assignments


def simulate_step(
    p_E: np.ndarray, *, n_tokens: int, top_k: int, n_devices: int,
    capacity_factor: float | None = None, balance: float = 0.0, seed: int = 0,
) -> StepStats:
    """Route one batch and place experts E/N per device (experts are in random order already)."""
    p_E = np.asarray(p_E, dtype=np.float64)
    E = p_E.shape[0]
    if p_E.ndim != 1 or (p_E < 0).any() or not np.isclose(p_E.sum(), 1.0):
        raise ValueError("p_E must be a 1-D probability vector")
    for name, v in (("n_tokens", n_tokens), ("n_devices", n_devices)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if E % n_devices:
        raise ValueError(f"n_devices ({n_devices}) must divide the number of experts ({E})")
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
    p_mix = (1.0 - balance) * p_E + balance / E
    load_E = route_counts(p_mix, n_tokens=n_tokens, top_k=top_k, seed=seed)
    dropped = 0
    if capacity_factor is not None:
        # The layer's own slots per expert (chapter 5), so a simulated drop is a real one.
        cap = expert_capacity(n_tokens, E, top_k, capacity_factor)
        kept_E = np.minimum(load_E, cap)
        dropped = int((load_E - kept_E).sum())
        load_E = kept_E
    device_N = load_E.reshape(n_devices, E // n_devices).sum(axis=1)
    return StepStats(load_E, device_N, dropped, n_tokens * top_k)
