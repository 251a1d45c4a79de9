"""The training loop of the tiny language model, its schedule and optimizer, and evaluation.

    model, log = train(make_config("short", "moe8"), out="runs/moe8_s0")

Batches depend only on (seed, step) and the LR only on the step, so a run resumed from a
checkpoint continues exactly where it stopped. A run resumed with more ``steps`` than it was
started with is extended: its cosine schedule is stretched to the new end from the step it
resumes at, and the log's ``resumed`` list records each resume that trains (step, old and new
total steps, and the learning rate at that step under each schedule).

Every variant of a config shares data, batches, optimizer, schedule and seed; only the model's
FFN differs. Evaluation scores the fixed validation set window by window, so two runs can be
compared on the same windows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moe_lab.data import Corpus, get_batch, load_corpus, validation_windows
from moe_lab.model import TinyLM, count_params
from moe_lab.provenance import machine_record
from moe_lab.train.checkpoint import atomic_save, load_checkpoint, save_checkpoint
from moe_lab.train.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_frac * lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: TinyLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms do not; routers get lr * router_lr_scale."""
    groups = {"decay": [], "no_decay": [], "router": []}
    for name, p in model.named_parameters():
        if name.endswith("router.weight"):
            groups["router"].append(p)
        elif p.dim() >= 2:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    scale = {"decay": 1.0, "no_decay": 1.0, "router": cfg.router_lr_scale}
    wd = {"decay": cfg.weight_decay, "no_decay": 0.0, "router": 0.0}
    params = [
        {"params": ps, "weight_decay": wd[g], "lr_scale": scale[g]}
        for g, ps in groups.items()
        if ps
    ]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def window_losses(model: TinyLM, x_NL: torch.Tensor, y_NL: torch.Tensor, chunk: int = 256):
    """Mean next-byte cross-entropy of each window (nats per byte): an (N,) float64 tensor."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, x_NL.shape[0], chunk):
        logits_BLV = model(x_NL[i : i + chunk]).logits
        ce_BL = torch.nn.functional.cross_entropy(
            logits_BLV.transpose(1, 2), y_NL[i : i + chunk], reduction="none"
        )
        out.append(ce_BL.mean(1).double())
    model.train(was_training)
    return torch.cat(out)


def summarize_windows(losses_N: torch.Tensor, kind_N: torch.Tensor) -> dict:
    """Mean validation loss, its standard error over windows, and the mean per text kind."""
    n = losses_N.numel()
    sem = float(losses_N.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "val_loss": float(losses_N.mean()),
        "val_sem": sem,
        "val_prose": float(losses_N[kind_N == 0].mean()),
        "val_code": float(losses_N[kind_N == 1].mean()),
    }


def _record_resume(log: dict, cfg: TrainConfig, step: int, path: Path) -> None:
    """Note a resume at ``step`` in ``log["resumed"]``; refuse a total below the steps done."""
    old = replace(cfg, steps=log["config"]["steps"])
    if cfg.steps != old.steps and cfg.steps <= step:
        raise ValueError(f"{path} has trained {step} steps already: to extend the run, "
                         f"steps must exceed {step}, got {cfg.steps}")
    if step == cfg.steps == old.steps:
        return  # a finished run, resumed as it was: nothing to train, nothing changes
    log.setdefault("resumed", []).append({
        "step": step, "old_steps": old.steps, "new_steps": cfg.steps,
        "old_lr": lr_at(old, step), "new_lr": lr_at(cfg, step),
    })
    if cfg.steps != old.steps:
        log["config"] = cfg.to_dict()
        log.pop("val_window_losses", None)  # they belonged to the old last step


def train(
    cfg: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    corpus: Corpus | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    init: Callable[[TinyLM], None] | None = None,
    keep_every: int = 0,
) -> tuple[TinyLM, dict]:
    """Train ``cfg.steps`` steps (or up to ``stop_at``); returns (model, log).

    ``init(model)``, when given, changes the freshly built model's weights in place before the
    optimizer sees them: a run that starts from another run's weights (``--init-from``, e.g.
    a dense model upcycled to an MoE). ``keep_every`` > 0 (with ``out``) also writes the
    model's weights alone to ``out/weights/step_NNNNN.pt`` at step 0 and every ``keep_every``
    steps: snapshots for studying a run over training, which ``ckpt.pt`` overwrites.

    ``dtype`` (e.g. ``torch.float64``) converts the model after it is built: for equivalence
    checks to round-off; a checkpoint does not record it, so resume with the same ``dtype``.

    With ``out``, writes ``out/log.json`` at every evaluation and ``out/ckpt.pt`` at the end
    (and every ``ckpt_every`` steps); ``resume=True`` continues from ``out/ckpt.pt``, whose
    config must be ``cfg`` except perhaps ``steps``: a different ``cfg.steps`` (more than the
    checkpoint has trained) changes the schedule from the resumed step on, recorded in
    ``log["resumed"]``.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    corpus = corpus if corpus is not None else load_corpus(max_code_bytes=cfg.max_code_bytes)
    torch.manual_seed(cfg.seed)
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 0:
        raise ValueError(f"keep_every must be an int >= 0, got {keep_every!r}")
    if keep_every and out is None:
        raise ValueError("keep_every needs an output folder (out=...)")
    model = TinyLM(cfg.model)
    if dtype is not None:
        model = model.to(dtype)
    if init is not None:
        init(model)
    opt = make_optimizer(model, cfg)
    total, active = count_params(model)
    log = {
        "config": cfg.to_dict(),
        "params_total": total,
        "params_active": active,
        "threads": torch.get_num_threads(),
        "machine_start": machine_record(),
        "evals": [],
    }
    val_set = validation_windows(corpus, cfg.model.block_size, windows=cfg.val_windows)
    E = cfg.model.moe.num_experts if cfg.model.moe else 0
    # Running state between evaluations; saved in checkpoints so a resume is exact.
    state = {
        "log": log,
        "train_s": 0.0,
        "cpu_s": 0.0,
        "ce_sum": 0.0,
        "ce_n": 0,
        "load": torch.zeros(cfg.model.n_layers, E, dtype=torch.long),
    }
    step = 0
    out = Path(out) if out is not None else None
    if resume:
        if out is None:
            raise ValueError("resume=True needs an output folder (out=...)")
        step, state = load_checkpoint(out / "ckpt.pt", model, opt, cfg, ignore=("steps",))
        log = state["log"]
        _record_resume(log, cfg, step, out / "ckpt.pt")
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    moe_blocks = [b.ffn for b in model.blocks if hasattr(b.ffn, "update_bias")]
    if keep_every and step == 0:
        save_weights(out / "weights" / "step_00000.pt", model)
    model.train()
    bar = tqdm(range(step, end), desc=f"train {cfg.steps} steps", disable=not progress)
    for step in bar:
        t_start, c_start = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step) * group["lr_scale"]
        x, y, _ = get_batch(corpus, "train", cfg.batch, seed=cfg.seed, step=step)
        out_m = model(x, y)
        opt.zero_grad(set_to_none=True)
        out_m.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        state["ce_sum"] += out_m.ce.item()
        state["ce_n"] += 1
        for i, r in enumerate(out_m.routing):
            state["load"][i] += r.tokens_per_expert
            if cfg.model.moe.bias_update_rate > 0:  # DeepSeek-V3 balancing, after the step
                moe_blocks[i].update_bias(r.tokens_per_expert)
        # evaluation time is not counted; CPU time is robust to other jobs on the machine
        state["train_s"] += time.perf_counter() - t_start
        state["cpu_s"] += time.process_time() - c_start
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            losses_N = window_losses(model, val_set[0], val_set[1])
            val = summarize_windows(losses_N, val_set[2])
            load = state["load"]
            share = (load / load.sum(1, keepdim=True).clamp_min(1)).tolist() if E else []
            log["evals"].append(
                {
                    "step": done,
                    "wall_s": round(state["train_s"], 3),
                    "cpu_s": round(state["cpu_s"], 3),
                    "train_loss": state["ce_sum"] / state["ce_n"],
                    **val,
                    "expert_load": share,
                }
            )
            if done == cfg.steps:  # per-window losses, for paired comparisons between runs
                log["val_window_losses"] = [round(v, 5) for v in losses_N.tolist()]
            load.zero_()
            state["ce_sum"], state["ce_n"] = 0.0, 0
            bar.set_postfix(val=f"{val['val_loss']:.3f}")
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / "log.json").write_text(json.dumps(log, indent=1))
        if keep_every and done % keep_every == 0:
            save_weights(out / "weights" / f"step_{done:05d}.pt", model)
        if out is not None and (done == end or (cfg.ckpt_every and done % cfg.ckpt_every == 0)):
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(out / "ckpt.pt", model, opt, cfg, done, state)
    log["machine_end"] = machine_record()
    return model, log


