"""A small decoder-only Transformer whose FFN is dense or a Mixture of Experts.

Pre-norm blocks (RMSNorm), causal self-attention, learned positions, tied embeddings. With
``cfg.moe`` set, every block's FFN is ``moe_lab.layer.MoE``; the training loss then adds each
layer's auxiliary and z-loss times the coefficients in ``cfg.moe``, and the forward pass returns
every layer's routing decision for analysis.

Decoding: ``new_cache`` and ``forward_cached`` run the same blocks on new positions only,
keeping every layer's keys and values in a ``KVCache``; their logits equal ``forward``'s on
the whole prefix (dropless routing: a token's experts do not depend on the others in a call).
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


@dataclass
class KVCache:
    """Keys and values of every layer for the first ``length`` positions of each sequence.

    k, v: (n_layers, B, n_heads, block_size, head_dim), filled up to ``length``. Made by
    ``TinyLM.new_cache`` and advanced by ``TinyLM.forward_cached``.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        """Positions the cache can hold: the model's block_size."""
        return self.k.shape[3]


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

    def forward_cached(
        self, x_BLD: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Attention of L new positions start..start+L-1 over everything cached before them.

        Writes the new keys and values into k_BHSd/v_BHSd (this layer's cache, in place)."""
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).split(D, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B,H,L,d)
        end = start + L
        k_BHSd[:, :, start:end] = k
        v_BHSd[:, :, start:end] = v
        keys, values = k_BHSd[:, :, :end], v_BHSd[:, :, :end]  # (B, H, end, d)
        if start == 0:  # a prompt: the same causal attention as forward()
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:  # new position i sees cached positions 0..start+i
            mask_LS = torch.arange(end, device=x_BLD.device) <= torch.arange(
                start, end, device=x_BLD.device
            ).unsqueeze(1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_LS)
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

    def forward_cached(self, x_BLD: torch.Tensor, k_BHSd, v_BHSd, start: int):
        """``forward`` for new positions only, attending over the cache (see Attention)."""
        x_BLD = x_BLD + self.attn.forward_cached(self.norm1(x_BLD), k_BHSd, v_BHSd, start)
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

    def new_cache(
        self, batch_size: int, *, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to block_size positions
        (dtype and device default to the model's)."""
        check_positive_int("batch_size", batch_size)
        ref = self.tok_emb.weight
        cfg = self.cfg
        shape = (cfg.n_layers, batch_size, cfg.n_heads, cfg.block_size, cfg.d_model // cfg.n_heads)
        dtype, device = dtype or ref.dtype, device or ref.device
        return KVCache(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
        )

    def forward_cached(self, idx_BL: torch.Tensor, cache: KVCache) -> ModelOutput:
        """Logits (B, L, V) of L new tokens that follow the ``cache.length`` cached ones.

        Equal to ``forward(prefix + idx)``'s last L positions (round-off aside) for a dense
        model or a dropless MoE; with a capacity factor the routing sees only this call's
        tokens, as it would in a server. Appends the new keys and values to ``cache`` and
        advances ``cache.length``. ``routing`` holds each MoE layer's decision for the B*L new
        tokens; no loss is computed.
        """
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        if not isinstance(idx_BL, torch.Tensor) or idx_BL.dtype != torch.long or idx_BL.dim() != 2:
            raise TypeError("idx must be an int64 tensor of shape (batch, length)")
        B, L = idx_BL.shape
        if B != cache.batch_size:
            raise ValueError(f"idx has batch size {B}, the cache was made for {cache.batch_size}")
        start = cache.length
        if L < 1 or start + L > self.cfg.block_size:
            raise ValueError(
                f"{start} cached + {L} new positions must be between 1 and block_size="
                f"{self.cfg.block_size}"
            )
        pos_L = torch.arange(start, start + L, device=idx_BL.device)
        x_BLD = self.tok_emb(idx_BL) + self.pos_emb(pos_L)
        routing = []
        for i, block in enumerate(self.blocks):
            x_BLD, moe_out = block.forward_cached(x_BLD, cache.k[i], cache.v[i], start)
            if moe_out is not None:
                routing.append(
                    LayerRouting(
                        moe_out.indices, moe_out.weights, moe_out.tokens_per_expert, moe_out.dropped
                    )
                )
        cache.length = start + L
        logits_BLV = self.norm(x_BLD) @ self.tok_emb.weight.t()  # tied embeddings
        return ModelOutput(logits=logits_BLV, routing=routing)


def count_params(model: TinyLM) -> tuple[int, int]:
    """(total, active per token): active counts only top_k of each layer's E experts."""
    total = sum(p.numel() for p in model.parameters())
    moe = model.cfg.moe
    if moe is None:
        return total, total
    expert = sum(p.numel() for b in model.blocks for p in b.ffn.experts.parameters())
    return total, total - expert + expert * moe.top_k // moe.num_experts
