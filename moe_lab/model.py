"""A small decoder-only Transformer whose FFN is dense or a Mixture of Experts.

Pre-norm blocks (RMSNorm), causal self-attention, learned positions, tied embeddings. With
``cfg.moe`` set, every block's FFN is ``moe_lab.layer.MoE``; the training loss then adds each
layer's auxiliary and z-loss times the coefficients in ``cfg.moe``, and the forward pass returns
every layer's routing decision for analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_lab.config import MoEConfig, check_positive_int
from moe_lab.experts import FFN
from moe_lab.layer import MoE


@dataclass(kw_only=True)
class ModelConfig:
    """Sizes of the model. ``moe=None`` gives dense FFNs of hidden size ``d_ff``."""

    vocab_size: int = 256
    block_size: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    activation: str = "swiglu"
    moe: MoEConfig | None = None

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "d_ff"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise TypeError(f"moe must be a MoEConfig or None, got {type(self.moe).__name__}")
            if self.moe.d_model != self.d_model:
                raise ValueError(
                    f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}"
                )


@dataclass
class LayerRouting:
    """One MoE layer's routing for one forward pass: indices/weights (T, k), load (E,)."""

    indices: torch.Tensor
    weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped: int


@dataclass
class ModelOutput:
    """logits (B, L, V); ce: next-byte cross-entropy; loss: ce + weighted router losses.

    aux_loss/z_loss are the unweighted sums over MoE layers (zero for a dense model).
    """

    logits: torch.Tensor
    ce: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: list[LayerRouting] = field(default_factory=list)


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).split(D, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B,H,L,d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, d)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)) with a dense FFN or an MoE layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.ffn = (
            MoE(cfg.moe) if cfg.moe is not None else FFN(cfg.d_model, cfg.d_ff, cfg.activation)
        )

    def forward(self, x_BLD: torch.Tensor):
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD))
        h_BLD = self.norm2(x_BLD)
        if isinstance(self.ffn, MoE):
            out = self.ffn(h_BLD)
            return x_BLD + out.y, out
        return x_BLD + self.ffn(h_BLD), None


class TinyLM(nn.Module):
    """Byte-level decoder-only language model; see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        for emb in (self.tok_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=cfg.d_model**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=(2 * cfg.n_layers * cfg.d_model) ** -0.5)

    def forward(self, idx_BL: torch.Tensor, targets_BL: torch.Tensor | None = None) -> ModelOutput:
        if not isinstance(idx_BL, torch.Tensor) or idx_BL.dtype != torch.long or idx_BL.dim() != 2:
            raise TypeError("idx must be an int64 tensor of shape (batch, length)")
        B, L = idx_BL.shape
        if not 1 <= L <= self.cfg.block_size:
            raise ValueError(f"sequence length must be in [1, {self.cfg.block_size}], got {L}")
        pos_L = torch.arange(L, device=idx_BL.device)
        x_BLD = self.tok_emb(idx_BL) + self.pos_emb(pos_L)
        routing, aux, z = [], x_BLD.new_zeros(()), x_BLD.new_zeros(())
        for block in self.blocks:
            x_BLD, moe_out = block(x_BLD)
            if moe_out is not None:
                aux, z = aux + moe_out.aux_loss, z + moe_out.z_loss
                routing.append(
                    LayerRouting(
                        moe_out.indices, moe_out.weights, moe_out.tokens_per_expert, moe_out.dropped
                    )
                )
        logits_BLV = self.norm(x_BLD) @ self.tok_emb.weight.t()  # tied embeddings
        out = ModelOutput(logits=logits_BLV, aux_loss=aux, z_loss=z, routing=routing)
        if targets_BL is not None:
            out.ce = F.cross_entropy(logits_BLV.reshape(B * L, -1), targets_BL.reshape(-1))
            out.loss = out.ce
            if self.cfg.moe is not None:
                out.loss = out.ce + self.cfg.moe.aux_loss_coef * aux + self.cfg.moe.z_loss_coef * z
        return out


def count_params(model: TinyLM) -> tuple[int, int]:
    """(total, active per token): active counts only top_k of each layer's E experts."""
    total = sum(p.numel() for p in model.parameters())
    moe = model.cfg.moe
    if moe is None:
        return total, total
    expert = sum(p.numel() for b in model.blocks for p in b.ffn.experts.parameters())
    return total, total - expert + expert * moe.top_k // moe.num_experts
