"""The MoE layer: equals a dense FFN with one expert and a Mixtral reference; rejects bad input."""

import pytest
import torch

from moe_lab import FFN, MoE, MoEConfig
from tests.reference import mixtral_reference


@pytest.mark.parametrize("impl", ["loop", "einsum", "sort"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_one_expert_top1_equals_dense_ffn(impl, activation):
    """With E=1, k=1 the router always picks the only expert with weight 1: a dense FFN."""
    torch.manual_seed(0)
    moe = MoE(
        MoEConfig(d_model=6, d_ff=10, num_experts=1, top_k=1, impl=impl, activation=activation)
    ).double()
    ffn = FFN(6, 10, activation).double()
    with torch.no_grad():
        for name in ("w_gate", "w_up", "w_down"):
            if getattr(ffn, name) is not None:
                getattr(ffn, name).copy_(getattr(moe.experts, name)[0])
    x1 = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out = moe(x1)
    torch.testing.assert_close(out.y, ffn(x2))
    assert out.y.shape == x1.shape
    g = torch.randn_like(out.y)
    out.y.backward(g)
    ffn(x2).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    for name in ("w_gate", "w_up", "w_down"):
        if getattr(ffn, name) is not None:
            torch.testing.assert_close(getattr(moe.experts, name).grad[0], getattr(ffn, name).grad)


@pytest.mark.parametrize("impl", ["loop", "einsum", "sort"])
def test_top2_equals_independent_mixtral_reference(impl):
    torch.manual_seed(3)
    moe = MoE(MoEConfig(d_model=16, d_ff=24, num_experts=8, top_k=2, impl=impl))
    x = torch.randn(4, 9, 16)
    ex = moe.experts
    want = mixtral_reference(x.reshape(-1, 16), moe.router.weight, ex.w_gate, ex.w_up, ex.w_down, 2)
    torch.testing.assert_close(moe(x).y.reshape(-1, 16), want, rtol=1e-5, atol=1e-5)


def test_output_fields():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, capacity_factor=0.5))
    out = moe(torch.randn(32, 8))
    assert out.tokens_per_expert.shape == (4,)
    assert out.tokens_per_expert.sum().item() + out.dropped == 32 * 2
    assert out.dropped.dtype == torch.long and out.dropped.ndim == 0  # a tensor: no host sync
    assert out.aux_loss.ndim == 0 and out.z_loss.ndim == 0
    assert (out.tokens_per_expert <= 8).all()  # capacity = ceil(0.5 * 2 * 32 / 4) = 8


def test_dropped_assignments_contribute_zero():
    """A token whose every choice is dropped gets y = 0 (the residual lives outside the layer)."""
    torch.manual_seed(0)
    moe = MoE(
        MoEConfig(
            d_model=4, d_ff=4, num_experts=2, top_k=1, capacity_factor=0.5, normalize_weights=False
        )
    ).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 picks expert 0
    x = torch.ones(8, 4, dtype=torch.float64)
    out = moe(x)  # all 8 want expert 0, capacity = ceil(0.5 * 8 / 2) = 2
    assert out.dropped == 6
    assert out.y[2:].abs().max() == 0 and out.y[:2].abs().min() > 0


def test_bias_balancing_moves_load():
    torch.manual_seed(0)
    moe = MoE(
        MoEConfig(
            d_model=8,
            d_ff=8,
            num_experts=4,
            top_k=1,
            bias_update_rate=0.05,
            normalize_weights=False,
        )
    )
    x = torch.randn(256, 8)
    with torch.no_grad():
        moe.router.weight[2] += 1.0  # skew toward expert 2
    first = moe(x).tokens_per_expert.max().item()
    for _ in range(100):
        moe.update_bias(moe(x).tokens_per_expert)
    assert moe(x).tokens_per_expert.max().item() < first
    assert not moe.expert_bias.requires_grad and "router.expert_bias" in dict(moe.named_buffers())


def test_expert_choice_layer_matches_definition():
    torch.manual_seed(0)
    moe = MoE(
        MoEConfig(d_model=6, d_ff=8, num_experts=3, router="expert_choice", capacity_factor=1.0)
    ).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    out = moe(x)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    want = torch.zeros_like(x)
    C = 3  # ceil(1.0 * 9 / 3)
    for e in range(3):
        top = probs[:, e].topk(C).indices
        want[top] += probs[top, e, None] * moe.experts.forward_expert(e, x[top])
    torch.testing.assert_close(out.y, want)
    assert out.tokens_per_expert.tolist() == [3, 3, 3]


def test_noisy_gating_only_in_training():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, noisy_gating=True))
    x = torch.randn(16, 8)
    moe.eval()
    torch.testing.assert_close(moe(x).y, moe(x).y)
    with torch.no_grad():
        moe.router.noise.weight.fill_(1.0)
    moe.train()
    assert not torch.equal(moe(x).y, moe(x).y)


@pytest.mark.parametrize(
    "x, exc, words",
    [
        (torch.randn(3, 7), ValueError, "d_model"),
        (torch.ones(3, 8, dtype=torch.long), TypeError, "floating"),
        (torch.randn(0, 8), ValueError, "at least one token"),
        (torch.randn(3, 8, dtype=torch.float64), TypeError, "dtype"),
        ([[0.0] * 8], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(x, exc, words):
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4))
    with pytest.raises(exc, match=words):
        moe(x)


def test_nan_router_logits_are_reported_behind_the_debug_switch():
    from moe_lab.layer import check_values

    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4))
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    assert torch.isnan(moe(x).y).any()  # off by default: no host sync, NaN flows through
    check_values(True)
    try:
        with pytest.raises(ValueError, match="NaN or inf"):
            moe(x)
    finally:
        check_values(False)


def test_cfg_must_be_config():
    with pytest.raises(TypeError, match="MoEConfig"):
        MoE({"d_model": 8})


@pytest.mark.parametrize("router", ["top_k", "expert_choice"])
def test_shared_expert_adds_a_dense_ffn_to_the_routed_output(router):
    """shared_d_ff > 0 (DeepSeekMoE): y = routed(x) + shared FFN(x), gradients included."""
    kw = dict(d_model=6, d_ff=4, num_experts=4, top_k=2, router=router,
              capacity_factor=1.0 if router == "expert_choice" else None)
    torch.manual_seed(0)
    with_shared = MoE(MoEConfig(**kw, shared_d_ff=5)).double()
    routed = MoE(MoEConfig(**kw)).double()
    routed.load_state_dict(
        {k: v for k, v in with_shared.state_dict().items() if not k.startswith("shared.")}
    )
    ffn = FFN(6, 5).double()
    ffn.load_state_dict({k.removeprefix("shared."): v for k, v in with_shared.state_dict().items()
                         if k.startswith("shared.")})
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = with_shared(x)
    ref = routed(x_ref).y + ffn(x_ref)
    torch.testing.assert_close(out.y, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    (out.y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(with_shared.shared.w_up.grad, ffn.w_up.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(with_shared.router.weight.grad, routed.router.weight.grad)


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_shared_d_ff_is_validated(bad, exc):
    with pytest.raises(exc, match="shared_d_ff"):
        MoEConfig(d_model=4, d_ff=4, num_experts=2, shared_d_ff=bad)
