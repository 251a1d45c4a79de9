"""MoEConfig validates every field on construction with a clear, named error."""

import pytest

from moe_lab import MoEConfig

BASE = dict(d_model=8, d_ff=16, num_experts=4)


def test_defaults_follow_the_contract():
    cfg = MoEConfig(**BASE)
    assert (cfg.top_k, cfg.score, cfg.normalize_weights) == (2, "softmax", True)
    assert (cfg.capacity_factor, cfg.impl, cfg.activation) == (None, "sort", "swiglu")


def test_keyword_only():
    with pytest.raises(TypeError):
        MoEConfig(8, 16, 4)


@pytest.mark.parametrize(
    "changes, exc, words",
    [
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=5), ValueError, "top_k"),
        (dict(d_model=0), ValueError, "d_model"),
        (dict(d_ff=-3), ValueError, "d_ff"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(d_model=8.0), TypeError, "d_model"),
        (dict(num_experts=True), TypeError, "num_experts"),
        (dict(score="relu"), ValueError, "score"),
        (dict(impl="magic"), ValueError, "impl"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(capacity_factor=0), ValueError, "capacity_factor"),
        (dict(capacity_factor=-1.5), ValueError, "capacity_factor"),
        (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
        (dict(capacity_factor="1.25"), TypeError, "capacity_factor"),
        (dict(router="expert_choice"), ValueError, "capacity_factor"),
        (dict(normalize_weights=1), TypeError, "normalize_weights"),
        (dict(aux_loss_coef=-0.1), ValueError, "aux_loss_coef"),
    ],
)
def test_bad_values_raise_named_errors(changes, exc, words):
    with pytest.raises(exc, match=words):
        MoEConfig(**{**BASE, **changes})


def test_top1_normalised_warns_router_gets_no_gradient():
    with pytest.warns(UserWarning, match="no gradient"):
        MoEConfig(**BASE, top_k=1)
