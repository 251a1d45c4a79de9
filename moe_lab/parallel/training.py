"""Training a model that holds expert-parallel layers: which parameters are which, and grads.

In a model with ``ExpertParallelMoE`` layers sharded over a group of W ranks, each rank trains
on its own slice of the batch. Two kinds of parameters then need different treatment:

- **replicated** (attention, embeddings, norms, routers, shared experts): every rank holds the
  same copy and computed a gradient from its own tokens only; the gradients are *averaged*
  over the group (what data parallelism does);
- **expert** (``experts.w_gate/w_up/w_down`` of each sharded layer): each rank holds different
  experts, and the all-to-all's backward already *summed* every rank's contribution into them;
  they are never broadcast or averaged, only divided by W so that both kinds are gradients of
  the same objective, the mean over ranks of each rank's loss.

``sync_gradients`` does both after ``backward()``. ``DistributedDataParallel`` knows neither:
wrapped as is, it would broadcast rank 0's experts over every other rank's at construction and
average different experts' gradients. ``prepare_ddp`` makes DDP ignore the expert parameters
(its own supported mechanism) and scales their gradients by 1/W as they accumulate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_lab.parallel.comm import run_collective
from moe_lab.parallel.layer import ExpertParallelMoE


def _sharded_layers(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)}


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the sharded experts' parameters."""
    names = []
    for prefix, layer in _sharded_layers(model).items():
        for name, _ in layer.experts.named_parameters():
            names.append(f"{prefix}.experts.{name}" if prefix else f"experts.{name}")
    return names


def replicated_parameter_names(model: nn.Module) -> list[str]:
    """Every other parameter's name: the same on every rank, averaged like data parallelism."""
    experts = set(expert_parameter_names(model))
    return [name for name, _ in model.named_parameters() if name not in experts]


def _group_of(model: nn.Module):
    layers = list(_sharded_layers(model).values())
    if not layers:
        raise ValueError("model holds no ExpertParallelMoE layer; use plain data parallelism")
    groups = {id(layer.group) for layer in layers}
    if len(groups) > 1:
        raise ValueError("the model's sharded layers use different process groups")
    return layers[0].group


@torch.no_grad()
def sync_gradients(model: nn.Module) -> None:
    """After ``backward()`` on every rank: average replicated gradients over the expert-parallel
    group, divide expert gradients by its size. Every rank must call it (it is a collective)."""
    group = _group_of(model)
    W = dist.get_world_size(group)
    experts = set(expert_parameter_names(model))
    flat = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # no token reached it here: a zero, so every rank joins the sum
            p.grad = torch.zeros_like(p)
        if name in experts:
            p.grad.div_(W)
        else:
            flat.append(p.grad)
    if flat:
        buf = torch.cat([g.reshape(-1) for g in flat])
        run_collective("all_reduce of replicated gradients",
                       lambda: dist.all_reduce(buf, group=group), group)
        buf.div_(W)
        offset = 0
        for g in flat:
            g.copy_(buf[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def prepare_ddp(model: nn.Module) -> nn.Module:
    """Make ``DistributedDataParallel(model)`` safe: it ignores the expert parameters (no
    broadcast, no averaging), and their gradients are divided by the group's size as they
    accumulate. Call before wrapping; returns the model. The DDP process group must be the
    expert-parallel group (EP over the whole data-parallel world)."""
    group = _group_of(model)
    W = dist.get_world_size(group)
    names = expert_parameter_names(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    params = dict(model.named_parameters())
    for name in names:
        if not getattr(params[name], "_moe_lab_scaled", False):
            # scales each incoming gradient, so gradient accumulation stays right
            params[name].register_hook(lambda g: g / W)
            params[name]._moe_lab_scaled = True
    return model
