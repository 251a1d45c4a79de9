"""Routing: top-k selection, renormalisation, selection bias, capacity with GShard priority."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab import capacity_mask, expert_capacity, top_k_routing
from moe_lab.routing import expert_choice_routing, expert_positions, noisy_logits


def test_softmax_top_k_renormalised():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]], dtype=torch.float64)
    w, i = top_k_routing(logits, 2)
    p = logits.softmax(-1)[0]
    assert i.tolist() == [[1, 2]]
    torch.testing.assert_close(w[0], torch.stack([p[1], p[2]]) / (p[1] + p[2]))
    w_raw, _ = top_k_routing(logits, 2, normalize=False)
    torch.testing.assert_close(w_raw[0], torch.stack([p[1], p[2]]))


def test_scores_are_float32_or_wider():
    logits = torch.randn(5, 4).to(torch.bfloat16)
    w, _ = top_k_routing(logits, 2)
    assert w.dtype == torch.float32
    w64, _ = top_k_routing(logits.double(), 2)
    assert w64.dtype == torch.float64


def test_sigmoid_scores():
    logits = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    w, i = top_k_routing(logits, 1, score="sigmoid", normalize=False)
    assert i.item() == 1 and w.item() == pytest.approx(1 / (1 + math.exp(-2.0)))
    w, _ = top_k_routing(logits, 2, score="sigmoid")
    assert w.sum().item() == pytest.approx(1.0)


def test_bias_shifts_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)
    w, i = top_k_routing(logits, 1, bias=bias, normalize=False)
    assert i.item() == 2
    assert w.item() == pytest.approx(logits.softmax(-1)[0, 2].item())


@pytest.mark.parametrize(
    "logits, k, kw, exc, words",
    [
        (torch.randn(3, 4), 0, {}, ValueError, "k"),
        (torch.randn(3, 4), 5, {}, ValueError, "k"),
        (torch.randn(3, 4), 2, {"score": "tanh"}, ValueError, "score"),
        (torch.tensor([[0.0, float("nan")]]), 1, {}, ValueError, "NaN or inf"),
        (torch.tensor([[0.0, float("inf")]]), 1, {}, ValueError, "NaN or inf"),
        (torch.ones(3, 4, dtype=torch.long), 1, {}, TypeError, "floating"),
        (torch.randn(4), 1, {}, ValueError, "shape"),
        (torch.randn(3, 4), 2, {"bias": torch.zeros(3)}, ValueError, "bias"),
    ],
)
def test_bad_input(logits, k, kw, exc, words):
    with pytest.raises(exc, match=words):
        top_k_routing(logits, k, **kw)


def test_noisy_logits_reproducible_and_zero_std_is_clean():
    clean = torch.randn(4, 3)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(noisy_logits(clean, clean, g1), noisy_logits(clean, clean, g2))
    very_negative = torch.full_like(clean, -100.0)  # softplus -> ~0 noise
    torch.testing.assert_close(noisy_logits(clean, very_negative), clean)


@pytest.mark.parametrize(
    "T, E, k, cf, want",
    [(4096, 8, 2, 1.25, 1280), (100, 4, 2, 1.1, 55), (10, 3, 1, 1.0, 4), (0, 4, 2, 1.0, 0)],
)
def test_expert_capacity(T, E, k, cf, want):
    assert expert_capacity(T, E, k, cf) == want


def test_expert_capacity_errors():
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 2, 1, 0.0)
    with pytest.raises(ValueError, match="num_experts"):
        expert_capacity(10, 0, 1, 1.0)


def test_gshard_priority_first_choices_before_second():
    # Each expert gets two first choices and two second choices; with 2 slots each, every first
    # choice is kept and every second choice dropped, even though token 0's second choice comes
    # before token 3's first choice in token order.
    indices = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]])
    keep = capacity_mask(indices, 2, 2)
    assert keep[:, 0].all() and not keep[:, 1].any()


def gshard_reference_mask(indices, E, C):
    """Straight from the GShard/DeepSpeed definition: per choice j, then per token t."""
    T, k = indices.shape
    used = [0] * E
    keep = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in range(T):
            e = int(indices[t, j])
            if used[e] < C:
                keep[t, j] = True
            used[e] += 1
    return keep


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 40),
    E=st.integers(1, 8),
    k=st.integers(1, 3),
    C=st.integers(0, 12),
    seed=st.integers(0, 10_000),
)
def test_capacity_properties(T, E, k, C, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    _, indices = top_k_routing(torch.randn(T, E, generator=g), k)
    keep = capacity_mask(indices, E, C)
    assert torch.equal(keep, gshard_reference_mask(indices, E, C))
    for e in range(E):
        requests = int((indices == e).sum())
        kept = int(((indices == e) & keep).sum())
        assert kept <= C  # no expert over capacity
        assert kept == min(requests, C)  # nothing dropped while a slot is free


def test_expert_positions_are_queue_slots():
    indices = torch.tensor([[0, 1], [0, 1], [1, 0]])
    # choice-major queue: e0 <- t0, t1, t2(2nd); e1 <- t2, t0(2nd), t1(2nd)
    assert expert_positions(indices, 2).tolist() == [[0, 1], [1, 2], [0, 2]]


def test_capacity_mask_bad_input():
    with pytest.raises(ValueError, match="indices"):
        capacity_mask(torch.tensor([[0, 5]]), 4, 2)
    with pytest.raises(TypeError, match="indices"):
        capacity_mask(torch.tensor([[0.0, 1.0]]), 4, 2)
    with pytest.raises(ValueError, match="capacity"):
        capacity_mask(torch.tensor([[0, 1]]), 4, -1)
    with pytest.raises(ValueError, match="shape"):
        capacity_mask(torch.tensor([0, 1]), 4, 1)


def test_expert_choice_picks_top_tokens_per_expert():
    logits = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    w, tok = expert_choice_routing(logits, 2)
    assert w.shape == tok.shape == (2, 2)
    assert set(tok[0].tolist()) == {0, 1} and tok[1, 0].item() == 2
    with pytest.raises(ValueError, match="capacity"):
        expert_choice_routing(logits, 5)


def test_bias_errors_name_the_argument_and_the_problem():
    logits = torch.randn(4, 3)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        top_k_routing(logits, 2, bias=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        top_k_routing(logits, 2, bias=torch.zeros(4))
