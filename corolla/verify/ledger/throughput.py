"""How fast a ledger appends, reads back and verifies: the figures a benchmark reports.

Kept out of `store.py` (no benchmark logic in the ledger itself) and free of event
generation: the caller brings the events, so that a benchmark measures its own workload.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corolla.verify.errors import LedgerError
from corolla.verify.ledger.signing import LedgerPublicKey
from corolla.verify.ledger.store import AnyEvent, Ledger

__all__ = ["Throughput", "measure_throughput"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Throughput:
    """Events per second for each operation, over `events` events appended in batches of `batch`."""

    events: int
    batch: int
    append_per_s: float  # one transaction (lock, insert, signed head) per batch
    read_per_s: float  # `Ledger.events()`, parsing every body
    verify_per_s: float  # `Ledger.verify()`, the whole chain from seq 1


def measure_throughput(
    ledger: Ledger,
    events: Sequence[AnyEvent],
    public_key: LedgerPublicKey,
    *,
    batch: int = 100,
    clock: Callable[[], float] = time.perf_counter,
) -> Throughput:
    """Append `events` (new to the ledger) in batches, then read and verify the whole ledger.

    Read and verify rates are per event in the ledger, which may hold more than `events`.
    """
    if batch < 1:
        raise LedgerError(f"batch must be >= 1, got {batch}")
    if not events:
        raise LedgerError("measure_throughput needs at least one event")
    start = clock()
    for i in range(0, len(events), batch):
        ledger.append(events[i : i + batch])
    appended = clock()
    read = sum(1 for _ in ledger.events())
    was_read = clock()
    verified = ledger.verify(public_key).events
    done = clock()
    return Throughput(
        events=len(events),
        batch=batch,
        append_per_s=len(events) / max(appended - start, 1e-9),
        read_per_s=read / max(was_read - appended, 1e-9),
        verify_per_s=verified / max(done - was_read, 1e-9),
    )
