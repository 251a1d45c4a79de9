"""Interleaved CUDA-event timing for the GPU benchmarks (bench_triton, gpu_check)."""

from __future__ import annotations

import random

import torch


def time_interleaved(runners: dict, repeats: int, iters: int, seed: int,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per call of each runner (CUDA events); variants shuffled every repeat."""
    for run in runners.values():  # warm-up: compiles the kernels, fills the allocator
        for _ in range(warmup):
            run()
    torch.cuda.synchronize()
    samples = {name: [] for name in runners}
    order = list(runners)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                runners[name]()
            end.record()
            torch.cuda.synchronize()
            samples[name].append(start.elapsed_time(end) / iters)
    return samples
