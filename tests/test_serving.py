"""Serving (chapter 12): KV-cache decoding equals the full forward, the generation loop, and
the decode cost models checked against hand arithmetic and simulation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab.config import MoEConfig
from moe_lab.kernels.roofline import H100_SXM, DevicePeaks
from moe_lab.model import KVCache, ModelConfig, TinyLM
from moe_lab.scaling import CATALOG, GQA, MLA, Architecture
from moe_lab.scaling.comm import Interconnect
from moe_lab.serving import (
    LowPrecisionRouter,
    allreduce_time,
    batched_losses,
    crossover_batch,
    decode_step,
    distinct_per_group,
    ep_layout,
    expected_touched,
    generate,
    layer_states,
    measured_touched,
    overlap,
    predict_experts,
    prefetch_accuracy,
    routing_trace,
    simulate_cache,
    simulate_touched,
    tp_layout,
    weights_read,
    with_moe_config,
    with_router_dtype,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


def tiny(moe=True, block=12, **moe_kw) -> TinyLM:
    cfg = None
    if moe:
        cfg = MoEConfig(**{"d_model": D, "d_ff": 8, "num_experts": 4, "top_k": 2, **moe_kw})
    torch.manual_seed(0)
    m = TinyLM(ModelConfig(block_size=block, d_model=D, n_layers=2, n_heads=2, d_ff=32, moe=cfg))
    return m.double().eval()


MODELS = {
    "dense": dict(moe=False),
    "moe": dict(),
    "moe_shared_einsum": dict(shared_d_ff=8, impl="einsum"),
    "moe_loop_top1": dict(top_k=1, impl="loop", normalize_weights=False),
}


# ---- the KV cache -------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_cached_logits_equal_the_full_forward(name):
    model = tiny(**MODELS[name])
    idx = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = model.new_cache(3)
    assert cache.k.dtype == torch.float64 and cache.capacity == 12
    parts = [model.forward_cached(idx[:, :4], cache)]  # a prompt of 4, then 8 single steps
    for t in range(4, 12):
        parts.append(model.forward_cached(idx[:, t : t + 1], cache))
        assert cache.length == t + 1
    got = torch.cat([p.logits for p in parts], dim=1)
    torch.testing.assert_close(got, full.logits, rtol=1e-12, atol=1e-12)
    if name != "dense":  # each step routes its own tokens exactly as the full pass did
        for layer in range(2):
            steps = [
                p.routing[layer].indices.view(3, -1, p.routing[layer].indices.shape[-1])
                for p in parts
            ]
            full_idx = full.routing[layer].indices.view(3, 12, -1)
            assert torch.equal(torch.cat(steps, dim=1), full_idx)


def test_chunks_after_the_prompt_see_the_cache():
    """Several new positions after cached ones (start > 0, L > 1) use the offset causal mask."""
    model = tiny()
    idx = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2)
    chunks = [model.forward_cached(idx[:, a:b], cache).logits for a, b in ((0, 3), (3, 7), (7, 11))]
    torch.testing.assert_close(torch.cat(chunks, 1), model(idx).logits, rtol=1e-12, atol=1e-12)


def test_cache_errors_name_the_argument():
    model = tiny()
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="block_size=12"):
        model.forward_cached(torch.zeros(2, 13, dtype=torch.long), cache)
    model.forward_cached(torch.zeros(2, 10, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="10 cached \\+ 3 new"):
        model.forward_cached(torch.zeros(2, 3, dtype=torch.long), cache)
    assert cache.length == 10  # a refused call leaves the cache as it was
    with pytest.raises(ValueError, match="batch size 3"):
        model.forward_cached(torch.zeros(3, 1, dtype=torch.long), cache)
    with pytest.raises(TypeError, match="int64"):
        model.forward_cached(torch.zeros(2, 1), cache)
    with pytest.raises(TypeError, match="KVCache"):
        model.forward_cached(torch.zeros(2, 1, dtype=torch.long), None)
    with pytest.raises(ValueError, match="batch_size"):
        model.new_cache(0)
    with pytest.raises(TypeError, match="batch_size"):
        model.new_cache(2.0)
    assert isinstance(model.new_cache(1, dtype=torch.float32), KVCache)


# ---- the generation loop ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dense", "moe"])
@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_cached_generation_equals_uncached(name, temperature):
    model = tiny(**MODELS[name])
    prompt = torch.randint(0, 256, (4, 3), generator=torch.Generator().manual_seed(3))
    a = generate(model, prompt, 9, temperature=temperature, seed=7)
    b = generate(model, prompt, 9, temperature=temperature, seed=7, use_cache=False)
    assert a.tokens_BT.shape == (4, 12) and torch.equal(a.tokens_BT[:, :3], prompt)
    assert torch.equal(a.tokens_BT, b.tokens_BT)
    assert torch.equal(a.new_tokens_BN, a.tokens_BT[:, 3:])


def test_greedy_is_the_argmax_and_sampling_follows_the_seed():
    model = tiny()
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(4))
    g = generate(model, prompt, 1)
    assert torch.equal(g.new_tokens_BN[:, 0], model(prompt).logits[:, -1].argmax(-1))
    hot = [generate(model, prompt, 8, temperature=50.0, seed=s).tokens_BT for s in (1, 1, 2)]
    assert torch.equal(hot[0], hot[1])
    assert not torch.equal(hot[0], hot[2])  # near-uniform over 256 bytes: 16 draws differ


def test_generate_records_routing_and_restores_the_mode():
    model = tiny().train()
    prompt = torch.zeros(2, 5, dtype=torch.long)
    g = generate(model, prompt, 3, record_routing=True)
    assert model.training
    assert [len(step) for step in g.routing] == [2, 2, 2]
    assert g.routing[0][0].shape == (2 * 5, 2) and g.routing[1][0].shape == (2, 2)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(max_new_tokens=8), ValueError, "exceeds the model's block_size=12"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=True), TypeError, "temperature"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_generate_refuses_bad_arguments(kw, err, match):
    model = tiny()
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(err, match=match):
        generate(model, torch.zeros(1, 5, dtype=torch.long), kw.pop("max_new_tokens"), **kw)


def test_generate_refuses_bad_models_and_prompts():
    with pytest.raises(TypeError, match="TinyLM"):
        generate(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="int64"):
        generate(tiny(), torch.zeros(1, 2), 1)
    with pytest.raises(ValueError, match="shape"):
        generate(tiny(), torch.zeros(4, dtype=torch.long), 1)


# ---- experts touched per decode step ------------------------------------------------------


def test_expected_touched_by_hand():
    assert expected_touched(8, 2, 1) == 2  # one token: its k experts
    assert expected_touched(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))  # 3.5
    assert expected_touched(4, 4, 3) == 4
    with pytest.raises(ValueError, match="top_k"):
        expected_touched(4, 5, 1)
    with pytest.raises(ValueError, match="batch"):
        expected_touched(4, 2, 0)


@settings(max_examples=25, deadline=None)
@given(E=st.integers(1, 32), k=st.integers(1, 8), B=st.integers(1, 64), seed=st.integers(0, 99))
def test_expected_touched_matches_simulation(E, k, B, seed):
    k = min(k, E)
    sim = simulate_touched(E, k, B, trials=2000, seed=seed).double()
    formula = expected_touched(E, k, B)
    se = sim.std() / math.sqrt(len(sim))
    assert abs(float(sim.mean()) - formula) <= 5 * float(se) + 2 / len(sim)
    assert k - 1e-9 <= formula <= min(E, k * B) + 1e-9


def test_distinct_and_measured_touched_by_hand():
    idx = torch.tensor([[0, 1, 1, 0], [2, 3, 0, 3]])
    assert distinct_per_group(idx, 4).tolist() == [2, 3]
    # 4 sequences, 2 positions, k=1: batches {0,1} and {2,3} at each position
    idx_NLk = torch.tensor([[[0], [1]], [[0], [2]], [[3], [1]], [[1], [1]]])
    assert measured_touched(idx_NLk, 4, 2) == pytest.approx((1 + 2 + 2 + 1) / 4)
    assert measured_touched(idx_NLk, 4, 1) == 1.0
    with pytest.raises(ValueError, match="exceeds"):
        measured_touched(idx_NLk, 4, 5)
    with pytest.raises(ValueError, match="expert ids"):
        distinct_per_group(torch.tensor([[4]]), 4)


# ---- the decode roofline ------------------------------------------------------------------


def test_decode_step_mixtral_by_hand():
    m = CATALOG["Mixtral-8x7B"]
    attn = 2 * 4096 * 32 * 128 + 2 * 4096 * 8 * 128  # q, o and k, v projections
    expert = 3 * 4096 * 14336
    router = 4096 * 8
    head = 32000 * 4096
    one_token = 32 * (attn + router + 2 * expert) + head  # matmul weights of one token
    assert weights_read(m, 1) == one_token + 4096  # + one embedding row
    two = 8 * (1 - (6 / 8) ** 2)  # experts two tokens touch, uniform routing
    assert weights_read(m, 2) == pytest.approx(one_token + 32 * (two - 2) * expert + 2 * 4096)
    ctx = 100
    kv_per_pos = 32 * 2 * 8 * 128 * 2  # layers x (K and V) x kv heads x head dim x bytes
    flops = 2 * one_token + 32 * 2 * ctx * 32 * (128 + 128)
    s = decode_step(m, H100_SXM, batch=1, context_len=ctx)
    assert s.weight_bytes == 2 * (one_token + 4096)
    assert s.kv_bytes == ctx * kv_per_pos
    assert s.flops == flops
    assert s.memory_s == pytest.approx((2 * (one_token + 4096) + ctx * kv_per_pos) / 3.35e12)
    assert s.compute_s == pytest.approx(flops / 989e12)
    assert s.bound == "memory" and s.time_s == s.memory_s
    assert s.experts_touched == 2 and s.tokens_per_expert == 2 / 8
    fp8 = decode_step(m, H100_SXM, batch=1, context_len=ctx, weight_bytes=1.0, kv_bytes=1.0)
    assert fp8.weight_bytes == s.weight_bytes / 2 and fp8.kv_bytes == s.kv_bytes / 2


def test_crossover_batch_is_where_the_bound_flips():
    m = CATALOG["DeepSeek-V3"]
    b = crossover_batch(m, H100_SXM, context_len=512)
    assert b is not None and b > 1
    assert decode_step(m, H100_SXM, batch=b, context_len=512).bound == "compute"
    assert decode_step(m, H100_SXM, batch=b - 1, context_len=512).bound == "memory"
    # Mixtral's GQA cache costs 4 FLOPs per byte: past a context, no batch is compute-bound
    assert crossover_batch(CATALOG["Mixtral-8x7B"], H100_SXM, context_len=8192) is None
    slow = DevicePeaks(name="slow memory", flops_per_s=989e12, bytes_per_s=1e9, source="x")
    assert crossover_batch(m, slow, context_len=1) is None  # never within max_batch
    with pytest.raises(TypeError, match="DevicePeaks"):
        decode_step(m, "H100", batch=1, context_len=1)
    with pytest.raises(ValueError, match="context_len"):
        decode_step(m, H100_SXM, batch=1, context_len=0)


# ---- expert offloading --------------------------------------------------------------------


TRACE = list("ABCADBA")


def test_cache_policies_on_a_hand_worked_trace():
    # capacity 2.  LRU: every request misses (A B C A D B A).
    assert simulate_cache(TRACE, 2, "lru").hits == 0
    # LFU with full history: C evicts A (both count 1, A older); A (count 2) evicts B; D
    # evicts C; B (count 2) evicts D; the last A hits.
    assert simulate_cache(TRACE, 2, "lfu").hits == 1
    # Belady: C evicts B (next used at 5, A at 3); A hits; D evicts C (never again); B evicts
    # D (never again); A hits.
    r = simulate_cache(TRACE, 2, "belady")
    assert (r.hits, r.misses) == (2, 5) and r.hit_rate == pytest.approx(2 / 7)
    assert simulate_cache(TRACE, 4, "lru").misses == 4  # only the first use of each key
    assert simulate_cache(TRACE, 1, "lru").hits == 0


@settings(max_examples=40, deadline=None)
@given(trace=st.lists(st.integers(0, 7), min_size=1, max_size=60), cap=st.integers(1, 8))
def test_belady_is_never_beaten(trace, cap):
    best = simulate_cache(trace, cap, "belady").hits
    assert all(simulate_cache(trace, cap, p).hits <= best for p in ("lru", "lfu"))
    assert simulate_cache(trace, 8, "lru").misses == len(set(trace))


def test_cache_arguments_and_trace_order():
    with pytest.raises(ValueError, match="policy"):
        simulate_cache(TRACE, 2, "fifo")
    with pytest.raises(ValueError, match="capacity"):
        simulate_cache(TRACE, 0)
    with pytest.raises(TypeError, match="sequence"):
        simulate_cache("ABCA", 2)
    layer0, layer1 = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5], [6, 7]])
    assert routing_trace([layer0, layer1]) == [
        (0, 0),
        (0, 1),
        (1, 4),
        (1, 5),
        (0, 2),
        (0, 3),
        (1, 6),
        (1, 7),
    ]


# ---- prefetching the next layer's experts -------------------------------------------------


def test_layer_states_reproduce_the_forward_routing():
    model = tiny(block=8)
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    st_ = layer_states(model, idx)
    for mine, theirs in zip(st_.indices, model(idx).routing, strict=True):
        assert torch.equal(mine, theirs.indices)
    # a layer's own router on its own MoE input is its choice exactly
    for layer in range(2):
        pred = predict_experts(model, layer, st_.pre_moe[layer])
        assert overlap(pred, st_.indices[layer]) == 1.0
    acc = prefetch_accuracy(model, idx)
    assert len(acc) == 1 and 0 <= acc[0] <= 1


def test_overlap_by_hand():
    pred = torch.tensor([[0, 1], [2, 3]])
    true = torch.tensor([[1, 5], [3, 2]])
    assert overlap(pred, true) == 0.75
    with pytest.raises(ValueError, match="shapes"):
        overlap(pred, true[:1])
    with pytest.raises(ValueError, match="source"):
        prefetch_accuracy(tiny(), torch.zeros(1, 2, dtype=torch.long), "after")


# ---- capacity at evaluation and a low-precision router -----------------------------------


def test_with_moe_config_keeps_the_weights():
    model = tiny()
    idx = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(6))
    same = with_moe_config(model, impl="einsum")
    torch.testing.assert_close(same(idx).logits, model(idx).logits)
    tight = with_moe_config(model, capacity_factor=0.25)
    assert tight.cfg.moe.capacity_factor == 0.25 and model.cfg.moe.capacity_factor is None
    assert sum(int(r.dropped) for r in tight(idx).routing) > 0
    with pytest.raises(ValueError, match="MoE"):
        with_moe_config(tiny(moe=False), capacity_factor=1.0)


def test_capacity_makes_a_token_depend_on_its_batch_mates():
    model = tiny()
    x = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(7))
    for m, invariant in ((model, True), (with_moe_config(model, capacity_factor=1.0), False)):
        alone = m(x[:1]).logits
        together = m(x).logits[:1]
        assert torch.allclose(alone, together, rtol=1e-12, atol=1e-12) == invariant


def test_batched_losses_order_matters_only_with_capacity():
    model = tiny()
    x = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(8))
    y = torch.roll(x, -1, 1)
    ident, rev = torch.arange(8), torch.arange(8).flip(0)
    a, da = batched_losses(model, x, y, ident, 3)
    b, db = batched_losses(model, x, y, rev, 3)
    torch.testing.assert_close(a, b)
    assert da == db == 0
    cap = with_moe_config(model, capacity_factor=1.0)
    c, dc = batched_losses(cap, x, y, ident, 3)
    assert dc > 0 and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="permutation"):
        batched_losses(model, x, y, torch.zeros(8, dtype=torch.long), 3)


def test_low_precision_router():
    model = tiny()
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    exact = with_router_dtype(model, torch.float64)  # the same computation
    torch.testing.assert_close(exact(idx).logits, model(idx).logits, rtol=0, atol=0)
    bf16 = with_router_dtype(model, torch.bfloat16)
    assert isinstance(bf16.blocks[0].ffn.router, LowPrecisionRouter)
    assert not isinstance(model.blocks[0].ffn.router, LowPrecisionRouter)  # a copy
    h = torch.randn(5, D, dtype=torch.float64)
    logits = bf16.blocks[0].ffn.router.logits(h)
    assert logits.dtype == torch.float64
    assert torch.equal(logits, logits.bfloat16().double())  # rounded to bf16 values
    assert not torch.equal(logits, model.blocks[0].ffn.router.logits(h))
    with pytest.raises(TypeError, match="dtype"):
        LowPrecisionRouter(model.cfg.moe, torch.int8)


# ---- serving layouts ----------------------------------------------------------------------


NET = Interconnect(name="test", nvlink_GBps=100.0, rdma_GBps=10.0, gpus_per_node=4, latency_us=10.0)


def toy_arch(attention) -> Architecture:
    return Architecture(
        n_layers=2,
        d_model=8,
        vocab_size=16,
        attention=attention,
        n_routed_experts=4,
        top_k=2,
        d_ff_expert=4,
    )


def test_layouts_by_hand():
    m = toy_arch(
        MLA(
            n_heads=2,
            q_lora_rank=None,
            kv_lora_rank=4,
            qk_nope_head_dim=2,
            qk_rope_head_dim=2,
            v_head_dim=2,
        )
    )
    expert = 3 * 8 * 4
    routed = 2 * 4 * expert  # layers x experts x weights
    total = m.vocab_size * m.d_model * 2 + 2 * (m.attention.params(8) + 2 * 8 + 8 * 4)
    total += routed + 8  # final norm
    ep = ep_layout(m, ep=4, batch_per_gpu=3, context_len=5, net=NET, weight_bytes=1.0)
    assert ep.weight_bytes == (total - routed) + routed / 4
    assert ep.kv_bytes == 3 * 5 * 2 * (4 + 2) * 2  # seqs x ctx x layers x latent x bytes
    assert ep.collectives == 4 and ep.sequences == 12 and ep.comm_s > 0
    tp = tp_layout(m, tp=4, batch=12, context_len=5, net=NET, weight_bytes=1.0)
    assert tp.weight_bytes == total / 4
    assert tp.kv_bytes == 12 * 5 * 2 * 6 * 2  # MLA's latent: every rank keeps all of it
    one = 10e-6 + 2 * 3 / 4 * (12 * 8 * 2) / 100e9
    assert tp.comm_s == pytest.approx(4 * one) and tp.collectives == 4
    g = toy_arch(GQA(n_heads=4, n_kv_heads=2, head_dim=2))
    split = tp_layout(g, tp=4, batch=12, context_len=5, net=NET)
    assert split.kv_bytes == 12 * 5 * 2 * (2 * 2 * 2) * 2 / 2  # 2 KV heads over 4 ranks
    assert allreduce_time(1e6, 1, NET) == 0.0
    with pytest.raises(ValueError, match="node"):
        tp_layout(m, tp=8, batch=1, context_len=1, net=NET)
    assert ep_layout(m, ep=1, batch_per_gpu=1, context_len=1, net=NET).comm_s == 0.0


# ---- exported weights ---------------------------------------------------------------------


def test_export_and_load_round_trip(tmp_path):
    import json

    from moe_lab.serving.weights import SERVING_DIR, export_run, load_model
    from moe_lab.train import make_config
    from moe_lab.train.checkpoint import write_checkpoint

    cfg = make_config("short", "moe8", seed=0)
    torch.manual_seed(0)
    model = TinyLM(cfg.model)
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run / "ckpt.pt", cfg, 3, model.state_dict(), {}, {})
    (run / "log.json").write_text(
        json.dumps(
            {
                "command": "python -m moe_lab.train --config short --variant moe8 --seed 0 --out x",
                "evals": [{"val_loss": 1.5}],
                "machine_start": {},
                "machine_end": {},
            }
        )
    )
    rec = export_run(run, tmp_path / "out" / "m", command="test")
    assert rec["steps"] == 3 and rec["final_val_loss"] == 1.5
    loaded = load_model(tmp_path / "out" / "m.json")
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    pt = tmp_path / "out" / "m.pt"
    pt.write_bytes(pt.read_bytes() + b"x")  # any change to the file is refused
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(tmp_path / "out" / "m.json")
    committed = load_model("tinylm_long_moe8_s0")  # the chapter's model, by name
    assert committed.cfg == make_config("long", "moe8").model
    assert (SERVING_DIR / "tinylm_long_dense_s0.json").is_file()
