"""Communication for expert parallelism: a differentiable all-to-all and clear failures.

``all_to_all`` wraps ``torch.distributed.all_to_all_single`` in our own autograd Function. The
forward sends ``input_splits[d]`` rows to rank d and receives ``output_splits[s]`` rows from
rank s. Its backward is the same exchange run in reverse: the gradient of the rows we received
goes back to the ranks that sent them, so the splits swap places.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A collective failed because another rank died, stalled past the timeout, or disagreed."""


def group_rank_size(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (the default group when None); clear error if no group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(torchrun does the rendezvous), or start workers with moe_lab.parallel.spawn"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _timeout_s(group) -> float | None:
    """The group's collective timeout in seconds, when the backend exposes it (gloo, NCCL)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_group

        pg = group if group is not None else _get_default_group()
        device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
        t = pg._get_backend(device).options._timeout
        return t.total_seconds() if isinstance(t, datetime.timedelta) else None
    except Exception:  # noqa: BLE001 - best effort, only used in an error message
        return None


def run_collective(what: str, fn, group=None):
    """Run ``fn()``; turn a backend error (dead peer, timeout) into a PeerFailure that says so."""
    try:
        return fn()
    except RuntimeError as err:
        if isinstance(err, PeerFailure):
            raise
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        t = _timeout_s(group)
        limit = f"{t:g} s" if t is not None else "the process-group timeout"
        raise PeerFailure(
            f"rank {rank} of {world}: {what} failed. Another rank probably died or stalled "
            f"(a collective waits at most {limit}; set it with init_process_group(timeout=...)). "
            f"Backend error: {type(err).__name__}: {str(err).strip()[:300]}"
        ) from err


@dataclass
class TrafficLog:
    """Bytes each all-to-all sent to each destination rank, as measured from the real splits.

    ``entries`` holds ``(tag, bytes_to_dest)`` with ``bytes_to_dest[d]`` the bytes this rank
    sent to rank d (its own rank included: that slice is a local copy, not network traffic).
    """

    entries: list[tuple[str, list[int]]] = field(default_factory=list)

    def add(self, tag: str, splits: list[int], row_bytes: int) -> None:
        self.entries.append((tag, [s * row_bytes for s in splits]))

    def total(self, tag: str) -> list[int]:
        """Bytes sent to each rank by every exchange tagged ``tag`` (e.g. "dispatch.backward")."""
        rows = [b for t, b in self.entries if t == tag]
        return [sum(col) for col in zip(*rows, strict=True)] if rows else []


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward is the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group, log, tag):
        ctx.splits, ctx.group, ctx.log, ctx.tag = (output_splits, input_splits), group, log, tag
        return _exchange(x_ND, output_splits, input_splits, group, log, tag)

    @staticmethod
    def backward(ctx, grad_MD):
        output_splits, input_splits = ctx.splits
        # Rows we received from rank s came from its x; their gradient goes back to s.
        grad_ND = _exchange(
            grad_MD, input_splits, output_splits, ctx.group, ctx.log, ctx.tag + ".backward"
        )
        return grad_ND, None, None, None, None, None


def _exchange(x_ND, output_splits, input_splits, group, log, tag):
    x_ND = x_ND.contiguous()
    out_MD = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))  # (M, ...) rows received
    if log is not None:
        log.add(tag, list(input_splits), math.prod(x_ND.shape[1:]) * x_ND.element_size())
    run_collective(
        f"all-to-all '{tag}'",
        lambda: dist.all_to_all_single(
            out_MD, x_ND, list(output_splits), list(input_splits), group=group
        ),
        group,
    )
    return out_MD


def all_to_all(
    x_ND: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group=None,
    *,
    log: TrafficLog | None = None,
    tag: str = "all_to_all",
) -> torch.Tensor:
    """Differentiable all-to-all: send rows ``input_splits[d]`` to rank d, (N, ...) -> (M, ...).

    Every rank must call it (and, when training, backpropagate through it) the same number of
    times in the same order. With grad enabled the output always joins the graph, so every rank
    takes part in the backward exchange even where its own input needs no gradient.
    """
    _, world = group_rank_size(group)
    for name, splits, n in (
        ("input_splits", input_splits, x_ND.shape[0]),
        ("output_splits", output_splits, None),
    ):
        if len(splits) != world or any(int(s) < 0 for s in splits):
            raise ValueError(f"{name} must be {world} non-negative ints, got {list(splits)}")
        if n is not None and sum(splits) != n:
            raise ValueError(f"{name} must sum to the {n} rows of x, got {sum(splits)}")
    in_s, out_s = [int(s) for s in input_splits], [int(s) for s in output_splits]
    if torch.is_grad_enabled() and not x_ND.requires_grad:
        x_ND = x_ND.detach().requires_grad_()  # keep this rank in the backward collective
    return _AllToAll.apply(x_ND, out_s, in_s, group, log, tag)


def exchange_counts(counts_WE: torch.Tensor, group=None) -> torch.Tensor:
    """Tell every rank how many rows it will get: send row d of (W, e) counts to rank d.

    Returns (W, e): row s is what rank s will send us, per local expert.
    """
    counts_WE = counts_WE.contiguous()
    recv_WE = torch.empty_like(counts_WE)
    run_collective(
        "exchange of per-expert token counts",
        lambda: dist.all_to_all_single(recv_WE, counts_WE, group=group),
        group,
    )
    return recv_WE


def peer_table(group=None) -> list[tuple[str, int]]:
    """(host name, process id) of every rank of ``group``: gathered once at start-up, so that
    after a failure the survivors can tell which peer is gone (``lost_ranks``). A collective."""
    import os
    import socket

    _, world = group_rank_size(group)
    table: list = [None] * world
    run_collective("all_gather_object of the peer table",
                   lambda: dist.all_gather_object(table, (socket.gethostname(), os.getpid()),
                                                  group=group), group)
    return [tuple(t) for t in table]


def _process_gone(pid: int) -> bool:
    """True when process ``pid`` has exited (or is a zombie nobody has reaped yet)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def lost_ranks(table: list[tuple[str, int]]) -> tuple[list[int], bool]:
    """(ranks whose process has exited, whether every rank was on this host and so checked).

    Only ranks on this machine can be checked; a rank on another host that died, or any rank
    that is alive but stalled, is not in the list."""
    import socket

    here = socket.gethostname()
    gone = [r for r, (host, pid) in enumerate(table) if host == here and _process_gone(pid)]
    return gone, all(host == here for host, _ in table)


def name_lost_ranks(err: PeerFailure, table: list[tuple[str, int]],
                    grace_s: float = 3.0) -> PeerFailure:
    """``err`` with the lost rank named: "lost rank 1 (pid 1234 exited)", or why not.

    A killed peer's sockets close while the kernel is still tearing the process down, so its
    /proc entry can read as running for a moment after the collective fails: look again for
    up to ``grace_s`` seconds before saying that no rank exited."""
    import time

    deadline = time.monotonic() + grace_s
    gone, all_local = lost_ranks(table)
    while not gone and time.monotonic() < deadline:
        time.sleep(0.05)
        gone, all_local = lost_ranks(table)
    if gone:
        what = "; ".join(f"lost rank {r} (process {table[r][1]} on {table[r][0]} exited)"
                         for r in gone)
    elif all_local:
        what = "no rank has exited: a rank stalled past the timeout"
    else:
        what = "no rank on this host has exited: a rank on another host died or stalled"
    return PeerFailure(f"{what}. {err}")
