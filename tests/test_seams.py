"""The layer's three seams: router, dispatcher, expert backend; each tested alone and together.

Every dispatcher x backend pair equals an independent float64 reference, outputs and gradients;
each dispatcher is checked alone with a fixed routing decision and fake experts.
"""

import dataclasses

import pytest
import torch

from moe_lab import MoE, MoEConfig
from moe_lab.dispatch import make_dispatcher
from moe_lab.losses import load_balancing_loss, router_z_loss
from moe_lab.router import RoutingDecision

# (dispatcher, backend) pairs the config accepts; triton runs in test_kernels (interpreter).
PAIRS = [("loop", "auto"), ("loop", "loop")] + [
    (d, b) for d in ("einsum", "sort") for b in ("auto", "loop", "bmm", "grouped_mm")
]


def reference(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, from the output's own routing decision: sum_j w * Expert_j(x)."""
    out = moe(x_TD)
    keep = out.keep if out.keep is not None else torch.ones_like(out.indices, dtype=torch.bool)
    rows = []
    for t in range(x_TD.shape[0]):
        y = x_TD.new_zeros(x_TD.shape[1])
        for j in range(out.indices.shape[1]):
            if keep[t, j]:
                e = int(out.indices[t, j])
                y = y + out.weights[t, j].to(x_TD.dtype) * moe.experts.forward_expert(
                    e, x_TD[t : t + 1]
                )[0]
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("router, cf", [("top_k", None), ("top_k", 0.75),
                                        ("expert_choice", 1.0)])
@pytest.mark.parametrize("impl, backend", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def test_every_pair_equals_the_float64_reference(impl, backend, router, cf, activation):
    """float64 where the backend allows it; grouped_mm (float32 on CPU) against float64."""
    dtype = torch.float32 if backend == "grouped_mm" else torch.float64
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=4, top_k=2, impl=impl, backend=backend,
                    router=router, capacity_factor=cf, activation=activation)
    moe = MoE(cfg).to(dtype)
    ref_moe = MoE(dataclasses.replace(cfg, impl="loop", backend="auto")).double()
    ref_moe.load_state_dict(moe.state_dict())
    with torch.no_grad():
        for m in (moe, ref_moe):
            m.router.weight[0] += 0.5  # uneven loads, some drops with capacity
    x = torch.randn(21, 8, dtype=torch.float64)
    xs = x.to(dtype).detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    y, want = moe(xs).y, reference(ref_moe, xr)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y.double(), want, **tol)
    g = torch.randn_like(want)
    (y * g.to(dtype)).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(xs.grad.double(), xr.grad, **tol)
    for (n, p), (_, q) in zip(moe.named_parameters(), ref_moe.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), q.grad, msg=n, **tol)
    if backend == "auto" and impl != "loop":
        assert moe.experts.last_backend in ("bmm", "grouped_mm", "loop")
        assert f"last call: {moe.experts.last_backend}" in repr(moe)


class FakeExperts:
    """Expert e multiplies its rows by (e + 1): any misrouted row shows in the output.

    ``backend="loop"`` takes the sort dispatcher's fused path (``forward_routed``); any other
    name its gather / ``forward_sorted`` / combine path.
    """

    last_backend = None

    def __init__(self, num_experts, backend="loop"):
        self.num_experts, self.backend = num_experts, backend

    def resolve_backend(self, x, counts_E, backend=None):
        return self.backend if backend is None else backend

    def forward_routed(self, x_TD, token_of_N, w_N, counts_E):
        scale_N = torch.repeat_interleave(torch.arange(1, self.num_experts + 1), counts_E)
        h_ND = x_TD[token_of_N] * (scale_N.to(x_TD.dtype) * w_N).unsqueeze(1)
        return torch.zeros_like(x_TD).index_add(0, token_of_N, h_ND)

    def forward_expert(self, e, x_ND):
        return x_ND * (e + 1)

    def forward_batched(self, x_ECD):
        return x_ECD * torch.arange(1, self.num_experts + 1, dtype=x_ECD.dtype)[:, None, None]

    def forward_sorted(self, x_ND, counts_E, backend=None):
        scale_N = torch.repeat_interleave(torch.arange(1, self.num_experts + 1), counts_E)
        return x_ND * scale_N.to(x_ND.dtype).unsqueeze(1)


def fixed_decision(keep: bool) -> RoutingDecision:
    """Four tokens, E = 3, k = 2; token 3 goes twice to expert 2; slot (1, 0) dropped if keep."""
    indices = torch.tensor([[0, 1], [1, 2], [2, 0], [2, 2]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0], [0.3, 0.7]],
                           dtype=torch.float64)
    keep_Tk = None
    if keep:
        keep_Tk = torch.ones(4, 2, dtype=torch.bool)
        keep_Tk[1, 0] = False
    zero = torch.zeros((), dtype=torch.long)
    kept = indices if keep_Tk is None else indices[keep_Tk]
    counts = torch.bincount(kept.reshape(-1), minlength=3)  # the kept assignments per expert
    return RoutingDecision(weights, indices, keep_Tk, 4 if keep else None,
                           torch.zeros(4, 3), torch.zeros(4, 3), zero.double(), zero.double(),
                           counts, zero, zero)


