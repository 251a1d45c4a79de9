"""Trained weights for the serving chapter: exported from a training run, loaded safely.

    python -m moe_lab.serving.weights runs/serving/moe8_s0 benchmarks/results/serving/NAME

writes NAME.pt (the model's state dict only, float32, written to a temporary file and renamed)
and NAME.json: the training command (from the run's log), the machines it ran on, its final
validation loss, the export command and machine, and the weights' SHA-256. ``load_model``
rebuilds the config from the recorded command (``moe_lab.train.config_from_argv``), refuses a
file whose hash differs, and loads it with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path

import torch

from moe_lab.model import TinyLM
from moe_lab.provenance import machine_record
from moe_lab.train.checkpoint import atomic_save

PROG = "python -m moe_lab.serving.weights"
SERVING_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "serving"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_run(run_dir: Path, out_stem: Path, *, command: str | None = None) -> dict:
    """Write ``out_stem``.pt and ``out_stem``.json from the run in ``run_dir``."""
    run_dir, out_stem = Path(run_dir), Path(out_stem)
    log = json.loads((run_dir / "log.json").read_text())
    blob = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["model"].items()}
    pt = out_stem.with_suffix(".pt")
    atomic_save(state, pt)
    record = {
        "weights": pt.name,
        "sha256": _sha256(pt),
        "dtype": "float32",
        "train_command": log["command"],
        "steps": blob["step"],
        "final_val_loss": log["evals"][-1]["val_loss"],
        "train_machine_start": log["machine_start"],
        "train_machine_end": log["machine_end"],
        "export_command": command,
        "export_machine": machine_record(),
    }
    out_stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return record


def load_model(name: str | Path) -> TinyLM:
    """The exported model described by a JSON file: a path, or a name in ``SERVING_DIR``
    ("tinylm_long_moe8_s0"); float32, eval mode."""
    from moe_lab.train import config_from_argv

    json_path = Path(name)
    if json_path.suffix != ".json":
        json_path = SERVING_DIR / f"{name}.json"
    record = json.loads(json_path.read_text())
    pt = json_path.with_name(record["weights"])
    if _sha256(pt) != record["sha256"]:
        raise ValueError(f"{pt} does not match the SHA-256 recorded in {json_path}")
    argv = shlex.split(record["train_command"])[3:]  # after "python -m moe_lab.train"
    cfg, _ = config_from_argv(argv)
    model = TinyLM(cfg.model)
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    return model.eval()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {PROG} RUN_DIR OUT_STEM")
    rec = export_run(sys.argv[1], sys.argv[2], command=f"{PROG} {shlex.join(sys.argv[1:])}")
    print(json.dumps({k: rec[k] for k in ("weights", "sha256", "final_val_loss")}))
