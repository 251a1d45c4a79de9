"""Checkpoints of a training run: written atomically, read back safely, checked before use.

A checkpoint holds the model, the optimizer, the step and the loop's running state (the log so
far, timers, load counters), so a resumed run continues exactly where it stopped. It is written
to a temporary file and renamed, so a run killed mid-write leaves the previous checkpoint whole;
it is read with ``weights_only=True``, so loading a file runs no pickled code; and it is refused,
with every mismatch named, when its config or tensor shapes differ from the run resuming it
(the total ``steps`` aside when the caller extends the run).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moe_lab.train.config import TrainConfig

CKPT_FORMAT = "moe_lab.tinylm/1"


def _flat(d: dict, prefix: str = "") -> dict:
    items = {}
    for k, v in d.items():
        items.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return items


def save_checkpoint(path: Path, model, opt, cfg: TrainConfig, step: int, state: dict) -> None:
    """Write model, optimizer, step and the running log; atomically (tmp file, then rename)."""
    write_checkpoint(path, cfg, step, model.state_dict(), opt.state_dict(), state)


def write_checkpoint(
    path: Path, cfg: TrainConfig, step: int, model_state: dict, optim_state: dict, state: dict
) -> None:
    """Write a checkpoint from state dicts (a sharded run passes the gathered, global ones),
    atomically (``atomic_save``)."""
    blob = {
        "format": CKPT_FORMAT,
        "config": cfg.to_dict(),
        "step": step,
        "model": model_state,
        "optim": optim_state,
        "state": state,
    }
    atomic_save(blob, path)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to ``path.tmp``, flushed to disk, then renamed over ``path``: until the
    rename any previous file stays whole, and a reader never sees a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _read(path: Path) -> dict:
    """The checkpoint's contents, or a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, disallowed globals...
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a {CKPT_FORMAT} checkpoint")
    return blob


def config_differences(theirs: dict, ours: dict, *, ignore=()) -> list[str]:
    """Each field where two ``TrainConfig.to_dict()``s differ, as "name: A in checkpoint, B now"
    (nested fields by dotted name); fields named in ``ignore`` are not compared."""
    want, got = _flat(ours), _flat(theirs)
    return [
        f"{k}: {got.get(k)!r} in checkpoint, {want.get(k)!r} now"
        for k in sorted(set(want) | set(got))
        if k not in ignore and want.get(k) != got.get(k)
    ]


def checkpoint_config(path: Path) -> tuple[dict, int]:
    """(the config a checkpoint was written for, as a dict; the steps it has trained)."""
    blob = _read(path)
    return blob["config"], int(blob["step"])


def read_checked(
    path: Path, cfg: TrainConfig, shapes: dict[str, tuple], *, ignore: tuple[str, ...] = ()
) -> dict:
    """The checkpoint at ``path``, refused (ValueError naming each mismatch) unless its config
    equals ``cfg`` (fields in ``ignore`` aside) and its tensors have exactly ``shapes``."""
    path = Path(path)
    blob = _read(path)
    diff = config_differences(blob["config"], cfg.to_dict(), ignore=ignore)
    if diff:
        raise ValueError(f"{path} was written for a different config: " + "; ".join(diff))
    theirs = {k: tuple(v.shape) for k, v in blob["model"].items()}
    bad = [
        f"{k}: {theirs.get(k)} in checkpoint, {shapes.get(k)} in model"
        for k in sorted(set(shapes) | set(theirs))
        if shapes.get(k) != theirs.get(k)
    ]
    if bad:
        raise ValueError(f"{path} does not match the model's tensors: " + "; ".join(bad))
    return blob


def load_checkpoint(
    path: Path, model, opt, cfg: TrainConfig, *, ignore: tuple[str, ...] = ()
) -> tuple[int, dict]:
    """Restore a checkpoint written by ``save_checkpoint``; clear errors name file and mismatch.

    The checkpoint's config must equal ``cfg`` except in the fields named in ``ignore`` (the
    training loop passes ``("steps",)`` to extend a run)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    blob = read_checked(path, cfg, own, ignore=ignore)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optim"])
    return int(blob["step"]), blob["state"]
