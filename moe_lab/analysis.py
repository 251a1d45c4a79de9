"""Looking inside a trained MoE: what its routing depends on, how it changes, what experts do.

- ``routing_trace``: every token's top-k experts in every MoE layer, first choice first.
- ``mutual_information`` (bits) between the chosen expert and a token feature, with
  ``shuffled_mi``, the same statistic for a router with the same expert loads but random
  assignment: a plug-in estimate is positive even for independent variables (about
  ``(|X|-1)(|Y|-1) / (2 N ln 2)`` bits), so a measured value means something only above it.
- ``byte_class``: letter, digit, space, punctuation, other.
- ``coactivation``: how often two experts are picked for the same token, and what independent
  slots would give.
- ``fluctuation``: the share of tokens whose top-k set changed between two traces (router
  fluctuation, as StableMoE calls it).
- ``ablate_expert`` and ``ablate_hidden_units``: remove one expert (its tokens go to their next
  choice, through the router's selection bias) or a slice of a dense FFN, for a while.
"""

from __future__ import annotations

import math
import string
from contextlib import contextmanager

import torch

from moe_lab.model import TinyLM

BYTE_CLASSES = ("letter", "digit", "space", "punctuation", "other")


def _class_table() -> torch.Tensor:
    table = torch.full((256,), 4, dtype=torch.long)
    for cls, chars in enumerate(
        (string.ascii_letters, string.digits, string.whitespace, string.punctuation)
    ):
        table[list(chars.encode())] = cls
    return table


_CLASS_OF_BYTE = _class_table()


def byte_class(idx: torch.Tensor) -> torch.Tensor:
    """Each byte's class, an index into ``BYTE_CLASSES``: ASCII letters, digits, whitespace,
    punctuation; everything else (control bytes, the bytes of non-ASCII characters) is other."""
    if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point:
        raise TypeError("idx must be an integer tensor of byte values")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > 255):
        raise ValueError("idx must hold byte values in [0, 255]")
    return _CLASS_OF_BYTE[idx.long()]


def _labels(name: str, v: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dtype.is_floating_point or v.dtype == torch.bool:
        raise TypeError(
            f"{name} must be an integer tensor of labels, got "
            f"{getattr(v, 'dtype', type(v).__name__)}"
        )
    v = v.reshape(-1).long()
    if v.numel() and int(v.min()) < 0:
        raise ValueError(f"{name} must hold labels >= 0")
    return v


def _entropy_bits(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log2()).sum())


def entropy(x: torch.Tensor) -> float:
    """Plug-in entropy of the labels in ``x``, in bits."""
    x = _labels("x", x)
    if x.numel() == 0:
        raise ValueError("x must hold at least one label")
    return _entropy_bits(torch.bincount(x))


def mutual_information(x: torch.Tensor, y: torch.Tensor) -> float:
    """Plug-in mutual information I(X; Y) in bits, from paired labels (same number of each).

    ``I = sum_xy p(x, y) log2(p(x, y) / (p(x) p(y)))`` over the empirical joint distribution;
    equal to ``H(X) + H(Y) - H(X, Y)``.
    """
    x, y = _labels("x", x), _labels("y", y)
    if x.numel() != y.numel():
        raise ValueError(f"x and y must hold as many labels, got {x.numel()} and {y.numel()}")
    if x.numel() == 0:
        raise ValueError("x and y must hold at least one label")
    ny = int(y.max()) + 1
    joint = torch.bincount(x * ny + y)
    mi = _entropy_bits(torch.bincount(x)) + _entropy_bits(torch.bincount(y)) - _entropy_bits(joint)
    return max(mi, 0.0)  # round-off can leave -1e-16 for independent labels


def shuffled_mi(
    x: torch.Tensor, y: torch.Tensor, *, repeats: int = 8, generator: torch.Generator | None = None
) -> torch.Tensor:
    """I(X; Y') for ``repeats`` random permutations Y' of y: float64 (repeats,).

    A permutation keeps every label's count (the same expert loads) and breaks any link to x:
    this is what a router with the same loads but random assignment would score.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    x, y = _labels("x", x), _labels("y", y)
    out = [
        mutual_information(x, y[torch.randperm(y.numel(), generator=generator)])
        for _ in range(repeats)
    ]
    return torch.tensor(out, dtype=torch.float64)


def independence_bias(x: torch.Tensor, y: torch.Tensor) -> float:
    """The plug-in estimate's expected value for independent labels, to first order (bits):
    ``(|X| - 1)(|Y| - 1) / (2 N ln 2)`` with |X|, |Y| the labels that occur (Miller, 1955)."""
    x, y = _labels("x", x), _labels("y", y)
    kx, ky = int(torch.unique(x).numel()), int(torch.unique(y).numel())
    return (kx - 1) * (ky - 1) / (2 * x.numel() * math.log(2))


def coactivation(indices_Tk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E, E) int64: how many tokens picked both e1 and e2 among their k experts (symmetric,
    zero diagonal, since a token picks k distinct experts)."""
    if not isinstance(indices_Tk, torch.Tensor) or indices_Tk.dim() != 2:
        raise TypeError("indices_Tk must be a (tokens, k) integer tensor")
    E = num_experts
    idx = indices_Tk.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= E):
        raise ValueError(f"indices_Tk must lie in [0, {E})")
    k = idx.shape[1]
    counts = torch.zeros(E * E, dtype=torch.long)
    for a in range(k):
        for b in range(k):
            if a != b:
                counts += torch.bincount(idx[:, a] * E + idx[:, b], minlength=E * E)
    return counts.view(E, E)


