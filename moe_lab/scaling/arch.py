"""Architecture descriptions of MoE language models and their parameter counts.

A model is a stack of `n_layers` blocks (attention + FFN). The FFN of a block is either a
dense FFN or an MoE layer (router + routed experts + optional shared experts). Counting is
exact for the weights listed here; norms are counted as one scale vector of size d_model
(RMSNorm), which is what the catalogued models use or close enough to not matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe_lab.config import check_int

ActiveEmbeddings = Literal["both", "output", "none"]


def _check_int(owner: str, name: str, value, *, minimum: int = 1) -> None:
    """Raise TypeError/ValueError naming `owner.name` unless value is an int >= minimum."""
    check_int(f"{owner}.{name}", value, minimum)


def _check_bools(obj, *names: str, none_ok: tuple[str, ...] = ()) -> None:
    """Raise TypeError naming the field unless each of `names` holds a bool (or allowed None)."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, bool) and not (v is None and name in none_ok):
            raise TypeError(f"{type(obj).__name__}.{name} must be a bool"
                            f"{' or None' if name in none_ok else ''}, got {v!r}")


@dataclass(frozen=True, kw_only=True)
class GQA:
    """Multi-head (n_kv_heads == n_heads), grouped-query or multi-query attention."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    bias: bool = False  # biases on q, k, v, o projections (gpt-oss)
    qk_norm: bool = False  # RMSNorm over each head's q and k (Qwen3)
    sinks: bool = False  # one learned attention-sink logit per head (gpt-oss)

    def __post_init__(self):
        for name in ("n_heads", "n_kv_heads", "head_dim"):
            _check_int("GQA", name, getattr(self, name))
        _check_bools(self, "bias", "qk_norm", "sinks")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"GQA.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})"
            )

    @property
    def qk_dim(self) -> int:
        return self.head_dim

    @property
    def v_dim(self) -> int:
        return self.head_dim

    def matmul_params(self, d_model: int) -> int:
        """Weights of the q, k, v, o projections (what the matmuls multiply by)."""
        q_o = 2 * d_model * self.n_heads * self.head_dim
        kv = 2 * d_model * self.n_kv_heads * self.head_dim
        return q_o + kv

    def params(self, d_model: int) -> int:
        extra = 0
        if self.bias:
            extra += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim + d_model
        if self.qk_norm:
            extra += 2 * self.head_dim
        if self.sinks:
            extra += self.n_heads
        return self.matmul_params(d_model) + extra

    def kv_cache_elems(self) -> int:
        """Elements cached per token per layer for decoding: K and V of every KV head."""
        return 2 * self.n_kv_heads * self.head_dim


def MHA(*, n_heads: int, head_dim: int, **kw) -> GQA:
    """Classic multi-head attention: one K/V head per query head."""
    return GQA(n_heads=n_heads, n_kv_heads=n_heads, head_dim=head_dim, **kw)


@dataclass(frozen=True, kw_only=True)
class MLA:
    """DeepSeek's multi-head latent attention (DeepSeek-V2/V3, Kimi K2).

    Queries go through a low-rank bottleneck of `q_lora_rank` (None: a plain projection);
    keys and values are rebuilt from a shared latent of `kv_lora_rank`, plus one decoupled
    RoPE key of `qk_rope_head_dim` shared by all heads. Each low-rank latent has an RMSNorm.
    """

    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self):
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim"):
            _check_int("MLA", name, getattr(self, name))
        if self.q_lora_rank is not None:
            _check_int("MLA", "q_lora_rank", self.q_lora_rank)

    @property
    def qk_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def v_dim(self) -> int:
        return self.v_head_dim

    def matmul_params(self, d_model: int) -> int:
        h = self.n_heads
        if self.q_lora_rank is None:
            q = d_model * h * self.qk_dim
        else:
            q = d_model * self.q_lora_rank + self.q_lora_rank * h * self.qk_dim
        kv_a = d_model * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        o = h * self.v_head_dim * d_model
        return q + kv_a + kv_b + o

    def params(self, d_model: int) -> int:
        norms = self.kv_lora_rank + (self.q_lora_rank or 0)
        return self.matmul_params(d_model) + norms

    def kv_cache_elems(self) -> int:
        """Elements cached per token per layer: the KV latent plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


Attention = GQA | MLA


def ffn_matmul_params(d_model: int, d_ff: int, glu: bool) -> int:
    """Weights of one FFN: gate, up and down for a GLU (SwiGLU/GEGLU), up and down otherwise."""
    return (3 if glu else 2) * d_model * d_ff


