"""Sharded training: the tiny LM with every MoE layer's experts split over W processes.

    model, log = train_sharded(make_config("short", "moe8"), ep=2, out="runs/moe8_ep2")

or ``python -m moe_lab.train ... --ep 2`` (it spawns the ranks), or under torchrun
(``torchrun --nproc_per_node=2 -m moe_lab.train ... --ep 2``, which reads RANK/WORLD_SIZE).

Every rank builds the same seeded model (the same numbers as one process) and swaps each MoE
layer for ``ExpertParallelMoE``: rank r keeps experts [r*E/W, (r+1)*E/W) of every layer, the rest
(attention, embeddings, norms, routers) is replicated. Each step, rank r reads rows
[r*B/W, (r+1)*B/W) of the same global batch a single process reads. What makes W ranks train
the single-process model, step for step:

- **gradients**: ``sync_gradients`` averages the replicated ones; expert gradients (summed over
  ranks by the all-to-all's backward) are divided by W: the gradient of the mean over ranks of
  each rank's loss, which equals the single-process loss when ...
- **the auxiliary loss** is the global one: f_e, the share of assignments sent to expert e,
  is counted over every rank's tokens (an all-reduce of counts), and each rank multiplies it
  by its own tokens' mean probability P_e; the mean over ranks of E * sum_e f_e * P_e^r is
  exactly E * sum_e f_e * P_e of the whole batch (equal slices), gradient included (f carries
  none). The mean of per-rank aux losses would not be: sum_e f_e^r P_e^r mixes local shares.
  The cross-entropy and the z-loss are means over tokens, so their rank mean is already global.
- **gradient clipping** uses the global norm: replicated gradients once, plus the sum over
  ranks of each rank's expert-gradient squares.
- **bias balancing** (``update_bias``) and the **logged expert load** use global counts.
- **evaluation**: each rank scores its share of the fixed validation windows (every rank must
  run the sharded forward); rank 0 gathers them and logs the same numbers as one process.

Checkpoints are written by rank 0 in the single-process layout: expert tensors (and their AdamW
``exp_avg``/``exp_avg_sq``) gathered by global expert id, so the file is what a single-process
run writes, and any W' that divides E resumes it (each rank slices its experts on load).

Not equal to one process, by design: noisy gating (each rank draws its own noise) and capacity
limits (capacity is per rank's tokens, as in GShard). A rank that dies makes the others fail
within the process-group timeout with an error naming it (``PeerFailure``); rerun with
``resume=True`` to continue from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moe_lab.data import Corpus, get_batch, load_corpus, validation_windows
from moe_lab.layer import MoE
from moe_lab.model import TinyLM, count_params
from moe_lab.parallel.comm import PeerFailure, group_rank_size, name_lost_ranks, peer_table
from moe_lab.parallel.comm import run_collective as _collective
from moe_lab.parallel.launch import spawn
from moe_lab.parallel.layer import ExpertParallelMoE
from moe_lab.parallel.training import sync_gradients
from moe_lab.provenance import machine_record
from moe_lab.routing import expert_counts
from moe_lab.train.checkpoint import read_checked, write_checkpoint
from moe_lab.train.config import TrainConfig
from moe_lab.train.loop import (
    _record_resume,
    lr_at,
    make_optimizer,
    summarize_windows,
    window_losses,
)

KILL_ENV = "MOE_LAB_KILL_AT"  # "RANK:STEP": that rank kills itself (SIGKILL) at that step


def check_layout(cfg: TrainConfig, ep: int) -> None:
    """Refuse a sharding the model cannot take, with the reason (ValueError)."""
    moe = cfg.model.moe
    if moe is None:
        raise ValueError("--ep needs an MoE variant: a dense model has no experts to shard")
    if moe.num_experts % ep:
        raise ValueError(f"--ep {ep} must divide the number of experts ({moe.num_experts})")
    if cfg.batch_size % ep:
        raise ValueError(f"--ep {ep} must divide the batch size ({cfg.batch_size}): each rank "
                         "reads an equal slice of the global batch")


def shard_model(model: TinyLM, group=None) -> TinyLM:
    """Swap every MoE layer of ``model`` (the same on every rank) for its sharded form."""
    for block in model.blocks:
        if isinstance(block.ffn, MoE) and not isinstance(block.ffn, ExpertParallelMoE):
            block.ffn = ExpertParallelMoE.from_moe(block.ffn, group)
    return model


def _expert_layers(model) -> dict[str, ExpertParallelMoE]:
    """Expert parameter name -> its sharded layer."""
    out = {}
    for prefix, layer in model.named_modules():
        if isinstance(layer, ExpertParallelMoE):
            for name, _ in layer.experts.named_parameters():
                out[f"{prefix}.experts.{name}"] = layer
    return out


def _optim_index(model, opt) -> dict[str, int]:
    """Parameter name -> its index in ``opt.state_dict()`` (torch numbers them group by group)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    return {n: i for i, n in enumerate(order)}


