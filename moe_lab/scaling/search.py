"""Search the parallel layouts of a model on a given number of GPUs for the ones that fit.

`feasible_plans` tries every combination of the TP, PP and EP degrees it is given, keeps the
valid `ClusterPlan`s (layouts that do not fit the model or the nodes raise `LayoutError` in
ClusterPlan and are skipped; any other error, such as an unknown precision name, is raised)
whose most loaded stage fits in GPU memory with `headroom` to spare, and orders them by memory
per GPU. The
headroom stands for what the memory model does not count: communication buffers, the CUDA
context, allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from .arch import Architecture
from .memory import GiB, StageMemory, memory_per_gpu, moe_layer_times
from .plan import ClusterPlan, LayoutError


@dataclass(frozen=True)
class PlanReport:
    """A plan that fits, its most loaded stage and the all-to-all share of an MoE layer."""

    plan: ClusterPlan
    memory: StageMemory
    comm_s: float
    compute_s: float

    @property
    def gib(self) -> float:
        return self.memory.total / GiB

    @property
    def comm_share(self) -> float:
        """All-to-all / (all-to-all + compute) of one MoE layer if nothing overlaps."""
        both = self.comm_s + self.compute_s
        return self.comm_s / both if both else 0.0


def _degrees(name: str, values) -> tuple[int, ...]:
    vals = tuple(values)
    if not vals:
        raise ValueError(f"{name} must list at least one degree")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must hold positive ints, got {v!r}")
    return vals


def feasible_plans(
    model: Architecture, n_gpus: int, *, tp=(1,), pp=(1,), ep=(1,), headroom: float = 0.1,
    **plan_kwargs,
) -> list[PlanReport]:
    """Every valid (tp, pp, ep) layout of `model` on `n_gpus` GPUs that fits, least memory
    first. `plan_kwargs` go to ClusterPlan unchanged (precision, recompute, zero_stage, ...);
    an error in them is raised, not taken for a layout that does not fit."""
    if not isinstance(model, Architecture):
        raise TypeError(f"model must be an Architecture, got {type(model).__name__}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    grid = product(_degrees("tp", tp), _degrees("pp", pp), _degrees("ep", ep))
    out = []
    for t, p, e in grid:
        try:
            plan = ClusterPlan(model=model, n_gpus=n_gpus, tp=t, pp=p, ep=e, **plan_kwargs)
        except LayoutError:
            continue
        worst = memory_per_gpu(plan)
        if worst.total <= (1 - headroom) * plan.gpu.memory_gib * GiB:
            out.append(PlanReport(plan, worst, *moe_layer_times(plan)))
    return sorted(out, key=lambda r: r.memory.total)
