"""Tile sizes as data keyed by device (as vLLM keeps its fused-MoE configs), not code."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

CONFIG_PATH = Path(__file__).with_name("tile_configs.json")
KINDS = ("forward", "dw", "gate_up")


@dataclass(frozen=True, kw_only=True)
class Tiles:
    """One launch configuration. For the dW kernel, block_m is the rows summed per step; for
    the gate-and-up kernel, block_n is the width of each of its two output tiles."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            # tl.dot needs every block dimension >= 16; tl.arange needs powers of two.
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {value!r}")
        if not isinstance(self.num_warps, int) or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Tiles.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Tiles.num_stages must be a positive int, got {self.num_stages!r}")

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def as_dict(self) -> dict:
        return asdict(self)


@cache
def _table() -> dict:
    return json.loads(CONFIG_PATH.read_text())


@cache
def device_key(device: torch.device, interpreted: bool) -> str:
    """The key a device's tiles are stored under: 'interpreter', or the CUDA device name."""
    if interpreted or device.type != "cuda":
        return "interpreter"
    return torch.cuda.get_device_name(device)


@cache
def tiles_for(kind: str, device: torch.device, interpreted: bool) -> Tiles:
    """The tiles for `kind` (one of KINDS) on `device`; an unknown GPU, or a device entry
    without that kind, gets 'default'. Looked up once per (kind, device)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    table = _table()
    entry = table.get(device_key(device, interpreted), table["default"])
    return Tiles(**entry.get(kind, table["default"][kind]))