def save_weights(path: Path, model: TinyLM) -> None:
    """The model's state dict alone (no optimizer), written atomically: tmp file, then rename.

    Read it back with ``torch.load(path, weights_only=True)``."""
    atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)


@torch.no_grad()
def routing_by_kind(model: TinyLM, corpus: Corpus, cfg: TrainConfig, windows=None) -> torch.Tensor:
    """Assignments per (layer, kind, expert) over the fixed validation set: an (L, 2, E) count.

    Kind 0 is prose, 1 is code.
    """
    moe = cfg.model.moe
    if moe is None:
        raise ValueError("routing_by_kind needs an MoE model (cfg.model.moe is None)")
    x, _, kind_N = windows or validation_windows(
        corpus, cfg.model.block_size, windows=cfg.val_windows
    )
    was_training = model.training
    model.eval()
    counts_LKE = torch.zeros(cfg.model.n_layers, 2, moe.num_experts, dtype=torch.long)
    for i in range(0, x.shape[0], 256):
        x_BL = x[i : i + 256]
        kind_T = kind_N[i : i + 256].repeat_interleave(x_BL.shape[1])  # (B*L,) kind of each token
        for layer, r in enumerate(model(x_BL).routing):
            for j in range(r.indices.shape[1]):
                counts_LKE[layer].index_put_(
                    (kind_T, r.indices[:, j]), torch.ones_like(kind_T), accumulate=True
                )
    model.train(was_training)
    return counts_LKE
