"""Tests of moe_lab.scaling: published counts, counts and FLOPs against real torch modules,
memory arithmetic, plan validation, the all-to-all model and the straggler simulator."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moe_lab.scaling import (
    CATALOG,
    CLAIMS,
    GPUS,
    GQA,
    INTERCONNECTS,
    MHA,
    MLA,
    PRECISIONS,
    Architecture,
    ClusterPlan,
    cluster_flops,
    count_params,
    dispatch_traffic,
    expert_popularity,
    forward_flops_per_token,
    gpu_hours,
    gpus_needed,
    implied_mfu,
    laws,
    memory_per_gpu,
    moe_layer_comm_time,
    moe_layer_times,
    param_breakdown,
    simulate_step,
    stage_memory,
    training_flops,
    training_flops_per_token,
)
from moe_lab.scaling.comm import (
    DEEPEP_LOW_LATENCY_US,
    H800_ALLTOALL_LATENCY_US,
    deepep_fit,
    deepep_low_latency_bytes,
    expected_distinct_groups,
    fit_latency_bandwidth,
)
from moe_lab.scaling.imbalance import route_counts
from moe_lab.scaling.search import feasible_plans

BIB = Path(__file__).resolve().parents[1] / "book" / "references.bib"


# ---------------------------------------------------------------- published counts

@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{c.model}-{c.cite[0]}" for c in CLAIMS])
def test_catalog_reproduces_published_counts(claim):
    total, active = claim.reproduce()
    if claim.total is not None:
        assert claim.agrees(total, claim.total, use_rounding=True), (total, claim.total)
    if claim.active is not None:
        assert claim.agrees(active, claim.active, use_rounding=False), (active, claim.active)


def test_every_claim_cites_the_bibliography_and_every_model_is_claimed():
    keys = set(re.findall(r"@\w+\{([^,\s]+),", BIB.read_text()))
    for claim in CLAIMS:
        assert set(claim.cite) <= keys, claim.cite
    assert {c.model for c in CLAIMS} == set(CATALOG)


def test_rounded_claim_is_what_makes_glam_pass():
    """GLaM's 1.2T is two significant figures; the architecture gives 1.16T, not within 2%."""
    glam = next(c for c in CLAIMS if c.model.startswith("GLaM"))
    total, _ = glam.reproduce()
    assert round(total / 1e11) == 12
    assert not glam.agrees(total, glam.total, use_rounding=False)


def test_deepseek_v3_mtp_accounts_for_685b():
    m = CATALOG["DeepSeek-V3"]
    main, _ = count_params(m)
    with_mtp, _ = count_params(m, include_mtp=True)
    mtp = param_breakdown(m, include_mtp=True)["mtp"][0]
    assert with_mtp - main == mtp
    stored = with_mtp + 2 * m.vocab_size * m.d_model
    assert abs(stored - 685e9) / 685e9 < 0.005


# ---------------------------------------------------------------- a real torch model

