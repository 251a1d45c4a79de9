"""Expert parallelism: experts sharded over processes, all-to-all dispatch and combine.

Start ranks with torchrun (``torchrun --nproc_per_node=4 -m moe_lab.parallel --check``) or
from Python with ``moe_lab.parallel.spawn``; wrap a replicated ``MoE`` with
``ExpertParallelMoE.from_moe``.
"""

from moe_lab.parallel.comm import PeerFailure, TrafficLog, all_to_all
from moe_lab.parallel.launch import SpawnError, free_port, spawn
from moe_lab.parallel.layer import ExpertParallelMoE, ExpertParallelOutput
from moe_lab.parallel.routing import NodeLimit, groups_spanned, node_limited_top_k

__all__ = [
    "ExpertParallelMoE",
    "ExpertParallelOutput",
    "NodeLimit",
    "PeerFailure",
    "SpawnError",
    "TrafficLog",
    "all_to_all",
    "free_port",
    "groups_spanned",
    "node_limited_top_k",
    "spawn",
]
