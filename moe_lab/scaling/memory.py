"""Memory per GPU of a `ClusterPlan`, and the all-to-all share of an MoE layer's time.

Model state per GPU (rajbhandari2020zero): weights x param_bytes, gradients x grad_bytes and
optimizer state x optimizer_bytes, each divided by the data-parallel degree when ZeRO shards it
(stage 1: optimizer, 2: + gradients, 3: + weights). Dense weights are split by TP and
replicated over DP; routed experts are split by EP and replicated over EDP = TP x DP / EP.

Activations: an estimate of what each layer saves for its backward pass, counted tensor by
tensor for a flash-attention layer (no seq_len^2 score matrix is stored) with sequence
parallelism dividing them by TP (korthikanti2023reducing). Per token and layer, in elements:
attention 2d (block input, normed input) + q, k, v, output (+ MLA's latents) + 2 per head for
the softmax statistics; dense FFN 2d + 3f (gate, up, product; 2f for a 2-matrix FFN); MoE
2d + 2E (FP32 router probabilities) + top_k x (d in + 3f + d out) + 3f per shared expert.
With recompute="full" a layer keeps only its input (d) and one layer's worth is rebuilt at a
time. Under the 1F1B schedule stage s holds pp - s micro-batches in flight (narayanan2021megatron);
the last stage also holds the FP32 logits of one micro-batch. Buffers of the communication
libraries, the CUDA context and allocator fragmentation are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .arch import MLA, Architecture, ffn_matmul_params, ffn_params
from .comm import moe_layer_comm_time
from .count import _moe_ffn
from .flops import attention_score_flops
from .plan import ClusterPlan

GiB = 2.0**30


def activation_elems_per_token(model: Architecture, kind: str) -> float:
    """Elements a 'dense' or 'moe' block saves for backward, per token (no recompute)."""
    d, a = model.d_model, model.attention
    attn = 2 * d + 2 * a.n_heads  # block input, normed input, softmax statistics (FP32)
    if isinstance(a, MLA):
        q_lat = 2 * a.q_lora_rank if a.q_lora_rank else 0  # latent and its norm
        kv_lat = 2 * a.kv_lora_rank + a.qk_rope_head_dim
        attn += q_lat + kv_lat + a.n_heads * (2 * a.qk_dim + 2 * a.v_dim)  # q, k, v, out
    else:
        attn += (2 * a.n_heads + 2 * a.n_kv_heads) * a.head_dim  # q, out, k, v
    if kind == "dense":
        f = model.d_ff_dense
        return attn + 2 * d + (3 if model.dense_is_glu else 2) * f
    inner = 3 if model.expert_glu else 2
    moe = 2 * d + 2 * model.n_routed_experts
    moe += model.top_k * (2 * d + inner * model.d_ff_expert)
    moe += model.n_shared_experts * inner * model.shared_width
    return attn + moe


def _layer_params(model: Architecture, kind: str) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of one block."""
    d = model.d_model
    base = model.attention.params(d) + 2 * d
    if kind == "dense":
        return base + ffn_params(d, model.d_ff_dense, model.dense_is_glu, model.ffn_bias), 0
    ffn = _moe_ffn(model)
    return base + ffn["router"][0] + ffn["shared_experts"][0], ffn["routed_experts"][0]


@dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU on one pipeline stage."""

    stage: int
    layers: range
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def rows(self) -> list[tuple[str, float]]:
        """(name, GiB) rows for a table."""
        return [("weights", self.weights / GiB), ("gradients", self.grads / GiB),
                ("optimizer state", self.optimizer / GiB),
                ("activations", self.activations / GiB), ("total", self.total / GiB)]


def _sharded(dense: float, expert: float, plan: ClusterPlan, zero: bool) -> float:
    """Parameters held per GPU: ZeRO shards dense ones over DP and experts over EDP."""
    return dense / plan.dp_size + expert / plan.edp if zero else dense + expert


def stage_memory(plan: ClusterPlan) -> list[StageMemory]:
    """Memory per GPU of every pipeline stage."""
    m, p, z = plan.model, plan.precision, plan.zero_stage
    kinds = m.layer_kinds()
    tok = plan.micro_tokens / plan.tp  # tokens per GPU with sequence parallelism
    per_layer = {k: activation_elems_per_token(m, k) for k in ("dense", "moe")}
    out = []
    for s, layers in enumerate(plan.stages()):
        dense = expert = 0.0
        for i in layers:
            ne, ex = _layer_params(m, kinds[i])
            dense, expert = dense + ne, expert + ex
        emb = m.vocab_size * m.d_model
        last = s == plan.pp - 1
        if s == 0:
            dense += emb
        if last:
            dense += m.d_model + (emb if (not m.tied_embeddings or plan.pp > 1) else 0)
            if plan.include_mtp and m.mtp_modules:  # MTP blocks sit after the last layer
                ne, ex = _layer_params(m, "moe")
                dense += m.mtp_modules * (ne + 3 * m.d_model + 2 * m.d_model**2)
                expert += m.mtp_modules * ex
        dense_g, expert_g = dense / plan.tp, expert / plan.ep
        # ZeRO stage >= 3 shards weights, >= 2 gradients, >= 1 optimizer state.
        w = p.param_bytes * _sharded(dense_g, expert_g, plan, z >= 3)
        g = p.grad_bytes * _sharded(dense_g, expert_g, plan, z >= 2)
        o = p.optimizer_bytes * _sharded(dense_g, expert_g, plan, z >= 1)
        mtp = last and plan.include_mtp and m.mtp_modules
        if plan.recompute == "full":
            # Each in-flight micro-batch keeps every layer's input; the backward pass rebuilds
            # one layer of one micro-batch at a time.
            elems = m.d_model * (len(layers) + (2 * m.mtp_modules if mtp else 0))
            rebuilt = max(per_layer[kinds[i]] for i in layers)
        else:
            elems = sum(per_layer[kinds[i]] for i in layers)
            elems += m.mtp_modules * (per_layer["moe"] + 2 * m.d_model) if mtp else 0
            rebuilt = 0.0
        acts = p.act_bytes * tok * (elems * (plan.pp - s) + rebuilt)
        if last:
            acts += 4.0 * m.vocab_size * tok  # FP32 logits of one micro-batch
        out.append(StageMemory(s, layers, w, g, o, acts))
    return out


def memory_per_gpu(plan: ClusterPlan) -> StageMemory:
    """The most loaded stage: the one that decides whether the plan fits."""
    return max(stage_memory(plan), key=lambda st: st.total)


def fits(plan: ClusterPlan) -> bool:
    return memory_per_gpu(plan).total <= plan.gpu.memory_gib * GiB


def moe_layer_times(plan: ClusterPlan) -> tuple[float, float]:
    """(all-to-all seconds, compute seconds) of one MoE layer, one micro-batch, fwd + bwd,
    on one GPU; compute at `compute_efficiency` of the GPU's peak in `compute_dtype`."""
    m = plan.model
    if not m.is_moe:
        return 0.0, 0.0
    tok = plan.micro_tokens // plan.tp
    comm = 0.0
    if plan.ep > 1:
        net = plan.net
        if plan.ep_gpus_per_node != net.gpus_per_node:
            net = replace(net, gpus_per_node=plan.ep_gpus_per_node)
        comm = moe_layer_comm_time(tokens=tok, d_model=m.d_model, top_k=m.top_k,
                                   n_experts=m.n_routed_experts, ep=plan.ep, net=net,
                                   max_nodes=plan.max_nodes)
    d = m.d_model
    weights = (m.attention.matmul_params(d) + d * m.n_routed_experts
               + m.n_shared_experts * ffn_matmul_params(d, m.shared_width, m.expert_glu)
               + m.top_k * ffn_matmul_params(d, m.d_ff_expert, m.expert_glu))
    per_token = 6.0 * weights + 3.0 * attention_score_flops(m, (plan.seq_len + 1) / 2) / (
        m.n_layers + m.n_cross_attn_layers)
    peak = plan.gpu.peak(plan.compute_dtype)
    compute = tok * per_token / (peak * plan.compute_efficiency)
    return comm, compute