class TinyAttention(nn.Module):
    """Full (non-causal) attention built from the Architecture's attention description."""

    def __init__(self, a, d: int):
        super().__init__()
        self.a = a
        if isinstance(a, MLA):
            if a.q_lora_rank:
                self.q_a = nn.Linear(d, a.q_lora_rank, bias=False)
                self.q_norm = nn.RMSNorm(a.q_lora_rank)
                self.q_b = nn.Linear(a.q_lora_rank, a.n_heads * a.qk_dim, bias=False)
            else:
                self.q = nn.Linear(d, a.n_heads * a.qk_dim, bias=False)
            self.kv_a = nn.Linear(d, a.kv_lora_rank + a.qk_rope_head_dim, bias=False)
            self.kv_norm = nn.RMSNorm(a.kv_lora_rank)
            self.kv_b = nn.Linear(a.kv_lora_rank,
                                  a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
            self.o = nn.Linear(a.n_heads * a.v_head_dim, d, bias=False)
        else:
            hd = a.head_dim
            self.q = nn.Linear(d, a.n_heads * hd, bias=a.bias)
            self.k = nn.Linear(d, a.n_kv_heads * hd, bias=a.bias)
            self.v = nn.Linear(d, a.n_kv_heads * hd, bias=a.bias)
            self.o = nn.Linear(a.n_heads * hd, d, bias=a.bias)
            if a.qk_norm:
                self.q_norm, self.k_norm = nn.RMSNorm(hd), nn.RMSNorm(hd)
            if a.sinks:
                self.sinks = nn.Parameter(torch.zeros(a.n_heads))

    def forward(self, x_TD, mem_SD=None):
        a, h = self.a, self.a.n_heads
        mem_SD = x_TD if mem_SD is None else mem_SD
        T, S = x_TD.shape[0], mem_SD.shape[0]
        if isinstance(a, MLA):
            q = self.q_b(self.q_norm(self.q_a(x_TD))) if a.q_lora_rank else self.q(x_TD)
            q_HTQ = q.view(T, h, a.qk_dim).transpose(0, 1)
            lat_SL, rope_SR = self.kv_a(mem_SD).split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
            kv = self.kv_b(self.kv_norm(lat_SL)).view(S, h, a.qk_nope_head_dim + a.v_head_dim)
            k_nope, v_SHV = kv.split([a.qk_nope_head_dim, a.v_head_dim], -1)
            k_SHQ = torch.cat([k_nope, rope_SR[:, None, :].expand(S, h, -1)], -1)
            k_HSQ, v_HSV = k_SHQ.transpose(0, 1), v_SHV.transpose(0, 1)
        else:
            hd, rep = a.head_dim, a.n_heads // a.n_kv_heads
            q_HTQ = self.q(x_TD).view(T, h, hd).transpose(0, 1)
            k_HSQ = self.k(mem_SD).view(S, a.n_kv_heads, hd).transpose(0, 1)
            v_HSV = self.v(mem_SD).view(S, a.n_kv_heads, hd).transpose(0, 1)
            if a.qk_norm:
                q_HTQ, k_HSQ = self.q_norm(q_HTQ), self.k_norm(k_HSQ)
            k_HSQ, v_HSV = k_HSQ.repeat_interleave(rep, 0), v_HSV.repeat_interleave(rep, 0)
        scores_HTS = q_HTQ @ k_HSQ.transpose(1, 2) / math.sqrt(q_HTQ.shape[-1])
        if getattr(a, "sinks", False):
            sink = self.sinks[:, None, None].expand(h, T, 1)
            probs = torch.softmax(torch.cat([scores_HTS, sink], -1), -1)[..., :-1]
        else:
            probs = torch.softmax(scores_HTS, -1)
        out_TF = (probs @ v_HSV).transpose(0, 1).reshape(T, -1)
        return self.o(out_TF)


class TinyFFN(nn.Module):
    def __init__(self, d: int, f: int, glu: bool, bias: bool):
        super().__init__()
        self.glu = glu
        self.up = nn.Linear(d, f, bias=bias)
        self.gate = nn.Linear(d, f, bias=bias) if glu else None
        self.down = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.glu else F.gelu(self.up(x))
        return self.down(h)


class TinyMoE(nn.Module):
    """Router + top-k routed experts (a loop over experts) + shared experts."""

    def __init__(self, m: Architecture):
        super().__init__()
        d = m.d_model
        self.k = m.top_k
        self.router = nn.Linear(d, m.n_routed_experts, bias=m.router_bias)
        self.experts = nn.ModuleList(TinyFFN(d, m.d_ff_expert, m.expert_glu, m.ffn_bias)
                                     for _ in range(m.n_routed_experts))
        self.shared = nn.ModuleList(TinyFFN(d, m.shared_width, m.expert_glu, m.ffn_bias)
                                    for _ in range(m.n_shared_experts))

    def forward(self, x_TD):
        w_TK, idx_TK = torch.softmax(self.router(x_TD), -1).topk(self.k, -1)
        y = sum((s(x_TD) for s in self.shared), torch.zeros_like(x_TD))
        for e, expert in enumerate(self.experts):
            tok, slot = (idx_TK == e).nonzero(as_tuple=True)
            if tok.numel():
                y = y.index_add(0, tok, w_TK[tok, slot, None] * expert(x_TD[tok]))
        return y


class TinyBlock(nn.Module):
    def __init__(self, m: Architecture, kind: str, cross: bool):
        super().__init__()
        d = m.d_model
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = TinyAttention(m.attention, d)
        self.cross = TinyAttention(m.attention, d) if cross else None
        self.nc = nn.RMSNorm(d) if cross else None
        if kind == "moe":
            self.ffn = TinyMoE(m)
        else:
            self.ffn = TinyFFN(d, m.d_ff_dense, m.dense_is_glu, m.ffn_bias)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        if self.cross is not None:  # attends to the block input, standing in for an encoder
            x = x + self.cross(self.nc(x), x)
        return x + self.ffn(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, m: Architecture, with_mtp: bool = False):
        super().__init__()
        d = m.d_model
        self.embed = nn.Embedding(m.vocab_size, d)
        kinds = m.layer_kinds()
        first_cross = m.n_layers - m.n_cross_attn_layers
        self.blocks = nn.ModuleList(TinyBlock(m, k, i >= first_cross) for i, k in enumerate(kinds))
        self.norm = nn.RMSNorm(d)
        self.head = None if m.tied_embeddings else nn.Linear(d, m.vocab_size, bias=False)
        self.mtp = None
        if with_mtp:
            self.mtp = nn.ModuleDict(dict(enorm=nn.RMSNorm(d), hnorm=nn.RMSNorm(d),
                                          proj=nn.Linear(2 * d, d, bias=False),
                                          block=TinyBlock(m, "moe", False), norm=nn.RMSNorm(d)))

    def logits(self, h):
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)

    def forward(self, ids_T):
        e = self.embed(ids_T)
        h = e
        for block in self.blocks:
            h = block(h)
        out = self.logits(self.norm(h))
        if self.mtp is not None:
            t = self.mtp
            z = t["proj"](torch.cat([t["hnorm"](h), t["enorm"](e)], -1))
            out = out + self.logits(t["norm"](t["block"](z)))
        return out


def _active_by_hooks(model: TinyLM) -> int:
    """Parameters of every module a single token's forward pass actually calls."""
    used = set()
    hooks = [mod.register_forward_hook(lambda mod, i, o: used.add(mod))
             for mod in model.modules() if not list(mod.children())]
    with torch.no_grad():
        model(torch.tensor([3]))
    for h in hooks:
        h.remove()
    params = {id(p): p for mod in used for p in mod.parameters(recurse=False)}
    for mod in model.modules():  # sink logits live on the attention module itself
        if isinstance(mod, TinyAttention) and any(c in used for c in mod.children()):
            params.update({id(p): p for p in mod.parameters(recurse=False)})
    return sum(p.numel() for p in params.values())


TINY = {
    "mha-moe": Architecture(n_layers=3, d_model=16, vocab_size=50,
                            attention=MHA(n_heads=4, head_dim=4), n_routed_experts=4, top_k=2,
                            d_ff_expert=8),
    "gqa-bias-sinks-tied": Architecture(
        n_layers=2, d_model=16, vocab_size=40,
        attention=GQA(n_heads=4, n_kv_heads=2, head_dim=6, bias=True, qk_norm=True, sinks=True),
        n_routed_experts=6, top_k=3, d_ff_expert=10, ffn_bias=True, router_bias=True,
        tied_embeddings=True),
    "mla-shared-dense-mtp": Architecture(
        n_layers=4, d_model=16, vocab_size=30,
        attention=MLA(n_heads=2, q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4,
                      qk_rope_head_dim=2, v_head_dim=5),
        n_routed_experts=8, top_k=2, d_ff_expert=6, n_shared_experts=2, d_ff_shared=4,
        first_dense_layers=1, d_ff_dense=20, mtp_modules=1),
    "mla-interleaved-cross": Architecture(
        n_layers=4, n_cross_attn_layers=2, d_model=12, vocab_size=25,
        attention=MLA(n_heads=3, q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=2,
                      qk_rope_head_dim=2, v_head_dim=3),
        n_routed_experts=4, top_k=1, d_ff_expert=8, moe_every=2, d_ff_dense=14,
        expert_glu=False, dense_glu=True, tied_embeddings=True),
    "dense-gqa": Architecture(n_layers=2, d_model=16, vocab_size=20,
                              attention=GQA(n_heads=4, n_kv_heads=1, head_dim=4), d_ff_dense=24),
}


