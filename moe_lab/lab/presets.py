"""The tiny language model's presets and variants: chapter 7's experiments, kept for the record.

Every committed log in ``benchmarks/results/tinylm_*.json`` was written by
``python -m moe_lab.train --config PRESET --variant VARIANT --seed S ...`` and records that
command; ``tests/test_results.py`` rebuilds the run's config from it and reruns the start. So a
preset here changes only together with the runs it produced, and an old one stays (as
``long_d96`` does) while a log still names it.

A preset is plain data: the model's sizes and the training fields it sets. A variant is the FFN:
dense, or an MoE with the dense FFN's active hidden size per token, so every variant of a preset
costs the same FFN FLOPs per token. ``moe_lab.train.make_config`` turns (preset, variant, seed)
into a ``TrainConfig``.
"""

from __future__ import annotations

from moe_lab.config import MoEConfig

VARIANTS = (
    "dense", "moe8", "fine", "fine32", "moe16", "fine32k4", "shared", "top1", "nobal",
    "top1renorm",
)
# Not of equal active FLOPs, so kept apart from VARIANTS (whose every member matches dense's
# active FFN width): the shape of sparse upcycling (chapter 8). The command line takes both.
UPCYCLING_VARIANTS = ("up8",)
ALL_VARIANTS = VARIANTS + UPCYCLING_VARIANTS

# "short" fits the chapter's build budget; the others are the committed experiments.
LONG_MODEL = dict(block_size=64, d_model=64, n_layers=4, n_heads=4, d_ff=256)
PRESETS = {
    "short": dict(
        model=dict(block_size=64, d_model=64, n_layers=2, n_heads=4, d_ff=256),
        train=dict(steps=200, batch_size=16, eval_every=50, warmup=20),
    ),
    "long": dict(
        model=LONG_MODEL,
        train=dict(steps=1000, batch_size=32, eval_every=50, warmup=50),
    ),
    # The "long" model trained four times as long: about 29 training bytes per dense parameter.
    # Help text is an eighth of each batch, so its 0.43 MB are seen about 2.4 times.
    "long4k": dict(
        model=LONG_MODEL,
        train=dict(steps=4000, batch_size=32, eval_every=100, warmup=100, prose_fraction=0.125),
    ),
    # Three times wider (d_model 192), trained twice as long as "long"; evaluated every 100
    # steps because one evaluation of the fixed set costs about 30 training steps here.
    "wide": dict(
        model=dict(block_size=64, d_model=192, n_layers=4, n_heads=4, d_ff=768),
        train=dict(steps=2000, batch_size=32, eval_every=100, warmup=100),
    ),
    # A first, wider attempt (about 1.7 training bytes per dense parameter); kept for the record.
    "long_d96": dict(
        model=dict(block_size=64, d_model=96, n_layers=4, n_heads=4, d_ff=384),
        train=dict(steps=1000, batch_size=16, eval_every=50, warmup=50),
    ),
}

# Training fields a variant sets in every preset (before the caller's own overrides).
VARIANT_TRAIN = {
    # a calmer router for top-1 (Switch's stability advice)
    "top1": dict(router_lr_scale=0.1),
    "top1renorm": dict(router_lr_scale=0.1),
}


def variant_moe(variant: str, d_model: int, d_ff: int) -> MoEConfig | None:
    """The FFN of each variant, all with the dense FFN's active hidden size per token.

    moe8: E=8, k=2, hidden d_ff/2. fine: E=16, k=4, hidden d_ff/4 (DeepSeekMoE-style);
    fine32: E=32, k=8, hidden d_ff/8. top1: E=4, k=1, hidden d_ff (Switch).
    nobal: moe8 without the auxiliary loss. top1renorm: top1 with its one gate renormalised
    to 1, the mistake chapter 7's first top-1 run made (then the router learns nothing from the
    LM loss). These have 4x the dense FFN's parameters in total;
    moe16 (E=16, k=2, hidden d_ff/2) and fine32k4 (E=32, k=4, hidden d_ff/4) have 8x.
    shared (DeepSeekMoE): a shared expert of hidden d_ff/2 that every token uses, plus top-2 of
    16 routed experts of hidden d_ff/4 (4.5x in total).
    up8, the one exception to equal active FLOPs: top-2 of 8 experts of the dense hidden size
    d_ff, the shape sparse upcycling gives when every expert is a copy of the dense FFN
    (``moe_lab.upcycle``, chapter 8): twice the dense FFN's FLOPs per token, 8x its parameters.
    """
    if variant not in ALL_VARIANTS:
        raise ValueError(f"variant must be one of {ALL_VARIANTS}, got {variant!r}")
    if variant == "dense":
        return None
    E, k = {
        "moe8": (8, 2),
        "fine": (16, 4),
        "fine32": (32, 8),
        "moe16": (16, 2),
        "fine32k4": (32, 4),
        "shared": (16, 2),
        "top1": (4, 1),
        "top1renorm": (4, 1),
        "nobal": (8, 2),
        "up8": (8, 2),
    }[variant]
    # the shared variant spends half the active width on its shared expert
    routed_ff, shared_ff = (d_ff // 2, d_ff // 2) if variant == "shared" else (d_ff, 0)
    if routed_ff % k or (shared_ff and 2 * shared_ff != d_ff):
        raise ValueError(f"d_ff={d_ff} does not split evenly for variant {variant!r}")
    return MoEConfig(
        d_model=d_model,
        d_ff=d_ff if variant == "up8" else routed_ff // k,
        shared_d_ff=shared_ff,
        num_experts=E,
        top_k=k,
        impl="sort",
        # Top-1 keeps the raw softmax probability as its gate, as Switch does: renormalised over
        # one choice it would always be 1.0 and the router would get no gradient from the loss.
        normalize_weights=k > 1 or variant == "top1renorm",
        aux_loss_coef=0.0 if variant == "nobal" else 0.01,
        z_loss_coef=0.001,
    )
