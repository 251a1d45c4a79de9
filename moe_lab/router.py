"""The router: token -> routing decision (which experts, what weights, what it cost).

``Router`` holds the routing weight (``router.weight``, (E, D), no bias), the optional noise
weight of noisy gating, and the ``expert_bias`` buffer of DeepSeek-V3's auxiliary-loss-free
balancing. Calling it returns one ``RoutingDecision``; dispatchers read only that.

Both routers use one representation, a list of assignments (token t, slot j) -> expert
``indices_Tk[t, j]`` with weight ``weights_Tk[t, j]``, kept where ``keep_Tk`` is True:

- top-k: k slots per token, its chosen experts; ``keep_Tk`` marks what survived capacity.
- expert choice: E slots per token, slot e is expert e; ``keep_Tk`` marks the tokens each
  expert picked (Zhou et al., 2022), so any dispatcher runs it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_lab.config import MoEConfig
from moe_lab.losses import balancing_loss, router_z_loss
from moe_lab.routing import (
    capacity_slots,
    expert_counts,
    expert_positions,
    noisy_logits,
    router_probs,
    select_node_limited,
    select_top_k,
)


@dataclass
class RoutingDecision:
    """One call's routing, and what follows from it.

    weights_Tk, indices_Tk: the assignments (weights in float32 or wider). keep_Tk: bool (T, k),
    or None when every assignment is kept. capacity: slots per expert, or None (dropless).
    logits_TE, probs_TE: the router's logits (noise included) and scores. aux_loss, z_loss:
    unweighted losses (expert choice has no balancing loss: 0). tokens_per_expert (E,): kept
    assignments per expert. dropped: 0-d int tensor, assignments dropped by capacity (0 under
    expert choice, which drops none it chose). unrouted: 0-d int tensor, tokens with no kept
    assignment (their routed output is zero).
    """

    weights_Tk: torch.Tensor
    indices_Tk: torch.Tensor
    keep_Tk: torch.Tensor | None
    capacity: int | None
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    unrouted: torch.Tensor


class Router(nn.Module):
    """Linear router with optional noisy gating and a selection bias: (T, D) -> RoutingDecision."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.num_experts, cfg.d_model
        self.weight = nn.Parameter(torch.empty(E, D))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear(D, E)
        # Shazeer et al. (2017): a second projection sets the noise scale; it starts at zero
        # (built without drawing random numbers, so it does not shift the experts' init).
        self.noise = None
        if cfg.noisy_gating:
            self.noise = nn.utils.skip_init(nn.Linear, D, E, bias=False)
            nn.init.zeros_(self.noise.weight)
        # DeepSeek-V3 balancing: shifts selection only; a buffer, not trained. Always used.
        self.register_buffer("expert_bias", torch.zeros(E))

    def extra_repr(self) -> str:
        E, D = self.weight.shape
        return (f"d_model={D}, num_experts={E}, router={self.cfg.router!r}, "
                f"top_k={self.cfg.top_k}, score={self.cfg.score!r}, noisy={self.noise is not None}")

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits (T, E); with noisy gating, Gaussian noise is added while training.

        Under ``torch.autocast`` the router still runs in its weights' precision (float32 for a
        float32 layer): rounding logits to bfloat16 before the softmax moves probabilities by
        whole percents once logits grow (chapter 6), and the router is a tiny matmul.
        """
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = x_TD.to(self.weight.dtype)
            logits_TE = F.linear(x_TD, self.weight)
            if self.noise is not None and self.training:
                logits_TE = noisy_logits(logits_TE, self.noise(x_TD))
        return logits_TE

    def forward(self, x_TD: torch.Tensor) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        if self.cfg.router == "expert_choice":
            return self._expert_choice(logits_TE)
        return self._top_k(logits_TE)

    def _top_k(self, logits_TE: torch.Tensor) -> RoutingDecision:
        cfg = self.cfg
        T, E = logits_TE.shape
        probs_TE = router_probs(logits_TE, cfg.score)
        if cfg.node_limit is None:
            weights_Tk, indices_Tk = select_top_k(
                probs_TE, cfg.top_k, normalize=cfg.normalize_weights, bias=self.expert_bias
            )
        else:
            weights_Tk, indices_Tk = select_node_limited(
                probs_TE, cfg.top_k, cfg.node_limit, normalize=cfg.normalize_weights,
                bias=self.expert_bias,
            )
        balance_TE = probs_TE
        if cfg.score == "sigmoid":  # balance over normalised affinities, as DeepSeek-V3 does
            balance_TE = probs_TE / probs_TE.sum(-1, keepdim=True)
        requested_E = expert_counts(indices_Tk, E)  # counted once: the loss and the load
        aux_loss = balancing_loss(balance_TE, indices_Tk, E, requested_E)
        keep_Tk, capacity = None, None
        if cfg.capacity_factor is not None:
            # GShard: capacity from the T tokens of this call; first choices queue first
            capacity = capacity_slots(T, E, cfg.top_k, cfg.capacity_factor)
            keep_Tk = expert_positions(indices_Tk, E) < capacity
        return _decision(weights_Tk, indices_Tk, keep_Tk, capacity, logits_TE, probs_TE,
                         aux_loss, requested=True, requested_E=requested_E)

    def _expert_choice(self, logits_TE: torch.Tensor) -> RoutingDecision:
        """Zhou et al. (2022): each expert takes its top-C tokens; balanced by construction."""
        T, E = logits_TE.shape
        capacity = min(T, capacity_slots(T, E, 1, self.cfg.capacity_factor))
        probs_TE = router_probs(logits_TE, "softmax")
        _, tokens_EC = torch.topk(probs_TE.t(), capacity, dim=-1)
        keep_TE = torch.zeros(T, E, dtype=torch.bool, device=logits_TE.device)
        keep_TE[tokens_EC, torch.arange(E, device=logits_TE.device).unsqueeze(1)] = True
        weights_TE = probs_TE * keep_TE
        indices_TE = torch.arange(E, device=logits_TE.device).expand(T, E)
        # no balancing loss: every expert takes exactly C tokens. Its unpicked slots are not
        # requests, so nothing counts as dropped; tokens no expert picked are `unrouted`.
        return _decision(weights_TE, indices_TE, keep_TE, capacity, logits_TE, probs_TE,
                         probs_TE.new_zeros(()), requested=False)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3 step: raise the bias of under-loaded experts, lower the over-loaded."""
        load_E = load_E.to(self.expert_bias.dtype)
        self.expert_bias += rate * torch.sign(load_E.mean() - load_E)


def _decision(weights_Tk, indices_Tk, keep_Tk, capacity, logits_TE, probs_TE, aux_loss, *,
              requested: bool, requested_E=None) -> RoutingDecision:
    """Fill in the statistics, as tensors (no host sync). ``requested``: every slot is an
    assignment the router asked for, so an unkept one was dropped (top-k). ``requested_E``:
    the assignments per expert already counted, which are the load when all are kept."""
    E = probs_TE.shape[1]
    zero = torch.zeros((), dtype=torch.long, device=indices_Tk.device)
    if keep_Tk is None:
        kept_Tk, dropped, unrouted = indices_Tk, zero, zero
    else:
        kept_Tk = indices_Tk.masked_fill(~keep_Tk, E)  # unkept slots counted in bin E
        dropped = (~keep_Tk).sum() if requested else zero
        unrouted = (~keep_Tk.any(1)).sum()
    if keep_Tk is None and requested_E is not None:
        tokens_per_expert = requested_E
    else:
        tokens_per_expert = expert_counts(kept_Tk, E)
    return RoutingDecision(weights_Tk, indices_Tk, keep_Tk, capacity, logits_TE, probs_TE,
                           aux_loss, router_z_loss(logits_TE), tokens_per_expert, dropped,
                           unrouted)