@pytest.mark.parametrize("name", TINY)
def test_count_params_equals_torch_module(name):
    m = TINY[name]
    torch.manual_seed(0)
    with_mtp = m.mtp_modules > 0
    model = TinyLM(m, with_mtp=with_mtp)
    total, active = count_params(m, include_mtp=with_mtp, active_embeddings="both")
    assert total == sum(p.numel() for p in model.parameters())
    assert active == _active_by_hooks(model)


@pytest.mark.parametrize("name", TINY)
def test_embedding_conventions_differ_by_one_matrix(name):
    m = TINY[name]
    emb = m.vocab_size * m.d_model
    both = count_params(m)[1]
    out = count_params(m, active_embeddings="output")[1]
    none = count_params(m, active_embeddings="none")[1]
    assert both - out == (0 if m.tied_embeddings else emb)
    assert out - none == emb
    with pytest.raises(ValueError, match="active_embeddings"):
        count_params(m, active_embeddings="input")


@pytest.mark.parametrize("name", TINY)
def test_flops_match_torch_flop_counter(name):
    m = TINY[name]
    torch.manual_seed(0)
    mtp = m.mtp_modules > 0
    model = TinyLM(m, with_mtp=mtp)
    T = 7
    ids = torch.randint(0, m.vocab_size, (T,))
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            model(ids)
    assert fwd.get_total_flops() == pytest.approx(
        T * forward_flops_per_token(m, seq_len=T, causal=False, include_mtp=mtp), rel=1e-12)
    with FlopCounterMode(display=False) as train:
        model(ids).float().pow(2).mean().backward()
    assert train.get_total_flops() == pytest.approx(
        T * training_flops_per_token(m, seq_len=T, causal=False, include_mtp=mtp), rel=1e-12)


def test_causal_attention_halves_the_score_flops():
    m = CATALOG["Mixtral-8x7B"]
    full = forward_flops_per_token(m, seq_len=4096, causal=False)
    causal = forward_flops_per_token(m, seq_len=4096, causal=True)
    one = forward_flops_per_token(m, seq_len=1, causal=False)
    # Attention terms: full attends 4096 positions, causal (4096 + 1) / 2 on average.
    assert full - one == pytest.approx(2 * (causal - one), rel=1e-12)
    with pytest.raises(ValueError, match="seq_len"):
        forward_flops_per_token(m, seq_len=0)


# ---------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None)
@given(E=st.integers(1, 64), k=st.integers(1, 8), L=st.integers(1, 6),
       shared=st.integers(0, 2), every=st.integers(1, 3))
def test_active_grows_by_one_expert_per_moe_layer(E, k, L, shared, every):
    k = min(k, E)
    kw = dict(n_layers=L * every, d_model=8, vocab_size=11, attention=MHA(n_heads=2, head_dim=4),
              n_routed_experts=E, d_ff_expert=6, n_shared_experts=shared, moe_every=every,
              d_ff_dense=5)
    m = Architecture(top_k=k, **kw)
    total, active = count_params(m)
    assert active <= total
    expert = 3 * 8 * 6
    if k < E:
        assert count_params(Architecture(top_k=k + 1, **kw))[1] - active == L * expert
    assert count_params(Architecture(top_k=k, **{**kw, "n_routed_experts": E + 1}))[0] - total \
        == L * (expert + 8)  # one more expert and one more router row per MoE layer


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=5), "top_k"),
    (dict(first_dense_layers=9), "first_dense_layers"),
    (dict(d_ff_expert=0), "d_ff_expert"),
    (dict(n_routed_experts=0), "n_routed_experts"),
    (dict(first_dense_layers=1), "d_ff_dense"),
    (dict(n_layers=2.0), "n_layers"),
])
def test_architecture_rejects_bad_fields(kwargs, match):
    base = dict(n_layers=2, d_model=8, vocab_size=10, attention=MHA(n_heads=2, head_dim=4),
                n_routed_experts=4, top_k=2, d_ff_expert=4)
    with pytest.raises((ValueError, TypeError), match=match):
        Architecture(**{**base, **kwargs})
    with pytest.raises(ValueError, match="n_kv_heads"):
        GQA(n_heads=4, n_kv_heads=3, head_dim=2)


# ---------------------------------------------------------------- memory plans

MOE = Architecture(n_layers=8, d_model=64, vocab_size=100, attention=MHA(n_heads=8, head_dim=8),
                   n_routed_experts=16, top_k=2, d_ff_expert=32, n_shared_experts=1,
                   first_dense_layers=1, d_ff_dense=128)
DENSE = Architecture(n_layers=8, d_model=64, vocab_size=100,
                     attention=GQA(n_heads=8, n_kv_heads=2, head_dim=8), d_ff_dense=128)


def _plan(model=MOE, **kw):
    kw = {"n_gpus": 1, "zero_stage": 0, "precision": PRECISIONS["BF16 weights+grads, FP32 Adam"],
          **kw}
    return ClusterPlan(model=model, **kw)


def test_single_gpu_holds_the_whole_model_state():
    plan = _plan(model=CATALOG["DeepSeek-V3"])
    st_ = memory_per_gpu(plan)
    total, _ = count_params(CATALOG["DeepSeek-V3"], include_mtp=True)
    assert st_.weights == 2 * total and st_.grads == 2 * total and st_.optimizer == 12 * total


def test_tp_and_pp_partition_dense_weights_exactly():
    for tp, pp in [(1, 1), (2, 1), (1, 4), (4, 2)]:
        plan = _plan(model=DENSE, n_gpus=tp * pp, tp=tp, pp=pp)
        weights = sum(s.weights for s in stage_memory(plan)) * tp / 2
        assert weights == count_params(DENSE)[0]


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_divides_what_it_shards_by_dp(zero):
    base = memory_per_gpu(_plan(model=DENSE, n_gpus=8))
    st_ = memory_per_gpu(_plan(model=DENSE, n_gpus=8, zero_stage=zero))
    assert st_.optimizer == pytest.approx(base.optimizer / 8)
    assert st_.grads == pytest.approx(base.grads / (8 if zero >= 2 else 1))
    assert st_.weights == pytest.approx(base.weights / (8 if zero >= 3 else 1))
    assert st_.activations == base.activations


