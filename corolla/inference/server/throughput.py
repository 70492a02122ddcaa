"""A server measures its own speed at start, so that clients can route by it.

Two figures, both per block so that spans of different lengths compare:
- `throughput`: tokens/s of a parallel forward (batch 1 x 128 tokens) through one block;
- `step_ms_per_block`: latency of one cached inference step (one token) through one block.
"""

from __future__ import annotations

import time

import torch

from corolla.inference.server.backend import SpanBackend


def measure(backend: SpanBackend, *, tokens: int = 128, repeats: int = 3) -> tuple[float, float]:
    """`(throughput, step_ms_per_block)`; takes well under a second on small spans."""
    start, end = backend.start, backend.start + 1
    hidden = torch.randn(1, tokens, backend.hidden_size) * 0.02
    backend.forward(hidden, start, end)  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        backend.forward(hidden, start, end)
    throughput = tokens * repeats / (time.perf_counter() - began)

    cache = backend.new_cache(start, end, batch_size=1, max_length=repeats * 8 + 1)
    one = hidden[:, :1]
    backend.step(one, cache=cache, position=0, start=start, end=end)  # warm-up
    began = time.perf_counter()
    steps = repeats * 8
    for position in range(1, steps + 1):
        backend.step(one, cache=cache, position=position, start=start, end=end)
    step_ms = (time.perf_counter() - began) * 1000 / steps
    return throughput, step_ms
