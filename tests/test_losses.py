"""Load-balancing loss and router z-loss: values, limits and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab import load_balancing_loss, router_z_loss


@settings(max_examples=40, deadline=None)
@given(E=st.integers(1, 12), k=st.integers(1, 4), reps=st.integers(1, 5))
def test_uniform_routing_gives_one(E, k, reps):
    """Perfectly uniform routing and uniform probabilities: the loss is exactly 1."""
    k = min(k, E)
    T = E * reps
    # token t's choices are experts t, t+1, ..., t+k-1 (mod E): every expert gets T*k/E.
    indices = (torch.arange(T)[:, None] + torch.arange(k)[None, :]) % E
    probs = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    assert load_balancing_loss(probs, indices, E).item() == pytest.approx(1.0)


def test_collapsed_routing_gives_E():
    E, T = 8, 16
    probs = torch.zeros(T, E, dtype=torch.float64)
    probs[:, 3] = 1.0
    indices = torch.full((T, 1), 3)
    assert load_balancing_loss(probs, indices, E).item() == pytest.approx(E)


def test_matches_formula_and_gradient_flows_through_probs_only():
    torch.manual_seed(0)
    T, E, k = 10, 4, 2
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    indices = probs.topk(k, -1).indices
    f = torch.stack([(indices == e).sum() for e in range(E)]).double() / (T * k)
    want = E * (f * probs.mean(0)).sum()
    got = load_balancing_loss(probs, indices, E)
    torch.testing.assert_close(got, want)
    got.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    want = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits), want)


@pytest.mark.parametrize(
    "args, exc, words",
    [
        ((torch.ones(4, 3), torch.zeros(4, 1, dtype=torch.long), 4), ValueError, "probs"),
        ((torch.ones(4, 4), torch.zeros(3, 1, dtype=torch.long), 4), ValueError, "indices"),
        ((torch.ones(4, 4), torch.full((4, 1), 4), 4), ValueError, "indices"),
        ((torch.ones(4, 4), torch.zeros(4, 1), 4), TypeError, "indices"),
        (
            (torch.ones(4, 4, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long), 4),
            TypeError,
            "probs",
        ),
    ],
)
def test_bad_input(args, exc, words):
    with pytest.raises(exc, match=words):
        load_balancing_loss(*args)
    with pytest.raises(TypeError, match="logits"):
        router_z_loss(torch.ones(2, 2, dtype=torch.long))
