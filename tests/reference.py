"""Independent references written from the papers' definitions, token by token (slow, clear)."""

import torch
import torch.nn.functional as F


def mixtral_reference(x_TD, w_router_ED, w_gate, w_up, w_down, k):
    """Mixtral-style MoE: softmax over all experts, keep top k, renormalise, sum SwiGLU experts."""
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        logits = x_TD[t] @ w_router_ED.t()
        probs = torch.softmax(logits.double(), -1)
        top_p, top_e = torch.topk(probs, k)
        top_p = top_p / top_p.sum()
        for p, e in zip(top_p, top_e.tolist(), strict=True):
            h = F.silu(x_TD[t] @ w_gate[e]) * (x_TD[t] @ w_up[e])
            y[t] = y[t] + p.to(x_TD.dtype) * (h @ w_down[e])
    return y
