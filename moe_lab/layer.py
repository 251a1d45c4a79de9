"""The MoE layer: router -> routing decision -> dispatch -> experts -> combine.

Losses come back as values in ``MoEOutput``; the coefficients in the config are applied by the
training code. The dispatch implementation (``cfg.impl``) is the one seam that changes how
tokens reach experts; routing and experts stay the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_lab.config import MoEConfig
from moe_lab.dispatch import get_dispatch
from moe_lab.experts import FFN, Experts
from moe_lab.losses import load_balancing_loss, router_z_loss
from moe_lab.routing import (
    capacity_mask,
    expert_capacity,
    expert_choice_routing,
    noisy_logits,
    router_probs,
    top_k_routing,
)


@dataclass
class MoEOutput:
    """What one call of the layer returns.

    y: same shape as x. aux_loss, z_loss: unweighted losses of this call. tokens_per_expert (E,):
    assignments each expert processed, after dropping. dropped: assignments dropped (for expert
    choice: tokens no expert picked). indices/weights: the routing decision, (T, k), for analysis
    (for expert choice: (C, E), the tokens each expert picked and their weights).
    """

    y: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: int
    indices: torch.Tensor
    weights: torch.Tensor


@dataclass
class Routing:
    """A top-k routing decision with what follows from it: losses, capacity, kept assignments."""

    weights_Tk: torch.Tensor
    indices_Tk: torch.Tensor
    keep_Tk: torch.Tensor | None  # None: dropless
    capacity: int | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped: int


def route_tokens(
    cfg: MoEConfig,
    logits_TE: torch.Tensor,
    select: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Routing:
    """Select experts with ``select``, compute both router losses, apply capacity (GShard).

    Shared by the single-process layer and the expert-parallel one, so both route identically;
    capacity is computed from the T tokens of this call.
    """
    T, E = logits_TE.shape
    z_loss = router_z_loss(logits_TE)
    weights_Tk, indices_Tk = select(logits_TE)
    probs_TE = router_probs(logits_TE, cfg.score)
    if cfg.score == "sigmoid":  # balance over normalised affinities, as DeepSeek-V3 does
        probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True)
    aux_loss = load_balancing_loss(probs_TE, indices_Tk, E)
    keep_Tk, capacity = None, None
    if cfg.capacity_factor is not None:
        capacity = expert_capacity(T, E, cfg.top_k, cfg.capacity_factor)
        keep_Tk = capacity_mask(indices_Tk, E, capacity)
    dropped = 0 if keep_Tk is None else int((~keep_Tk).sum())
    return Routing(weights_Tk, indices_Tk, keep_Tk, capacity, aux_loss, z_loss, dropped)


class MoE(nn.Module):
    """A Mixture-of-Experts FFN layer: E experts, a linear router, top-k or expert choice."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.activation)
        # DeepSeekMoE shared expert: every token goes through it, next to its routed experts.
        self.shared = FFN(cfg.d_model, cfg.shared_d_ff, cfg.activation) if cfg.shared_d_ff else None
        self.noise = (
            nn.Linear(cfg.d_model, cfg.num_experts, bias=False) if cfg.noisy_gating else None
        )
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        # DeepSeek-V3 auxiliary-loss-free balancing: shifts selection only; a buffer, not trained.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self._dispatch = get_dispatch(cfg.impl)

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
        if x.dtype != self.router.weight.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's parameters are {self.router.weight.dtype}; "
                "convert one to match (e.g. moe.to(x.dtype))"
            )

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits (T, E); with noisy gating, Gaussian noise is added while training."""
        logits_TE = self.router(x_TD)
        if self.noise is not None and self.training:
            logits_TE = noisy_logits(logits_TE, self.noise(x_TD))
        return logits_TE

    def forward(self, x: torch.Tensor) -> MoEOutput:
        self._check_input(x)
        cfg = self.cfg
        x_TD = x.reshape(-1, cfg.d_model)
        logits_TE = self.router_logits(x_TD)
        if cfg.router == "expert_choice":
            out = self._forward_expert_choice(x, x_TD, logits_TE, router_z_loss(logits_TE))
        else:
            out = self._forward_top_k(x, x_TD, logits_TE)
        if self.shared is not None:
            out.y = out.y + self.shared(x)
        return out

    def _forward_top_k(self, x, x_TD, logits_TE) -> MoEOutput:
        cfg = self.cfg
        r = route_tokens(cfg, logits_TE, self.route)
        kept = r.indices_Tk if r.keep_Tk is None else r.indices_Tk[r.keep_Tk]
        tokens_per_expert = torch.bincount(kept.reshape(-1), minlength=cfg.num_experts)
        y_TD = self._dispatch(
            x_TD, r.weights_Tk.to(x.dtype), r.indices_Tk, r.keep_Tk, self.experts,
            capacity=r.capacity,
        )
        return MoEOutput(
            y=y_TD.view(x.shape),
            aux_loss=r.aux_loss,
            z_loss=r.z_loss,
            tokens_per_expert=tokens_per_expert,
            dropped=r.dropped,
            indices=r.indices_Tk,
            weights=r.weights_Tk,
        )

    def route(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k selection (weights (T, k), indices (T, k)), with the balancing bias if enabled."""
        cfg = self.cfg
        bias = self.expert_bias if cfg.bias_update_rate > 0 else None
        return top_k_routing(
            logits_TE, cfg.top_k, score=cfg.score, normalize=cfg.normalize_weights, bias=bias
        )

    def _forward_expert_choice(self, x, x_TD, logits_TE, z_loss) -> MoEOutput:
        """Zhou et al. (2022): each expert takes its top-C tokens; balanced by construction."""
        T, E = x_TD.shape[0], self.cfg.num_experts
        capacity = min(T, expert_capacity(T, E, 1, self.cfg.capacity_factor))
        weights_EC, tokens_EC = expert_choice_routing(logits_TE, capacity)
        h_ECD = self.experts.forward_batched(x_TD[tokens_EC])  # (E, C, D)
        h_ECD = h_ECD * weights_EC.to(x.dtype).unsqueeze(-1)
        y_TD = torch.zeros_like(x_TD).index_add(
            0, tokens_EC.reshape(-1), h_ECD.reshape(-1, x.shape[-1])
        )
        picked = torch.zeros(T, dtype=torch.bool, device=x.device)
        picked[tokens_EC.reshape(-1)] = True
        return MoEOutput(
            y=y_TD.view(x.shape),
            aux_loss=logits_TE.new_zeros(()),
            z_loss=z_loss,
            tokens_per_expert=torch.full((E,), capacity, dtype=torch.long, device=x.device),
            dropped=int((~picked).sum()),
            indices=tokens_EC.t(),
            weights=weights_EC.t(),
        )

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float | None = None) -> None:
        """DeepSeek-V3 balancing step: raise the bias of under-loaded experts, lower over-loaded."""
        rate = self.cfg.bias_update_rate if rate is None else rate
        load = tokens_per_expert.to(self.expert_bias.dtype)
        if load.shape != self.expert_bias.shape:
            raise ValueError(f"tokens_per_expert must have shape {tuple(self.expert_bias.shape)}")
        self.expert_bias += rate * torch.sign(load.mean() - load)
