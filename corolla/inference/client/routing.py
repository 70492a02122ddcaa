"""Choosing servers: a chain of spans that covers the blocks a client needs.

- Generation takes the min-latency chain: a shortest path over block boundaries where
  a hop through a server costs its measured round trip plus its announced per-block
  step time for the blocks it computes.
- Parallel forward/backward spreads load: the per-block cost is the inverse of the
  announced throughput, scaled by the requests this client already has in flight
  there, with a little jitter so that equal replicas share the work.
- A server that fails is banned with exponential backoff; success clears its record.
  Bans are keyed on the node id of the record that was routed to, never on an endpoint:
  a member's record may name any address, and a lie about another node's endpoint must
  cost the liar, not the node that really serves there.
- A server that misrepresented itself (`MISREPRESENTATION`: it does not serve the span or
  the model its record claims, or its certificate is not its record's node) is banned
  like a failure, and `on_misrepresentation` (a hook for a reputation book) is told.
- Records an `exclude` predicate rejects (nodes the ledger or this client's spot checker
  quarantined) are dropped whenever the records are fetched; `invalidate()` makes the next
  route fetch again, so a quarantine takes effect on this client's very next route.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from corolla.inference.discovery import ServerRecord
from corolla.inference.errors import AccessDeniedError, InferenceError, RemoteError, RoutingError, SpanNotServedError

log = logging.getLogger(__name__)

# A server's answer that contradicts its own record (blocks it does not hold, another model)
# or a certificate that is not its record's node: the record lied, and a replica serves instead.
MISREPRESENTATION: tuple[type[InferenceError], ...] = (SpanNotServedError, AccessDeniedError)
# What a client retries on another server: unreachable or faulty servers, and liars.
FAILOVER: tuple[type[InferenceError], ...] = (RemoteError, SpanNotServedError)


@dataclass(frozen=True, slots=True)
class Hop:
    """Blocks `[start, end)` computed by the server of `record`."""

    record: ServerRecord
    start: int
    end: int

    @property
    def endpoint(self) -> str:
        return self.record.endpoint

    @property
    def node_id(self) -> str:
        return self.record.node_id


class BanList:
    """Exponential backoff per node id: `base * 2**(failures-1)` seconds, at most `cap`."""

    def __init__(self, *, base: float = 1.0, cap: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.base = base
        self.cap = cap
        self.clock = clock
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def ban(self, node_id: str) -> float:
        with self._lock:
            failures = self._failures.get(node_id, 0) + 1
            self._failures[node_id] = failures
            duration = min(self.cap, self.base * 2 ** (failures - 1))
            self._until[node_id] = self.clock() + duration
            return duration

    def succeeded(self, node_id: str) -> None:
        with self._lock:
            self._failures.pop(node_id, None)
            self._until.pop(node_id, None)

    def is_banned(self, node_id: str) -> bool:
        with self._lock:
            return self._until.get(node_id, 0.0) > self.clock()


def shortest_chain(
    records: Sequence[ServerRecord],
    start: int,
    end: int,
    hop_cost: Callable[[ServerRecord, int, int], float],
) -> list[Hop]:
    """Dijkstra over block boundaries `start..end`: from boundary `s` a server holding
    block `s` can take the chain to any boundary up to the end of its span."""
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, Hop] = {}
    frontier = [(0.0, start)]
    starts = {r.start for r in records}
    while frontier:
        cost, at = heapq.heappop(frontier)
        if at == end:
            break
        if cost > best.get(at, float("inf")):
            continue
        for record in records:
            if not record.start <= at < record.end:
                continue
            stop = min(record.end, end)
            for nxt in range(at + 1, stop + 1):
                if nxt != stop and nxt not in starts:
                    continue  # only stop early where another server can take over
                total = cost + hop_cost(record, at, nxt)
                if total < best.get(nxt, float("inf")):
                    best[nxt] = total
                    came_from[nxt] = Hop(record, at, nxt)
                    heapq.heappush(frontier, (total, nxt))
    if end not in came_from and start != end:
        covered = sorted({i for r in records for i in range(r.start, r.end)})
        missing = [i for i in range(start, end) if i not in covered]
        raise RoutingError(
            f"no chain of live servers covers blocks {start}:{end}"
            + (f"; blocks with no server: {block_ranges(missing)}" if missing else "")
        )
    chain: list[Hop] = []
    at = end
    while at != start:
        hop = came_from[at]
        chain.append(hop)
        at = hop.start
    return chain[::-1]


class Router:
    """Routes over the servers a `source` reports, minus banned and excluded ones."""

    def __init__(
        self,
        source: Callable[[], list[ServerRecord]],
        *,
        rtt_ms: Callable[[ServerRecord], float],
        bans: BanList | None = None,
        refresh_period: float = 5.0,
        rng: random.Random | None = None,
        jitter: float = 0.1,
        exclude: Callable[[ServerRecord], bool] | None = None,
    ) -> None:
        self._source = source
        self._rtt_ms = rtt_ms
        self.bans = bans or BanList()
        self.refresh_period = refresh_period
        self._rng = rng or random.Random()
        self.jitter = jitter  # +-fraction of random cost noise, so equal replicas share load
        self.exclude = exclude  # True for records never to route to (e.g. quarantined nodes); asked at each fetch
        # told of each record whose server contradicted it (after the ban); e.g. a reputation book's entry
        self.on_misrepresentation: Callable[[ServerRecord, InferenceError], None] | None = None
        self._records: list[ServerRecord] = []
        self._fetched_at = -float("inf")
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    def records(self, *, refresh: bool = False) -> list[ServerRecord]:
        with self._lock:
            stale = time.monotonic() - self._fetched_at > self.refresh_period
            if refresh or stale:
                exclude = self.exclude
                self._records = [r for r in self._source() if exclude is None or not exclude(r)]
                self._fetched_at = time.monotonic()
            return [r for r in self._records if not self.bans.is_banned(r.node_id)]

    def invalidate(self) -> None:
        """Forget the fetched records: the next route fetches (and filters) them again."""
        with self._lock:
            self._fetched_at = -float("inf")

    def generation_route(self, start: int, end: int) -> list[Hop]:
        def cost(record: ServerRecord, a: int, b: int) -> float:
            return self._rtt_ms(record) + record.step_ms_per_block * (b - a)

        return self._route(start, end, cost)

    def forward_route(self, start: int, end: int) -> list[Hop]:
        def cost(record: ServerRecord, a: int, b: int) -> float:
            load = 1 + self._in_flight.get(record.endpoint, 0)
            per_block = 1000.0 / max(record.throughput, 1e-6)
            noise = self._rng.uniform(1 - self.jitter, 1 + self.jitter)
            return (per_block * (b - a) * load + self._rtt_ms(record)) * noise

        return self._route(start, end, cost)

    def _route(self, start: int, end: int, cost: Callable[[ServerRecord, int, int], float]) -> list[Hop]:
        try:
            return shortest_chain(self.records(), start, end, cost)
        except RoutingError:
            return shortest_chain(self.records(refresh=True), start, end, cost)

    def report_failure(self, hop: Hop, exc: Exception, *, failures: int, max_retries: int) -> None:
        """Ban the node of the hop's record (exponential backoff) and log it; a record the
        server contradicted is also reported as misrepresentation. After more than
        `max_retries` failures of one request, give up with `RoutingError`."""
        if isinstance(exc, MISREPRESENTATION):
            self.report_misrepresentation(hop.record, exc)
        else:
            duration = self.bans.ban(hop.node_id)
            log.warning(
                "server %s (node %s) failed on blocks %d:%d (%s); banned for %.1f s",
                hop.endpoint,
                hop.node_id,
                hop.start,
                hop.end,
                exc,
                duration,
            )
        if failures > max_retries:
            raise RoutingError(f"blocks {hop.start}:{hop.end} failed {failures} times; last error: {exc}") from exc

    def report_misrepresentation(self, record: ServerRecord, exc: InferenceError) -> None:
        """The server behind `record` is not what the record says: ban the record's node
        (whoever signed it), never the endpoint it names, and tell `on_misrepresentation`."""
        duration = self.bans.ban(record.node_id)
        log.warning(
            "node %s misrepresented itself in its record (%s, blocks %d:%d): %s; banned for %.1f s",
            record.node_id,
            record.endpoint,
            record.start,
            record.end,
            exc,
            duration,
        )
        hook = self.on_misrepresentation
        if hook is not None:
            try:
                hook(record, exc)
            except Exception:  # a reporting hook must not break routing
                log.exception("on_misrepresentation hook failed")

    def begin(self, endpoint: str) -> None:
        with self._lock:
            self._in_flight[endpoint] = self._in_flight.get(endpoint, 0) + 1

    def finish(self, endpoint: str) -> None:
        with self._lock:
            self._in_flight[endpoint] = max(0, self._in_flight.get(endpoint, 0) - 1)


def block_ranges(indices: list[int]) -> str:
    """Sorted block indices as `start:end` ranges, e.g. [2, 3, 5] -> "2:4, 5:6"."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return ", ".join(f"{a}:{b}" for a, b in out)
