"""Sparse upcycling: an MoE TinyLM built from a trained dense one (Komatsuzaki et al., 2023).

Everything but the FFNs is copied (embeddings, attention, norms). Each dense FFN becomes an MoE
layer in one of two ways:

- ``"copy"``: every expert is a copy of the dense FFN (hidden size ``d_ff``), as in the paper.
  With gates renormalised over the top-k (``normalize_weights=True``) the upcycled model equals
  the dense one for *any* router: ``sum_j w_j FFN(x) = FFN(x)`` since ``sum_j w_j = 1``. The
  router keeps its own initialisation. Copies start identical; they drift apart only because
  different experts see different tokens (``noise_std`` perturbs them if they do not).
- ``"split"``: fine-grained. The dense FFN's ``d_ff`` hidden units are cut into E contiguous
  slices of ``d_ff/E`` and expert e holds slice e. A SwiGLU FFN is a sum over its hidden units,
  so ``FFN(x) = sum_e FFN_e(x)``; the MoE computes ``sum_e w_e FFN_e(x)`` over the experts it
  picks, which equals the dense FFN exactly when every expert is picked with weight 1. The
  construction: ``top_k = E``, the router's weight set to zero (so every softmax score, and
  every renormalised gate, is exactly 1/E) and each expert's ``w_down`` multiplied by E. Once
  the router trains, the gates move away from 1/E: the experts are then weighted per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from moe_lab.config import MoEConfig
from moe_lab.layer import MoE
from moe_lab.model import ModelConfig, TinyLM

MODES = ("copy", "split")


def upcycle_config(
    dense_cfg: ModelConfig, *, num_experts: int, top_k: int = 2, mode: str = "copy", **moe_fields
) -> ModelConfig:
    """The MoE model config that ``upcycle`` builds from a dense one.

    ``copy``: experts of the dense hidden size, ``top_k`` of ``num_experts``. ``split``:
    experts of ``d_ff / num_experts`` and ``top_k`` must equal ``num_experts``. Extra
    ``moe_fields`` (e.g. ``aux_loss_coef``) go to the ``MoEConfig``.
    """
    if not isinstance(dense_cfg, ModelConfig):
        raise TypeError(f"dense_cfg must be a ModelConfig, got {type(dense_cfg).__name__}")
    if dense_cfg.moe is not None:
        raise ValueError("dense_cfg must describe a dense model (its moe is not None)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "split":
        if top_k != num_experts:
            raise ValueError(
                f"mode='split' equals the dense model only with top_k == num_experts "
                f"({num_experts}), got top_k={top_k}"
            )
        if dense_cfg.d_ff % num_experts:
            raise ValueError(
                f"mode='split' needs num_experts dividing d_ff={dense_cfg.d_ff}, got {num_experts}"
            )
    d_ff = dense_cfg.d_ff if mode == "copy" else dense_cfg.d_ff // num_experts
    moe = MoEConfig(
        d_model=dense_cfg.d_model,
        d_ff=d_ff,
        num_experts=num_experts,
        top_k=top_k,
        activation=dense_cfg.activation,
        **moe_fields,
    )
    return replace(dense_cfg, moe=moe)


def _check_exact_layer(cfg: MoEConfig, mode: str) -> None:
    """Refuse MoE settings under which the construction would not reproduce the dense FFN."""
    problems = []
    if not cfg.normalize_weights:
        problems.append("normalize_weights must be True (gates summing to 1)")
    if cfg.capacity_factor is not None:
        problems.append("capacity_factor must be None (a dropped token loses its FFN)")
    if cfg.shared_d_ff:
        problems.append("shared_d_ff must be 0 (a shared expert has no dense counterpart)")
    if cfg.router != "top_k":
        problems.append(f"router must be 'top_k', got {cfg.router!r}")
    if mode == "split" and cfg.score != "softmax":
        problems.append("score must be 'softmax' (a zero router then gives every gate 1/E)")
    if problems:
        raise ValueError("cannot upcycle into this MoE config: " + "; ".join(problems))


@torch.no_grad()
def load_upcycled(
    model: TinyLM,
    dense_state: dict[str, torch.Tensor],
    *,
    mode: str = "copy",
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> None:
    """Fill the MoE ``model`` in place from a dense TinyLM's ``state_dict``.

    Non-FFN tensors are copied as they are. ``noise_std`` > 0 multiplies every expert weight
    by ``1 + noise_std * N(0, 1)`` (drawn per expert and entry, from ``generator``) so copies
    differ from the start; 0 keeps the upcycled model equal to the dense one.
    """
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
    if model.cfg.moe is None:
        raise ValueError("model must be an MoE TinyLM (its cfg.moe is None)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    cfg = model.cfg.moe
    _check_exact_layer(cfg, mode)
    E = cfg.num_experts
    if mode == "split" and cfg.top_k != E:
        raise ValueError(f"mode='split' needs top_k == num_experts ({E}), got {cfg.top_k}")
    own = model.state_dict()
    ffn_keys = {k for k in dense_state if ".ffn." in k}
    rest = {k: v for k, v in dense_state.items() if k not in ffn_keys}
    missing = sorted(k for k in own if ".ffn." not in k and k not in rest)
    if missing:
        raise ValueError(f"dense_state lacks tensors the model needs: {missing[:4]}")
    for k, v in rest.items():
        if k not in own or own[k].shape != v.shape:
            raise ValueError(
                f"dense_state[{k!r}] has shape {tuple(v.shape)}, the model "
                f"expects {tuple(own[k].shape) if k in own else 'no such tensor'}"
            )
        own[k].copy_(v)
    for i, block in enumerate(model.blocks):
        moe: MoE = block.ffn
        names = ("w_gate", "w_up", "w_down") if cfg.activation == "swiglu" else ("w_up", "w_down")
        dense = {n: dense_state.get(f"blocks.{i}.ffn.{n}") for n in names}
        if any(w is None for w in dense.values()):
            raise ValueError(f"dense_state has no dense FFN for block {i} (blocks.{i}.ffn.w_up)")
        F_dense = dense["w_up"].shape[1]
        want = F_dense if mode == "copy" else F_dense // E
        if moe.experts.d_ff != want or (mode == "split" and F_dense % E):
            raise ValueError(
                f"block {i}: a dense FFN of hidden size {F_dense} gives experts of "
                f"{want} in mode {mode!r}, the model's have {moe.experts.d_ff}"
            )
        for n, w in dense.items():
            if mode == "copy":
                w_E = w.unsqueeze(0).expand(E, *w.shape)
            elif n == "w_down":  # (F, D) -> (E, F/E, D), times E: gates of 1/E give weight 1
                w_E = w.reshape(E, F_dense // E, -1) * E
            else:  # (D, F) -> (E, D, F/E): expert e holds hidden units [e F/E, (e+1) F/E)
                w_E = w.reshape(w.shape[0], E, F_dense // E).permute(1, 0, 2)
            w_E = w_E.to(getattr(moe.experts, n).dtype)
            if noise_std > 0:
                noise = torch.randn(w_E.shape, generator=generator, dtype=w_E.dtype)
                w_E = w_E * (1 + noise_std * noise.to(w_E.device))
            getattr(moe.experts, n).copy_(w_E)
        if mode == "split":
            moe.router.weight.zero_()


def upcycle(
    dense: TinyLM,
    *,
    num_experts: int,
    top_k: int = 2,
    mode: str = "copy",
    noise_std: float = 0.0,
    seed: int = 0,
    **moe_fields,
) -> TinyLM:
    """A new MoE TinyLM from the trained dense ``dense`` (see the module docstring).

    The router is initialised from ``seed`` (``copy``) or set to zero (``split``); the result
    has the dense model's dtype and device and, with ``noise_std=0``, its outputs.
    """
    if not isinstance(dense, TinyLM):
        raise TypeError(f"dense must be a TinyLM, got {type(dense).__name__}")
    cfg = upcycle_config(dense.cfg, num_experts=num_experts, top_k=top_k, mode=mode, **moe_fields)
    p = next(dense.parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyLM(cfg).to(dtype=p.dtype, device=p.device)
    load_upcycled(model, dense.state_dict(), mode=mode, noise_std=noise_std, generator=g)
    return model


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(model state dict, training config dict or None) from a training checkpoint
    (``ckpt.pt``) or a bare weights file (``save_weights``); loaded with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and "model" in blob and "format" in blob:
        return blob["model"], blob.get("config")
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob, None
    raise ValueError(f"{path} holds neither a training checkpoint nor a state dict")


def initializer(
    path: str | Path, *, noise_std: float = 0.0, seed: int = 0
) -> Callable[[TinyLM], None]:
    """``init`` for ``moe_lab.train.train``: start from the weights in ``path``.

    A dense file into an MoE model is upcycled by copying (``load_upcycled``, mode "copy");
    a file of the model's own shapes is loaded as it is. Anything else is refused, naming the
    first tensors that differ.
    """
    state, _ = read_weights(path)

    def init(model: TinyLM) -> None:
        dense_file = not any(".experts." in k for k in state)
        if model.cfg.moe is not None and dense_file:
            g = torch.Generator().manual_seed(seed)
            load_upcycled(model, state, mode="copy", noise_std=noise_std, generator=g)
            return
        if noise_std:
            raise ValueError("noise_std applies only when upcycling a dense file into an MoE")
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state.items()}
        if own != theirs:
            bad = sorted(k for k in set(own) | set(theirs) if own.get(k) != theirs.get(k))
            raise ValueError(f"{path} does not fit the model: {bad[:4]} differ")
        model.load_state_dict(state)

    return init


def expert_spread(model: TinyLM) -> list[float]:
    """Per MoE layer: how far its experts are from their mean, relative to their size.

    ``sqrt(mean_e |W_e - mean W|^2 / mean_e |W_e|^2)`` over each expert's weights flattened
    into one vector: 0 for identical copies, ``sqrt(1 - 1/E)`` for experts drawn independently
    from one zero-mean distribution.
    """
    if not isinstance(model, TinyLM) or model.cfg.moe is None:
        raise TypeError("model must be an MoE TinyLM")
    out = []
    for block in model.blocks:
        ex = block.ffn.experts
        ws = [getattr(ex, n) for n in ("w_gate", "w_up", "w_down") if getattr(ex, n) is not None]
        w_EP = torch.cat([w.detach().reshape(w.shape[0], -1) for w in ws], dim=1).double()
        mean_P = w_EP.mean(0)
        spread = (w_EP - mean_P).pow(2).sum(1).mean() / w_EP.pow(2).sum(1).mean()
        out.append(float(spread.sqrt()))
    return out