def ffn_params(d_model: int, d_ff: int, glu: bool, bias: bool) -> int:
    bias_n = ((2 if glu else 1) * d_ff + d_model) if bias else 0
    return ffn_matmul_params(d_model, d_ff, glu) + bias_n


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """A decoder (or encoder-decoder) Transformer whose FFNs may be MoE layers.

    Layer order: `first_dense_layers` dense blocks, then the rest, where block j of the rest
    is an MoE block when (j + 1) % moe_every == 0 (moe_every=2: dense, MoE, dense, MoE, ...
    as in GLaM and Llama 4 Maverick). A model with n_routed_experts == 0 is dense.
    """

    name: str = ""
    n_layers: int
    d_model: int
    vocab_size: int
    attention: Attention
    n_routed_experts: int = 0
    top_k: int = 0
    d_ff_expert: int = 0
    n_shared_experts: int = 0
    d_ff_shared: int | None = None  # width of each shared expert; None: d_ff_expert
    first_dense_layers: int = 0
    moe_every: int = 1
    d_ff_dense: int = 0  # width of the dense FFN blocks (if any)
    expert_glu: bool = True  # experts are GLU FFNs (3 matrices) rather than 2-matrix FFNs
    dense_glu: bool | None = None  # None: same as expert_glu
    ffn_bias: bool = False
    router_bias: bool = False
    tied_embeddings: bool = False
    n_cross_attn_layers: int = 0  # encoder-decoder: decoder blocks with cross-attention
    mtp_modules: int = 0  # DeepSeek-V3 multi-token-prediction modules (one MoE block each)

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Architecture.name must be a str, got {type(self.name).__name__}")
        for name in ("n_layers", "d_model", "vocab_size", "moe_every"):
            _check_int("Architecture", name, getattr(self, name))
        _check_bools(self, "expert_glu", "dense_glu", "ffn_bias", "router_bias",
                     "tied_embeddings", none_ok=("dense_glu",))
        for name in ("n_routed_experts", "top_k", "d_ff_expert", "n_shared_experts",
                     "first_dense_layers", "d_ff_dense", "n_cross_attn_layers", "mtp_modules"):
            _check_int("Architecture", name, getattr(self, name), minimum=0)
        if not isinstance(self.attention, GQA | MLA):
            raise TypeError(
                f"Architecture.attention must be GQA or MLA, got {type(self.attention).__name__}"
            )
        if self.first_dense_layers > self.n_layers:
            raise ValueError(
                f"Architecture.first_dense_layers ({self.first_dense_layers}) exceeds "
                f"n_layers ({self.n_layers})"
            )
        if self.n_cross_attn_layers > self.n_layers:
            raise ValueError("Architecture.n_cross_attn_layers exceeds n_layers")
        if self.n_routed_experts:
            if not 1 <= self.top_k <= self.n_routed_experts:
                raise ValueError(
                    f"Architecture.top_k must be in [1, n_routed_experts={self.n_routed_experts}]"
                    f", got {self.top_k}"
                )
            if self.d_ff_expert < 1:
                raise ValueError("Architecture.d_ff_expert must be >= 1 for an MoE model")
            if self.n_moe_layers == 0:
                raise ValueError("Architecture has experts but no MoE layer (check moe_every)")
        elif self.top_k or self.n_shared_experts or self.mtp_modules:
            raise ValueError(
                "Architecture.n_routed_experts is 0 (dense model): top_k, n_shared_experts "
                "and mtp_modules must be 0"
            )
        if self.d_ff_shared is not None:
            _check_int("Architecture", "d_ff_shared", self.d_ff_shared)
        if self.n_dense_layers and self.d_ff_dense < 1:
            raise ValueError("Architecture.d_ff_dense must be >= 1: the model has dense layers")

    def layer_kinds(self) -> tuple[str, ...]:
        """'dense' or 'moe' for every block, in order."""
        kinds = ["dense"] * self.first_dense_layers
        for j in range(self.n_layers - self.first_dense_layers):
            moe = self.n_routed_experts > 0 and (j + 1) % self.moe_every == 0
            kinds.append("moe" if moe else "dense")
        return tuple(kinds)

    @property
    def n_moe_layers(self) -> int:
        return self.layer_kinds().count("moe")

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def shared_width(self) -> int:
        return self.d_ff_expert if self.d_ff_shared is None else self.d_ff_shared

    @property
    def dense_is_glu(self) -> bool:
        return self.expert_glu if self.dense_glu is None else self.dense_glu
