"""Per-rank checks run inside a process group: EP equals the unsharded layer; traffic adds up.

Each function here runs on every rank (under ``spawn`` or torchrun) and returns plain data
(floats, ints, tensors) so the launcher can collect it.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.distributed as dist

from moe_lab.config import MoEConfig, NodeLimit
from moe_lab.layer import MoE
from moe_lab.parallel.comm import PeerFailure, TrafficLog
from moe_lab.parallel.layer import ExpertParallelMoE
from moe_lab.parallel.traffic import dedup_node_rows, dispatch_rows, gather_rows


def make_case(
    world_size: int,
    *,
    seed: int = 0,
    d_model: int = 8,
    d_ff: int = 12,
    num_experts: int = 8,
    top_k: int = 2,
    capacity_factor: float | None = None,
    activation: str = "swiglu",
    dead_experts: tuple[int, ...] = (1, 6),
    tokens: int = 6,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    shared_d_ff: int = 0,
    score: str = "softmax",
    noisy_gating: bool = False,
    expert_bias: bool = False,
    router: str = "top_k",
):
    """A seeded layer and per-rank inputs built identically on every rank.

    Every token leans along one direction u and the router rows of ``dead_experts`` point
    against u, so those experts get no tokens. Rank r has ``tokens + 3r`` tokens, shifted
    towards the router row of a different live expert, so ranks route unevenly.
    ``expert_bias`` sets a non-zero selection bias; ``noisy_gating`` a non-zero noise weight.
    Returns (moe, xs, grads_out): one input and one output cotangent per rank.
    """
    # top-1 runs Switch-style (unnormalised), so the router gradient is checked, not just zero
    cfg = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k,
                    capacity_factor=capacity_factor, activation=activation,
                    normalize_weights=top_k > 1, shared_d_ff=shared_d_ff, score=score,
                    noisy_gating=noisy_gating, router=router)
    torch.manual_seed(seed)
    moe = MoE(cfg).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(d_model, generator=gen, dtype=dtype)
    u = u / u.norm()
    with torch.no_grad():
        for e in dead_experts:
            moe.router.weight[e] = -4.0 * u
        if expert_bias:
            moe.router.expert_bias.copy_(0.05 * torch.randn(num_experts, generator=gen))
        if noisy_gating:
            moe.router.noise.weight.copy_(0.5 * torch.randn(num_experts, d_model, generator=gen))
    xs, gs = [], []
    live = [e for e in range(num_experts) if e not in dead_experts]
    for r in range(world_size):
        T = tokens + 3 * r
        fav = moe.router.weight[live[(3 * r) % len(live)]].detach()
        x = torch.randn(T, d_model, generator=gen, dtype=dtype) + 3.0 * u + 1.5 * fav
        xs.append(x.to(device))
        gs.append(torch.randn(T, d_model, generator=gen, dtype=dtype).to(device))
    return moe.to(device), xs, gs


def reference_layer(moe: MoE, node_limit: NodeLimit | None = None) -> MoE:
    """The oracle: the real unsharded layer (a copy with ``node_limit`` in its config)."""
    if node_limit is None:
        return moe
    w = moe.router.weight
    limited = MoE(dataclasses.replace(moe.cfg, node_limit=node_limit)).to(w.device, w.dtype)
    limited.load_state_dict(moe.state_dict())
    return limited


def _loss(out, g):
    return (out.y * g).sum() + 0.3 * out.aux_loss + 0.1 * out.z_loss


def _grad(p: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient; None (no token reached it on this rank) counts as zero."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def ep_groups(ep_size: int):
    """Split the world into consecutive expert-parallel groups of ``ep_size`` ranks (the other
    dimension being data parallel). Every rank must call this; returns (my group, its index)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    groups = [dist.new_group(list(range(g * ep_size, (g + 1) * ep_size)))
              for g in range(world // ep_size)]
    return groups[rank // ep_size], rank // ep_size


def equivalence(
    cases: list[dict], node_limits: list | None = None, ep_size: int | None = None
) -> list[dict]:
    """On this rank: EP forward/backward vs the unsharded layer, for each case of ``make_case``.

    With ``ep_size``, the world is split into groups of that many ranks, each an independent EP
    layer with its own data (EP x DP). Returns per case the largest absolute differences
    (outputs, losses, input, expert and router gradients) and whether integer outputs match.
    """
    group, replica = (None, 0) if ep_size is None else ep_groups(ep_size)
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    device = _device()
    results = []
    for n, case in enumerate(cases):
        nl = node_limits[n] if node_limits else None
        nl = NodeLimit(**nl) if isinstance(nl, dict) else nl
        case = dict(case, seed=case.get("seed", 0) + 1000 * replica)
        moe, xs, gs = make_case(W, device=device, **case)
        ep = ExpertParallelMoE.from_moe(moe, group, node_limit=nl)
        moe = reference_layer(moe, nl)
        x = xs[rank].clone().requires_grad_()
        torch.manual_seed(9000 + rank)  # noisy gating: the same noise as the reference's
        out = ep(x)
        _loss(out, gs[rank]).backward()
        global_load = ep.global_tokens_per_expert(out)
        ep.update_bias(out.tokens_per_expert, rate=0.1)  # from this rank's load: made global

        ref_xs = [xi.clone().requires_grad_() for xi in xs]
        refs = []
        for r, xi in enumerate(ref_xs):
            torch.manual_seed(9000 + r)
            refs.append(moe(xi))
        losses = [_loss(o, g) for o, g in zip(refs, gs, strict=True)]
        # router and shared expert are replicated: their gradients are this rank's tokens' only
        shared = list(moe.shared.parameters()) if moe.shared is not None else []
        router_local, *shared_local = torch.autograd.grad(
            losses[rank], [moe.router.weight, *shared], retain_graph=True
        )
        sum(losses).backward()  # expert gradients: every rank's tokens
        ref = refs[rank]
        sl = slice(ep.first_expert, ep.first_expert + ep.num_local)
        expert_err = max(
            _maxdiff(_grad(getattr(ep.experts, name)), _grad(getattr(moe.experts, name))[sl])
            for name in ("w_gate", "w_up", "w_down") if getattr(moe.experts, name) is not None
        )
        ref_load = sum(o.tokens_per_expert for o in refs)
        moe.update_bias(ref_load, rate=0.1)
        results.append({
            "y": _maxdiff(out.y, ref.y),
            "aux_loss": _maxdiff(out.aux_loss, ref.aux_loss),
            "z_loss": _maxdiff(out.z_loss, ref.z_loss),
            "x_grad": _maxdiff(x.grad, ref_xs[rank].grad),
            "expert_grad": expert_err,
            "router_grad": _maxdiff(ep.router.weight.grad, router_local),
            "shared_grad": max(
                (_maxdiff(_grad(p), g)
                 for p, g in zip(ep.shared.parameters() if shared else [], shared_local,
                                 strict=True)),
                default=0.0,
            ),
            "expert_bias": _maxdiff(ep.expert_bias, moe.expert_bias),
            "ints_equal": bool(torch.equal(out.tokens_per_expert, ref.tokens_per_expert)
                               and out.dropped == ref.dropped
                               and torch.equal(global_load, ref_load)),
            "dropped": int(out.dropped),
            "idle_experts": int((global_load == 0).sum()),
            "send_rows": out.send_rows,
            "recv_rows": out.recv_rows,
        })
    return results


def traffic(case: dict, node_limit: dict | None = None, ranks_per_node: int = 1) -> dict:
    """One training step with a TrafficLog: measured bytes per exchange vs the analytic count.

    Returns (W, W) matrices (row i = bytes rank i sent to rank j) for each exchange, the
    analytic dispatch matrix from routing alone, and the deduplicated node-level rows.
    """
    rank, W = dist.get_rank(), dist.get_world_size()
    device = _device()
    nl = NodeLimit(**node_limit) if node_limit else None
    moe, xs, gs = make_case(W, device=device, **case)
    ep = ExpertParallelMoE.from_moe(moe, node_limit=nl)
    ep.traffic_log = TrafficLog()
    x = xs[rank].clone().requires_grad_()
    out = ep(x)
    _loss(out, gs[rank]).backward()
    cfg, keep = moe.cfg, out.keep  # keep: the assignments capacity kept (None: all)
    row_bytes = cfg.d_model * x.element_size()
    analytic = dispatch_rows(out.indices, keep, cfg.num_experts, W) * row_bytes
    measured = {
        tag: gather_rows(torch.tensor(ep.traffic_log.total(tag), device=device))
        for tag in ("dispatch", "combine", "dispatch.backward", "combine.backward")
    }
    out_dict = {f"measured_{k}": v.cpu() for k, v in measured.items()}
    out_dict["analytic_dispatch"] = gather_rows(analytic).cpu()
    num_nodes = W // ranks_per_node
    if num_nodes >= 1 and W % ranks_per_node == 0:
        rows = dedup_node_rows(out.indices, keep, cfg.num_experts, num_nodes)
        out_dict["dedup_rank_to_node"] = gather_rows(rows * row_bytes).cpu()
    out_dict["row_bytes"] = row_bytes
    return out_dict


def traffic_pair(case: dict, node_limit: dict, ranks_per_node: int) -> dict:
    """``traffic`` with plain top-k and with node-limited routing, in one launch."""
    return {"plain": traffic(case, None, ranks_per_node),
            "limited": traffic(case, node_limit, ranks_per_node)}


def run_step(case: dict) -> dict:
    """One EP training step on this rank; returns its output, input gradient and the gradients
    of its parameters (its expert slice, its local router gradient)."""
    rank, W = dist.get_rank(), dist.get_world_size()
    moe, xs, gs = make_case(W, device=_device(), **case)
    ep = ExpertParallelMoE.from_moe(moe)
    x = xs[rank].clone().requires_grad_()
    out = ep(x)
    _loss(out, gs[rank]).backward()
    grads = {name: _grad(p).cpu() for name, p in ep.named_parameters()}
    return {"y": out.y.detach().cpu(), "x_grad": x.grad.cpu(), "grads": grads,
            "tokens_per_expert": out.tokens_per_expert.cpu(),
            "local_expert_rows": out.local_expert_rows.cpu(), "send_rows": out.send_rows}


def setup_drill() -> list[str | None]:
    """Bad setups on purpose; each must raise the same clear ValueError on every rank."""
    rank, W = dist.get_rank(), dist.get_world_size()
    attempts = [
        {"num_experts": W + 1, "dead_experts": (), "top_k": 1},  # E not divisible by W
        {"d_ff": 12 + 4 * rank},  # configs differ between ranks
        {"seed": rank},  # ranks built their layer from different seeds
    ]
    caught: list[str | None] = []
    for kw in attempts:
        moe, _, _ = make_case(W, device=_device(), **kw)
        try:
            ExpertParallelMoE.from_moe(moe)
            caught.append(None)
        except ValueError as err:
            caught.append(str(err))
    return caught


def fault_drill(mode: str = "exit", hang_s: float = 7.0) -> dict:
    """The last rank dies (``mode="exit"``) or stalls (``"hang"``) in the middle of a forward,
    after the dispatch exchange; the others report how long they took to fail and why."""
    rank, W = dist.get_rank(), dist.get_world_size()
    moe, xs, _ = make_case(W, num_experts=2 * W, dead_experts=(1,), dtype=torch.float32,
                           device=_device())
    ep = ExpertParallelMoE.from_moe(moe)
    ep(xs[rank]).y.sum().backward()  # one healthy step first
    if rank == W - 1:
        def fail(*args, **kwargs):
            if mode == "exit":
                os._exit(3)
            time.sleep(hang_s)
            os._exit(4)

        ep.experts.forward_sorted = fail
    start = time.monotonic()
    try:
        ep(xs[rank])
    except PeerFailure as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _TinyNet(torch.nn.Module):
    """A model with replicated parts around one MoE layer, as a user's own model would be."""

    def __init__(self, moe: MoE):
        super().__init__()
        D = moe.cfg.d_model
        self.pre, self.moe, self.post = torch.nn.Linear(D, D), moe, torch.nn.Linear(D, D)

    def forward(self, x):
        out = self.moe(torch.tanh(self.pre(x)))
        return self.post(out.y), out.aux_loss


def _net_loss(net, x, g):
    y, aux = net(x)
    return (y * g).mean() + 0.1 * aux


def training_sync(case: dict, use_ddp: bool = False) -> dict:
    """On this rank: a model holding an EP layer, trained on this rank's slice of one global
    batch; after ``sync_gradients`` (or DDP with ``prepare_ddp``) every gradient must equal the
    gradient of the mean over ranks of each rank's loss, computed here on one process."""
    from moe_lab.parallel.training import expert_parameter_names, prepare_ddp, sync_gradients

    rank, W = dist.get_rank(), dist.get_world_size()
    moe, xs, gs = make_case(W, **case)
    torch.manual_seed(5)
    ref = _TinyNet(moe).double()
    net = _TinyNet(ExpertParallelMoE.from_moe(moe))
    net.pre.double(), net.post.double()
    net.pre.load_state_dict(ref.pre.state_dict())
    net.post.load_state_dict(ref.post.state_dict())
    experts_before = net.moe.experts.w_up.detach().clone()
    model = net
    if use_ddp:
        prepare_ddp(net)
        model = torch.nn.parallel.DistributedDataParallel(net)
    loss = _net_loss(model, xs[rank], gs[rank])
    loss.backward()
    if not use_ddp:
        sync_gradients(net)
    # the reference: one process, the mean over ranks of each rank's loss
    sum(_net_loss(ref, x, g) for x, g in zip(xs, gs, strict=True)).div(W).backward()
    ref_grads = dict(ref.named_parameters())
    sl = slice(net.moe.first_expert, net.moe.first_expert + net.moe.num_local)
    worst = {}
    expert_names = set(expert_parameter_names(net))
    for name, p in net.named_parameters():
        want = ref_grads[name].grad
        if name in expert_names:
            want = want[sl]
        worst[name] = _maxdiff(p.grad, want)
    return {"worst": worst, "experts": sorted(expert_names),
            "experts_kept": bool(torch.equal(net.moe.experts.w_up, experts_before))}