def coactivation_expected(indices_Tk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E, E) float64: the pair counts if each slot picked its expert independently of the
    others, with each slot's own expert loads (pairs of one expert with itself left out)."""
    idx = indices_Tk.long()
    T, k = idx.shape
    p_kE = torch.stack(
        [torch.bincount(idx[:, j], minlength=num_experts).double() / T for j in range(k)]
    )
    exp = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for a in range(k):
        for b in range(k):
            if a != b:
                exp += T * torch.outer(p_kE[a], p_kE[b])
    exp.fill_diagonal_(0)
    return exp


def fluctuation(before_Tk: torch.Tensor, after_Tk: torch.Tensor) -> float:
    """The share of tokens whose set of k experts differs between two routings of the same
    tokens (order within the k ignored)."""
    if before_Tk.shape != after_Tk.shape or before_Tk.dim() != 2:
        raise ValueError(
            f"before_Tk and after_Tk must be (tokens, k) of one shape, got "
            f"{tuple(before_Tk.shape)} and {tuple(after_Tk.shape)}"
        )
    a, b = before_Tk.sort(dim=1).values, after_Tk.sort(dim=1).values
    return float((a != b).any(dim=1).double().mean())


@torch.no_grad()
def routing_trace(model: TinyLM, x_NL: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Top-k expert indices of every token in every MoE layer: uint8 (layers, N * L, k),
    tokens in row-major window order, each token's first choice in column 0."""
    if not isinstance(model, TinyLM) or model.cfg.moe is None:
        raise TypeError("model must be an MoE TinyLM")
    if model.cfg.moe.num_experts > 256:
        raise ValueError("routing_trace stores experts as uint8: at most 256")
    was = model.training
    model.eval()
    parts = []
    for i in range(0, x_NL.shape[0], chunk):
        out = model(x_NL[i : i + chunk])
        parts.append(torch.stack([r.indices for r in out.routing]).to(torch.uint8))
    model.train(was)
    return torch.cat(parts, dim=1)


def _moe_layer(model: TinyLM, layer: int):
    if not isinstance(model, TinyLM) or model.cfg.moe is None:
        raise TypeError("model must be an MoE TinyLM")
    if not 0 <= layer < len(model.blocks):
        raise ValueError(f"layer must be in [0, {len(model.blocks)}), got {layer}")
    return model.blocks[layer].ffn


@contextmanager
def ablate_expert(model: TinyLM, layer: int, expert: int):
    """Inside the ``with``, expert ``expert`` of ``layer`` receives no token: its selection
    bias is -inf, so every token that picked it takes its next choice, and the gates are
    renormalised over the k experts picked. No weight changes; the bias is restored after."""
    moe = _moe_layer(model, layer)
    E = moe.cfg.num_experts
    if not 0 <= expert < E:
        raise ValueError(f"expert must be in [0, {E}), got {expert}")
    if moe.cfg.top_k >= E:
        raise ValueError(f"with top_k={moe.cfg.top_k} of {E} experts there is no next choice")
    bias = moe.router.expert_bias
    saved = bias.clone()
    try:
        bias[expert] = float("-inf")
        yield model
    finally:
        bias.copy_(saved)


@contextmanager
def ablate_hidden_units(model: TinyLM, layer: int, units: slice):
    """Inside the ``with``, the dense FFN of ``layer`` loses hidden units ``units`` (their
    rows of ``w_down`` are zero, so they add nothing); the weights are restored after."""
    if not isinstance(model, TinyLM) or model.cfg.moe is not None:
        raise TypeError("model must be a dense TinyLM")
    if not 0 <= layer < len(model.blocks):
        raise ValueError(f"layer must be in [0, {len(model.blocks)}), got {layer}")
    if not isinstance(units, slice):
        raise TypeError(f"units must be a slice, got {type(units).__name__}")
    w = model.blocks[layer].ffn.w_down
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[units] = 0
        yield model
    finally:
        with torch.no_grad():
            w.copy_(saved)