@pytest.mark.parametrize("fake_backend", ["loop", "other"])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("name", ["loop", "einsum", "sort"])
def test_each_dispatcher_alone_with_fake_experts(name, keep, fake_backend):
    x = torch.arange(8, dtype=torch.float64).view(4, 2) + 1
    r = fixed_decision(keep)
    scale = (r.indices_Tk + 1).double() * r.weights_Tk
    if keep:
        scale = scale * r.keep_Tk
    want = x * scale.sum(1, keepdim=True)
    experts = FakeExperts(3, backend=fake_backend)
    torch.testing.assert_close(make_dispatcher(name)(x, r, experts), want)


def test_losses_match_their_formulas():
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=6, d_ff=8, num_experts=5, top_k=2)).double()
    x = torch.randn(30, 6, dtype=torch.float64)
    out = moe(x)
    logits = x @ moe.router.weight.t()
    probs = logits.softmax(-1)
    f = torch.bincount(out.indices.reshape(-1), minlength=5).double() / out.indices.numel()
    torch.testing.assert_close(out.aux_loss, 5 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(out.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(probs, out.indices, 5))
    torch.testing.assert_close(out.z_loss, router_z_loss(logits))


def test_nonzero_expert_bias_is_used_without_a_bias_rate():
    """A bias set by hand (or loaded) moves selection even when bias_update_rate is 0."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=6, d_ff=8, num_experts=4, top_k=1, normalize_weights=False))
    x = torch.randn(40, 6)
    with torch.no_grad():
        moe.router.expert_bias[3] = 10.0
    assert (moe(x).indices == 3).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["loop", "einsum", "sort"])
def test_low_precision_layer_is_close_to_float32(impl, dtype):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, impl=impl)
    moe32 = MoE(cfg)
    low = MoE(cfg).to(dtype)
    low.load_state_dict(moe32.state_dict())
    x = torch.randn(24, 16)
    out = low(x.to(dtype))
    assert out.y.dtype == dtype
    same = (out.indices == moe32(x).indices).all(1)  # rounding may flip a close choice
    assert same.float().mean() > 0.8
    torch.testing.assert_close(out.y.float()[same], moe32(x).y[same], rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"impl": "triton", "backend": "bmm"}, "shorthand"),
        ({"impl": "loop", "backend": "grouped_mm"}, "one expert at a time"),
        ({"backend": "cublas"}, "backend must be one of"),
        ({"router": "expert_choice", "capacity_factor": 1.0, "score": "sigmoid"}, "softmax"),
        ({"router": "expert_choice", "capacity_factor": 1.0, "bias_update_rate": 0.1},
         "balanced by construction"),
    ],
)
def test_config_rejects_contradictory_choices(kw, words):
    with pytest.raises(ValueError, match=words):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, **kw)


def test_update_bias_checks_its_argument():
    moe = MoE(MoEConfig(d_model=4, d_ff=4, num_experts=4))
    with pytest.raises(ValueError, match="shape"):
        moe.update_bias(torch.ones(3))
    with pytest.raises(TypeError, match="tensor"):
        moe.update_bias([1, 2, 3, 4])
    moe.update_bias(torch.tensor([4, 0, 0, 0]), rate=0.5)
    assert moe.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]


def test_expert_choice_counts_unrouted_tokens_not_drops():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=6, d_ff=8, num_experts=3, router="expert_choice",
                        capacity_factor=0.5))
    out = moe(torch.randn(12, 6))
    assert int(out.dropped) == 0
    never = ~out.keep.any(1)
    assert int(out.unrouted) == int(never.sum()) > 0
    assert (out.y[never] == 0).all()
    assert out.tokens_per_expert.tolist() == [2, 2, 2]  # C = ceil(0.5 * 12 / 3)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_loop_gradients_when_only_some_inputs_need_them(activation, input_grad):
    """The sort dispatcher's fused loop path skips the input's gradient when x needs none, and
    still gives the router and the experts theirs, equal to the unfused (bmm) path."""
    torch.manual_seed(3)
    cfg = MoEConfig(d_model=6, d_ff=10, num_experts=4, top_k=2, activation=activation,
                    impl="sort", backend="loop")
    fused = MoE(cfg).double()
    plain = MoE(dataclasses.replace(cfg, backend="bmm")).double()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(20, 6, dtype=torch.float64)
    grads = []
    for moe in (fused, plain):
        xi = x.clone().requires_grad_(input_grad)
        moe.zero_grad()
        (moe(xi).y ** 2).sum().backward()
        grads.append([p.grad for p in moe.parameters()] + [xi.grad])
    assert (grads[0][-1] is None) == (not input_grad)
    for a, b in zip(grads[0], grads[1], strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b)