def test_expert_parallelism_divides_only_the_routed_experts():
    routed = param_breakdown(MOE)["routed_experts"][0]
    ep1 = memory_per_gpu(_plan(n_gpus=4))
    ep4 = memory_per_gpu(_plan(n_gpus=4, ep=4))
    assert ep1.weights - ep4.weights == pytest.approx(2 * routed * (1 - 1 / 4))
    # ZeRO-1 shards expert optimizer state over the expert-data-parallel degree tp*dp/ep.
    z = memory_per_gpu(_plan(n_gpus=8, ep=4, zero_stage=1))
    expected = 12 * (count_params(MOE)[0] - routed) / 8 + 12 * routed / 4 / 2
    assert z.optimizer == pytest.approx(expected)


def test_activation_estimate_by_hand():
    """DENSE, one GPU: every tensor a block keeps, per token, in BF16, plus FP32 logits."""
    d, h, kv, hd, f, L, V, T = 64, 8, 2, 8, 128, 8, 100, 256
    attn = 2 * d + 2 * h + (2 * h + 2 * kv) * hd  # inputs, softmax stats, q, out, k, v
    block = attn + 2 * d + 3 * f  # + FFN input, normed input, gate, up, product
    none = memory_per_gpu(_plan(model=DENSE, seq_len=T)).activations
    assert none == 2 * T * L * block + 4 * T * V
    full = memory_per_gpu(_plan(model=DENSE, seq_len=T, recompute="full")).activations
    assert full == 2 * T * (L * d + block) + 4 * T * V


