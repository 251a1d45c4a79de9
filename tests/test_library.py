"""moe_lab used as a library, from a user's point of view: in one's own model and training loop,
under autocast, in nn.Sequential, saved and pickled."""

import io
import pickle
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import moe_lab
from moe_lab import MoE, MoEConfig, MoEFFN

ROOT = Path(__file__).resolve().parents[1]
PATHS = [("loop", "auto", None), ("loop", "auto", 1.0), ("einsum", "auto", None),
         ("einsum", "bmm", 1.0), ("sort", "auto", None), ("sort", "bmm", 1.0),
         ("sort", "loop", 0.75)]


@pytest.mark.parametrize("impl, backend, cf", PATHS)
def test_float32_layer_under_bf16_autocast(impl, backend, cf):
    """The usual recipe: float32 weights, bf16 activations from a Linear, autocast on. Routing
    stays float32, the output is bf16 on every path, gradients reach float32 weights."""
    torch.manual_seed(0)
    pre = nn.Linear(16, 16)
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, impl=impl, backend=backend,
                        capacity_factor=cf))
    x = torch.randn(24, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = pre(x)
        out = moe(h)
    assert h.dtype == torch.bfloat16 and out.y.dtype == torch.bfloat16
    assert out.weights.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    # routing in float32 on the same (bf16) activations: the same decision as without autocast
    plain = moe(h.detach().float())
    assert torch.equal(out.indices, plain.indices)
    torch.testing.assert_close(out.y.float(), plain.y, rtol=0.05, atol=0.05)
    (out.y.float().sum() + out.aux_loss).backward()
    assert moe.experts.w_up.grad.dtype == torch.float32
    assert moe.router.weight.grad.dtype == torch.float32


def test_moeffn_fits_nn_sequential_and_keeps_its_losses():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, aux_loss_coef=0.5, z_loss_coef=0.25)
    ffn = MoEFFN(cfg)
    model = nn.Sequential(nn.Linear(8, 8), ffn, nn.Linear(8, 2))
    x = torch.randn(5, 3, 8)
    y = model(x)
    assert y.shape == (5, 3, 2)
    last = ffn.last
    torch.testing.assert_close(ffn.loss(), 0.5 * last.aux_loss + 0.25 * last.z_loss)
    (y.square().mean() + ffn.loss()).backward()
    assert ffn.moe.router.weight.grad is not None
    with pytest.raises(RuntimeError, match="forward call first"):
        MoEFFN(cfg).loss()


@pytest.mark.parametrize("impl", ["sort", "triton"])
def test_layer_pickles_and_round_trips_its_state(impl):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, impl=impl))
    again = pickle.loads(pickle.dumps(moe))
    buf = io.BytesIO()
    torch.save(moe.state_dict(), buf)
    buf.seek(0)
    fresh = MoE(moe.cfg)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(6, 8)
    if impl == "sort":  # the Triton interpreter is slow; equality of state is enough there
        torch.testing.assert_close(again(x).y, moe(x).y)
        torch.testing.assert_close(fresh(x).y, moe(x).y)
    for (n, p), (_, q) in zip(moe.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_version_matches_the_project_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert moe_lab.__version__ == meta["project"]["version"]


def test_expert_choice_sends_a_single_token_to_every_expert():
    """Documented: expert choice is a training-time router; one decoding token gets all E."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="expert_choice",
                        capacity_factor=1.0))
    out = moe(torch.randn(1, 8))
    assert out.keep.tolist() == [[True] * 4] and out.tokens_per_expert.tolist() == [1] * 4
