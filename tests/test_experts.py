"""Expert FFNs: the stacked layout, the dense FFN, and the grouped forms agree."""

import pytest
import torch
import torch.nn.functional as F

from moe_lab import FFN, Experts
from moe_lab.backends import grouped_mm_loop


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_weight_layout(activation):
    ex = Experts(5, 8, 12, activation)
    assert ex.w_up.shape == (5, 8, 12) and ex.w_down.shape == (5, 12, 8)
    assert (ex.w_gate is None) == (activation == "gelu")
    if ex.w_gate is not None:
        assert ex.w_gate.shape == (5, 8, 12)


def test_swiglu_expert_formula():
    torch.manual_seed(0)
    ex = Experts(3, 6, 10).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    e = 2
    want = (F.silu(x @ ex.w_gate[e]) * (x @ ex.w_up[e])) @ ex.w_down[e]
    torch.testing.assert_close(ex.forward_expert(e, x), want)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_ffn_equals_single_expert(activation):
    torch.manual_seed(0)
    ffn = FFN(6, 10, activation).double()
    ex = Experts(1, 6, 10, activation).double()
    with torch.no_grad():
        for name in ("w_gate", "w_up", "w_down"):
            if getattr(ffn, name) is not None:
                getattr(ex, name)[0].copy_(getattr(ffn, name))
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(ffn(x), ex.forward_expert(0, x))


@pytest.mark.parametrize("counts", [[3, 0, 4], [0, 0, 7], [0, 0, 0], [1, 1, 1]])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_sorted_batched_and_grouped_agree(counts, activation):
    torch.manual_seed(1)
    ex = Experts(3, 4, 6, activation).double()
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 4, dtype=torch.float64)
    blocks = torch.split(x, counts)
    want = torch.cat([ex.forward_expert(e, b) for e, b in enumerate(blocks)] + [x[:0]])
    torch.testing.assert_close(ex.forward_sorted(x, counts_E), want)
    for backend in ("loop", "bmm"):
        torch.testing.assert_close(ex.forward_sorted(x, counts_E, backend=backend), want)
    w_up = torch.cat([b @ ex.w_up[e] for e, b in enumerate(blocks)] + [x[:0] @ ex.w_up[0]])
    torch.testing.assert_close(grouped_mm_loop(x, ex.w_up, counts_E), w_up)


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_experts"):
        Experts(0, 4, 4)
    with pytest.raises(ValueError, match="activation"):
        FFN(4, 4, "relu")
