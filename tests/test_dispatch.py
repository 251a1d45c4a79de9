"""The three dispatch implementations agree, outputs and gradients, in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab import MoE, MoEConfig
from moe_lab.dispatch import make_dispatcher, permute

IMPLS = ["loop", "einsum", "sort"]

# (T, d_model, d_ff, E, k, capacity_factor, skew): shapes nobody tuned for. skew pushes the
# router toward expert 0, so some experts get no tokens.
SHAPES = [
    (1, 3, 5, 4, 1, None, 0.0),  # fewer tokens than experts
    (3, 5, 7, 8, 2, None, 0.0),  # most experts get nothing
    (17, 6, 9, 5, 5, None, 0.0),  # k = E
    (17, 6, 9, 5, 5, 0.6, 0.0),  # k = E with capacity
    (29, 7, 11, 6, 2, 1.0, 0.0),
    (29, 7, 11, 6, 2, 0.3, 3.0),  # heavy dropping, skewed
    (40, 4, 6, 3, 1, None, 5.0),  # collapsed router: empty experts
    (40, 4, 6, 3, 1, 1.7, 5.0),
    (13, 8, 3, 7, 3, 2.0, 1.0),
]


def run(impl, shape, seed=0):
    T, D, Fh, E, k, cf, skew = shape
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=D,
        d_ff=Fh,
        num_experts=E,
        top_k=k,
        capacity_factor=cf,
        impl=impl,
        normalize_weights=k > 1,  # top-1 unnormalised (Switch), so router gradients are compared
    )
    moe = MoE(cfg).double()
    with torch.no_grad():
        moe.router.weight[0] += skew
    # a positive mean input makes the skewed row win: logit_0 gains about skew * D
    x = (torch.randn(T, D, dtype=torch.float64) + (1.0 if skew else 0.0)).requires_grad_(True)
    out = moe(x)
    g = torch.randn_like(out.y)
    (out.y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return out, x.grad.clone(), grads


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("impl", ["einsum", "sort"])
def test_impl_equals_loop(impl, shape):
    ref_out, ref_gx, ref_grads = run("loop", shape)
    out, gx, grads = run(impl, shape)
    torch.testing.assert_close(out.y, ref_out.y)
    torch.testing.assert_close(gx, ref_gx)
    assert ref_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    assert out.dropped == ref_out.dropped
    assert torch.equal(out.tokens_per_expert, ref_out.tokens_per_expert)


def test_some_shape_really_has_empty_experts_and_drops():
    out, _, _ = run("loop", SHAPES[6])
    assert (out.tokens_per_expert == 0).any()
    out, _, _ = run("loop", SHAPES[5])
    assert out.dropped > 0


@settings(max_examples=50, deadline=None)
@given(
    T=st.integers(1, 30),
    E=st.integers(1, 6),
    k=st.integers(1, 3),
    drop=st.booleans(),
    seed=st.integers(0, 999),
)
def test_permute_then_unpermute_is_identity(T, E, k, drop, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, E, (T, k), generator=g)
    keep = torch.rand(T, k, generator=g) < 0.7 if drop else None
    order, token_of, counts = permute(indices, keep, E)
    x = torch.randn(T, 3, generator=g, dtype=torch.float64)
    x_sorted = x[token_of]
    # rows come grouped by expert, in counts order
    assert torch.equal(indices.reshape(-1)[order], torch.repeat_interleave(torch.arange(E), counts))
    # unpermute: scatter the sorted rows back to their (token, slot) places
    back = torch.zeros(T * k, 3, dtype=torch.float64)
    back[order] = x_sorted
    kept = torch.ones(T * k, dtype=torch.bool) if keep is None else keep.reshape(-1)
    torch.testing.assert_close(back[kept], x.repeat_interleave(k, 0)[kept])
    assert int(counts.sum()) == int(kept.sum())


def test_make_dispatcher_rejects_unknown():
    with pytest.raises(ValueError, match="dispatcher"):
        make_dispatcher("warp")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_combine_gradcheck(k):
    """The combine step's hand-written backward against finite differences."""
    from moe_lab.dispatch import _Combine

    g = torch.Generator().manual_seed(k)
    T, E = 5, 5
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    order, token_of, _ = permute(indices, None, E)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    h = torch.randn(T * k, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w: _Combine.apply(h, w, inv, order, token_of),
                                    (h, w))
    want = (w.unsqueeze(-1) * h[inv].view(T, k, 3)).sum(1)
    torch.testing.assert_close(_Combine.apply(h, w, inv, order, token_of), want)
