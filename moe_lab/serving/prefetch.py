"""Predicting the next layer's experts early, so their weights can be fetched in time.

While layer l runs, an offloading server would like to start copying the experts layer l + 1
will need. The residual stream changes little from one layer to the next, so applying layer
l + 1's own norm and router to a hidden state available earlier guesses its choice
(eliseev2023offloading). ``layer_states`` runs the model block by block and keeps, for
every layer, the residual stream entering its MoE layer ("pre_moe", after attention) and
leaving it ("post_moe"), with the experts each layer actually chose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lab.layer import MoE
from moe_lab.model import TinyLM


@dataclass
class LayerStates:
    """Per MoE layer l (lists of length n_layers): residual streams (T, D) and indices (T, k)."""

    pre_moe: list[torch.Tensor]
    post_moe: list[torch.Tensor]
    indices: list[torch.Tensor]


@torch.no_grad()
def layer_states(model: TinyLM, idx_BL: torch.Tensor) -> LayerStates:
    """Run ``model`` on idx_BL block by block (what ``TinyLM.forward`` does) and keep states."""
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
    if model.cfg.moe is None:
        raise ValueError("layer_states needs an MoE model (cfg.moe is None)")
    B, L = idx_BL.shape
    x_BLD = model.tok_emb(idx_BL) + model.pos_emb(torch.arange(L, device=idx_BL.device))
    pre, post, chosen = [], [], []
    for block in model.blocks:
        x_BLD = x_BLD + block.attn(block.norm1(x_BLD))
        pre.append(x_BLD.reshape(B * L, -1))
        assert isinstance(block.ffn, MoE)
        out = block.ffn(block.norm2(x_BLD))
        x_BLD = x_BLD + out.y
        post.append(x_BLD.reshape(B * L, -1))
        chosen.append(out.indices)
    return LayerStates(pre, post, chosen)


@torch.no_grad()
def predict_experts(model: TinyLM, layer: int, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, k): the experts ``layer``'s router would pick for hidden states x_TD, read through
    that layer's own norm (selection bias included, as the router selects)."""
    block = model.blocks[layer]
    logits_TE = block.ffn.router.logits(block.norm2(x_TD))
    scores_TE = logits_TE + block.ffn.expert_bias  # softmax is monotone: rank by logits
    return scores_TE.topk(model.cfg.moe.top_k, dim=-1).indices


def overlap(pred_Tk: torch.Tensor, true_Tk: torch.Tensor) -> float:
    """Mean share of each token's true experts that the prediction contains (0 to 1)."""
    if pred_Tk.shape != true_Tk.shape:
        raise ValueError(f"shapes differ: {tuple(pred_Tk.shape)} vs {tuple(true_Tk.shape)}")
    hit_Tk = (true_Tk.unsqueeze(-1) == pred_Tk.unsqueeze(-2)).any(-1)
    return float(hit_Tk.double().mean())


def prefetch_accuracy(model: TinyLM, idx_BL: torch.Tensor, source: str = "pre_moe") -> list[float]:
    """For l = 1..n_layers-1: how much of layer l's choice is predicted from layer l - 1's
    ``source`` state ("pre_moe": a whole MoE layer and an attention ahead; "post_moe": one
    attention ahead)."""
    if source not in ("pre_moe", "post_moe"):
        raise ValueError(f"source must be 'pre_moe' or 'post_moe', got {source!r}")
    st = layer_states(model, idx_BL)
    states = getattr(st, source)
    return [
        overlap(predict_experts(model, layer, states[layer - 1]), st.indices[layer])
        for layer in range(1, len(model.blocks))
    ]
