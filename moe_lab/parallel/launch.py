"""Start W worker processes from Python (a notebook cell, a test) with torch.multiprocessing.

``spawn(fn, world_size)`` runs ``fn(*args)`` on every rank inside an initialised process group
and returns each rank's result. ``fn`` must live in an importable module (a notebook's own
functions cannot be pickled into a spawned process). A free port is picked at run time, the
process-group timeout bounds every collective, and a hard deadline kills stragglers, so a dead
or stuck rank gives an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it), for MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    """NCCL when CUDA GPUs are present, gloo otherwise (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for_rank(backend: str, local_rank: int) -> torch.device:
    """The device a rank computes on: its own GPU under NCCL, the CPU under gloo."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class RankResult:
    """What one rank did: its return value, or the error it raised, or how it exited."""

    rank: int
    ok: bool
    value: object = None
    error: str | None = None
    error_type: str | None = None
    seconds: float | None = None
    exitcode: int | None = None


class SpawnError(RuntimeError):
    """At least one rank failed; the message has every rank's error."""


def _worker(rank, world_size, port, backend, pg_timeout_s, num_threads, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if num_threads is not None:
        torch.set_num_threads(num_threads)  # this worker process only, like torchrun's OMP=1
    start = time.monotonic()
    record: dict = {"rank": rank}
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        device_for_rank(backend, rank)
        record.update(ok=True, value=fn(*args))
    except BaseException as err:  # noqa: BLE001 - report everything to the parent
        record.update(ok=False, error=f"{err}\n{traceback.format_exc()}",
                      error_type=type(err).__name__)
    record["seconds"] = time.monotonic() - start
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    if record["ok"]:
        dist.destroy_process_group()
    else:  # peers may be gone: do not wait on them while shutting down
        os._exit(0)


def spawn(
    fn,
    world_size: int,
    *,
    args: tuple = (),
    backend: str | None = None,
    pg_timeout_s: float = 30.0,
    deadline_s: float = 120.0,
    num_threads: int | None = 1,
    raise_on_error: bool = True,
) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return their results in rank order.

    ``pg_timeout_s`` bounds each collective; ``deadline_s`` bounds the whole run (stragglers are
    killed). With ``raise_on_error=False`` returns a RankResult per rank instead of raising.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not callable(fn) or getattr(fn, "__module__", "__main__") == "__main__":
        raise TypeError("fn must be a function importable from a module (not from __main__)")
    try:
        pickle.dumps((fn, args))
    except Exception as err:  # noqa: BLE001 - any pickling failure means it cannot be sent
        raise TypeError(
            f"fn and args must be picklable (a module-level function importable from a "
            f"module, not a lambda or a notebook function): {err}"
        ) from err
    backend = backend or default_backend()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), backend, pg_timeout_s, num_threads, fn, args, out_dir),
            nprocs=world_size, join=False, start_method="spawn",
        )
        end = time.monotonic() + deadline_s
        for p in ctx.processes:
            p.join(timeout=max(0.0, end - time.monotonic()))
        timed_out = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
        for r in timed_out:
            ctx.processes[r].kill()
            ctx.processes[r].join()
        results = []
        for r, p in enumerate(ctx.processes):
            path = Path(out_dir) / f"rank{r}.pt"
            if path.exists():
                res = RankResult(**torch.load(path, weights_only=True), exitcode=p.exitcode)
            else:
                why = "killed at the deadline" if r in timed_out else "died without a result"
                res = RankResult(rank=r, ok=False, error=f"rank {r} {why}", exitcode=p.exitcode)
            results.append(res)
    if not raise_on_error:
        return results
    failed = [r for r in results if not r.ok]
    if failed:
        raise SpawnError("\n".join(f"rank {r.rank}: {r.error}" for r in failed))
    return [r.value for r in results]
