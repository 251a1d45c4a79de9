"""Text generation for the tiny model: a prompt batch in, sampled continuations out.

One call of ``TinyLM.forward_cached`` runs the whole prompt (prefill); then each decode step
feeds the B tokens just sampled and reads every earlier key and value from the KV cache, so
a step costs one position per sequence instead of the whole prefix. ``use_cache=False`` runs
the full forward over the prefix at every step instead: the reference the cache must equal.

Sampling: ``temperature=0`` is greedy (argmax); otherwise softmax(logits / temperature) is
sampled with a ``torch.Generator`` seeded by ``seed``, so a call is reproducible and the
cached and uncached loops draw the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moe_lab.config import check_int
from moe_lab.model import TinyLM


@dataclass
class Generation:
    """tokens_BT: prompt and continuation, (B, L + N). routing[s][l]: expert indices
    (B * positions, k) of MoE layer l in call s (s = 0 is the prompt; empty for dense or
    when not recorded)."""

    tokens_BT: torch.Tensor
    prompt_len: int
    routing: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def new_tokens_BN(self) -> torch.Tensor:
        return self.tokens_BT[:, self.prompt_len :]


def _check_args(model, prompt_BL, max_new_tokens, temperature, seed) -> None:
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
    if not isinstance(prompt_BL, torch.Tensor) or prompt_BL.dtype != torch.long:
        raise TypeError("prompt must be an int64 tensor of shape (batch, length)")
    if prompt_BL.dim() != 2 or prompt_BL.numel() == 0:
        raise ValueError(
            f"prompt must have shape (batch, length) with both >= 1, got {tuple(prompt_BL.shape)}"
        )
    check_int("max_new_tokens", max_new_tokens, 1)
    block = model.cfg.block_size
    if prompt_BL.shape[1] + max_new_tokens > block:
        raise ValueError(
            f"prompt length {prompt_BL.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"the model's block_size={block} (learned positions stop there)"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    check_int("seed", seed, 0)


def next_tokens(logits_BV: torch.Tensor, temperature: float, gen: torch.Generator | None):
    """(B,) next tokens: argmax when temperature is 0, else sampled at that temperature."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.double() / temperature, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=gen).squeeze(1)


@torch.no_grad()
def generate(
    model: TinyLM,
    prompt_BL: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    use_cache: bool = True,
    record_routing: bool = False,
) -> Generation:
    """Continue every prompt of the batch by ``max_new_tokens`` tokens (all prompts share one
    length L; L + max_new_tokens must fit in block_size). The model is put in eval mode for
    the call and restored after."""
    _check_args(model, prompt_BL, max_new_tokens, temperature, seed)
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=prompt_BL.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        tokens_BT = prompt_BL
        routing: list[list[torch.Tensor]] = []
        cache = model.new_cache(prompt_BL.shape[0]) if use_cache else None
        new_BL = prompt_BL
        for _ in range(max_new_tokens):
            if use_cache:
                out = model.forward_cached(new_BL, cache)
            else:
                out = model(tokens_BT)
            if record_routing:
                routing.append([r.indices for r in out.routing])
            nxt_B = next_tokens(out.logits[:, -1], temperature, gen)
            new_BL = nxt_B.unsqueeze(1)
            tokens_BT = torch.cat([tokens_BT, new_BL], dim=1)
    finally:
        model.train(was_training)
    return Generation(tokens_BT=tokens_BT, prompt_len=prompt_BL.shape[1], routing=routing)
