"""Expected DHT churn is quiet: departed peers leave the routing table, py-libp2p's
warnings about them go to DEBUG, and every other warning stays a warning."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from corolla.inference.discovery import DhtNode, _host


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    """Records that reach a root handler, as `basicConfig` would print them."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    root = logging.getLogger()
    root.addHandler(handler)
    _host.quiet_stream_eof_warnings()
    yield records
    root.removeHandler(handler)


def test_warnings_about_departed_peers_are_demoted_to_debug(captured: list[logging.LogRecord]) -> None:
    store = logging.getLogger("libp2p.kad_dht.value_store")
    providers = logging.getLogger("libp2p.kad_dht.provider_store")
    store.warning("Failed to store value at peer 12D3Koo: Peer 12D3Koo recently failed all addresses (negative cache)")
    providers.warning("Error sending ADD_PROVIDER to 12D3Koo: peer ID not found")
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
        assert client_id in {p.to_base58() for p in table.get_peer_ids()}
        server._call(server._prune_departed)
        assert client_id in {p.to_base58() for p in table.get_peer_ids()}  # alive: stays
        client.stop()
        server._call(server._prune_departed)
        assert client_id not in {p.to_base58() for p in table.get_peer_ids()}
    finally:
        server.stop()
