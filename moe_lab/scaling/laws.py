"""Scaling laws for comparing an MoE with a dense model at equal predicted loss.

Krajewski et al. (krajewski2024finegrained, eq. 1, eq. 9 and Table 1) fitted, on their data,

    MoE:    L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta
    dense:  L(N, D)    = c + a_d / N^alpha_d + b_d / D^beta_d

with N the total non-embedding parameters, D the training tokens and G the granularity (how
many times smaller an expert is than the standard FFN of width 4 d_model; a token is routed to
G of them, so the active parameters do not depend on G). Every MoE they fitted has expansion
rate E = 64 (total expert parameters / active expert parameters), granularity 1 to 16, 129M to
3.7B parameters and 16B to 130B tokens: the law says nothing about other expansion rates, and
beyond that range it is an extrapolation. Losses are on their corpus, so only equalities of
loss (which dense model matches which MoE) are used, never the absolute values.

The coefficients below are the published ones; nothing here is refitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .arch import Architecture, ffn_params
from .count import param_breakdown


@dataclass(frozen=True, kw_only=True)
class FineGrainedLaw:
    """Coefficients of the MoE law (eq. 9) and of the dense law (eq. 1) fitted beside it."""

    a: float
    alpha: float
    b: float
    beta: float
    g: float
    gamma: float
    c: float
    dense_a: float
    dense_alpha: float
    dense_b: float
    dense_beta: float
    expansion: float  # the only expansion rate the MoE law was fitted at
    granularity_range: tuple[float, float]
    params_range: tuple[float, float]  # total non-embedding parameters of the fitted models
    source: str


KRAJEWSKI2024 = FineGrainedLaw(
    a=18.1, alpha=0.115, b=30.8, beta=0.147, g=2.1, gamma=0.58, c=0.47,
    dense_a=16.3, dense_alpha=0.126, dense_b=26.7, dense_beta=0.127,
    expansion=64.0, granularity_range=(1.0, 16.0), params_range=(129e6, 3.7e9),
    source="krajewski2024finegrained, Table 1 (E = 64)",
)


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def moe_loss(n_params: float, tokens: float, granularity: float,
             law: FineGrainedLaw = KRAJEWSKI2024) -> float:
    """Predicted loss of an MoE (expansion rate law.expansion) with n_params total
    non-embedding parameters, trained on `tokens` tokens."""
    for name, v in (("n_params", n_params), ("tokens", tokens), ("granularity", granularity)):
        _positive(name, v)
    lo, hi = law.granularity_range
    if not lo <= granularity <= hi:
        raise ValueError(f"granularity must be in [{lo}, {hi}] (the fitted range), "
                         f"got {granularity}")
    return (law.c + (law.g / granularity**law.gamma + law.a) / n_params**law.alpha
            + law.b / tokens**law.beta)


def dense_loss(n_params: float, tokens: float, law: FineGrainedLaw = KRAJEWSKI2024) -> float:
    """Predicted loss of a dense Transformer with n_params non-embedding parameters."""
    _positive("n_params", n_params)
    _positive("tokens", tokens)
    return law.c + law.dense_a / n_params**law.dense_alpha + law.dense_b / tokens**law.dense_beta


def dense_params_for_loss(loss: float, tokens: float,
                          law: FineGrainedLaw = KRAJEWSKI2024) -> float:
    """Parameters a dense model trained on `tokens` tokens needs to reach `loss`."""
    _positive("tokens", tokens)
    room = loss - law.c - law.dense_b / tokens**law.dense_beta
    if not room > 0:
        raise ValueError(f"no dense model reaches loss {loss} on {tokens:.3g} tokens: the "
                         "data term alone is larger")
    return (law.dense_a / room) ** (1.0 / law.dense_alpha)


def cheapest_dense(loss: float, law: FineGrainedLaw = KRAJEWSKI2024) -> tuple[float, float]:
    """(parameters, tokens) of the dense model that reaches `loss` with the fewest training
    FLOPs 6 N D. Minimising log N + log D on a / N^alpha + b / D^beta = r puts
    alpha x = beta y for x, y the two terms: x = r beta / (alpha + beta)."""
    room = loss - law.c
    if not room > 0:
        raise ValueError(f"loss must exceed the irreducible c = {law.c}, got {loss}")
    al, be = law.dense_alpha, law.dense_beta
    x, y = room * be / (al + be), room * al / (al + be)
    return (law.dense_a / x) ** (1.0 / al), (law.dense_b / y) ** (1.0 / be)


@dataclass(frozen=True)
class LawInputs:
    """What the law needs from an Architecture."""

    n_params: float  # total non-embedding parameters
    active_params: float  # active non-embedding parameters
    expansion: float  # expert parameters in an MoE layer / those a token uses
    granularity: float  # standard FFN parameters (8 d^2) / parameters of one routed expert


def law_inputs(model: Architecture, law: FineGrainedLaw = KRAJEWSKI2024) -> LawInputs:
    """N, E and G of `model` in the law's terms, checking E equals the law's expansion rate.

    The paper's experts are 2-matrix FFNs; a GLU expert of width f has as many parameters as
    a 2-matrix one of width 1.5 f, so G = 8 d^2 / (parameters of one expert) for either kind.
    """
    if not isinstance(model, Architecture):
        raise TypeError(f"model must be an Architecture, got {type(model).__name__}")
    if not model.is_moe:
        raise ValueError("law_inputs needs an MoE model")
    parts = param_breakdown(model, active_embeddings="none")
    total = sum(t for name, (t, _) in parts.items() if name != "embedding")
    active = sum(a for name, (_, a) in parts.items() if name != "embedding")
    if not model.tied_embeddings:
        total -= parts["output"][0]
        active -= parts["output"][1]
    routed_t, routed_a = parts["routed_experts"]
    shared = parts["shared_experts"][0]
    expansion = (routed_t + shared) / (routed_a + shared)
    expert = ffn_params(model.d_model, model.d_ff_expert, model.expert_glu, model.ffn_bias)
    granularity = 8 * model.d_model**2 / expert
    if not math.isclose(expansion, law.expansion, rel_tol=0.02):
        raise ValueError(f"{model.name}: expansion rate {expansion:.1f}, but the law was "
                         f"fitted at {law.expansion:g} only")
    return LawInputs(total, active, expansion, granularity)
