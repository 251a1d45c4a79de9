"""Expert parallelism: experts sharded over processes, all-to-all dispatch and combine.

Start ranks with torchrun (``torchrun --nproc_per_node=4 -m moe_lab.parallel --check``) or
from Python with ``moe_lab.parallel.spawn``; wrap a replicated ``MoE`` with
``ExpertParallelMoE.from_moe``: the same layer with the all-to-all dispatcher. Node-limited
routing, which bounds the ranks a token's rows travel to, is routing:
``moe_lab.routing.node_limited_top_k`` and ``MoEConfig(node_limit=...)``.
"""

from moe_lab.parallel.comm import PeerFailure, TrafficLog, all_to_all
from moe_lab.parallel.launch import SpawnError, free_port, spawn
from moe_lab.parallel.layer import AllToAllDispatcher, ExpertParallelMoE, ExpertParallelOutput
from moe_lab.parallel.training import (
    expert_parameter_names,
    prepare_ddp,
    replicated_parameter_names,
    sync_gradients,
)

__all__ = [
    "AllToAllDispatcher",
    "ExpertParallelMoE",
    "ExpertParallelOutput",
    "PeerFailure",
    "SpawnError",
    "TrafficLog",
    "all_to_all",
    "expert_parameter_names",
    "free_port",
    "prepare_ddp",
    "replicated_parameter_names",
    "spawn",
    "sync_gradients",
]
