"""Which blocks a server should serve when the operator does not say (`--blocks`).

As in Petals: add up the announced throughput of the live servers per block, and take
the window of `length` blocks whose weakest block is weakest (ties: the least total
throughput, then the lowest start), so that a new server strengthens the bottleneck.
"""

from __future__ import annotations

from collections.abc import Iterable

from corolla.inference.discovery import ServerRecord


def block_throughputs(records: Iterable[ServerRecord], num_blocks: int) -> list[float]:
    totals = [0.0] * num_blocks
    for record in records:
        for index in range(max(record.start, 0), min(record.end, num_blocks)):
            totals[index] += record.throughput
    return totals


def choose_span(records: Iterable[ServerRecord], *, num_blocks: int, length: int) -> tuple[int, int]:
    length = max(1, min(length, num_blocks))
    totals = block_throughputs(records, num_blocks)
    best = min(
        range(num_blocks - length + 1),
        key=lambda s: (min(totals[s : s + length]), sum(totals[s : s + length]), s),
    )
    return best, best + length
