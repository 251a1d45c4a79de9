"""The command line: a named preset and variant in, a trained model's JSON log out.

    python -m moe_lab.train --config long4k --variant moe8 --seed 0 --threads 1 --out runs/x

Each committed log in ``benchmarks/results`` records the exact command that wrote it, and
``tests/test_results.py`` rebuilds its config with ``config_from_argv``, so the flags and what
they mean stay as they are. ``make_config`` is the same choice made from Python: the chapters
and benchmarks call it with the names the command line takes (presets and variants from
``moe_lab.lab.presets``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moe_lab.data import load_corpus
from moe_lab.lab.presets import PRESETS, VARIANT_TRAIN, VARIANTS, variant_moe
from moe_lab.model import ModelConfig
from moe_lab.train.config import TrainConfig
from moe_lab.train.loop import routing_by_kind, train

DESCRIPTION = (
    "Train the tiny language model: seeded, resumable, logged as JSON; dense or MoE variants."
)


def make_config(preset: str, variant: str, *, seed: int = 0, **overrides) -> TrainConfig:
    """A TrainConfig from a preset name and a variant; ``overrides`` replace training fields."""
    if preset not in PRESETS:
        raise ValueError(f"config must be one of {tuple(PRESETS)}, got {preset!r}")
    m = dict(PRESETS[preset]["model"])
    model = ModelConfig(**m, moe=variant_moe(variant, m["d_model"], m["d_ff"]))
    train_fields = dict(PRESETS[preset]["train"], seed=seed)
    train_fields.update(VARIANT_TRAIN.get(variant, {}))
    train_fields.update(overrides)
    return TrainConfig(model=model, **train_fields)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_lab.train", description=DESCRIPTION)
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
    """Train as the command line asks; write OUT/log.json (with routing by text kind for MoE)."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
