"""Expert parallelism: EP over W gloo ranks equals the unsharded layer; traffic adds up;
bad setups and dead ranks fail loudly and in bounded time.

Distributed tests start real processes (torch.multiprocessing spawn, torchrun) on a port picked
at run time; each has a hard pytest timeout and the launcher's own deadline, so none can hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab import MoE, MoEConfig
from moe_lab.parallel import ExpertParallelMoE, spawn
from moe_lab.parallel.checks import (
    equivalence,
    fault_drill,
    make_case,
    run_step,
    setup_drill,
    traffic,
)
from moe_lab.parallel.traffic import dedup_node_rows, dispatch_rows, node_matrix, step_matrix
from moe_lab.routing import (
    NodeLimit,
    groups_spanned,
    node_limited_top_k,
    router_probs,
    top_k_routing,
)

ROOT = Path(__file__).resolve().parents[1]
FLOAT_KEYS = ("y", "aux_loss", "z_loss", "x_grad", "expert_grad", "router_grad", "shared_grad",
              "expert_bias")


# ---------------------------------------------------------------- node-limited routing


@st.composite
def grouped_logits(draw):
    G = draw(st.integers(1, 4))
    per = draw(st.integers(1, 4))
    M = draw(st.integers(1, G))
    k = draw(st.integers(1, M * per))
    T = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    logits = torch.randn(T, G * per, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    return logits, k, G, M


@settings(max_examples=60, deadline=None)
@given(grouped_logits())
def test_node_limited_spans_at_most_m_groups_and_is_top_k_inside_them(case):
    logits, k, G, M = case
    w, idx = node_limited_top_k(logits, k, G, M)
    E = logits.shape[1]
    assert (groups_spanned(idx, E, G) <= M).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w), dtype=w.dtype))
    probs = router_probs(logits)
    # The picks are the k best experts among the groups the token is allowed to use.
    per = E // G
    for t in range(logits.shape[0]):
        groups = sorted(set((idx[t] // per).tolist()))
        allowed = torch.cat([torch.arange(g * per, (g + 1) * per) for g in groups])
        best = probs[t, allowed].topk(k).values
        torch.testing.assert_close(probs[t, idx[t]].sort(descending=True).values, best)


@settings(max_examples=30, deadline=None)
@given(grouped_logits())
def test_node_limited_with_all_groups_is_plain_top_k(case):
    logits, k, G, _ = case
    w, idx = node_limited_top_k(logits, k, G, G)
    w_ref, idx_ref = top_k_routing(logits, k)
    assert torch.equal(idx, idx_ref)
    assert torch.equal(w, w_ref)


def test_node_limited_bias_moves_selection_not_weights():
    logits = torch.zeros(3, 8, dtype=torch.float64)
    bias = torch.zeros(8)
    bias[6] = 1.0  # group 1 (experts 4..7) wins only because of the bias
    w, idx = node_limited_top_k(logits, 2, 2, 1, bias=bias)
    assert (idx // 4 == 1).all() and (idx == 6).any(dim=1).all()
    torch.testing.assert_close(w, torch.full((3, 2), 0.5, dtype=torch.float64))


def test_node_limited_rejects_bad_arguments():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        node_limited_top_k(logits, 2, 3, 1)
    with pytest.raises(ValueError, match="max_groups"):
        node_limited_top_k(logits, 2, 2, 3)
    with pytest.raises(ValueError, match="cannot fit"):
        node_limited_top_k(logits, 5, 2, 1)
    with pytest.raises(TypeError, match="num_groups"):
        NodeLimit(num_groups=2.0, max_groups=1)


# ---------------------------------------------------------------- traffic accounting


def test_dispatch_rows_counts_kept_assignments_per_destination():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (50, 2), generator=gen)
    keep = torch.rand(50, 2, generator=gen) > 0.3
    rows = dispatch_rows(idx, keep, 8, 4)
    expected = [sum(int(keep[t, j]) for t in range(50) for j in range(2) if idx[t, j] // 2 == d)
                for d in range(4)]
    assert rows.tolist() == expected
    assert int(dispatch_rows(idx, None, 8, 4).sum()) == 100
    with pytest.raises(ValueError, match="divisible"):
        dispatch_rows(idx, None, 8, 3)


def test_node_matrix_and_step_matrix():
    m = torch.arange(16).reshape(4, 4)
    n = node_matrix(m, 2)
    assert n.tolist() == [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]
    s = step_matrix(m, row_bytes=4)
    assert torch.equal(s, s.t()) and int(s.sum()) == 2 * 2 * 4 * int(m.sum())


def test_dedup_node_rows_counts_each_token_once_per_node():
    idx = torch.tensor([[0, 1], [0, 5], [4, 6], [7, 3]])
    keep = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    # nodes of 4 experts: token 0 -> {0}, token 1 -> {0} (expert 5 dropped), 2 -> {1}, 3 -> {1,0}
    assert dedup_node_rows(idx, keep, 8, 2).tolist() == [3, 2]


# ---------------------------------------------------------------- single-process errors


def test_needs_a_process_group_and_a_moe():
    moe = MoE(MoEConfig(d_model=4, d_ff=8, num_experts=4))
    with pytest.raises(TypeError, match="moe must be"):
        ExpertParallelMoE.from_moe(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="not initialised"):
        ExpertParallelMoE.from_moe(moe)


def test_spawn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        spawn(equivalence, 0)
    with pytest.raises(TypeError, match="importable"):
        spawn(lambda: None, 1)


# ---------------------------------------------------------------- equivalence, W = 1, 2, 4

CASES = [
    {},  # dropless
    {"capacity_factor": 1.0},
    {"capacity_factor": 0.5, "activation": "gelu", "top_k": 1},
    {"capacity_factor": 1.25, "num_experts": 16, "top_k": 4, "tokens": 9},
    {"shared_d_ff": 6},  # a replicated shared expert (DeepSeekMoE)
    # sigmoid scores with a selection bias (DeepSeek-V3), noisy gating, both with capacity
    {"score": "sigmoid", "expert_bias": True, "capacity_factor": 1.0},
    {"noisy_gating": True, "expert_bias": True, "capacity_factor": 1.0},
    {"router": "expert_choice", "capacity_factor": 1.0},  # k = E slots, kept where picked
]


def _check_rank_results(per_rank, W):
    assert len(per_rank) == W
    for n, case in enumerate(CASES + [{"node_limited": True}]):
        rows = [r[n] for r in per_rank]
        for res in rows:
            for key in FLOAT_KEYS:
                assert res[key] < 1e-12, (W, case, key, res[key])
            assert res["ints_equal"], (W, case)
        # The scenario really has what it claims: idle experts, drops when capacity is set.
        if case.get("router") == "expert_choice":  # balanced by construction: none idle
            assert rows[0]["idle_experts"] == 0
            continue
        if not (case.get("noisy_gating") or case.get("expert_bias")):  # these revive some
            assert rows[0]["idle_experts"] >= 2
        if case.get("capacity_factor"):
            assert sum(r["dropped"] for r in rows) > 0
        if W > 1:
            sends = [c for r in rows for c in r["send_rows"]]
            assert len(set(sends)) > 1, "routing should be uneven across ranks"


def _equivalence_and_traffic(W):
    """Everything one spawn of W ranks checks (process start-up is the slow part)."""
    groups = 2 if W == 4 else 1
    results = equivalence(CASES + [{"num_experts": 8, "top_k": 2, "tokens": 8}],
                          [None] * len(CASES) + [{"num_groups": 2, "max_groups": 1}])
    plain = traffic({"num_experts": 8, "tokens": 20, "capacity_factor": 1.0},
                    ranks_per_node=W // groups)
    limited = traffic({"num_experts": 8, "tokens": 20}, {"num_groups": groups, "max_groups": 1},
                      ranks_per_node=W // groups)
    setup = setup_drill() if W == 2 else None
    step = run_step({"capacity_factor": 1.0})
    # EP x DP: two independent EP groups of 2 ranks, each with its own data.
    sub = equivalence(CASES[:2], ep_size=2) if W == 4 else None
    return {"eq": results, "plain": plain, "limited": limited, "setup": setup, "step": step,
            "sub": sub}


def _check_traffic(t, W):
    a = t["analytic_dispatch"]
    assert a.shape == (W, W)
    assert torch.equal(t["measured_dispatch"], a)
    assert torch.equal(t["measured_combine"], a.t())  # results come back the other way
    assert torch.equal(t["measured_combine.backward"], a)
    assert torch.equal(t["measured_dispatch.backward"], a.t())


_RUNS: dict[int, list] = {}


def _run(W):
    if W not in _RUNS:
        _RUNS[W] = spawn(_equivalence_and_traffic, W, args=(W,), deadline_s=150, pg_timeout_s=30)
    return _RUNS[W]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("W", [1, 2, 4])
def test_ep_equals_unsharded(W):
    out = _run(W)
    _check_rank_results([o["eq"] for o in out], W)
    for o in out:
        _check_traffic(o["plain"], W)
        _check_traffic(o["limited"], W)
    _check_assembled_step([o["step"] for o in out], W)
    if W == 4:
        for o in out:
            for res in o["sub"]:
                assert max(res[k] for k in FLOAT_KEYS) < 1e-12 and res["ints_equal"]
                assert len(res["send_rows"]) == 2  # the group's size, not the world's
    if W == 4:  # 2 nodes of 2 ranks, max 1 node per token: every token crosses at most once
        for r, o in enumerate(out):
            dedup = o["limited"]["dedup_rank_to_node"][r]  # this rank's row
            tokens = 20 + 3 * r
            assert int(dedup.sum()) == tokens * o["limited"]["row_bytes"]


def _check_assembled_step(steps, W):
    """Expert slices stacked over ranks give the full expert gradient; router gradients are
    local, and their sum over ranks is what data parallelism's all-reduce hands every rank."""
    moe, xs, gs = make_case(W, capacity_factor=1.0)
    ref_xs = [x.clone().requires_grad_() for x in xs]
    outs = [moe(x) for x in ref_xs]
    sum((o.y * g).sum() + 0.3 * o.aux_loss + 0.1 * o.z_loss
        for o, g in zip(outs, gs, strict=True)).backward()
    for r, st_ in enumerate(steps):
        torch.testing.assert_close(st_["y"], outs[r].y.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(st_["x_grad"], ref_xs[r].grad, rtol=0, atol=1e-12)
        assert st_["grads"]["experts.w_up"].shape == (8 // W, 8, 12)
    for name in ("w_gate", "w_up", "w_down"):
        full = torch.cat([st_["grads"][f"experts.{name}"] for st_ in steps])
        torch.testing.assert_close(full, getattr(moe.experts, name).grad, rtol=0, atol=1e-12)
    router = sum(st_["grads"]["router.weight"] for st_ in steps)
    torch.testing.assert_close(router, moe.router.weight.grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- failures


@pytest.mark.timeout(180)
def test_bad_setup_raises_on_every_rank():
    for msgs in (o["setup"] for o in _run(2)):
        assert "num_experts=3 is not divisible by the world size 2" in msgs[0]
        assert "different MoEConfig" in msgs[1] and "ranks [1]" in msgs[1]
        assert "different MoE weights" in msgs[2] and "ranks [1]" in msgs[2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_stalled_rank_fails_the_others_within_the_timeout(mode):
    timeout_s, hang_s = 3.0, 7.0
    *survivors, victim = spawn(fault_drill, 3, args=(mode, hang_s), pg_timeout_s=timeout_s,
                               deadline_s=90, raise_on_error=False)
    assert not victim.ok and victim.exitcode == (3 if mode == "exit" else 4)
    for rank, s in enumerate(survivors):
        assert s.ok, s.error
        msg = s.value["error"]
        assert msg is not None, f"rank {rank} should have raised PeerFailure"
        assert f"rank {rank} of 3" in msg and "died or stalled" in msg and "3 s" in msg
        # A dead peer closes its sockets (seen at once); a stalled one costs the full timeout.
        assert s.value["seconds"] < timeout_s + 2.5
        if mode == "hang":
            assert s.value["seconds"] > 0.9 * timeout_s


# ---------------------------------------------------------------- torchrun


@pytest.mark.timeout(150)
def test_torchrun_check_matches_unsharded():
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "moe_lab.parallel",
           "--check", "--timeout-s", "60"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("-> OK") == 4, proc.stdout
    assert "EP=2 equals the unsharded layer on every rank: True" in proc.stdout


# ---------------------------------------------------------------- one-rank group, in process


@pytest.fixture
def one_rank_group():
    import datetime

    import torch.distributed as dist

    from moe_lab.parallel import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_bad_input_and_splits_raise_clear_errors(one_rank_group):
    from moe_lab.parallel import all_to_all

    moe, xs, _ = make_case(1)
    ep = ExpertParallelMoE.from_moe(moe)
    assert ep.experts.w_gate.shape == moe.experts.w_gate.shape  # W=1 holds every expert
    with pytest.raises(TypeError, match="dtype"):
        ep(xs[0].float())
    with pytest.raises(ValueError, match="d_model=8"):
        ep(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="input_splits"):
        all_to_all(torch.randn(4, 2), [4], [3])
    with pytest.raises(ValueError, match="output_splits"):
        all_to_all(torch.randn(4, 2), [4, 0], [4])
    with pytest.raises(ValueError, match="node_limit needs router='top_k'"):
        ExpertParallelMoE.from_moe(
            MoE(MoEConfig(d_model=4, d_ff=8, num_experts=4, router="expert_choice",
                          capacity_factor=1.0)),
            node_limit=NodeLimit(num_groups=2, max_groups=1),
        )
    with pytest.raises(ValueError, match="node_limit"):
        ExpertParallelMoE.from_moe(moe, node_limit=NodeLimit(num_groups=3, max_groups=1))
    # Leading dimensions are flattened and restored, as in the unsharded layer.
    x = xs[0][:6].reshape(2, 3, 8)
    torch.testing.assert_close(ep(x).y, moe(x).y)
    with torch.no_grad():  # inference: no graph, same numbers
        torch.testing.assert_close(ep(x).y, moe(x).y)


def _training_checks(W):
    from moe_lab.parallel.checks import training_sync

    case = {"capacity_factor": 1.25, "tokens": 8}
    return {"sync": training_sync(case), "ddp": training_sync(case, use_ddp=True)}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("W", [2, 4])
def test_expert_parallel_training_gradients(W):
    """A user's model around an EP layer: sync_gradients, and DDP after prepare_ddp, give every
    parameter the gradient of the mean loss; DDP leaves each rank's own experts in place."""
    for res in spawn(_training_checks, W, args=(W,), deadline_s=150, pg_timeout_s=30):
        for how in ("sync", "ddp"):
            r = res[how]
            assert r["experts"] == ["moe.experts.w_down", "moe.experts.w_gate",
                                    "moe.experts.w_up"]
            assert r["experts_kept"], how
            for name, err in r["worst"].items():
                assert err < 1e-12, (W, how, name, err)
