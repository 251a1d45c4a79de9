"""Train the tiny language model: seeded, resumable, logged as JSON; dense or MoE variants.

    python -m moe_lab.train --config short --variant moe8 --seed 0 --out runs/moe8_s0

Batches depend only on (seed, step) and the LR only on the step, so a run resumed from a
checkpoint continues exactly where it stopped. Every variant of a config shares data, batches,
optimizer, schedule and seed; MoE variants keep the active FFN FLOPs per token of the dense one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moe_lab.config import MoEConfig, check_positive_int
from moe_lab.data import (
    VAL_WINDOWS,
    BatchConfig,
    Corpus,
    get_batch,
    load_corpus,
    validation_windows,
)
from moe_lab.model import ModelConfig, TinyLM, count_params
from moe_lab.provenance import machine_record

VARIANTS = (
    "dense", "moe8", "fine", "fine32", "moe16", "fine32k4", "shared", "top1", "nobal",
    "top1renorm",
)


@dataclass(kw_only=True)
class TrainConfig:
    """One training run: model, data, optimizer and schedule, evaluation and checkpoints."""

    model: ModelConfig
    steps: int
    batch_size: int = 16
    prose_fraction: float = 0.25
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_lr_scale: float = 1.0
    eval_every: int = 50
    # The fixed validation set (moe_lab.data.validation_windows): windows per kind.
    val_prose_windows: int = VAL_WINDOWS["prose"]
    val_code_windows: int = VAL_WINDOWS["code"]
    ckpt_every: int = 0  # 0: only at the end (when an output folder is given)
    seed: int = 0
    max_code_bytes: int | None = None

    def __post_init__(self):
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"model must be a ModelConfig, got {type(self.model).__name__}")
        for name in ("steps", "batch_size", "eval_every", "val_prose_windows", "val_code_windows"):
            check_positive_int(name, getattr(self, name))
        for name in ("warmup", "ckpt_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "router_lr_scale", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"min_lr_frac must be in [0, 1], got {self.min_lr_frac}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def val_windows(self) -> dict[str, int]:
        return {"prose": self.val_prose_windows, "code": self.val_code_windows}

    @property
    def batch(self) -> BatchConfig:
        return BatchConfig(
            batch_size=self.batch_size,
            block_size=self.model.block_size,
            prose_fraction=self.prose_fraction,
        )


# Presets. "short" fits the chapter's build budget; the others are the committed experiments.
LONG_MODEL = dict(block_size=64, d_model=64, n_layers=4, n_heads=4, d_ff=256)
PRESETS = {
    "short": dict(
        model=dict(block_size=64, d_model=64, n_layers=2, n_heads=4, d_ff=256),
        train=dict(steps=200, batch_size=16, eval_every=50, warmup=20),
    ),
    "long": dict(
        model=LONG_MODEL,
        train=dict(steps=1000, batch_size=32, eval_every=50, warmup=50),
    ),
    # The "long" model trained four times as long: about 29 training bytes per dense parameter.
    # Help text is an eighth of each batch, so its 0.43 MB are seen about 2.4 times.
    "long4k": dict(
        model=LONG_MODEL,
        train=dict(steps=4000, batch_size=32, eval_every=100, warmup=100, prose_fraction=0.125),
    ),
    # Three times wider (d_model 192), trained twice as long as "long"; evaluated every 100
    # steps because one evaluation of the fixed set costs about 30 training steps here.
    "wide": dict(
        model=dict(block_size=64, d_model=192, n_layers=4, n_heads=4, d_ff=768),
        train=dict(steps=2000, batch_size=32, eval_every=100, warmup=100),
    ),
    # A first, wider attempt (about 1.7 training bytes per dense parameter); kept for the record.
    "long_d96": dict(
        model=dict(block_size=64, d_model=96, n_layers=4, n_heads=4, d_ff=384),
        train=dict(steps=1000, batch_size=16, eval_every=50, warmup=50),
    ),
}


def variant_moe(variant: str, d_model: int, d_ff: int) -> MoEConfig | None:
    """The FFN of each variant, all with the dense FFN's active hidden size per token.

    moe8: E=8, k=2, hidden d_ff/2. fine: E=16, k=4, hidden d_ff/4 (DeepSeekMoE-style);
    fine32: E=32, k=8, hidden d_ff/8. top1: E=4, k=1, hidden d_ff (Switch).
    nobal: moe8 without the auxiliary loss. top1renorm: top1 with its one gate renormalised
    to 1, the mistake chapter 7's first top-1 run made (then the router learns nothing from the
    LM loss). These have 4x the dense FFN's parameters in total;
    moe16 (E=16, k=2, hidden d_ff/2) and fine32k4 (E=32, k=4, hidden d_ff/4) have 8x.
    shared (DeepSeekMoE): a shared expert of hidden d_ff/2 that every token uses, plus top-2 of
    16 routed experts of hidden d_ff/4 (4.5x in total).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "dense":
        return None
    E, k = {
        "moe8": (8, 2),
        "fine": (16, 4),
        "fine32": (32, 8),
        "moe16": (16, 2),
        "fine32k4": (32, 4),
        "shared": (16, 2),
        "top1": (4, 1),
        "top1renorm": (4, 1),
        "nobal": (8, 2),
    }[variant]
    # the shared variant spends half the active width on its shared expert
    routed_ff, shared_ff = (d_ff // 2, d_ff // 2) if variant == "shared" else (d_ff, 0)
    if routed_ff % k or (shared_ff and 2 * shared_ff != d_ff):
        raise ValueError(f"d_ff={d_ff} does not split evenly for variant {variant!r}")
    return MoEConfig(
        d_model=d_model,
        d_ff=routed_ff // k,
        shared_d_ff=shared_ff,
        num_experts=E,
        top_k=k,
        impl="sort",
        # Top-1 keeps the raw softmax probability as its gate, as Switch does: renormalised over
        # one choice it would always be 1.0 and the router would get no gradient from the loss.
        normalize_weights=k > 1 or variant == "top1renorm",
        aux_loss_coef=0.0 if variant == "nobal" else 0.01,
        z_loss_coef=0.001,
    )


def make_config(preset: str, variant: str, *, seed: int = 0, **overrides) -> TrainConfig:
    """A TrainConfig from a preset name and a variant; ``overrides`` replace training fields."""
    if preset not in PRESETS:
        raise ValueError(f"config must be one of {tuple(PRESETS)}, got {preset!r}")
    m = dict(PRESETS[preset]["model"])
    model = ModelConfig(**m, moe=variant_moe(variant, m["d_model"], m["d_ff"]))
    train = dict(PRESETS[preset]["train"], seed=seed)
    if variant in ("top1", "top1renorm"):
        train["router_lr_scale"] = 0.1  # a calmer router for top-1 (Switch's stability advice)
    train.update(overrides)
    return TrainConfig(model=model, **train)


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


CKPT_FORMAT = "moe_lab.tinylm/1"


def _flat(d: dict, prefix: str = "") -> dict:
    items = {}
    for k, v in d.items():
        items.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return items


def save_checkpoint(path: Path, model, opt, cfg: TrainConfig, step: int, state: dict) -> None:
    """Write model, optimizer, step and the running log; atomically (tmp file, then rename)."""
    blob = {
        "format": CKPT_FORMAT,
        "config": cfg.to_dict(),
        "step": step,
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "state": state,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model, opt, cfg: TrainConfig) -> tuple[int, dict]:
    """Restore a checkpoint written by ``save_checkpoint``; clear errors name file and mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, disallowed globals...
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a {CKPT_FORMAT} checkpoint")
    want, got = _flat(cfg.to_dict()), _flat(blob["config"])
    diff = [
        f"{k}: {got.get(k)!r} in checkpoint, {want.get(k)!r} now"
        for k in sorted(set(want) | set(got))
        if want.get(k) != got.get(k)
    ]
    if diff:
        raise ValueError(f"{path} was written for a different config: " + "; ".join(diff))
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in blob["model"].items()}
    bad = [
        f"{k}: {theirs.get(k)} in checkpoint, {own.get(k)} in model"
        for k in sorted(set(own) | set(theirs))
        if own.get(k) != theirs.get(k)
    ]
    if bad:
        raise ValueError(f"{path} does not match the model's tensors: " + "; ".join(bad))
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optim"])
    return int(blob["step"]), blob["state"]


def train(
    cfg: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    corpus: Corpus | None = None,
    progress: bool = True,
) -> tuple[TinyLM, dict]:
    """Train ``cfg.steps`` steps (or up to ``stop_at``); returns (model, log).

    With ``out``, writes ``out/log.json`` at every evaluation and ``out/ckpt.pt`` at the end
    (and every ``ckpt_every`` steps); ``resume=True`` continues from ``out/ckpt.pt``.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    corpus = corpus if corpus is not None else load_corpus(max_code_bytes=cfg.max_code_bytes)
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg.model)
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
        step, state = load_checkpoint(out / "ckpt.pt", model, opt, cfg)
        log = state["log"]
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    moe_blocks = [b.ffn for b in model.blocks if hasattr(b.ffn, "update_bias")]
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
        if out is not None and (done == end or (cfg.ckpt_every and done % cfg.ckpt_every == 0)):
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(out / "ckpt.pt", model, opt, cfg, done, state)
    log["machine_end"] = machine_record()
    return model, log


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=tuple(PRESETS), default="short")
    p.add_argument("--variant", choices=VARIANTS, default="dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="override the preset's total steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="folder for log.json and ckpt.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    return p


def config_from_argv(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """The TrainConfig a command line asks for (as recorded in a log's ``command``)."""
    args = parser().parse_args(argv)
    overrides = {} if args.steps is None else {"steps": args.steps}
    return make_config(args.config, args.variant, seed=args.seed, **overrides), args


def main(argv: list[str] | None = None) -> dict:
    argv = list(__import__("sys").argv[1:] if argv is None else argv)
    cfg, args = config_from_argv(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(max_code_bytes=cfg.max_code_bytes)
    model, log = train(cfg, out=args.out, resume=args.resume, corpus=corpus)
    if cfg.model.moe is not None:
        log["routing_by_kind"] = routing_by_kind(model, corpus, cfg).tolist()
    log["command"] = "python -m moe_lab.train " + " ".join(argv)
    log["variant"], log["preset"] = args.variant, args.config
    Path(args.out, "log.json").write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