def test_activations_scale_with_batch_pipeline_and_recompute():
    a1 = memory_per_gpu(_plan(model=DENSE, micro_batch=1, seq_len=128)).activations
    a2 = memory_per_gpu(_plan(model=DENSE, micro_batch=2, seq_len=128)).activations
    assert a2 == pytest.approx(2 * a1)
    rec = memory_per_gpu(_plan(model=DENSE, micro_batch=1, seq_len=128, recompute="full"))
    assert rec.activations < a1
    stages = stage_memory(_plan(model=DENSE, n_gpus=4, pp=4, seq_len=128))
    assert stages[0].activations > stages[1].activations > stages[2].activations


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n_gpus=12, tp=8), ValueError, "n_gpus"),
    (dict(n_gpus=16, dp=3), ValueError, "dp"),
    (dict(n_gpus=1024, ep=512), ValueError, "ep .*exceeds"),
    (dict(n_gpus=48, ep=3), ValueError, "ep .*divide .*n_routed_experts"),
    (dict(n_gpus=32, ep=64), ValueError, r"ep .*divide tp \* dp"),
    (dict(n_gpus=128, pp=64, ep=2), ValueError, "pp"),
    (dict(n_gpus=64, tp=16), ValueError, "tp"),
    (dict(n_gpus=48, tp=3), ValueError, "tp .*n_heads"),
    (dict(n_gpus=8, zero_stage=4), ValueError, "zero_stage"),
    (dict(n_gpus=8, recompute="some"), ValueError, "recompute"),
    (dict(n_gpus=0), ValueError, "n_gpus"),
    (dict(n_gpus=8, tp=1.5), TypeError, "tp"),
    (dict(n_gpus=8, max_nodes=0), ValueError, "max_nodes"),
    (dict(n_gpus=12), ValueError, "n_gpus .*whole nodes"),
])
def test_planner_rejects_impossible_plans(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ClusterPlan(model=CATALOG["DeepSeek-V3"], **kwargs)


def test_planner_rejects_ep_groups_that_straddle_nodes():
    # DeepSeek-V2's 160 experts allow EP=5 or 10, but such groups cannot tile 8-GPU nodes.
    for tp, ep in [(2, 5), (1, 5), (1, 10)]:
        with pytest.raises(ValueError, match=r"ep \* tp .*tile the nodes"):
            ClusterPlan(model=CATALOG["DeepSeek-V2"], n_gpus=80, tp=tp, ep=ep)
    ClusterPlan(model=CATALOG["DeepSeek-V2"], n_gpus=80, tp=2, ep=4)  # 8 GPUs: one node


def test_planner_rejects_ep_on_a_dense_model():
    with pytest.raises(ValueError, match="ep .*dense"):
        ClusterPlan(model=DENSE, n_gpus=8, ep=2)
    with pytest.raises(TypeError, match="model"):
        ClusterPlan(model="DeepSeek-V3", n_gpus=8)


# ---------------------------------------------------------------- all-to-all model

NET = INTERCONNECTS["H800 (peak)"]
A2A = dict(tokens=4096, d_model=7168, top_k=8, n_experts=256, gpus_per_node=8,
           bytes_per_elem=1.0)


def test_expected_distinct_groups_by_enumeration():
    for groups, per, k in [(2, 4, 3), (4, 2, 2), (3, 3, 4)]:
        hits = [len({i // per for i in c}) for c in itertools.combinations(range(groups * per), k)]
        assert expected_distinct_groups(groups, per, k) == pytest.approx(np.mean(hits))


def test_dedup_traffic_by_enumeration():
    """Source GPU 0 of ep=4 GPUs on 2 nodes, 8 experts (2 per GPU), top-3."""
    E, g, ep, k = 8, 2, 4, 3
    combos = list(itertools.combinations(range(E), k))
    remote_nodes = np.mean([len({e // (E // 2) for e in c} - {0}) for c in combos])
    other_gpus = np.mean([len({e // (E // ep) for e in c} - {0}) for c in combos])
    t = dispatch_traffic(tokens=1, d_model=1, top_k=k, n_experts=E, ep=ep, gpus_per_node=g,
                         bytes_per_elem=1.0)
    assert t.inter_copies == pytest.approx(remote_nodes)
    assert t.intra_copies == pytest.approx(other_gpus)
    naive = dispatch_traffic(tokens=1, d_model=1, top_k=k, n_experts=E, ep=ep, gpus_per_node=g,
                             bytes_per_elem=1.0, dedup=False)
    assert naive.inter_copies == pytest.approx(k * 2 / 4) and naive.intra_copies == k / 4


def test_all_to_all_within_a_node_never_touches_the_network():
    t = dispatch_traffic(ep=8, **A2A)
    assert t.inter_bytes == 0 and t.intra_bytes > 0 and t.bottleneck(NET) == "NVLink"
    assert dispatch_traffic(ep=1, **A2A).time_s(NET) == 0


def test_all_to_all_limits_and_monotonicity():
    times = [dispatch_traffic(ep=ep, **A2A).time_s(NET) for ep in (8, 16, 32, 64, 128, 256)]
    assert dispatch_traffic(ep=64, **A2A).bottleneck(NET) == "network"
    assert all(np.diff(times) > 0)
    # Linear in tokens and bytes; twice the network bandwidth halves a network-bound time.
    t = dispatch_traffic(ep=64, **A2A)
    assert dispatch_traffic(ep=64, **{**A2A, "tokens": 8192}).inter_bytes == 2 * t.inter_bytes
    fast = replace(NET, rdma_GBps=2 * NET.rdma_GBps)
    alpha = NET.latency_us * 1e-6  # the fixed part does not scale with bandwidth
    assert t.time_s(fast) - alpha == pytest.approx(
        max((t.time_s(NET) - alpha) / 2, t.intra_bytes / (NET.nvlink_GBps * 1e9)))
    # Node-limited routing: fewer nodes, fewer network copies; M >= nodes changes nothing.
    copies = [dispatch_traffic(ep=256, max_nodes=m, **A2A).inter_copies for m in (1, 2, 4, 8)]
    assert all(np.diff(copies) > 0)
    assert dispatch_traffic(ep=64, max_nodes=8, **A2A) == dispatch_traffic(ep=64, **A2A)
    for ep in (16, 32, 256):  # one network copy per node instead of one per expert...
        dd = dispatch_traffic(ep=ep, **A2A)
        nv = dispatch_traffic(ep=ep, dedup=False, **A2A)
        assert dd.inter_bytes < nv.inter_bytes
        assert dd.intra_bytes > nv.intra_bytes  # ...paid for with NVLink forwarding
    fwd = moe_layer_comm_time(tokens=4096, d_model=7168, top_k=8, n_experts=256, ep=64, net=NET,
                              training=False)
    assert moe_layer_comm_time(tokens=4096, d_model=7168, top_k=8, n_experts=256, ep=64,
                               net=NET) > fwd > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(ep=3), "ep"), (dict(ep=12, n_experts=96), "gpus_per_node"),
    (dict(ep=64, max_nodes=0), "max_nodes"),
    (dict(ep=8, tokens=0), "tokens"), (dict(ep=8, bytes_per_elem=0), "bytes_per_elem"),
])
def test_all_to_all_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dispatch_traffic(**{**A2A, **kwargs})


# ---------------------------------------------------------------- stragglers

def test_uniform_routing_is_nearly_balanced_and_skew_makes_stragglers():
    uni = simulate_step(expert_popularity(16, skew="uniform"), n_tokens=20000, top_k=2,
                        n_devices=4)
    assert uni.device_load.sum() == 40000 and uni.dropped == 0
    assert 1.0 <= uni.straggler < 1.05
    skewed = np.mean([simulate_step(expert_popularity(64, s=1.2, seed=s), n_tokens=4096,
                                    top_k=2, n_devices=16, seed=s).straggler for s in range(5)])
    flat = np.mean([simulate_step(expert_popularity(64, s=0.2, seed=s), n_tokens=4096,
                                  top_k=2, n_devices=16, seed=s).straggler for s in range(5)])
    assert skewed > flat > 1.0


def test_capacity_caps_every_expert_and_counts_the_drops():
    p = expert_popularity(32, s=1.0, seed=1)
    free = simulate_step(p, n_tokens=2048, top_k=2, n_devices=8, seed=3)
    capped = simulate_step(p, n_tokens=2048, top_k=2, n_devices=8, capacity_factor=1.25, seed=3)
    cap = math.ceil(1.25 * 2 * 2048 / 32)
    assert capped.expert_load.max() <= cap
    assert capped.dropped == int((free.expert_load - np.minimum(free.expert_load, cap)).sum())
    assert capped.straggler <= cap * 4 / (2 * 2048 / 8)  # 4 experts per device
    assert capped.straggler < free.straggler


def test_simulated_capacity_is_the_layers_expert_capacity():
    """The straggler simulation caps experts with routing.expert_capacity, not a copy of it.

    1.1 * 2 * 100 / 4 is 55.000000000000007 in floating point: a bare ceil gives 56 slots, the
    layer gives 55. A popular expert that every token picks must be held to the layer's 55.
    """
    from moe_lab.routing import expert_capacity

    assert math.ceil(1.1 * 2 * 100 / 4) == 56 and expert_capacity(100, 4, 2, 1.1) == 55
    p = np.array([0.97, 0.01, 0.01, 0.01])
    free = simulate_step(p, n_tokens=100, top_k=2, n_devices=4, seed=0)
    capped = simulate_step(p, n_tokens=100, top_k=2, n_devices=4, capacity_factor=1.1, seed=0)
    assert free.expert_load.max() > 56
    assert capped.expert_load.max() == 55
    assert capped.dropped == int(free.expert_load.max()) - 55


def test_full_balancing_equals_uniform_routing():
    p = expert_popularity(16, skew="dirichlet", alpha=0.3, seed=2)
    a = simulate_step(p, n_tokens=1000, top_k=2, n_devices=4, balance=1.0, seed=5)
    b = simulate_step(expert_popularity(16, skew="uniform"), n_tokens=1000, top_k=2, n_devices=4,
                      seed=5)
    np.testing.assert_array_equal(a.expert_load, b.expert_load)


def test_gumbel_top1_samples_the_popularity():
    p = expert_popularity(8, s=1.0, seed=0)
    counts = route_counts(p, n_tokens=200_000, top_k=1, seed=1)
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.005)
    assert route_counts(p, n_tokens=10, top_k=8).tolist() == [10] * 8  # k = E: every expert


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_devices=3), "n_devices"), (dict(balance=1.5), "balance"),
    (dict(capacity_factor=0.0), "capacity_factor"), (dict(n_tokens=0), "n_tokens"),
])
def test_simulator_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_step(expert_popularity(8), **{**dict(n_tokens=10, top_k=2, n_devices=4),
                                               **kwargs})
    with pytest.raises(ValueError, match="skew"):
        expert_popularity(8, skew="pareto")


# ---------------------------------------------------------------- compute budget

def test_budget_round_trips_and_scales():
    peak = GPUS["H800"].peak_flops
    flops = training_flops(37e9, 14.8e12)
    assert flops == 6 * 37e9 * 14.8e12
    mfu = implied_mfu(flops, gpu_hours=2.664e6, peak_flops=peak)
    assert 0 < mfu < 1
    assert gpu_hours(flops, peak_flops=peak, mfu=mfu) == pytest.approx(2.664e6)
    assert gpus_needed(flops, days=60, peak_flops=peak, mfu=mfu) == pytest.approx(2.664e6 / 1440)
    with pytest.raises(ValueError, match="mfu"):
        gpu_hours(flops, peak_flops=peak, mfu=1.5)
    with pytest.raises(ValueError, match="tokens"):
        training_flops(1e9, 0)


def test_cluster_flops_inverts_gpus_needed():
    peak = GPUS["H800"].peak_flops
    flops = cluster_flops(n_gpus=10240, days=90, peak_flops=peak, mfu=0.35)
    assert flops == pytest.approx(10240 * 90 * 86400 * peak * 0.35)
    assert gpus_needed(flops, days=90, peak_flops=peak, mfu=0.35) == pytest.approx(10240)
    for kw, match in [(dict(n_gpus=0), "n_gpus"), (dict(days=-1), "days"),
                      (dict(mfu=0), "mfu"), (dict(peak_flops=0), "peak_flops")]:
        with pytest.raises(ValueError, match=match):
            cluster_flops(**{"n_gpus": 8, "days": 1, "peak_flops": peak, "mfu": 0.5, **kw})


def test_fp8_peak_is_a_parameter_of_the_gpu_and_the_plan():
    h800 = GPUS["H800"]
    assert h800.peak("fp8") == pytest.approx(2 * h800.peak("bf16"), rel=1e-3)
    with pytest.raises(ValueError, match="dtype"):
        h800.peak("fp4")
    base = dict(model=CATALOG["DeepSeek-V3"], n_gpus=2048, pp=16, ep=64, max_nodes=4)
    comm16, comp16 = moe_layer_times(ClusterPlan(**base))
    comm8, comp8 = moe_layer_times(ClusterPlan(**base, compute_dtype="fp8"))
    assert comm8 == comm16 and comp8 == pytest.approx(comp16 / 2, rel=1e-3)
    with pytest.raises(ValueError, match="compute_dtype"):
        ClusterPlan(**base, compute_dtype="int8")


# ---------------------------------------------------------------- all-to-all latency

def test_latency_bandwidth_fit_recovers_a_known_line():
    nbytes = np.array([1e6, 4e6, 1.6e7])
    alpha, bw = fit_latency_bandwidth(nbytes, 20e-6 + nbytes / 40e9)
    assert alpha == pytest.approx(20e-6) and bw == pytest.approx(40.0)
    with pytest.raises(ValueError, match="distinct"):
        fit_latency_bandwidth([1e6, 1e6], [1e-4, 2e-4])
    with pytest.raises(ValueError, match="same length"):
        fit_latency_bandwidth([1e6], [1e-4])
    with pytest.raises(ValueError, match="positive"):
        fit_latency_bandwidth([1e6, -1.0], [1e-4, 2e-4])


def test_default_alpha_is_the_fit_of_deepeps_timings():
    """The stored alpha is deepep_fit() rounded, and the bandwidth that fit implies agrees
    with the bandwidth DeepEP measured for its large-message kernels (43 GB/s)."""
    alpha, bw = deepep_fit()
    assert round(alpha * 1e6, 1) == H800_ALLTOALL_LATENCY_US
    assert bw == pytest.approx(INTERCONNECTS["H800 (DeepEP measured)"].rdma_GBps, rel=0.1)
    for net in INTERCONNECTS.values():
        assert net.latency_us == H800_ALLTOALL_LATENCY_US
    # DeepEP's own bandwidth column is these bytes over its times (EP 256: 39 and 40 GB/s).
    d_us, c_us = DEEPEP_LOW_LATENCY_US[256]
    assert deepep_low_latency_bytes("dispatch") / (d_us * 1e-6) / 1e9 == pytest.approx(39, abs=1)
    assert deepep_low_latency_bytes("combine") / (c_us * 1e-6) / 1e9 == pytest.approx(40, abs=1)
    with pytest.raises(ValueError, match="EP=12"):
        deepep_fit((12, 64))
    with pytest.raises(ValueError, match="kind"):
        deepep_low_latency_bytes("reduce")


def test_latency_floor_prices_small_all_to_alls():
    alpha = NET.latency_us * 1e-6
    one = dispatch_traffic(ep=64, **{**A2A, "tokens": 1})
    assert alpha < one.time_s(NET) < 1.1 * alpha  # one token: almost all latency
    big = dispatch_traffic(ep=64, **A2A)
    no_alpha = replace(NET, latency_us=0.0)
    assert big.time_s(NET) - big.time_s(no_alpha) == pytest.approx(alpha)
    with pytest.raises(ValueError, match="latency_us"):
        replace(NET, latency_us=-1.0)


# ---------------------------------------------------------------- MoE vs dense scaling law

WIDE = Architecture(name="wide", n_layers=4, d_model=96, vocab_size=100,
                    attention=GQA(n_heads=4, n_kv_heads=2, head_dim=24),
                    n_routed_experts=128, top_k=2, d_ff_expert=128)  # E = 64, G = 1


def test_law_reproduces_the_papers_compute_optimal_table():
    """Krajewski et al. Table 2 (E x N_act, D, G, loss); N = N_act (8E + 4) / 12 from their
    parameter formulas. The published coefficients are rounded, hence the tolerance."""
    rows = [(100e6, 4.37e9, 8, 3.133), (1e9, 28.94e9, 16, 2.491), (3e9, 72.9e9, 16, 2.245),
            (7e9, 137.6e9, 16, 2.076)]  # G = 32 rows lie outside the fitted range
    for n_act, tokens, g, loss in rows:
        n = n_act * (8 * 64 + 4) / 12
        assert laws.moe_loss(n, tokens, g) == pytest.approx(loss, abs=0.05)


def test_dense_inverse_and_cheapest_dense():
    loss = laws.dense_loss(1e10, 2e11)
    assert laws.dense_params_for_loss(loss, 2e11) == pytest.approx(1e10)
    n, d = laws.cheapest_dense(loss)
    assert laws.dense_loss(n, d) == pytest.approx(loss)
    for scale in (0.5, 0.9, 1.1, 2.0):  # any other D on the same loss costs more FLOPs
        d2 = d * scale
        assert laws.dense_params_for_loss(loss, d2) * d2 > n * d
    with pytest.raises(ValueError, match="data term"):
        laws.dense_params_for_loss(laws.KRAJEWSKI2024.c + 0.01, 1e9)
    with pytest.raises(ValueError, match="irreducible"):
        laws.cheapest_dense(0.4)


def test_law_inputs_and_validation():
    li = laws.law_inputs(WIDE)
    assert li.expansion == 64 and li.granularity == pytest.approx(8 * 96 / (3 * 128))
    total, active = count_params(WIDE, active_embeddings="none")
    assert li.n_params == total - 2 * 100 * 96  # untied: embedding and output head
    assert li.active_params == active  # 'none': neither embedding counts as active
    with pytest.raises(ValueError, match="expansion rate"):
        laws.law_inputs(CATALOG["DeepSeek-V3"])
    with pytest.raises(ValueError, match="MoE"):
        laws.law_inputs(DENSE)
    with pytest.raises(ValueError, match="granularity"):
        laws.moe_loss(1e9, 1e10, 32)
    with pytest.raises(ValueError, match="tokens"):
        laws.moe_loss(1e9, 0, 4)
    # More granular experts lower the predicted loss at equal N and D.
    assert laws.moe_loss(1e10, 1e11, 8) < laws.moe_loss(1e10, 1e11, 1)


# ---------------------------------------------------------------- plan search

def test_feasible_plans_are_the_valid_layouts_that_fit():
    kw = dict(zero_stage=1, recompute="full", max_nodes=4,
              precision=PRECISIONS["DeepSeek-V3 (FP32 master+grads, BF16 moments)"])
    model = CATALOG["DeepSeek-V3"]
    found = feasible_plans(model, 2048, tp=(1, 2), pp=(8, 16), ep=(3, 32, 64), **kw)
    assert found and all(r.plan.ep != 3 for r in found)  # EP=3 is invalid: skipped
    gib = [r.gib for r in found]
    assert gib == sorted(gib) and max(gib) <= 0.9 * 80
    layouts = {(r.plan.tp, r.plan.pp, r.plan.ep) for r in found}
    for tp, pp, ep in itertools.product((1, 2), (8, 16), (32, 64)):
        plan = ClusterPlan(model=model, n_gpus=2048, tp=tp, pp=pp, ep=ep, **kw)
        fits_ = memory_per_gpu(plan).total <= 0.9 * 80 * 2**30
        assert ((tp, pp, ep) in layouts) == fits_
    assert all(0 < r.comm_share < 1 for r in found)
    with pytest.raises(ValueError, match="headroom"):
        feasible_plans(model, 2048, headroom=1.0)
    with pytest.raises(ValueError, match="tp"):
        feasible_plans(model, 2048, tp=())
    with pytest.raises(ValueError, match="pp"):
        feasible_plans(model, 2048, pp=(0,))
    with pytest.raises(TypeError, match="model"):
        feasible_plans("DeepSeek-V3", 2048)


# ---------------------------------------------------------------- names checked at construction

from moe_lab.scaling import Claim, Interconnect, LayoutError, Precision  # noqa: E402
from moe_lab.scaling.budget import GPU  # noqa: E402

V3 = dict(model=CATALOG["DeepSeek-V3"], n_gpus=2048, pp=16, ep=64, max_nodes=4)


def test_plan_takes_catalog_names_and_refuses_unknown_ones_at_once():
    by_name = ClusterPlan(**V3, gpu="H800", precision="BF16 weights, FP32 grads, FP32 Adam",
                          net="H800 (DeepEP measured)")
    assert by_name.gpu is GPUS["H800"] and by_name.net is INTERCONNECTS["H800 (DeepEP measured)"]
    assert by_name.precision is PRECISIONS["BF16 weights, FP32 grads, FP32 Adam"]
    bad = [
        (dict(gpu="H100"), ValueError, r"gpu 'H100' is not in GPUS; known: 'H100-SXM', 'H800'"),
        (dict(precision="bf16"), ValueError,
         r"precision 'bf16' is not in PRECISIONS; known: 'BF16 weights\+grads, FP32 Adam'"),
        (dict(net="InfiniBand"), ValueError, r"net 'InfiniBand' is not in INTERCONNECTS"),
        (dict(gpu=80), TypeError, "gpu must be a GPU or the name of one in GPUS, got int"),
        (dict(precision=None), TypeError, "precision must be a Precision or the name of one"),
        (dict(net=50.0), TypeError, "net must be an? Interconnect or the name of one"),
        (dict(recompute=True), TypeError, "recompute must be a str"),
        (dict(compute_dtype=8), TypeError, "compute_dtype must be a str"),
        (dict(include_mtp="yes"), TypeError, "include_mtp must be a bool"),
        (dict(compute_efficiency="0.5"), TypeError, "compute_efficiency must be a number"),
        (dict(compute_efficiency=1.5), ValueError, r"compute_efficiency must be in \(0, 1\]"),
    ]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            ClusterPlan(**V3, **kw)


def test_plan_interconnect_follows_its_gpu_and_is_stated():
    h800, h100 = ClusterPlan(**V3), ClusterPlan(**V3, gpu="H100-SXM")
    assert h800.net is INTERCONNECTS["H800 (peak)"]  # the default plan is unchanged
    assert h100.gpu is GPUS["H100-SXM"] and h100.net is INTERCONNECTS["H100 SXM (peak)"]
    assert h100.net.nvlink_GBps > h800.net.nvlink_GBps
    for plan in (h800, h100):
        assert plan.gpu.interconnect == plan.net.name and plan.net.gpu == plan.gpu.name
        assert f"gpu='{plan.gpu.name}', net='{plan.net.name}'" in repr(plan)
        assert f"interconnect '{plan.net.name}': NVLink {plan.net.nvlink_GBps:g} GB/s" in (
            plan.summary())
    # NVLink is not the all-to-all's bottleneck for DeepSeek-V3's layout: same all-to-all time.
    assert moe_layer_times(h100)[0] == pytest.approx(moe_layer_times(h800)[0])
    # An H800 network under H100 GPUs (e.g. replace() of an H800 plan) is refused, not kept.
    with pytest.raises(ValueError, match=r"net 'H800 \(peak\)' is the interconnect of H800 "
                                         r"GPUs, not of gpu 'H100-SXM'.*'H100 SXM \(peak\)'"):
        replace(h800, gpu="H100-SXM")
    with pytest.raises(ValueError, match="is the interconnect of H800 GPUs"):
        ClusterPlan(**{**h800.__dict__, "gpu": GPUS["H100-SXM"]})
    # A network tied to no GPU goes with any; a GPU without a default needs one.
    ib = Interconnect(name="my IB", nvlink_GBps=450.0, rdma_GBps=25.0)
    assert ClusterPlan(**V3, gpu="H100-SXM", net=ib).net is ib
    b = GPU(name="B-test", bf16_dense_tflops=2000.0, memory_gib=180, source="test")
    with pytest.raises(ValueError, match="gpu 'B-test' names no interconnect of its own"):
        ClusterPlan(**V3, gpu=b)
    assert "on 2048 B-test GPUs" in ClusterPlan(**V3, gpu=b, net=ib).summary()


def test_catalog_entries_validate_their_fields():
    with pytest.raises(ValueError, match="GPU.interconnect 'NVL72' is not in INTERCONNECTS"):
        GPU(name="x", bf16_dense_tflops=1.0, memory_gib=1, source="", interconnect="NVL72")
    with pytest.raises(TypeError, match="GPU.memory_gib must be a number"):
        GPU(name="x", bf16_dense_tflops=1.0, memory_gib="80", source="")
    with pytest.raises(ValueError, match="GPU.bf16_dense_tflops must be > 0"):
        GPU(name="x", bf16_dense_tflops=float("nan"), memory_gib=80, source="")
    with pytest.raises(TypeError, match="Interconnect.rdma_GBps must be a number"):
        Interconnect(name="x", nvlink_GBps=1.0, rdma_GBps=None)
    with pytest.raises(TypeError, match="Interconnect.gpu must be a GPU name"):
        Interconnect(name="x", nvlink_GBps=1.0, rdma_GBps=1.0, gpu=GPUS["H800"])
    with pytest.raises(TypeError, match="Precision.grad_bytes must be a number"):
        Precision(grad_bytes="4")
    with pytest.raises(TypeError, match="GQA.qk_norm must be a bool"):
        GQA(n_heads=8, n_kv_heads=8, head_dim=8, qk_norm="yes")
    with pytest.raises(TypeError, match="Architecture.tied_embeddings must be a bool"):
        replace(DENSE, tied_embeddings=1)
    with pytest.raises(ValueError, match="Claim.model 'GPT-5' is not in CATALOG; known: 'Mix"):
        Claim(model="GPT-5", total=1e12, cite=("x",))
    with pytest.raises(ValueError, match="active_embeddings"):
        Claim(model="DBRX", total=1e12, cite=("x",), active_embeddings="input")
    # all-to-all times take an interconnect's name too, and refuse unknown ones
    kw = dict(tokens=4096, d_model=7168, top_k=8, n_experts=256, ep=64)
    assert moe_layer_comm_time(**kw, net="H800 (peak)") == moe_layer_comm_time(**kw, net=NET)
    with pytest.raises(ValueError, match="net 'H800' is not in INTERCONNECTS"):
        moe_layer_comm_time(**kw, net="H800")


def test_precision_is_named_by_its_numbers():
    assert Precision() == PRECISIONS["BF16 weights+grads, FP32 Adam"]
    assert Precision(grad_bytes=4.0).name == "BF16 weights, FP32 grads, FP32 Adam"
    custom = Precision(param_bytes=1.0, optimizer_bytes=4.0)
    assert custom.name.startswith("custom: 1 B weights, 2 B grads, 4 B optimizer state")
    assert Precision(name="mine", param_bytes=1.0).name == "mine"
    assert ClusterPlan(**V3, precision=custom).precision.name == custom.name


def test_feasible_plans_raise_errors_that_are_not_layouts():
    """Only layouts that do not fit are skipped: a bad name or GPU count is an error, not an
    empty answer."""
    model = CATALOG["DeepSeek-V3"]
    with pytest.raises(ValueError, match="precision 'fp8' is not in PRECISIONS"):
        feasible_plans(model, 2048, pp=(16,), ep=(64,), precision="fp8")
    with pytest.raises(ValueError, match="n_gpus .*whole nodes"):
        feasible_plans(model, 2044, pp=(4,), ep=(4,))
    with pytest.raises(LayoutError, match=r"ep \(3\) must divide"):
        ClusterPlan(model=model, n_gpus=48, ep=3)
    found = feasible_plans(model, 2048, pp=(16,), ep=(3, 64), recompute="full",
                           precision="DeepSeek-V3 (FP32 master+grads, BF16 moments)",
                           gpu="H100-SXM")
    assert [r.plan.ep for r in found] == [64] and found[0].plan.net.name == "H100 SXM (peak)"
