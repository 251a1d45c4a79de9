"""torch.compile: every dispatcher x CPU backend compiles and equals eager, forward and backward;
graph breaks only where the algorithm reads a count; capacity paths do not recompile per size."""

import pytest
import torch
import torch._dynamo as dynamo

from moe_lab import MoE, MoEConfig

PAIRS = [("loop", "auto"), ("einsum", "auto"), ("einsum", "grouped_mm"), ("sort", "auto"),
         ("sort", "loop"), ("sort", "bmm"), ("sort", "grouped_mm")]


def layer(impl, backend, cf, skew, seed=0):
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, impl=impl,
                        backend=backend, capacity_factor=cf))
    with torch.no_grad():
        moe.router.weight[0] += skew  # skewed routing: uneven loads, drops with capacity
    return moe


def step(module, x, g):
    x = x.clone().requires_grad_()
    out = module(x)
    ((out.y * g).sum() + 0.1 * out.aux_loss + 0.01 * out.z_loss).backward()
    return out.y.detach(), x.grad


def cases():
    """Every pair x {dropless, capacity} x {balanced, skewed}; one runs in the fast loop
    (make check), the others with the full suite (about a second or two each)."""
    for impl, backend in PAIRS:
        for cf in (None, 1.0):
            for skew in (0.0, 2.0):
                fast = (impl, backend, cf, skew) == ("sort", "auto", None, 2.0)
                yield pytest.param(
                    impl, backend, cf, skew, marks=() if fast else pytest.mark.slow,
                    id=f"{impl}-{backend}-{'dropless' if cf is None else 'capacity'}-"
                       f"{'skewed' if skew else 'balanced'}",
                )


@pytest.mark.parametrize("impl, backend, cf, skew", cases())
def test_compiled_equals_eager(impl, backend, cf, skew):
    """aot_eager traces forward and backward through dynamo and AOTAutograd (what inductor
    would compile); the inductor test below runs the default backend on two of these."""
    dynamo.reset()
    eager, compiled = layer(impl, backend, cf, skew), layer(impl, backend, cf, skew)
    x, g = torch.randn(40, 16) + 0.5, torch.randn(40, 16)
    y0, gx0 = step(eager, x, g)
    y1, gx1 = step(torch.compile(compiled, backend="aot_eager"), x, g)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("impl, cf", [("sort", None), ("einsum", 1.0)])
def test_default_backend_compiles(impl, cf):
    dynamo.reset()
    eager, compiled = layer(impl, "auto", cf, 1.0), layer(impl, "auto", cf, 1.0)
    x, g = torch.randn(40, 16), torch.randn(40, 16)
    y0, gx0 = step(eager, x, g)
    y1, gx1 = step(torch.compile(compiled), x, g)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)


def break_sites(moe, x):
    """Where dynamo breaks the graph: the set of (function, line) in moe_lab."""
    dynamo.reset()
    explained = dynamo.explain(lambda t: moe(t).y)(x)
    sites = set()
    for reason in explained.break_reasons:
        frames = [f for f in reason.user_stack if "moe_lab" in f.filename]
        if frames:
            sites.add(frames[-1].name)
    return sites


def test_graph_breaks_only_where_a_count_is_read():
    x = torch.randn(40, 16)
    # dropless sort with padded bmm: one read, the busiest expert's count (the slab's size)
    assert break_sites(layer("sort", "bmm", None, 1.0), x) == {"run_bmm"}
    # einsum with a capacity factor: static shapes throughout, one graph
    assert break_sites(layer("einsum", "auto", 1.0, 1.0), x) == set()
    # dropless einsum: the slab is sized by the busiest expert's load
    assert break_sites(layer("einsum", "auto", None, 1.0), x) == {"dispatch_einsum"}


def test_capacity_path_does_not_recompile_for_each_batch_size():
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    dynamo.reset()
    moe = layer("einsum", "auto", 1.25, 1.0)
    fn = torch.compile(moe, backend=counting_backend, dynamic=True)
    for T in (40, 48, 56, 72):  # four capacities: 13, 15, 18, 23 slots
        x = torch.randn(T, 16)
        torch.testing.assert_close(fn(x).y, moe(x).y, rtol=1e-5, atol=1e-5)
    assert len(compiles) == 1, f"{len(compiles)} graphs for four batch sizes"
