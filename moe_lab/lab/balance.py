"""Training under load balancing (chapter 6): one small MoE, one synthetic task, three ways.

The task is a mixture of regressions: each input comes from one of ``num_clusters`` Gaussian
clusters and its target is that cluster's own random nonlinear map of the input, so an MoE that
gives clusters their own experts fits it well. The same seed trains the same layer with no
balancing, with the Switch auxiliary loss, or with DeepSeek-V3's bias balancing, and records
every expert's share of the assignments at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab.config import MoEConfig, check_choice, check_positive_int
from moe_lab.layer import MoE

MODES = ("none", "aux", "bias")


@dataclass(kw_only=True)
class ClusterTask:
    """Inputs from Gaussian clusters (plus ``shift`` times a shared direction); targets
    tanh(x @ A_c) with a random map A_c per cluster."""

    d_model: int = 32
    num_clusters: int = 8
    spread: float = 0.5
    shift: float = 0.0
    seed: int = 0

    def __post_init__(self):
        check_positive_int("d_model", self.d_model)
        check_positive_int("num_clusters", self.num_clusters)
        g = torch.Generator().manual_seed(self.seed)
        D, K = self.d_model, self.num_clusters
        self.centers_KD = torch.randn(K, D, generator=g)
        self.maps_KDD = torch.randn(K, D, D, generator=g) / D**0.5
        # one direction shared by every input, like the large common component of real hidden
        # states: it adds an expert-specific amount to each expert's logit, the same for every
        # token (a token-independent offset per expert)
        self.shared_D = torch.randn(D, generator=g)

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n examples: (x (n, D), target (n, D), cluster (n,))."""
        c_n = torch.randint(0, self.num_clusters, (n,), generator=g)
        x_nD = self.centers_KD[c_n] + self.spread * torch.randn(n, self.d_model, generator=g)
        x_nD = x_nD + self.shift * self.shared_D
        y_nD = torch.tanh(torch.einsum("nd,nde->ne", x_nD, self.maps_KDD[c_n]))
        return x_nD, y_nD, c_n


@dataclass
class BalanceRun:
    """One training run: per-step expert load shares (steps, E), task loss and aux loss (steps,)."""

    mode: str
    load: torch.Tensor
    loss: torch.Tensor
    aux: torch.Tensor
    bias: torch.Tensor


def train_balancing(
    mode: str,
    *,
    steps: int = 300,
    batch: int = 256,
    num_experts: int = 8,
    top_k: int = 2,
    d_ff: int = 64,
    lr: float = 3e-3,
    aux_coef: float = 0.01,
    bias_rate: float = 1e-3,
    task: ClusterTask | None = None,
    seed: int = 0,
) -> BalanceRun:
    """Train an MoE on ``task`` with balancing ``mode`` ("none", "aux" or "bias")."""
    check_choice("mode", mode, MODES)
    check_positive_int("steps", steps)
    check_positive_int("batch", batch)
    task = ClusterTask() if task is None else task
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=task.d_model,
        d_ff=d_ff,
        num_experts=num_experts,
        top_k=top_k,
        bias_update_rate=bias_rate if mode == "bias" else 0.0,
    )
    moe = MoE(cfg)
    opt = torch.optim.Adam(moe.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    load, losses, auxes = [], [], []
    for _ in range(steps):
        x_nD, y_nD, _ = task.sample(batch, g)
        out = moe(x_nD)
        task_loss = torch.mean((out.y - y_nD) ** 2)
        loss = task_loss + (aux_coef * out.aux_loss if mode == "aux" else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mode == "bias":
            moe.update_bias(out.tokens_per_expert)
        load.append(out.tokens_per_expert.float() / (batch * top_k))
        losses.append(task_loss.detach())
        auxes.append(out.aux_loss.detach())
    return BalanceRun(
        mode=mode,
        load=torch.stack(load),
        loss=torch.stack(losses),
        aux=torch.stack(auxes),
        bias=moe.expert_bias.clone(),
    )
