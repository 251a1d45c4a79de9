"""Train the tiny language model: seeded, resumable, logged as JSON; dense or MoE variants.

    python -m moe_lab.train --config short --variant moe8 --seed 0 --out runs/moe8_s0

Where each part lives:

- ``config``: ``TrainConfig``, every setting of one run in one validated dataclass.
- ``loop``: ``train`` (the loop), ``lr_at`` (warm-up then cosine), ``make_optimizer`` (AdamW
  groups), and evaluation on the fixed validation set (``window_losses``,
  ``summarize_windows``, ``routing_by_kind``).
- ``checkpoint``: ``save_checkpoint`` (atomic) and ``load_checkpoint`` (``weights_only``,
  checked against the run's config).
- ``sharded``: ``train_sharded`` (experts sharded over W processes, ``--ep W``), ``train_rank``
  (one rank's part, under torchrun or any process group), and the checkpoint's resharding
  (``global_state``, ``load_resharded``): the file is the single-process one whatever W.
- ``cli``: ``make_config`` (a named preset and variant as a TrainConfig), ``config_from_argv``
  and ``main``; ``__main__`` runs it.

The presets and variants themselves are the book's experiments, kept in ``moe_lab.lab.presets``
and re-exported here because the command line offers them by name.
"""

from moe_lab.lab.presets import PRESETS, VARIANTS, variant_moe
from moe_lab.train.checkpoint import CKPT_FORMAT, load_checkpoint, save_checkpoint
from moe_lab.train.cli import config_from_argv, main, make_config, parser
from moe_lab.train.config import TrainConfig
from moe_lab.train.loop import (
    lr_at,
    make_optimizer,
    routing_by_kind,
    summarize_windows,
    train,
    window_losses,
)
from moe_lab.train.sharded import train_rank, train_sharded

__all__ = [
    "CKPT_FORMAT",
    "PRESETS",
    "VARIANTS",
    "TrainConfig",
    "config_from_argv",
    "load_checkpoint",
    "lr_at",
    "main",
    "make_config",
    "make_optimizer",
    "parser",
    "routing_by_kind",
    "save_checkpoint",
    "summarize_windows",
    "train",
    "train_rank",
    "train_sharded",
    "variant_moe",
    "window_losses",
]
