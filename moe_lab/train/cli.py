"""The command line: a named preset and variant in, a trained model's JSON log out.

    python -m moe_lab.train --config long4k --variant moe8 --seed 0 --threads 1 --out runs/x

Each committed log in ``benchmarks/results`` records the exact command that wrote it, and
``tests/test_results.py`` rebuilds its config with ``config_from_argv``, so the flags and what
they mean stay as they are. ``make_config`` is the same choice made from Python: the chapters
and benchmarks call it with the names the command line takes (presets and variants from
``moe_lab.lab.presets``).

Every bad argument ends the program the argparse way, before any training: a usage line, one
``error:`` line, exit status 2. A folder that already holds a run (``log.json`` or ``ckpt.pt``)
is continued with ``--resume`` or replaced with ``--overwrite``, never overwritten silently;
``--resume --steps N`` extends a run to N steps (the log's ``resumed`` list records the
schedule's change).

``--ep W`` trains with every MoE layer's experts sharded over W processes
(``moe_lab.train.sharded``): spawned here, or, under torchrun (RANK and WORLD_SIZE set, WORLD_SIZE
equal to W), this process is one rank. The log and checkpoint are the single-process ones
(the checkpoint resumes at any W' dividing E, or without ``--ep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from moe_lab.data import load_corpus
from moe_lab.lab.presets import ALL_VARIANTS, PRESETS, VARIANT_TRAIN, variant_moe
from moe_lab.model import ModelConfig
from moe_lab.train.checkpoint import checkpoint_config, config_differences
from moe_lab.train.config import TrainConfig
from moe_lab.train.loop import routing_by_kind, train

PROG = "python -m moe_lab.train"
DESCRIPTION = (
    "Train the tiny language model: seeded, resumable, logged as JSON; dense or MoE variants."
)
RUN_FILES = ("log.json", "ckpt.pt")  # what makes a folder hold a run


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


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION,
        usage="%(prog)s --out OUT [--config PRESET] [--variant VARIANT] [--seed S] [--steps N]"
              " [--threads T] [--ep W [--timeout-s S]] [--resume | --overwrite]"
              " [--init-from FILE [--upcycle-noise S]] [--keep-every N]",
    )
    p.add_argument("--config", choices=tuple(PRESETS), default="short", metavar="PRESET",
                   help="one of: " + ", ".join(PRESETS) + " (default: short)")
    p.add_argument("--variant", choices=ALL_VARIANTS, default="dense", metavar="VARIANT",
                   help="one of: " + ", ".join(ALL_VARIANTS) + " (default: dense)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                   help="integer >= 0 (default: 0)")
    p.add_argument("--steps", type=_int_at_least(1), default=None, metavar="N",
                   help="override the preset's total steps; with --resume, extend the run")
    p.add_argument("--threads", type=_int_at_least(1), default=None, metavar="T",
                   help="torch CPU threads, >= 1 (omit for torch's default)")
    p.add_argument("--ep", type=_int_at_least(1), default=None, metavar="W",
                   help="shard every MoE layer's experts over W processes (spawned, or the "
                        "ranks of torchrun); W must divide the experts and the batch size")
    p.add_argument("--timeout-s", type=_positive_float, default=60.0, metavar="S",
                   help="with --ep: a collective waits at most S seconds for a dead or stuck "
                        "rank (default: 60)")
    p.add_argument("--init-from", type=_folder, default=None, metavar="FILE",
                   help="start from the weights in FILE (a ckpt.pt or a weights file) with a "
                        "fresh optimizer and schedule; a dense file into an MoE variant is "
                        "upcycled, every expert a copy of the dense FFN (moe_lab.upcycle)")
    p.add_argument("--upcycle-noise", type=_non_negative_float, default=0.0, metavar="S",
                   help="with --init-from, upcycling: multiply each copied expert weight by "
                        "1 + S * N(0, 1), so the copies differ from the start (default: 0)")
    p.add_argument("--keep-every", type=_int_at_least(1), default=None, metavar="N",
                   help="also keep the model's weights at step 0 and every N steps, in "
                        "OUT/weights/step_NNNNN.pt (ckpt.pt holds only the latest)")
    p.add_argument("--out", type=_folder, required=True, help="folder for log.json and ckpt.pt")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in OUT (its log.json and ckpt.pt)")
    return p


def _config(args: argparse.Namespace) -> TrainConfig:
    overrides = {} if args.steps is None else {"steps": args.steps}
    return make_config(args.config, args.variant, seed=args.seed, **overrides)


def config_from_argv(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """The TrainConfig a command line asks for (as recorded in a log's ``command``)."""
    args = parser().parse_args(argv)
    return _config(args), args


def _flags_for(config: dict) -> str | None:
    """The ``--config P --variant V --seed S`` that give ``config`` (steps aside), if any."""
    seed, steps = config.get("seed"), config.get("steps")
    if not isinstance(seed, int) or not isinstance(steps, int) or seed < 0 or steps < 1:
        return None
    for preset in PRESETS:
        for variant in ALL_VARIANTS:
            cfg = make_config(preset, variant, seed=seed, steps=steps)
            if not config_differences(config, cfg.to_dict()):
                return f"--config {preset} --variant {variant} --seed {seed}"
    return None


def check_out(args: argparse.Namespace, cfg: TrainConfig) -> list[Path]:
    """Refuse an OUT that this command must not use; returns the files --overwrite replaces.

    Raises ValueError with the message the command line shows."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must name a folder")
    existing = [out / n for n in RUN_FILES if (out / n).exists()]
    if args.resume:
        ckpt = out / "ckpt.pt"
        if not ckpt.is_file():
            raise ValueError(f"--resume: no checkpoint to resume from ({ckpt} does not exist)")
        theirs, done = checkpoint_config(ckpt)
        diff = config_differences(theirs, cfg.to_dict(), ignore=("steps",))
        if diff:
            was, now = _flags_for(theirs), _flags_for(cfg.to_dict())
            what = (f"a run of {was}; this command asks for {now}" if was and now else
                    "a run of another config: " + "; ".join(diff[:4])
                    + ("; ..." if len(diff) > 4 else ""))
            raise ValueError(f"--resume: {ckpt} holds {what} (use the run's own flags to "
                             "resume it, or --overwrite to replace it)")
        if args.steps is None and theirs["steps"] != cfg.steps:
            raise ValueError(
                f"--resume: the run in {out} is set for {theirs['steps']} steps, the preset "
                f"for {cfg.steps}; pass --steps {theirs['steps']} to continue it as it was, "
                "or a larger --steps to extend it")
        if cfg.steps != theirs["steps"] and cfg.steps <= done:
            raise ValueError(f"--steps {cfg.steps}: the run in {out} has trained {done} steps "
                             f"already; to extend it, pass --steps > {done}")
        return []
    if existing and not args.overwrite:
        names = " and ".join(p.name for p in existing)
        raise ValueError(f"--out {out} already holds a run ({names}); pass --resume to "
                         "continue it or --overwrite to replace it")
    if not args.overwrite:
        return []
    return existing + [p for p in (out / "ckpt.tmp",) if p.is_file()]


def _torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def main(argv: list[str] | None = None) -> dict:
    """Train as the command line asks; write OUT/log.json (with routing by text kind for MoE).

    Bad arguments exit with status 2 and an argparse ``error:`` line, before any training."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    cfg = _config(args)
    rank = 0
    if args.ep is not None:
        from moe_lab.train.sharded import check_layout

        try:
            check_layout(cfg, args.ep)
        except ValueError as e:
            p.error(str(e))
        if _torchrun():
            world = int(os.environ["WORLD_SIZE"])
            if world != args.ep:
                p.error(f"--ep {args.ep}: torchrun started {world} processes; pass "
                        f"--nproc_per_node (times nodes) = {args.ep}")
            rank = int(os.environ["RANK"])
    try:
        replaced = check_out(args, cfg)
    except ValueError as e:
        p.error(str(e))
    init = None
    if args.upcycle_noise and args.init_from is None:
        p.error("--upcycle-noise needs --init-from")
    if args.init_from is not None or args.keep_every is not None:
        if args.ep is not None:
            p.error("--init-from and --keep-every work without --ep only")
    if args.init_from is not None and not args.resume:
        from moe_lab.upcycle import initializer

        try:
            init = initializer(args.init_from, noise_std=args.upcycle_noise, seed=args.seed)
        except (OSError, ValueError) as e:
            p.error(f"--init-from {args.init_from}: {e}")
    if rank == 0:
        for path in replaced:  # --overwrite: the old run goes before the new one starts
            path.unlink()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(max_code_bytes=cfg.max_code_bytes)
    if args.ep is None:
        model, log = train(cfg, out=args.out, resume=args.resume, corpus=corpus, init=init,
                           keep_every=args.keep_every or 0)
    elif _torchrun():
        model, log = _torchrun_rank(args, cfg, corpus)
        if model is None:
            return {}
    else:
        from moe_lab.parallel import SpawnError
        from moe_lab.train.sharded import train_sharded

        try:
            model, log = train_sharded(cfg, args.ep, out=args.out, resume=args.resume,
                                       corpus=corpus, progress=True, threads=args.threads or 1,
                                       timeout_s=args.timeout_s)
        except SpawnError as e:
            print(f"{PROG}: sharded training failed; the last checkpoint (if any) is in "
                  f"{args.out}: rerun with --resume to continue from it.\n{e}", file=sys.stderr)
            raise SystemExit(1) from None
    if cfg.model.moe is not None:
        log["routing_by_kind"] = routing_by_kind(model, corpus, cfg).tolist()
    log["command"] = f"{PROG} {shlex.join(argv)}"
    if args.init_from is not None:
        log["init_from"] = {"file": args.init_from, "upcycle_noise": args.upcycle_noise}
    log["variant"], log["preset"] = args.variant, args.config
    Path(args.out, "log.json").write_text(json.dumps(log, indent=1))
    return log


def _torchrun_rank(args: argparse.Namespace, cfg: TrainConfig, corpus):
    """This process is one torchrun rank: (whole model, log) on rank 0, (None, None) elsewhere."""
    import datetime

    import torch.distributed as dist

    from moe_lab.model import TinyLM
    from moe_lab.train.sharded import train_rank

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        dist.barrier()  # rank 0 has removed an --overwrite'n run before anyone reads OUT
        result = train_rank(cfg, out=args.out, resume=args.resume, corpus=corpus, progress=True)
    except Exception as e:  # a dead peer: say so, and do not wait on it while shutting down
        print(f"{PROG}: rank {dist.get_rank()}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()
    if result is None:
        return None, None
    log, model_sd = result
    model = TinyLM(cfg.model)
    model.load_state_dict(model_sd)
    return model, log
