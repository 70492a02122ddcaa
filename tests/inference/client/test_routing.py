"""Routing: min-latency chains, load spreading, exponential-backoff bans."""

from __future__ import annotations

import itertools
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.inference.client.routing import BanList, Hop, Router, shortest_chain
from corolla.inference.discovery import ServerRecord
from corolla.inference.errors import InferenceError, RoutingError, ServerUnavailableError, SpanNotServedError


def rec(port: int, start: int, end: int, *, step_ms: float = 1.0, throughput: float = 1000.0) -> ServerRecord:
    now = time.time()
    return ServerRecord(
        node_id="Qm" + "".join("123456789ABCDEFGH"[int(c)] for c in str(port)),
        endpoint=f"127.0.0.1:{port}",
        model_id="m",
        start=start,
        end=end,
        throughput=throughput,
        step_ms_per_block=step_ms,
        free_cache_bytes=1,
        dtype="float32",
        quant=None,
        updated_at=now,
        expires_at=now + 60,
    )


def latency(rtts: dict[int, float]):
    def cost(record: ServerRecord, a: int, b: int) -> float:
        return rtts[int(record.endpoint.rsplit(":", 1)[1])] + record.step_ms_per_block * (b - a)

    return cost


def test_min_latency_prefers_fewer_hops_when_rtt_dominates() -> None:
    records = [rec(1, 0, 4), rec(2, 0, 2), rec(3, 2, 4)]
    chain = shortest_chain(records, 0, 4, latency({1: 5.0, 2: 1.0, 3: 1.0}))
    assert [(h.endpoint, h.start, h.end) for h in chain] == [("127.0.0.1:2", 0, 2), ("127.0.0.1:3", 2, 4)]
    chain = shortest_chain(records, 0, 4, latency({1: 1.5, 2: 1.0, 3: 1.0}))
    assert [(h.endpoint, h.start, h.end) for h in chain] == [("127.0.0.1:1", 0, 4)]


def test_slow_compute_is_avoided() -> None:
    records = [rec(1, 0, 4, step_ms=10.0), rec(2, 0, 4, step_ms=1.0)]
    assert shortest_chain(records, 0, 4, latency({1: 1.0, 2: 1.0}))[0].endpoint == "127.0.0.1:2"


def test_overlapping_spans_are_cut_where_the_next_server_starts() -> None:
    records = [rec(1, 0, 3), rec(2, 2, 6)]
    chain = shortest_chain(records, 0, 6, latency({1: 1.0, 2: 1.0}))
    assert [(h.start, h.end) for h in chain] == [(0, 2), (2, 6)] or [(h.start, h.end) for h in chain] == [
        (0, 3),
        (3, 6),
    ]
    assert chain[0].end == chain[1].start


def test_uncovered_blocks_are_named() -> None:
    with pytest.raises(RoutingError, match="blocks with no server: 2:4"):
        shortest_chain([rec(1, 0, 2), rec(2, 4, 6)], 0, 6, latency({1: 1.0, 2: 1.0}))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 8)), min_size=1, max_size=8), st.integers(0, 10**6))
def test_any_chain_found_is_contiguous_and_within_spans(spans: list[tuple[int, int]], seed: int) -> None:
    records = [rec(100 + i, a, b) for i, (a, b) in enumerate(spans) if a < b]
    rng = random.Random(seed)
    cost = lambda r, a, b: rng.uniform(0.1, 2.0) * (b - a) + 1.0  # noqa: E731
    covered = {i for r in records for i in range(r.start, r.end)}
    if not covered.issuperset(range(8)):
        with pytest.raises(RoutingError):
            shortest_chain(records, 0, 8, cost)
        return
    chain = shortest_chain(records, 0, 8, cost)
    assert chain[0].start == 0 and chain[-1].end == 8
    for hop, nxt in itertools.pairwise(chain):
        assert hop.end == nxt.start
    for hop in chain:
        assert hop.record.start <= hop.start < hop.end <= hop.record.end


