"""Expert choice balances by construction; bias balancing shrinks load spread; the chapter-6
training helper is deterministic and validates its input; float32 sort path equals loop."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab import MoE, MoEConfig, expert_capacity, top_k_routing
from moe_lab.backends import torch_grouped_mm_applies
from moe_lab.lab.balance import ClusterTask, train_balancing
from moe_lab.routing import expert_choice_routing


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 8), data=st.data(), seed=st.integers(0, 999))
def test_expert_choice_every_expert_takes_exactly_C_best_tokens(T, E, data, seed):
    C = data.draw(st.integers(1, T))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weights_EC, tokens_EC = expert_choice_routing(logits, C)
    assert tokens_EC.shape == (E, C)
    probs = logits.softmax(-1)
    for e in range(E):
        picked = tokens_EC[e]
        assert len(set(picked.tolist())) == C  # C distinct tokens
        torch.testing.assert_close(weights_EC[e], probs[picked, e])
        rest = torch.ones(T, dtype=torch.bool)
        rest[picked] = False
        if rest.any():  # nobody left out scores higher than someone picked
            assert probs[rest, e].max() <= probs[picked, e].min()


def test_expert_choice_layer_loads_are_exactly_capacity():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, router="expert_choice",
                        capacity_factor=1.5))
    out = moe(torch.randn(3, 10, 8) + 2.0)  # skewed input: top-k would be unbalanced
    assert out.tokens_per_expert.tolist() == [expert_capacity(30, 4, 1, 1.5)] * 4 == [12] * 4


def test_bias_balancing_shrinks_load_spread_on_a_skewed_fixed_router():
    E, k, T = 8, 2, 512
    layer = MoE(MoEConfig(d_model=4, d_ff=8, num_experts=E, top_k=k, bias_update_rate=0.01))
    g = torch.Generator().manual_seed(0)
    skew = torch.linspace(1, -1, E)  # a fixed router that favours low-numbered experts
    spreads = []
    for _ in range(300):
        logits = torch.randn(T, E, generator=g) + skew
        _, idx = top_k_routing(logits, k, bias=layer.expert_bias)
        load = torch.bincount(idx.flatten(), minlength=E)
        spreads.append((load.max() / load.float().mean()).item())
        layer.update_bias(load)
    before, after = spreads[0], sum(spreads[-30:]) / 30
    assert before > 2.0  # the router really is skewed
    assert after < 1.4 and after < before / 1.5
    # the router's least favoured expert ends with a larger bias than its favourite
    assert layer.expert_bias[-1] > layer.expert_bias[0]


def test_train_balancing_is_deterministic_and_records_shares():
    task = ClusterTask(d_model=8, num_clusters=4, shift=1.0)
    a = train_balancing("bias", steps=4, batch=32, num_experts=4, d_ff=8, task=task)
    b = train_balancing("bias", steps=4, batch=32, num_experts=4, d_ff=8, task=task)
    assert torch.equal(a.load, b.load) and torch.equal(a.loss, b.loss)
    assert a.load.shape == (4, 4)
    torch.testing.assert_close(a.load.sum(1), torch.ones(4))
    assert a.bias.abs().sum() > 0  # the bias moved
    none = train_balancing("none", steps=4, batch=32, num_experts=4, d_ff=8, task=task)
    assert torch.equal(none.bias, torch.zeros(4))


def test_train_balancing_bad_input():
    with pytest.raises(ValueError, match="mode"):
        train_balancing("dropout")
    with pytest.raises(ValueError, match="steps"):
        train_balancing("none", steps=0)


@pytest.mark.parametrize("cf", [None, 0.7])
def test_float32_sort_path_equals_loop(cf):
    """float32 on CPU takes the grouped-matmul and permutation paths; they must equal loop."""
    D, Fh, E = 16, 32, 6
    x = torch.randn(50, D)
    assert torch_grouped_mm_applies(x, torch.empty(E, D, Fh))
    res = {}
    for impl in ("loop", "sort"):
        torch.manual_seed(3)
        moe = MoE(MoEConfig(d_model=D, d_ff=Fh, num_experts=E, top_k=2, impl=impl,
                            capacity_factor=cf))
        with torch.no_grad():
            moe.router.weight[0] += 1.0  # uneven loads
        xi = (x + 0.5).requires_grad_(True)
        out = moe(xi)
        (out.y * torch.linspace(-1, 1, D)).sum().backward()
        res[impl] = (out.y, xi.grad, {n: p.grad for n, p in moe.named_parameters()})
    (y0, gx0, g0), (y1, gx1, g1) = res["loop"], res["sort"]
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize(
    "dtype, D, Fh, tol",
    [(torch.float64, 6, 10, {}), (torch.float32, 8, 12, {"rtol": 1e-4, "atol": 1e-5})],
)
@pytest.mark.parametrize("backend", ["auto", "loop", "bmm", "grouped_mm"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [1, 1, 1, 1]])
def test_forward_sorted_backends_equal_per_expert_reference(counts, backend, dtype, D, Fh, tol):
    """Every CPU backend of forward_sorted (per-expert matmuls; padded bmm; torch grouped
    matmul for float32 with 16-byte rows) equals forward_expert, gradients included."""
    from moe_lab.experts import Experts

    torch.manual_seed(0)
    ex = Experts(4, D, Fh).to(dtype)
    c = torch.tensor(counts)
    x = torch.randn(int(c.sum()), D, dtype=dtype, requires_grad=True)
    assert torch_grouped_mm_applies(x, ex.w_up) == (dtype == torch.float32)
    if backend == "grouped_mm" and dtype != torch.float32:
        with pytest.raises(ValueError, match="grouped_mm' needs float32 on CPU"):
            ex.forward_sorted(x, c, backend=backend)
        return
    y = ex.forward_sorted(x, c, backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *ex.parameters()])
    blocks = torch.split(x, counts)
    ref = torch.cat([ex.forward_expert(e, b) for e, b in enumerate(blocks)])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *ex.parameters()])
    torch.testing.assert_close(y, ref, **tol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_torch_grouped_mm_takes_a_broadcast_gradient():
    """out.sum().backward() hands the grouped matmul an expanded (stride-0) gradient."""
    from moe_lab.experts import Experts

    torch.manual_seed(0)
    ex = Experts(3, 8, 12)
    c = torch.tensor([5, 0, 3])
    x = torch.randn(8, 8, requires_grad=True)
    ex.forward_sorted(x, c, backend="grouped_mm").sum().backward()
    ref = torch.cat([ex.forward_expert(e, b) for e, b in enumerate(torch.split(x, [5, 0, 3]))])
    (gx,) = torch.autograd.grad(ref.sum(), [x])
    torch.testing.assert_close(x.grad, gx, rtol=1e-4, atol=1e-5)
