"""The tiny language model: config validation, causality, MoE == dense when E=1, loss wiring."""

import pytest
import torch

from moe_lab.config import MoEConfig
from moe_lab.model import ModelConfig, TinyLM, count_params

D, F = 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(moe: MoEConfig | None = None, **kw) -> ModelConfig:
    return ModelConfig(block_size=12, d_model=D, n_layers=2, n_heads=2, d_ff=F, moe=moe, **kw)


def moe_cfg(E=4, k=2, f=F // 2, **kw) -> MoEConfig:
    return MoEConfig(d_model=D, d_ff=f, num_experts=E, top_k=k, **kw)


def test_config_is_validated():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="moe.d_model"):
        tiny(moe=MoEConfig(d_model=8, d_ff=8, num_experts=2))
    with pytest.raises(TypeError, match="moe"):
        tiny(moe={"num_experts": 2})
    with pytest.raises(TypeError, match="n_layers"):
        ModelConfig(n_layers=2.0)
    with pytest.raises(TypeError):
        ModelConfig(128)  # keyword-only
    model = TinyLM(tiny())
    with pytest.raises(ValueError, match="sequence length"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 4))


@pytest.mark.parametrize("moe", [None, moe_cfg(), moe_cfg(E=4, k=1, f=F, normalize_weights=False)])
def test_causal(moe):
    """Changing the byte at position t changes no logit before t (dropless routing is per token)."""
    torch.manual_seed(0)
    model = TinyLM(tiny(moe))
    idx = torch.randint(0, 256, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_one_expert_top1_equals_dense_model():
    """E=1, k=1 routes every token to the one expert with weight 1: the dense model exactly."""
    torch.manual_seed(0)
    dense = TinyLM(tiny()).double()
    moe = TinyLM(tiny(moe_cfg(E=1, k=1, f=F))).double()
    state = dense.state_dict()
    for i in range(2):
        for name in ("w_gate", "w_up", "w_down"):
            state[f"blocks.{i}.ffn.experts.{name}"] = state.pop(f"blocks.{i}.ffn.{name}")[None]
        state[f"blocks.{i}.ffn.router.weight"] = moe.state_dict()[f"blocks.{i}.ffn.router.weight"]
        key = f"blocks.{i}.ffn.router.expert_bias"
        state[key] = moe.state_dict()[key]
    moe.load_state_dict(state)
    idx = torch.randint(0, 256, (3, 12))
    tgt = torch.randint(0, 256, (3, 12))
    out_d, out_m = dense(idx, tgt), moe(idx, tgt)
    torch.testing.assert_close(out_m.logits, out_d.logits)
    torch.testing.assert_close(out_m.ce, out_d.ce)
    out_d.ce.backward()
    out_m.ce.backward()
    torch.testing.assert_close(
        moe.blocks[0].ffn.experts.w_up.grad[0], dense.blocks[0].ffn.w_up.grad
    )


def test_loss_adds_weighted_router_losses_and_returns_routing():
    torch.manual_seed(0)
    cfg = moe_cfg(E=4, k=2, aux_loss_coef=0.5, z_loss_coef=0.25)
    model = TinyLM(tiny(cfg))
    idx, tgt = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    out = model(idx, tgt)
    torch.testing.assert_close(out.loss, out.ce + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    assert len(out.routing) == 2
    for r in out.routing:
        assert r.indices.shape == r.weights.shape == (24, 2)
        assert int(r.tokens_per_expert.sum()) == 48 and r.dropped == 0
    out.loss.backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0
    dense_out = TinyLM(tiny())(idx, tgt)
    assert dense_out.routing == [] and torch.equal(dense_out.loss, dense_out.ce)


def test_count_params_active_counts_top_k_experts():
    dense = TinyLM(tiny())
    moe = TinyLM(tiny(moe_cfg(E=8, k=2, f=F // 2)))
    total_d, active_d = count_params(dense)
    total_m, active_m = count_params(moe)
    assert total_d == active_d
    router = 2 * 8 * D
    assert active_m == active_d + router  # equal active FFN size: E=8, k=2, d_ff/2
    assert total_m == active_d + router + 2 * 3 * D * (F // 2) * 6  # 6 more experts per layer