def test_bans_back_off_exponentially_and_clear_on_success() -> None:
    now = [0.0]
    bans = BanList(base=1.0, cap=8.0, clock=lambda: now[0])
    assert [bans.ban("a") for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert bans.is_banned("a")
    now[0] = 7.9
    assert bans.is_banned("a")
    now[0] = 8.1
    assert not bans.is_banned("a")
    bans.succeeded("a")
    assert bans.ban("a") == 1.0


def test_router_skips_banned_servers_and_spreads_load() -> None:
    records = [rec(1, 0, 4), rec(2, 0, 4)]
    router = Router(lambda: records, rtt_ms=lambda r: 1.0, rng=random.Random(0))
    router.bans.ban(records[0].node_id)
    assert {router.generation_route(0, 4)[0].endpoint for _ in range(5)} == {"127.0.0.1:2"}
    router.bans.succeeded(records[0].node_id)
    router.begin("127.0.0.1:1")  # one request in flight there: the other replica is cheaper
    assert router.forward_route(0, 4)[0].endpoint == "127.0.0.1:2"
    router.finish("127.0.0.1:1")
    chosen = {router.forward_route(0, 4)[0].endpoint for _ in range(50)}
    assert chosen == {"127.0.0.1:1", "127.0.0.1:2"}, "equal replicas should share the load"


def test_excluded_records_are_dropped_at_each_fetch_and_invalidate_refetches() -> None:
    records = [rec(1, 0, 4), rec(2, 0, 4)]
    fetches = [0]

    def source() -> list[ServerRecord]:
        fetches[0] += 1
        return records

    quarantined: set[str] = set()
    router = Router(source, rtt_ms=lambda r: 1.0, refresh_period=3600, exclude=lambda r: r.node_id in quarantined)
    assert {r.endpoint for r in router.records()} == {"127.0.0.1:1", "127.0.0.1:2"}
    quarantined.add(records[0].node_id)
    assert len(router.records()) == 2, "cached records stay until the next fetch"
    router.invalidate()
    assert [r.endpoint for r in router.records()] == ["127.0.0.1:2"]
    assert fetches[0] == 2
    assert {router.generation_route(0, 4)[0].endpoint for _ in range(5)} == {"127.0.0.1:2"}


def test_a_ban_takes_out_the_node_of_the_record_not_every_record_at_its_endpoint() -> None:
    """A liar's record names an honest server's endpoint: banning the liar leaves the
    honest server's own record (same endpoint, its own node id) routable."""
    honest = rec(1, 0, 4)
    liar = honest.model_copy(update={"node_id": "QmLiar", "end": 4})
    router = Router(lambda: [honest, liar], rtt_ms=lambda r: 1.0)
    router.report_failure(Hop(liar, 0, 4), SpanNotServedError("no"), failures=1, max_retries=4)
    assert router.bans.is_banned("QmLiar")
    assert not router.bans.is_banned(honest.node_id)
    assert router.records() == [honest]
    assert router.generation_route(0, 4)[0].record == honest


def test_misrepresentation_is_reported_to_the_hook_and_plain_failures_are_not() -> None:
    records = [rec(1, 0, 4), rec(2, 0, 4)]
    router = Router(lambda: records, rtt_ms=lambda r: 1.0)
    told: list[tuple[str, type[InferenceError]]] = []
    router.on_misrepresentation = lambda record, exc: told.append((record.node_id, type(exc)))
    router.report_failure(Hop(records[0], 0, 4), ServerUnavailableError("gone"), failures=1, max_retries=4)
    router.report_failure(Hop(records[1], 0, 4), SpanNotServedError("lied"), failures=1, max_retries=4)
    assert told == [(records[1].node_id, SpanNotServedError)]
    assert router.bans.is_banned(records[0].node_id) and router.bans.is_banned(records[1].node_id)

    def broken(record: ServerRecord, exc: InferenceError) -> None:
        raise ValueError("a hook's bug")

    router.on_misrepresentation = broken  # a failing hook does not break routing
    router.report_misrepresentation(records[0], SpanNotServedError("lied"))
    with pytest.raises(RoutingError, match="failed 5 times"):
        router.report_failure(Hop(records[0], 0, 4), SpanNotServedError("lied"), failures=5, max_retries=4)
