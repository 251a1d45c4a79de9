"""TrainConfig: every setting of one training run, in one validated dataclass.

Model, data mix, optimizer, schedule, evaluation and checkpoints are all fields here, so a run is
described by one object: the loop reads it, checkpoints record it (``to_dict``) and refuse to
resume under a different one, and logs carry it. Named presets live in ``moe_lab.lab.presets``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_lab.config import check_positive_int
from moe_lab.data import VAL_WINDOWS, BatchConfig
from moe_lab.model import ModelConfig


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
