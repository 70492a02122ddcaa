"""Expected DHT churn is quiet: departed peers leave the routing table, py-libp2p's
warnings about them go to DEBUG, and every other warning stays a warning."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from corolla.inference.discovery import DhtNode, ServerRecord, _host
from corolla.inference.errors import DiscoveryError


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    """Records that reach a root handler, as `basicConfig` would print them."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    # py-libp2p's "libp2p" logger does not propagate (its records reach stderr through
    # logging.lastResort, which also prints WARNING and above): listen there too.
    loggers = [logging.getLogger(), logging.getLogger("libp2p")]
    for logger in loggers:
        logger.addHandler(handler)
    _host.quiet_stream_eof_warnings()
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def test_warnings_about_departed_peers_are_demoted_to_debug(captured: list[logging.LogRecord]) -> None:
    store = logging.getLogger("libp2p.kad_dht.value_store")
    providers = logging.getLogger("libp2p.kad_dht.provider_store")
    store.warning("Failed to store value at peer 12D3Koo: Peer 12D3Koo recently failed all addresses (negative cache)")
    providers.warning("Error sending ADD_PROVIDER to 12D3Koo: peer ID not found")
    logging.getLogger("libp2p.transport.tcp.tcp").error("Failed to open TCP stream: %s", "connection refused")
    assert captured == []  # the root logger is at WARNING: demoted records are dropped

    store.setLevel(logging.DEBUG)
    try:
        store.warning("Failed to store value at peer 12D3Koo: dial failed")
    finally:
        store.setLevel(logging.NOTSET)
    assert [(r.levelname, r.name) for r in captured] == [("DEBUG", "libp2p.kad_dht.value_store")]


def test_other_warnings_stay_warnings(captured: list[logging.LogRecord]) -> None:
    logging.getLogger("libp2p.kad_dht.value_store").warning("Failed to save value records: disk full")
    logging.getLogger("libp2p.kad_dht.kad_dht").error("Error in DHT maintenance loop: boom")
    logging.getLogger("corolla.inference.discovery._node").warning("Failed to store value at peer X")  # ours
    assert [r.levelname for r in captured] == ["WARNING", "ERROR", "WARNING"]


def test_departed_peer_leaves_the_routing_table() -> None:
    server = DhtNode()
    server.start()
    try:
        client = DhtNode(bootstrap=server.addrs)
        client.start()
        client_id = client.peer_id
        table = server._dht.routing_table  # type: ignore[union-attr]
        client.find_servers("any-model", timeout=1.0)  # the server learns of the client by its requests
        deadline = time.monotonic() + 10.0
        while client_id not in {p.to_base58() for p in table.get_peer_ids()} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client_id in {p.to_base58() for p in table.get_peer_ids()}
        server._call(server._prune_departed)
        assert client_id in {p.to_base58() for p in table.get_peer_ids()}  # alive: stays
        client.stop()
        server._call(server._prune_departed)
        assert client_id not in {p.to_base58() for p in table.get_peer_ids()}
    finally:
        server.stop()


def test_stop_is_prompt_with_peers_and_an_announce_in_flight() -> None:
    """`stop` never waits on the DHT's timeouts: in-flight work gets `LEAVE_GRACE_S`."""
    bootstrap = DhtNode()
    bootstrap.start()
    peers = [DhtNode(bootstrap=bootstrap.addrs) for _ in range(3)]
    try:
        for peer in peers:
            peer.start()
        now = time.time()
        record = ServerRecord(
            node_id=bootstrap.peer_id,
            endpoint="127.0.0.1:50001",
            model_id="test-org/tiny",
            start=0,
            end=4,
            throughput=1.0,
            step_ms_per_block=1.0,
            free_cache_bytes=1,
            dtype="float32",
            quant=None,
            updated_at=now,
            expires_at=now + 60.0,
        )

        def announce() -> None:
            with contextlib.suppress(DiscoveryError):  # cut short by stop: that is the point
                bootstrap.announce(record)

        announcing = threading.Thread(target=announce)
        announcing.start()
        began = time.monotonic()
        bootstrap.stop()
        took = time.monotonic() - began
        announcing.join(5.0)
        assert took < 2.0, f"stop took {took:.2f} s"
        assert not announcing.is_alive()
    finally:
        bootstrap.stop()
        for peer in peers:
            peer.stop()