def _gather0(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0, in rank order: the global expert order."""
    _, W = group_rank_size(group)
    parts = [torch.empty_like(t) for _ in range(W)]
    _collective("all_gather of expert shards",
                lambda: dist.all_gather(parts, t.contiguous(), group=group), group)
    return torch.cat(parts)


def global_state(model, opt, group=None) -> tuple[dict, dict]:
    """(model state, optimizer state) by global expert id: what one process would hold.

    A collective (every rank gathers; rank 0 writes). AdamW's ``exp_avg``/``exp_avg_sq`` of an
    expert tensor are gathered with it; its ``step`` is the same on every rank."""
    experts = _expert_layers(model)
    model_sd = {k: (_gather0(v, group) if k in experts else v)
                for k, v in model.state_dict().items()}
    optim_sd = opt.state_dict() if opt is not None else None
    if optim_sd is not None:
        index = _optim_index(model, opt)
        for name in experts:
            if index[name] not in optim_sd["state"]:
                continue
            # a copy: state_dict() shares its per-parameter dicts with the live optimizer
            st = optim_sd["state"][index[name]] = dict(optim_sd["state"][index[name]])
            for key, v in list(st.items()):
                if torch.is_tensor(v) and v.dim() > 0:
                    st[key] = _gather0(v, group)
    return model_sd, optim_sd


def load_resharded(path: Path, model, opt, cfg: TrainConfig, group=None, *,
                   ignore: tuple[str, ...] = ()) -> tuple[int, dict]:
    """Resume a sharded model from a checkpoint of any layout: each rank slices its experts.

    Refused, naming the mismatch, when the config or any tensor's global shape differs."""
    _, W = group_rank_size(group)
    experts = _expert_layers(model)
    shapes = {k: ((v.shape[0] * W, *v.shape[1:]) if k in experts else tuple(v.shape))
              for k, v in model.state_dict().items()}
    blob = read_checked(path, cfg, shapes, ignore=ignore)

    def mine(name: str, v: torch.Tensor) -> torch.Tensor:
        layer = experts[name]
        return v[layer.first_expert:layer.first_expert + layer.num_local]

    model.load_state_dict({k: (mine(k, v) if k in experts else v)
                           for k, v in blob["model"].items()})
    optim_sd = blob["optim"]
    index = _optim_index(model, opt)
    for name in experts:
        st = optim_sd["state"].get(index[name], {})
        for key, v in list(st.items()):
            if torch.is_tensor(v) and v.dim() > 0:
                if tuple(v.shape) != shapes[name]:
                    raise ValueError(f"{path}: optimizer state {key} of {name} has shape "
                                     f"{tuple(v.shape)}, the model {shapes[name]}")
                st[key] = mine(name, v)
    opt.load_state_dict(optim_sd)
    return int(blob["step"]), blob["state"]


class _RouterTap:
    """Keeps the routing decision each sharded layer's router returned in the last forward."""

    def __init__(self, model):
        self.layers = [b.ffn for b in model.blocks if isinstance(b.ffn, ExpertParallelMoE)]
        self.decisions: list = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            layer.router.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def keep(module, args, out):
            self.decisions[i] = out
        return keep


def global_aux_loss(decisions: list, cfg, group=None) -> torch.Tensor:
    """This rank's share of the global balancing loss, summed over layers (see the module doc):
    E * sum_e f_e * P_e^r, f from every rank's counts, P^r from this rank's tokens."""
    E = cfg.num_experts
    local_LE = torch.stack([expert_counts(d.indices_Tk, E) for d in decisions]).double()
    _collective("all_reduce of the balancing counts",
                lambda: dist.all_reduce(local_LE, group=group), group)
    aux = decisions[0].probs_TE.new_zeros(())
    for d, counts_E in zip(decisions, local_LE, strict=True):
        p_TE = d.probs_TE
        if cfg.score == "sigmoid":  # as the router balances: normalised affinities
            p_TE = p_TE / p_TE.sum(-1, keepdim=True)
        f_E = (counts_E / counts_E.sum()).to(p_TE.dtype)
        aux = aux + E * torch.sum(f_E * p_TE.mean(dim=0))
    return aux


@torch.no_grad()
def clip_global_grad_norm_(model, max_norm: float, group=None) -> torch.Tensor:
    """``clip_grad_norm_`` over the whole sharded model: replicated gradients (the same on every
    rank after ``sync_gradients``) counted once, every rank's expert gradients summed."""
    experts = _expert_layers(model)
    rep, exp = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (exp if name in experts else rep).append(p.grad)
    sq = lambda gs: sum((torch.linalg.vector_norm(g) ** 2 for g in gs),  # noqa: E731
                        torch.zeros((), dtype=torch.float64)).double()
    exp_sq = sq(exp)
    _collective("all_reduce of expert gradient norms",
                lambda: dist.all_reduce(exp_sq, group=group), group)
    total = torch.sqrt(sq(rep) + exp_sq)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in rep + exp:
        g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def sharded_window_losses(model, x_NL, y_NL, group=None, chunk: int = 256) -> torch.Tensor:
    """``window_losses`` with every rank scoring an equal share of the windows (the last
    window repeated to even them out, then dropped); every rank gets all N losses."""
    rank, W = group_rank_size(group)
    N = x_NL.shape[0]
    per = math.ceil(N / W)
    pad = per * W - N
    if pad:
        x_NL = torch.cat([x_NL, x_NL[-1:].expand(pad, -1)])
        y_NL = torch.cat([y_NL, y_NL[-1:].expand(pad, -1)])
    mine = window_losses(model, x_NL[rank * per:(rank + 1) * per],
                         y_NL[rank * per:(rank + 1) * per], chunk)
    return _gather0(mine, group)[:N]


def _kill_at() -> tuple[int, int] | None:
    text = os.environ.get(KILL_ENV)
    if not text:
        return None
    rank, step = text.split(":")
    return int(rank), int(step)


def train_rank(
    cfg: TrainConfig,
    *,
    group=None,
    out: str | Path | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    corpus: Corpus | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    kill_at: tuple[int, int] | None = None,
) -> tuple[dict, dict] | None:
    """This rank's part of a sharded run (every rank of ``group`` calls it).

    Returns (log, model state by global expert id) on rank 0, None elsewhere. ``kill_at``
    (rank, step), or the environment variable MOE_LAB_KILL_AT="RANK:STEP", makes that rank
    kill itself at that step: the fault drill."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    rank, W = group_rank_size(group)
    check_layout(cfg, W)
    kill_at = kill_at or _kill_at()
    peers = peer_table(group)
    try:
        return _train_rank(cfg, group, rank, W, out, resume, stop_at, corpus, progress, dtype,
                           kill_at)
    except PeerFailure as err:
        raise name_lost_ranks(err, peers) from err


def _train_rank(cfg, group, rank, W, out, resume, stop_at, corpus, progress, dtype, kill_at):
    corpus = corpus if corpus is not None else load_corpus(max_code_bytes=cfg.max_code_bytes)
    torch.manual_seed(cfg.seed)  # the single-process model, built the same way on every rank
    model = TinyLM(cfg.model)
    if dtype is not None:
        model = model.to(dtype)
    total, active = count_params(model)
    shard_model(model, group)
    opt = make_optimizer(model, cfg)
    tap = _RouterTap(model)
    moe_cfg, E, L = cfg.model.moe, cfg.model.moe.num_experts, len(tap.layers)
    n_local = E // W
    layout = {"world_size": W,
              "experts_per_rank": [[r * n_local, (r + 1) * n_local] for r in range(W)],
              "expert_params_per_rank": sum(p.numel() for layer in tap.layers
                                            for p in layer.experts.parameters())}
    log = {"config": cfg.to_dict(), "params_total": total, "params_active": active,
           "threads": torch.get_num_threads(), "machine_start": machine_record(), "evals": [],
           "ep": layout, "ep_send_rows": []}
    val_set = validation_windows(corpus, cfg.model.block_size, windows=cfg.val_windows)
    state = {"log": log, "train_s": 0.0, "cpu_s": 0.0, "ce_sum": 0.0, "ce_n": 0,
             "load": torch.zeros(cfg.model.n_layers, E, dtype=torch.long)}
    step = 0
    out = Path(out) if out is not None else None
    if resume:
        if out is None:
            raise ValueError("resume=True needs an output folder (out=...)")
        step, state = load_resharded(out / "ckpt.pt", model, opt, cfg, group, ignore=("steps",))
        log = state["log"]
        _record_resume(log, cfg, step, out / "ckpt.pt")
        before = log.get("ep", {}).get("world_size", 1)
        if before != W:
            log.setdefault("resharded", []).append({"step": step, "from": before, "to": W})
        log["ep"] = layout
        log.setdefault("ep_send_rows", [])
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    B = cfg.batch_size // W
    rows = slice(rank * B, (rank + 1) * B)
    model.train()
    bar = tqdm(range(step, end), desc=f"train {cfg.steps} steps, EP={W}",
               disable=not progress or rank != 0)
    for step in bar:
        if kill_at is not None and tuple(kill_at) == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        t_start, c_start = time.perf_counter(), time.process_time()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step) * g["lr_scale"]
        x, y, _ = get_batch(corpus, "train", cfg.batch, seed=cfg.seed, step=step)
        out_m = model(x[rows], y[rows])
        aux = global_aux_loss(tap.decisions, moe_cfg, group)
        loss = out_m.ce + moe_cfg.aux_loss_coef * aux + moe_cfg.z_loss_coef * out_m.z_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(model)
        clip_global_grad_norm_(model, cfg.grad_clip, group)
        opt.step()
        # one all-reduce for the step's statistics: mean CE, global load, rows sent rank->rank
        stats = torch.zeros(1 + L * E + W * L * W, dtype=torch.float64)
        stats[0] = out_m.ce.detach().double()
        stats[1:1 + L * E] = torch.stack([r.tokens_per_expert for r in out_m.routing]).view(-1)
        sent = torch.zeros(W, L, W, dtype=torch.float64)
        sent[rank] = torch.tensor([layer.dispatcher.last["send_rows"] for layer in tap.layers],
                                  dtype=torch.float64)
        stats[1 + L * E:] = sent.view(-1)
        _collective("all_reduce of the step's statistics",
                    lambda s=stats: dist.all_reduce(s, group=group), group)
        state["ce_sum"] += float(stats[0]) / W
        state["ce_n"] += 1
        state["load"] += stats[1:1 + L * E].round().long().view(L, E)
        log["ep_send_rows"].append(stats[1 + L * E:].round().long().view(W, L, W).tolist())
        if moe_cfg.bias_update_rate > 0:  # DeepSeek-V3 balancing; the layer sums the load
            for layer, r in zip(tap.layers, out_m.routing, strict=True):
                layer.update_bias(r.tokens_per_expert)
        state["train_s"] += time.perf_counter() - t_start
        state["cpu_s"] += time.process_time() - c_start
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            losses_N = sharded_window_losses(model, val_set[0], val_set[1], group)
            val = summarize_windows(losses_N, val_set[2])
            load = state["load"]
            share = (load / load.sum(1, keepdim=True).clamp_min(1)).tolist()
            log["evals"].append({
                "step": done, "wall_s": round(state["train_s"], 3),
                "cpu_s": round(state["cpu_s"], 3),
                "train_loss": state["ce_sum"] / state["ce_n"], **val, "expert_load": share,
            })
            if done == cfg.steps:
                log["val_window_losses"] = [round(v, 5) for v in losses_N.tolist()]
            load.zero_()
            state["ce_sum"], state["ce_n"] = 0.0, 0
            bar.set_postfix(val=f"{val['val_loss']:.3f}")
            if out is not None and rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                (out / "log.json").write_text(json.dumps(log, indent=1))
        if out is not None and (done == end or (cfg.ckpt_every and done % cfg.ckpt_every == 0)):
            model_sd, optim_sd = global_state(model, opt, group)
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                write_checkpoint(out / "ckpt.pt", cfg, done, model_sd, optim_sd, state)
    log["machine_end"] = machine_record()
    model_sd, _ = global_state(model, None, group)
    return (log, model_sd) if rank == 0 else None


def _spawned(cfg: TrainConfig, kwargs: dict):
    return train_rank(cfg, **kwargs)


def train_sharded(
    cfg: TrainConfig,
    ep: int,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    corpus: Corpus | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    threads: int | None = 1,
    timeout_s: float = 60.0,
    deadline_s: float = 3600.0,
    kill_at: tuple[int, int] | None = None,
) -> tuple[TinyLM, dict]:
    """Train with experts sharded over ``ep`` spawned processes; returns (model, log) like
    ``train``, the model whole (experts gathered by global id).

    ``timeout_s`` bounds every collective (a dead or stuck rank fails the others after it);
    ``deadline_s`` the whole run. A failed rank raises ``SpawnError`` with every rank's error.
    """
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep must be a positive int, got {ep!r}")
    check_layout(cfg, ep)
    kwargs = dict(out=out, resume=resume, stop_at=stop_at, corpus=corpus, progress=progress,
                  dtype=dtype, kill_at=kill_at)
    results = spawn(_spawned, ep, args=(cfg, kwargs), backend="gloo", pg_timeout_s=timeout_s,
                    deadline_s=deadline_s, num_threads=threads)
    log, model_sd = results[0]
    model = TinyLM(cfg.model)
    if dtype is not None:
        model = model.to(dtype)
    model.load_state_dict(model_sd)
    return model, log
