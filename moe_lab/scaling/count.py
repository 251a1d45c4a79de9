"""Parameter counts of an `Architecture`: total, and active per token.

Active parameters are those a single token's forward pass multiplies by: attention, norms,
routers, dense FFNs, shared experts and the top_k routed experts of every MoE layer. How the
embedding matrices count is a convention that differs between publishers, so it is an argument:
"both" counts the input embedding and the output head (Mixtral), "output" counts only the head
(DeepSeek-V3's 36.6B, gpt-oss's 5.13B: an embedding lookup does no arithmetic), "none" neither.
"""

from __future__ import annotations

from .arch import ActiveEmbeddings, Architecture, ffn_params

COMPONENTS = (
    "embedding", "output", "attention", "norms", "dense_ffn", "shared_experts",
    "routed_experts", "router", "mtp",
)


def _check_convention(active_embeddings: str) -> None:
    if active_embeddings not in ("both", "output", "none"):
        raise ValueError(
            f"active_embeddings must be 'both', 'output' or 'none', got {active_embeddings!r}"
        )


def _moe_ffn(model: Architecture) -> dict[str, tuple[int, int]]:
    """Router, shared and routed experts of one MoE block: {component: (total, active)}."""
    d, E, k = model.d_model, model.n_routed_experts, model.top_k
    expert = ffn_params(d, model.d_ff_expert, model.expert_glu, model.ffn_bias)
    shared = model.n_shared_experts * ffn_params(
        d, model.shared_width, model.expert_glu, model.ffn_bias
    )
    router = d * E + (E if model.router_bias else 0)
    return {
        "router": (router, router),
        "shared_experts": (shared, shared),
        "routed_experts": (E * expert, k * expert),
    }


def param_breakdown(
    model: Architecture, *, include_mtp: bool = False, active_embeddings: ActiveEmbeddings = "both"
) -> dict[str, tuple[int, int]]:
    """{component: (total, active)} for every entry of COMPONENTS (zeros where absent)."""
    if not isinstance(model, Architecture):
        raise TypeError(f"model must be an Architecture, got {type(model).__name__}")
    _check_convention(active_embeddings)
    d, V = model.d_model, model.vocab_size
    out = {name: (0, 0) for name in COMPONENTS}

    def add(name: str, total: int, active: int) -> None:
        t, a = out[name]
        out[name] = (t + total, a + active)

    emb = V * d
    if model.tied_embeddings:  # one matrix, used as the output head too
        add("embedding", emb, 0 if active_embeddings == "none" else emb)
    else:
        add("embedding", emb, emb if active_embeddings == "both" else 0)
        add("output", emb, 0 if active_embeddings == "none" else emb)

    attn = model.attention.params(d)
    n_attn = model.n_layers + model.n_cross_attn_layers
    add("attention", n_attn * attn, n_attn * attn)
    norms = 2 * d * model.n_layers + d * model.n_cross_attn_layers + d  # + final norm
    add("norms", norms, norms)

    dense = ffn_params(d, model.d_ff_dense, model.dense_is_glu, model.ffn_bias)
    add("dense_ffn", model.n_dense_layers * dense, model.n_dense_layers * dense)
    if model.is_moe:
        for name, (t, a) in _moe_ffn(model).items():
            add(name, model.n_moe_layers * t, model.n_moe_layers * a)

    if include_mtp and model.mtp_modules:
        # DeepSeek-V3 MTP module: enorm + hnorm, eh_proj (2d -> d), one MoE block, and the
        # norm before the (shared) output head. Embedding and head are shared, not counted.
        ffn = _moe_ffn(model)
        block_t = attn + 2 * d + sum(t for t, _ in ffn.values())
        block_a = attn + 2 * d + sum(a for _, a in ffn.values())
        own = 3 * d + 2 * d * d
        add("mtp", model.mtp_modules * (block_t + own), model.mtp_modules * (block_a + own))
    return out


def count_params(
    model: Architecture, *, include_mtp: bool = False, active_embeddings: ActiveEmbeddings = "both"
) -> tuple[int, int]:
    """(total, active) parameter counts of `model`; see the module docstring for conventions."""
    parts = param_breakdown(model, include_mtp=include_mtp, active_embeddings=active_embeddings)
    return sum(t for t, _ in parts.values()), sum(a for _, a in parts.values())
