"""The MoE layer: router -> routing decision -> dispatcher -> expert backend -> combine.

Three seams, each swappable alone: the dispatcher (``cfg.impl``: how tokens reach experts),
the expert backend (``cfg.backend``: which GEMMs run them) and, in ``moe_lab.parallel``, the
process group (an all-to-all dispatcher and a slice of the experts: the same layer). Losses
come back as values in ``MoEOutput``; the config's coefficients are applied by the training
code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_lab.config import MoEConfig
from moe_lab.dispatch import Dispatcher, make_dispatcher
from moe_lab.experts import FFN, Experts
from moe_lab.router import Router, RoutingDecision
from moe_lab.routing import _check_logits

_CHECK_VALUES = False


def check_values(enabled: bool) -> None:
    """Debug switch: make every MoE forward check its router logits for NaN/inf.

    Off by default, since reading a tensor's values costs a device-to-host sync per call.
    """
    global _CHECK_VALUES
    _CHECK_VALUES = bool(enabled)


@dataclass
class MoEOutput:
    """What one call of the layer returns; the same fields mean the same under both routers.

    y: same shape as x. aux_loss, z_loss: unweighted losses of this call (expert choice is
    balanced by construction: aux_loss 0). tokens_per_expert (E,): assignments each expert
    processed. dropped: 0-d int tensor, assignments dropped for capacity (expert choice drops
    none it chose: 0). unrouted: 0-d int tensor, tokens no expert processed (routed output 0).
    indices, weights, keep: the assignments, (T, k) for top-k, (T, E) for expert choice (slot e
    is expert e; keep marks the tokens it picked); keep is None when every assignment is kept.
    """

    y: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    unrouted: torch.Tensor | None = None
    keep: torch.Tensor | None = None


class MoE(nn.Module):
    """A Mixture-of-Experts FFN layer: E experts, a linear router, top-k or expert choice.

    Host syncs per forward, and why: none for routing and statistics (returned as tensors);
    the dispatcher's (dropless einsum sizes its slab by the busiest expert; sort with capacity
    trims its order to the kept rows) and the backend's (``moe_lab.backends``: split sizes for
    "loop", the busiest count for "bmm"; none for "grouped_mm" and "triton"); in
    ``moe_lab.parallel``, the all-to-all's split sizes.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.activation,
                               backend=cfg.expert_backend)
        # DeepSeekMoE shared expert: every token goes through it, next to its routed experts.
        self.shared = FFN(cfg.d_model, cfg.shared_d_ff, cfg.activation) if cfg.shared_d_ff else None
        self.dispatcher: Dispatcher = make_dispatcher(cfg.dispatcher)

    @property
    def expert_bias(self) -> torch.Tensor:
        """The router's selection bias (E,): DeepSeek-V3's auxiliary-loss-free balancing."""
        return self.router.expert_bias

    def extra_repr(self) -> str:
        return f"dispatcher={self.dispatcher!r}"

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"x must have last dimension d_model={self.cfg.d_model}, got shape {tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"x must contain at least one token, got shape {tuple(x.shape)}")
        if x.dtype != self.router.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's parameters are {self.router.weight.dtype}; "
                "convert one to match (e.g. moe.to(x.dtype)), or run under torch.autocast"
            )

    def route(self, x_TD: torch.Tensor) -> RoutingDecision:
        """The routing decision for tokens x_TD (T, D)."""
        routing = self.router(x_TD)
        if _CHECK_VALUES:
            _check_logits(routing.logits_TE.detach(), "router logits")
        return routing

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """Route x (..., d_model), run the experts, combine: an ``MoEOutput`` with y like x.

        Under ``torch.autocast`` routing stays in the router's precision, the experts run in
        the autocast dtype, and y comes back in that dtype for every dispatcher, backend and
        capacity setting, as a ``Linear`` would return it.
        """
        self._check_input(x)
        x_TD = x.reshape(-1, self.cfg.d_model)
        r = self.route(x_TD)
        if torch.is_autocast_enabled(x.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        y_TD = self.dispatcher(x_TD, r, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return MoEOutput(
            y=y_TD.view(x.shape),  # x's shape; under autocast, the autocast dtype
            aux_loss=r.aux_loss,
            z_loss=r.z_loss,
            tokens_per_expert=r.tokens_per_expert,
            dropped=r.dropped,
            indices=r.indices_Tk,
            weights=r.weights_Tk,
            unrouted=r.unrouted,
            keep=r.keep_Tk,
        )

    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float | None = None) -> None:
        """DeepSeek-V3 balancing step from the load this process's tokens put on each expert.

        The dispatcher makes the load global first (a sum over ranks when sharded), so every
        replica of the router takes the same step.
        """
        rate = self.cfg.bias_update_rate if rate is None else rate
        if not isinstance(tokens_per_expert, torch.Tensor):
            raise TypeError(
                f"tokens_per_expert must be a tensor, got {type(tokens_per_expert).__name__}"
            )
        if tokens_per_expert.shape != self.expert_bias.shape:
            raise ValueError(f"tokens_per_expert must have shape {tuple(self.expert_bias.shape)}")
        self.router.update_bias(self.dispatcher.reduce_load(tokens_per_expert), rate)


class MoEFFN(nn.Module):
    """The MoE layer as a drop-in FFN: ``forward`` returns the output tensor, so it fits
    ``nn.Sequential`` and code written for a dense FFN; the last call's ``MoEOutput`` stays in
    ``last`` and ``loss()`` gives its weighted router losses to add to the task loss."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.moe = MoE(cfg)
        self.last: MoEOutput | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.moe(x)
        return self.last.y

    def loss(self) -> torch.Tensor:
        """aux_loss_coef * aux_loss + z_loss_coef * z_loss of the last call."""
        if self.last is None:
            raise RuntimeError("MoEFFN.loss() needs a forward call first")
        cfg = self.moe.cfg
        return cfg.aux_loss_coef * self.last.aux_loss + cfg.z_loss_coef * self.last.z_loss
