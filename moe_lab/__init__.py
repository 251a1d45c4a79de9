"""MoE Lab: the tested package behind the book, and a small Mixture-of-Experts library.

Quick start, in your own model::

    import torch
    from moe_lab import MoE, MoEConfig

    cfg = MoEConfig(d_model=512, d_ff=1024, num_experts=8, top_k=2)
    moe = MoE(cfg)                    # router -> dispatcher -> expert backend -> combine
    out = moe(x)                      # x: (..., 512); out.y has x's shape
    loss = task_loss(out.y) + cfg.aux_loss_coef * out.aux_loss + cfg.z_loss_coef * out.z_loss

``MoEFFN(cfg)`` returns the tensor instead (for ``nn.Sequential``), with ``.loss()`` for the
router losses of its last call. The layer compiles (``torch.compile(moe)``) and follows
``torch.autocast`` (routing stays float32). Sharded over processes:
``moe_lab.parallel.ExpertParallelMoE.from_moe(moe, group)``, then ``sync_gradients(model)``
after each backward (or ``prepare_ddp(model)`` before ``DistributedDataParallel``).
The book's experiment harness lives apart, in ``moe_lab.lab``.
"""

from importlib.metadata import PackageNotFoundError, version

from moe_lab.config import MoEConfig, NodeLimit
from moe_lab.experts import FFN, Experts
from moe_lab.layer import MoE, MoEFFN, MoEOutput
from moe_lab.losses import load_balancing_loss, router_z_loss
from moe_lab.model import ModelConfig, TinyLM
from moe_lab.router import Router, RoutingDecision
from moe_lab.routing import capacity_mask, expert_capacity, top_k_routing

try:
    __version__ = version("moe_lab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"

__all__ = [
    "FFN",
    "Experts",
    "MoE",
    "MoEConfig",
    "MoEFFN",
    "MoEOutput",
    "ModelConfig",
    "NodeLimit",
    "Router",
    "RoutingDecision",
    "TinyLM",
    "__version__",
    "capacity_mask",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "top_k_routing",
]
