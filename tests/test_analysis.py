"""moe_lab.analysis: mutual information and its baseline, co-activation, fluctuation, ablation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab import MoEConfig
from moe_lab.analysis import (
    BYTE_CLASSES,
    ablate_expert,
    ablate_hidden_units,
    byte_class,
    coactivation,
    coactivation_expected,
    entropy,
    fluctuation,
    independence_bias,
    mutual_information,
    routing_trace,
    shuffled_mi,
)
from moe_lab.model import ModelConfig, TinyLM


def t(*v):
    return torch.tensor(v)


def test_mi_of_a_hand_computed_table():
    # p(x, y): (0,0) 1/2, (1,0) 1/4, (1,1) 1/4. H(Y) = H(3/4) = 0.811278; H(Y|X) = 1/2 * 1 bit
    x, y = t(0, 0, 1, 1), t(0, 0, 0, 1)
    h_y = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert mutual_information(x, y) == pytest.approx(h_y - 0.5, abs=1e-12)
    assert mutual_information(x, y) == pytest.approx(0.311278, abs=1e-6)
    assert mutual_information(t(0, 0, 1, 1), t(3, 3, 7, 7)) == pytest.approx(1.0)
    assert mutual_information(t(0, 0, 1, 1), t(0, 1, 0, 1)) == 0.0
    assert entropy(t(0, 1, 2, 3)) == pytest.approx(2.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), min_size=1, max_size=60))
def test_mi_properties(pairs):
    x = torch.tensor([a for a, _ in pairs])
    y = torch.tensor([b for _, b in pairs])
    mi = mutual_information(x, y)
    assert -1e-12 <= mi <= min(entropy(x), entropy(y)) + 1e-9
    assert mi == pytest.approx(mutual_information(y, x), abs=1e-9)
    assert mutual_information(x, x) == pytest.approx(entropy(x), abs=1e-9)


def test_mi_refuses_bad_input():
    with pytest.raises(TypeError, match="x must be an integer"):
        mutual_information(torch.rand(3), t(0, 1, 2))
    with pytest.raises(ValueError, match="as many labels"):
        mutual_information(t(0, 1), t(0, 1, 2))
    with pytest.raises(ValueError, match=">= 0"):
        mutual_information(t(-1, 1), t(0, 1))


def test_shuffled_baseline_keeps_loads_and_matches_the_independence_bias():
    g = torch.Generator().manual_seed(0)
    N = 20_000
    x = torch.randint(0, 16, (N,), generator=g)
    y = torch.randint(0, 8, (N,), generator=g)  # independent of x
    base = shuffled_mi(x, y, repeats=30, generator=g)
    bias = independence_bias(x, y)  # 15 * 7 / (2 N ln 2), about 0.0038 bits
    assert base.mean() == pytest.approx(bias, rel=0.15)
    assert mutual_information(x, y) < base.mean() + 4 * base.std()
    # a dependent y stands far above its baseline
    y_dep = torch.where(torch.rand(N, generator=g) < 0.5, x % 8, y)
    dep = shuffled_mi(x, y_dep, repeats=5, generator=g)
    assert mutual_information(x, y_dep) > 50 * dep.mean()
    # the same loads: a permutation of y has y's counts
    perm = y_dep[torch.randperm(N, generator=g)]
    assert torch.equal(torch.bincount(perm), torch.bincount(y_dep))
    with pytest.raises(ValueError, match="repeats"):
        shuffled_mi(x, y, repeats=0)


def test_byte_classes():
    got = byte_class(torch.tensor(list(b"aZ09 \n.;{\x00\xc3")))
    names = [BYTE_CLASSES[i] for i in got]
    assert names == [
        "letter",
        "letter",
        "digit",
        "digit",
        "space",
        "space",
        "punctuation",
        "punctuation",
        "punctuation",
        "other",
        "other",
    ]
    with pytest.raises(ValueError, match="byte values"):
        byte_class(t(256))


def test_coactivation_counts_pairs_and_expected_counts():
    idx = t([0, 1], [1, 0], [0, 2], [3, 1])
    c = coactivation(idx, 4)
    want = torch.zeros(4, 4, dtype=torch.long)
    for a, b in ((0, 1), (0, 1), (0, 2), (3, 1)):
        want[a, b] += 1
        want[b, a] += 1
    assert torch.equal(c, want)
    top3 = coactivation(t([0, 1, 2]), 3)
    assert torch.equal(top3, torch.ones(3, 3, dtype=torch.long) - torch.eye(3, dtype=torch.long))
    # slot marginals: first (2/4 on 0, 1/4 on 1, 1/4 on 3), second (2/4 on 1, 1/4 on 0, 1/4 on 2)
    exp = coactivation_expected(idx, 4)
    assert exp[0, 1] == pytest.approx(4 * (0.5 * 0.5 + 0.25 * 0.25))
    assert torch.allclose(exp, exp.T) and exp.diagonal().abs().sum() == 0
    with pytest.raises(ValueError, match="lie in"):
        coactivation(t([0, 4]), 4)


def test_fluctuation_ignores_order_within_the_k():
    a = t([0, 1], [2, 3], [4, 5], [6, 7])
    b = t([1, 0], [2, 4], [4, 5], [7, 1])
    assert fluctuation(a, b) == 0.5
    assert fluctuation(a, a.flip(1)) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        fluctuation(a, a[:2])


def small_moe(seed=0, k=2, E=4):
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=16, d_ff=8, num_experts=E, top_k=k)
    return TinyLM(ModelConfig(block_size=8, d_model=16, n_layers=2, n_heads=2, d_ff=16, moe=moe))


def test_ablated_expert_gets_no_token_and_the_others_keep_theirs():
    model = small_moe()
    x = torch.randint(0, 256, (6, 8), generator=torch.Generator().manual_seed(1))
    before = routing_trace(model, x).long()  # (layers, T, k)
    with torch.no_grad():
        probs_TE = None
        h = model.tok_emb(x) + model.pos_emb(torch.arange(8))
        h = h + model.blocks[0].attn(model.blocks[0].norm1(h))
        probs_TE = (
            model.blocks[0].norm2(h).reshape(-1, 16) @ model.blocks[0].ffn.router.weight.T
        ).softmax(-1)
    for e in range(4):
        with ablate_expert(model, 0, e):
            after = routing_trace(model, x).long()
        assert not (after[0] == e).any()  # the ablated expert gets nothing
        hit = (before[0] == e).any(1)
        assert hit.any() and (~hit).any()
        assert torch.equal(after[0][~hit], before[0][~hit])  # untouched tokens keep their k
        # a token that had e gets its next choice: the top-k of the other experts
        others = probs_TE.clone()
        others[:, e] = -1
        want = others.topk(2, dim=1).indices
        assert torch.equal(after[0][hit].sort(1).values, want[hit].sort(1).values)
    assert torch.equal(routing_trace(model, x).long(), before)  # the bias is restored
    assert model.blocks[0].ffn.router.expert_bias.eq(0).all()
    with pytest.raises(ValueError, match="expert must be"):
        with ablate_expert(model, 0, 4):
            pass


def test_ablating_hidden_units_zeroes_their_contribution_and_restores():
    torch.manual_seed(0)
    dense = TinyLM(ModelConfig(block_size=8, d_model=16, n_layers=2, n_heads=2, d_ff=16))
    x = torch.randint(0, 256, (2, 8))
    ref = dense(x).logits
    ffn = dense.blocks[1].ffn
    h = torch.randn(5, 16)
    with ablate_hidden_units(dense, 1, slice(0, 4)):
        cut = ffn(h)
        assert not torch.allclose(dense(x).logits, ref)
    a = torch.nn.functional.silu(h @ ffn.w_gate[:, 4:]) * (h @ ffn.w_up[:, 4:])
    torch.testing.assert_close(cut, a @ ffn.w_down[4:])
    torch.testing.assert_close(dense(x).logits, ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="dense"):
        with ablate_hidden_units(small_moe(), 0, slice(0, 1)):
            pass


def test_routing_trace_shape_and_first_choice():
    model = small_moe(k=2, E=4)
    x = torch.randint(0, 256, (3, 8))
    tr = routing_trace(model, x, chunk=2)
    assert tr.shape == (2, 24, 2) and tr.dtype == torch.uint8
    out = model(x)
    for layer, r in enumerate(out.routing):
        assert torch.equal(tr[layer].long(), r.indices)
        w = r.weights
        assert (w[:, 0] >= w[:, 1]).all()  # column 0 is the first choice
