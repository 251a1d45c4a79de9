"""Inference-time variants of a trained model: capacity at evaluation, a low-precision router.

``with_moe_config`` builds the same model with changed ``MoEConfig`` fields (a capacity factor,
another dispatcher) and loads the same weights. ``with_router_dtype`` swaps every router for a
``LowPrecisionRouter``, which computes its logits in another dtype (bf16, as an inference
engine might) and hands them back in the weights' dtype: the rounding happens, the rest of
the layer runs as before. ``batched_losses`` scores windows in batches of a given order, the
unit over which capacity is counted.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F

from moe_lab.config import check_int
from moe_lab.model import ModelConfig, TinyLM
from moe_lab.router import Router


def _check_model(model) -> None:
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
    if model.cfg.moe is None:
        raise ValueError("model must be an MoE model (cfg.moe is None)")


def with_moe_config(model: TinyLM, **changes) -> TinyLM:
    """A new TinyLM whose MoE layers use ``dataclasses.replace(cfg.moe, **changes)``, holding
    ``model``'s weights, in eval mode (e.g. capacity_factor=1.0 for capacity at evaluation)."""
    _check_model(model)
    cfg = ModelConfig(**{**vars(model.cfg), "moe": replace(model.cfg.moe, **changes)})
    ref = model.tok_emb.weight
    new = TinyLM(cfg).to(dtype=ref.dtype, device=ref.device)
    new.load_state_dict(model.state_dict())
    return new.eval()


class LowPrecisionRouter(Router):
    """A router whose logits are computed in ``dtype`` (inputs and weight rounded to it, the
    product rounded to it) and returned in the weight's dtype. Same parameters and buffers
    as ``Router``, so a state dict moves between the two."""

    def __init__(self, cfg, dtype: torch.dtype = torch.bfloat16):
        super().__init__(cfg)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.noise is not None and self.training:
            raise ValueError("LowPrecisionRouter is for inference: noisy gating while training")
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.to(self.dtype), self.weight.to(self.dtype))
        return logits_TE.to(self.weight.dtype)


def with_router_dtype(model: TinyLM, dtype: torch.dtype = torch.bfloat16) -> TinyLM:
    """A deep copy of ``model`` (eval mode) whose routers compute logits in ``dtype``."""
    _check_model(model)
    new = copy.deepcopy(model).eval()
    for block in new.blocks:
        old = block.ffn.router
        low = LowPrecisionRouter(old.cfg, dtype).to(old.weight.device)
        low.load_state_dict(old.state_dict())
        block.ffn.router = low.to(old.weight.dtype)
    return new


@torch.no_grad()
def batched_losses(
    model: TinyLM, x_NL: torch.Tensor, y_NL: torch.Tensor, order_N: torch.Tensor, batch: int
) -> tuple[torch.Tensor, int]:
    """(per-window mean cross-entropy (N,) float64 in the windows' own order, assignments
    dropped): windows scored ``batch`` at a time in the order ``order_N`` (a permutation)."""
    check_int("batch", batch, 1)
    N = x_NL.shape[0]
    if not torch.equal(torch.sort(order_N).values, torch.arange(N)):
        raise ValueError("order must be a permutation of range(N)")
    model.eval()
    losses_N = torch.empty(N, dtype=torch.float64)
    dropped = 0
    for i in range(0, N, batch):
        rows = order_N[i : i + batch]
        out = model(x_NL[rows])
        ce_BL = F.cross_entropy(out.logits.transpose(1, 2), y_NL[rows], reduction="none")
        losses_N[rows] = ce_BL.mean(1).double()
        dropped += sum(int(r.dropped) for r in out.routing)
    return losses_N, dropped
