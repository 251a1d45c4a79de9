"""Chapter 8's data: routing traces over training, final weights, upcycled experts' spread.

    python benchmarks/inside_moe.py --runs runs/inside --out benchmarks/results/inside

reads the runs these commands wrote (one thread each; each log records its own command; the
continuations need their dense run's ``ckpt.pt`` first), for S in 0 and 1:

    T="python -m moe_lab.train --config long --threads 1"
    $T --variant moe8 --seed 0 --keep-every 50 --out runs/inside/moe8_s0
    $T --variant dense --seed S --out runs/inside/dense_sS
    $T --variant dense --seed 1S --steps 500 --init-from runs/inside/dense_sS/ckpt.pt \
       --out runs/inside/dense_cont_sS
    $T --variant up8 --seed 1S --steps 500 --init-from runs/inside/dense_sS/ckpt.pt \
       --out runs/inside/up8_cont_sS
    $T --variant up8 --seed S --steps 1500 --out runs/inside/up8_scratch_sS

(the continuations' seeds, 10 and 11, give them other batches than their dense run saw), and writes,
into ``--out``:

- ``log_<run>.json``: each run's training log, as written (its ``command`` reruns it);
- ``traces_moe8_s0.npz``: the top-k experts of every token of a fixed quarter of the validation
  set (every 4th window), every layer, at every weight snapshot of the ``moe8_s0`` run: uint8
  (snapshots, layers, tokens, k), with the snapshot steps and the windows' indices;
- ``moe8_s0.pt``, ``dense_s0.pt``: the final weights alone, in bfloat16 (load with
  ``weights_only=True``);
- ``upcycle.json``: each upcycled or MoE run's expert spread per layer at its end
  (``moe_lab.upcycle.expert_spread``);
- ``manifest.json``: this command, the machine, and which command produced each file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from moe_lab.analysis import routing_trace
from moe_lab.data import load_corpus, validation_windows
from moe_lab.model import TinyLM
from moe_lab.provenance import machine_record
from moe_lab.train import config_from_argv
from moe_lab.upcycle import expert_spread, read_weights

TRACE_RUN = "moe8_s0"
WINDOW_STRIDE = 4  # a quarter of the fixed validation set, prose and code alike
FINAL_WEIGHTS = ("moe8_s0", "dense_s0")


def model_of(run: Path, state: dict | None = None) -> TinyLM:
    """The run's model (config from its log's command), with ``state`` or its final weights."""
    log = json.loads((run / "log.json").read_text())
    cfg, _ = config_from_argv(shlex.split(log["command"])[3:])
    model = TinyLM(cfg.model)
    model.load_state_dict(state if state is not None else read_weights(run / "ckpt.pt")[0])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/inside", help="folder of the training runs")
    p.add_argument("--out", default="benchmarks/results/inside", help="results folder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/inside_moe.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    produced = {}
    logs = sorted(d for d in runs.iterdir() if (d / "log.json").is_file())
    for run in logs:
        log = json.loads((run / "log.json").read_text())
        if "command" not in log or "machine_end" not in log:
            continue  # unfinished
        name = f"log_{run.name}.json"
        (out / name).write_text(json.dumps(log, indent=1))
        produced[name] = log["command"]

    # routing traces of the snapshots
    trace_run = runs / TRACE_RUN
    corpus = load_corpus()
    model = model_of(trace_run)
    x_NL, _, kind_N = validation_windows(corpus, model.cfg.block_size, windows=None)
    windows = torch.arange(0, x_NL.shape[0], WINDOW_STRIDE)
    steps, traces = [], []
    for snap in sorted((trace_run / "weights").glob("step_*.pt")):
        state = torch.load(snap, map_location="cpu", weights_only=True)
        traces.append(routing_trace(model_of(trace_run, state), x_NL[windows]).numpy())
        steps.append(int(snap.stem.split("_")[1]))
    np.savez_compressed(
        out / f"traces_{TRACE_RUN}.npz",
        traces=np.stack(traces),
        steps=np.array(steps),
        windows=windows.numpy(),
        kinds=kind_N[windows].numpy(),
    )
    produced[f"traces_{TRACE_RUN}.npz"] = command

    for name in FINAL_WEIGHTS:
        state, _ = read_weights(runs / name / "ckpt.pt")
        path = out / f"{name}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp)
        tmp.replace(path)
        produced[path.name] = command

    spread = {}
    for run in logs:
        if not (run / "ckpt.pt").is_file() or not (run / "log.json").is_file():
            continue
        m = model_of(run)
        if m.cfg.moe is not None:
            spread[run.name] = expert_spread(m)
    (out / "upcycle.json").write_text(
        json.dumps({"command": command, "expert_spread": spread}, indent=1)
    )
    produced["upcycle.json"] = command
    manifest = {"command": command, "machine": machine_record(), "files": produced}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
