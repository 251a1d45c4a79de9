"""Expert offloading: a few experts in fast memory, the rest fetched on demand.

When a model's experts do not fit in GPU memory (or a laptop's), they live in slower memory
and a cache of ``capacity`` experts sits in the fast one (eliseev2023offloading). Each
request for an expert not in the cache is a miss: its weights must be copied in, evicting
another. ``simulate_cache`` replays a trace of requests under a replacement policy:

- "lru": evict the least recently used expert;
- "lfu": evict the expert requested least often so far (its whole history, not only while
  cached), the least recently used among ties: popular experts stay;
- "belady": evict the expert whose next request lies farthest ahead (Belady's optimum; it
  reads the future, so no server can run it, but no policy can beat its hit rate).

A trace is a sequence of hashable keys; ``routing_trace`` builds one from a model's routing in
decode order: token by token, layer by layer, each token's k experts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from moe_lab.config import check_choice, check_int

POLICIES = ("lru", "lfu", "belady")


@dataclass(frozen=True)
class CacheResult:
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _next_uses(trace: Sequence[Hashable]) -> list[float]:
    """For each request i, the index of the next request of the same key (inf if none)."""
    nxt: list[float] = [float("inf")] * len(trace)
    last: dict[Hashable, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = last.get(trace[i], float("inf"))
        last[trace[i]] = i
    return nxt


def simulate_cache(trace: Sequence[Hashable], capacity: int, policy: str = "lru") -> CacheResult:
    """Hits and misses of a cache of ``capacity`` entries serving ``trace`` under ``policy``."""
    check_int("capacity", capacity, 1)
    check_choice("policy", policy, POLICIES)
    if isinstance(trace, str | bytes) or not isinstance(trace, Sequence):
        raise TypeError(f"trace must be a sequence of keys, got {type(trace).__name__}")
    cache: OrderedDict[Hashable, float] = OrderedDict()  # key -> next use (belady); LRU order
    counts: dict[Hashable, int] = {}
    nxt = _next_uses(trace) if policy == "belady" else None
    hits = 0
    for i, key in enumerate(trace):
        counts[key] = counts.get(key, 0) + 1
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            if len(cache) >= capacity:
                if policy == "lru":
                    victim = next(iter(cache))
                elif policy == "lfu":  # the first minimum in LRU order: least recent of ties
                    victim = min(cache, key=lambda k: counts[k])
                else:
                    victim = max(cache, key=lambda k: cache[k])
                del cache[victim]
            cache[key] = 0.0
        if nxt is not None:
            cache[key] = nxt[i]
    return CacheResult(hits=hits, misses=len(trace) - hits)


def routing_trace(indices: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(layer, expert) requests in decode order from one sequence's routing.

    indices[l]: (L, k) experts of MoE layer l for the sequence's L tokens. Decoding runs token
    t through layer 0, 1, ... before token t + 1, each layer reading its token's k experts."""
    if not indices:
        raise ValueError("indices must hold at least one MoE layer's routing")
    L = indices[0].shape[0]
    if any(t.dim() != 2 or t.shape[0] != L for t in indices):
        raise ValueError("every layer's indices must have shape (L, k) with the same L")
    rows = [t.tolist() for t in indices]
    return [(layer, e) for t in range(L) for layer in range(len(rows)) for e in rows[layer][t]]
