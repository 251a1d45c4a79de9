"""FLOPs per token of an `Architecture`, for training and for inference.

A matmul of an (m, k) by a (k, n) matrix costs 2mkn FLOPs, so a token passing through a weight
matrix of P entries costs 2P. Per token, the forward pass costs

    2 * (active matmul weights, output head included) + attention scores,

where attention scores (QK^T and the weighted sum of V) cost 2 * ctx * n_heads * (d_qk + d_v)
per layer for `ctx` attended positions. An embedding lookup, norms, activations and softmax do
no matmul and are not counted, which is also what torch.utils.flop_counter counts. Training costs
3x the forward pass: the backward pass multiplies by each weight twice (input and weight
gradients). The familiar "6 N per token" is this with attention dropped.
"""

from __future__ import annotations

from .arch import Architecture, ffn_matmul_params


def active_matmul_weights(model: Architecture, *, include_mtp: bool = False) -> int:
    """Weights one token multiplies by: attention, dense FFNs, router, shared + top_k experts,
    and the output head (the input embedding is a lookup). Biases and norms excluded."""
    d = model.d_model
    attn = model.attention.matmul_params(d)
    n_attn = model.n_layers + model.n_cross_attn_layers
    dense = ffn_matmul_params(d, model.d_ff_dense, model.dense_is_glu)
    total = n_attn * attn + model.n_dense_layers * dense + model.vocab_size * d
    moe = 0
    if model.is_moe:
        moe = d * model.n_routed_experts  # router
        moe += model.n_shared_experts * ffn_matmul_params(d, model.shared_width, model.expert_glu)
        moe += model.top_k * ffn_matmul_params(d, model.d_ff_expert, model.expert_glu)
        total += model.n_moe_layers * moe
    if include_mtp and model.mtp_modules:
        # Each MTP module: eh_proj (2d -> d), one MoE block, and the shared output head again.
        total += model.mtp_modules * (attn + moe + 2 * d * d + model.vocab_size * d)
    return total


def _check_len(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def attention_score_flops(model: Architecture, ctx: float) -> float:
    """QK^T plus the weighted sum of V, per token, summed over layers, for `ctx` positions."""
    a = model.attention
    n_attn = model.n_layers + model.n_cross_attn_layers
    return n_attn * 2.0 * ctx * a.n_heads * (a.qk_dim + a.v_dim)


def forward_flops_per_token(
    model: Architecture, *, seq_len: int, causal: bool = True, include_mtp: bool = False
) -> float:
    """Forward FLOPs per token, averaged over a sequence of seq_len tokens.

    Causal attention skips masked positions: on average a token attends to (seq_len + 1) / 2
    of them. With causal=False every token attends to all seq_len positions (what a kernel
    that computes the full score matrix and masks it afterwards spends).
    """
    _check_len("seq_len", seq_len)
    ctx = (seq_len + 1) / 2 if causal else seq_len
    mtp_layers = model.mtp_modules if include_mtp else 0
    a = model.attention
    mtp_attn = mtp_layers * 2.0 * ctx * a.n_heads * (a.qk_dim + a.v_dim)
    return (2.0 * active_matmul_weights(model, include_mtp=include_mtp)
            + attention_score_flops(model, ctx) + mtp_attn)


def training_flops_per_token(
    model: Architecture, *, seq_len: int, causal: bool = True, include_mtp: bool = False
) -> float:
    """Forward + backward FLOPs per token: three times the forward pass."""
    return 3.0 * forward_flops_per_token(model, seq_len=seq_len, causal=causal,
                                         include_mtp=include_mtp)


def decode_flops_per_token(model: Architecture, *, context_len: int) -> float:
    """FLOPs to generate one token with a KV cache holding context_len positions."""
    _check_len("context_len", context_len)
    return 2.0 * active_matmul_weights(model) + attention_score_flops(model, context_len)


def kv_cache_bytes_per_token(model: Architecture, *, bytes_per_elem: float = 2.0) -> float:
    """Bytes of KV cache one token occupies, over all layers (MLA caches a small latent)."""
    n_attn = model.n_layers + model.n_cross_attn_layers
    return n_attn * model.attention.kv_cache_elems() * bytes_per_elem
