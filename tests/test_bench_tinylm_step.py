"""The tiny-LM step benchmark runs end to end on the short preset and records what it promises."""

import json

import pytest
import torch

from moe_lab import MoE, MoEConfig
from tests.chapters import load_benchmark


def load_bench():
    return load_benchmark("bench_tinylm_step")


def test_bench_short_preset_writes_result(tmp_path):
    out = tmp_path / "r.json"
    res = load_bench().main(
        ["--config", "short", "--variants", "dense,moe8,moe8_fixed", "--threads", "1",
         "--repeats", "3", "--max-code-bytes", "100000", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["date"] and saved["machine"] and saved["threads"] == 1
    start, end = saved["machine_start"], saved["machine_end"]
    for key in ("cpu", "cores", "load_average", "torch", "date", "revision"):
        assert key in start and key in end
    # the older field, still written: the 1-minute load before and after the timings
    assert saved["load_average_1min"] == [
        r["load_average"][0] if r["load_average"] else None for r in (start, end)
    ]
    assert saved["command"].startswith("python benchmarks/bench_tinylm_step.py --config short")
    assert saved["ratio_to_dense"]["dense"] == 1.0 == saved["per_round_ratio_to_dense"]["dense"]
    for v in ("dense", "moe8", "moe8_fixed"):
        step, parts = saved["median_step_s"][v], saved["median_fwd_bwd_s"][v]
        assert 0 < parts < step
        assert saved["median_optimizer_s"][v] > 0
        assert saved["ratio_to_dense"][v] == pytest.approx(step / saved["median_step_s"]["dense"])
        q1, q3 = saved["per_round_ratio_quartiles"][v]
        assert q1 <= saved["per_round_ratio_to_dense"][v] <= q3


def test_fixed_assignment_is_each_tokens_k_experts_averaged():
    """Token t's j-th copy is row j*T + t of the repeated tokens; expert e owns rows
    [e*T*k/E, (e+1)*T*k/E): y_t is the mean of those k experts on x_t, gradients included."""
    T, D, E, k = 6, 8, 4, 2
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, d_ff=16, num_experts=E, top_k=k)).double()
    fixed = load_bench().FixedAssignment(moe)
    x = torch.randn(2, T // 2, D, dtype=torch.float64, requires_grad=True)
    y = fixed(x)
    rows = T * k // E
    expert_of = [[(j * T + t) // rows for j in range(k)] for t in range(T)]
    assert all(len(set(es)) == k for es in expert_of)  # k distinct experts per token
    x_TD = x.reshape(T, D)
    ref = torch.stack([
        sum(moe.experts.forward_expert(e, x_TD[t : t + 1])[0] for e in expert_of[t]) / k
        for t in range(T)
    ]).view(x.shape)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *moe.experts.parameters()], g)
    want = torch.autograd.grad(ref, [x, *moe.experts.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_fixed_assignment_rejects_what_it_cannot_split():
    bench = load_bench()
    moe = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="must split into 4 blocks"):
        bench.FixedAssignment(moe)(torch.randn(3, 8))  # 3 tokens * 2 = 6 rows, not 4 blocks
    shared = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, shared_d_ff=8))
    with pytest.raises(ValueError, match="without a shared expert"):
        bench.FixedAssignment(shared)
    with pytest.raises(ValueError, match="has no MoE layers"):
        bench.build_model("short", "dense_fixed")
