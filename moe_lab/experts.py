"""Expert FFNs: one dense FFN, and E of them stacked into (E, ...) weight tensors.

A SwiGLU expert computes ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``; a GELU expert
computes ``gelu(x @ w_up[e]) @ w_down[e]`` and has no ``w_gate``. Which GEMMs run the experts
on rows grouped by expert is the backend (``moe_lab.backends``), chosen per module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_lab import backends
from moe_lab.config import ACTIVATIONS, BACKENDS, check_choice, check_positive_int


def _init(w: torch.Tensor, fan_in: int) -> None:
    nn.init.normal_(w, mean=0.0, std=fan_in**-0.5)


class FFN(nn.Module):
    """The Transformer feed-forward block: one expert, as a dense layer (chapter 1)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", *, dtype=None):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_ff", d_ff)
        check_choice("activation", activation, ACTIVATIONS)
        self.activation = activation
        kw = {"dtype": dtype}
        self.w_gate = (
            nn.Parameter(torch.empty(d_model, d_ff, **kw)) if activation == "swiglu" else None
        )
        self.w_up = nn.Parameter(torch.empty(d_model, d_ff, **kw))
        self.w_down = nn.Parameter(torch.empty(d_ff, d_model, **kw))
        for w in (self.w_gate, self.w_up):
            if w is not None:
                _init(w, d_model)
        _init(self.w_down, d_ff)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            h_NF = F.silu(x_ND @ self.w_gate) * (x_ND @ self.w_up)
        else:
            h_NF = F.gelu(x_ND @ self.w_up)
        return h_NF @ self.w_down  # (N, D)


class Experts(nn.Module):
    """E expert FFNs with stacked weights: w_gate, w_up (E, D, F) and w_down (E, F, D).

    ``backend`` picks the GEMMs ``forward_sorted`` uses; with "auto" the choice of the latest
    call is kept in ``last_backend`` and shown in the repr.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        *,
        backend: str = "auto",
        dtype=None,
    ):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            check_positive_int(name, value)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("backend", backend, BACKENDS)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.backend = activation, backend
        self.last_backend: str | None = None
        E, D, Fh = num_experts, d_model, d_ff
        self.w_gate = (
            nn.Parameter(torch.empty(E, D, Fh, dtype=dtype)) if activation == "swiglu" else None
        )
        self.w_up = nn.Parameter(torch.empty(E, D, Fh, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(E, Fh, D, dtype=dtype))
        for w in (self.w_gate, self.w_up):
            if w is not None:
                _init(w, D)
        _init(self.w_down, Fh)

    def extra_repr(self) -> str:
        chosen = f" (last call: {self.last_backend})" if self.backend == "auto" else ""
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation!r}, backend={self.backend!r}{chosen}")

    def act(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """The expert's nonlinearity: silu(gate) * up (SwiGLU) or gelu(up)."""
        return F.silu(gate) * up if self.activation == "swiglu" else F.gelu(up)

    def forward_expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on a block of tokens: (N, D) -> (N, D)."""
        gate = x_ND @ self.w_gate[e] if self.w_gate is not None else None
        return self.act(gate, x_ND @ self.w_up[e]) @ self.w_down[e]

    def forward_batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Every expert on its own (C, D) slab at once, as in GShard: (E, C, D) -> (E, C, D)."""
        gate = torch.bmm(x_ECD, self.w_gate) if self.w_gate is not None else None
        return torch.bmm(self.act(gate, torch.bmm(x_ECD, self.w_up)), self.w_down)

    def forward_sorted(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, backend: str | None = None
    ) -> torch.Tensor:
        """Rows of x sorted by expert (counts_E[e] rows for expert e): (N, D) -> (N, D).

        Runs the module's backend (or ``backend``, one of ``moe_lab.backends.BACKENDS``).
        """
        if x_ND.shape[0] == 0:
            return x_ND.new_zeros(x_ND.shape)
        backend = self.resolve_backend(x_ND, counts_E, backend)
        return backends.RUNNERS[backend](self, x_ND, counts_E)

    def resolve_backend(
        self, x: torch.Tensor, counts_E: torch.Tensor, backend: str | None = None
    ) -> str:
        """The backend a call on rows like ``x`` runs: ``backend``, else the module's; "auto"
        resolved by ``backends.choose_auto`` and recorded in ``last_backend``."""
        backend = self.backend if backend is None else backend
        if backend == "auto":
            backend = backends.choose_auto(self, x, counts_E)
            self.last_backend = backend
        else:
            check_choice("backend", backend, backends.BACKENDS)
        return backend

    def forward_routed(
        self, x_TD: torch.Tensor, token_of_N: torch.Tensor, w_N: torch.Tensor,
        counts_E: torch.Tensor,
    ) -> torch.Tensor:
        """Gather, run and combine in one pass, for the loop backend: rows n sorted by expert
        (``counts_E[e]`` of them for expert e) of tokens ``token_of_N``, mixed back with weights
        ``w_N``: (T, D) -> (T, D), with no (T*k, D) buffer (``backends.run_loop_routed``)."""
        return backends.run_loop_routed(self, x_TD, token_of_N, w_N, counts_E)

    def slice(self, first: int, num: int) -> Experts:
        """A new module holding copies of experts [first, first + num): one rank's shard."""
        part = Experts(num, self.d_model, self.d_ff, self.activation, backend=self.backend,
                       dtype=self.w_up.dtype).to(self.w_up.device)
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                if getattr(self, name) is not None:
                    getattr(part, name).copy_(getattr(self, name)[first:first + num])
        return part
