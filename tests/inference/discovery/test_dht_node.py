"""DhtNode on loopback: a real py-libp2p swarm of a bootstrap node, servers and a client."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from multiaddr import Multiaddr

from corolla.inference.discovery import DhtNode, ServerRecord
from corolla.inference.errors import DiscoveryError

MODEL = "test-org/tiny-llama"


def make_record(
    node: DhtNode, start: int, *, model_id: str = MODEL, ttl: float = 60.0, **extra: object
) -> ServerRecord:
    now = time.time()
    fields: dict[str, object] = {
        "node_id": node.peer_id,
        "endpoint": f"127.0.0.1:{50000 + start}",
        "model_id": model_id,
        "start": start,
        "end": start + 4,
        "throughput": 100.0 + start,
        "step_ms_per_block": 2.5,
        "free_cache_bytes": 1 << 30,
        "dtype": "bfloat16",
        "quant": None,
        "updated_at": now,
        "expires_at": now + ttl,
    }
    fields.update(extra)
    return ServerRecord(**fields)  # type: ignore[arg-type]


@dataclass
class Swarm:
    bootstrap: DhtNode
    servers: list[DhtNode]
    client: DhtNode


@pytest.fixture
def swarm(make_node: Callable[..., DhtNode]) -> Swarm:
    """A bootstrap node, three servers and a client, all knowing only the bootstrap address."""
    bootstrap = make_node()
    servers = [make_node(bootstrap=bootstrap.addrs) for _ in range(3)]
    client = make_node(bootstrap=bootstrap.addrs)
    return Swarm(bootstrap, servers, client)


def tcp_port(node: DhtNode) -> int:
    return int(Multiaddr(node.addrs[0]).value_for_protocol("tcp"))


def test_client_finds_all_servers_through_one_bootstrap_address(swarm: Swarm) -> None:
    announced = {}
    for i, server in enumerate(swarm.servers):
        record = make_record(server, 4 * i, quant="int8" if i == 1 else None, tls_fingerprint=f"fp{i}")
        server.announce(record)
        announced[server.peer_id] = record

    timings = []
    for _ in range(3):
        began = time.perf_counter()
        found = swarm.client.find_servers(MODEL)
        timings.append(time.perf_counter() - began)
        assert {r.node_id: r for r in found} == announced
    assert [r.start for r in found] == [0, 4, 8]  # sorted by span
    assert min(timings) < 1.0, timings
    # Any member can answer, not only the client, including a server about itself.
    assert {r.node_id for r in swarm.servers[0].find_servers(MODEL)} == set(announced)
    assert swarm.client.find_servers("another/model") == []


def test_refreshed_record_replaces_the_old_one(swarm: Swarm) -> None:
    server = swarm.servers[0]
    server.announce(make_record(server, 0, free_cache_bytes=10))
    assert [r.free_cache_bytes for r in swarm.client.find_servers(MODEL)] == [10]
    time.sleep(0.01)
    server.announce(make_record(server, 0, free_cache_bytes=20))
    # py-libp2p's get_value would answer from the client's local copy; we must not.
    assert [r.free_cache_bytes for r in swarm.client.find_servers(MODEL)] == [20]


def test_server_that_stops_refreshing_disappears_after_expiry(swarm: Swarm) -> None:
    model, ttl = "expiry/model", 3.0
    stop_refreshing = threading.Event()
    errors: list[BaseException] = []

    def refresh(server: DhtNode, start: int) -> None:
        try:
            while not stop_refreshing.is_set():
                server.announce(make_record(server, start, model_id=model, ttl=ttl))
                stop_refreshing.wait(0.5)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    quitter = swarm.servers[2]
    quitter.announce(make_record(quitter, 8, model_id=model, ttl=ttl))
    refreshers = [threading.Thread(target=refresh, args=(s, 4 * i)) for i, s in enumerate(swarm.servers[:2])]
    for thread in refreshers:
        thread.start()
    try:
        time.sleep(0.3)
        assert len(swarm.client.find_servers(model)) == 3
        time.sleep(ttl + 0.5)
        remaining = swarm.client.find_servers(model)
    finally:
        stop_refreshing.set()
        for thread in refreshers:
            thread.join(10)
    assert not errors
    assert sorted(r.node_id for r in remaining) == sorted(s.peer_id for s in swarm.servers[:2])
    assert all(r.expires_at > time.time() - 1 for r in remaining)


def test_withdrawn_server_is_no_longer_found(swarm: Swarm) -> None:
    for i, server in enumerate(swarm.servers):
        server.announce(make_record(server, 4 * i))
    assert len(swarm.client.find_servers(MODEL)) == 3
    swarm.servers[1].withdraw(MODEL)
    swarm.servers[1].withdraw("never/announced")  # no-op
    found = swarm.client.find_servers(MODEL)
    assert sorted(r.node_id for r in found) == sorted([swarm.servers[0].peer_id, swarm.servers[2].peer_id])


def test_records_of_a_stopped_server_are_read_from_replicas(swarm: Swarm) -> None:
    gone = swarm.servers[0]
    gone.announce(make_record(gone, 0))
    gone.stop()
    began = time.perf_counter()
    found = swarm.client.find_servers(MODEL, timeout=5.0)
    # Still unexpired, so still listed; the caller's routing bans it if it fails.
    assert [r.node_id for r in found] == [gone.peer_id]
    assert time.perf_counter() - began < 4.0


def test_announce_refuses_records_it_cannot_vouch_for(swarm: Swarm) -> None:
    server, other = swarm.servers[0], swarm.servers[1]
    with pytest.raises(DiscoveryError, match="not this node's peer id"):
        server.announce(make_record(other, 0))
    with pytest.raises(DiscoveryError, match="expired"):
        server.announce(make_record(server, 0, updated_at=time.time() - 10, expires_at=time.time() - 5))


def test_garbage_on_the_libp2p_port_does_not_hurt_the_node(swarm: Swarm) -> None:
    target = swarm.bootstrap
    server = swarm.servers[0]
    server.announce(make_record(server, 0))
    payloads = [
        os.urandom(4096),
        b"/multistream/1.0.0\n" + os.urandom(512),
        b"\x13/multistream/1.0.0\n\xff\xff\xff\xff\x0f" + b"A" * 1024,  # absurd length prefix
        b"",
    ]
    for payload in payloads:
        # the node may hang up at any point (that is the point): its closing first is fine
        with (
            socket.create_connection(("127.0.0.1", tcp_port(target)), timeout=5) as sock,
            contextlib.suppress(OSError),  # broken pipe, reset, not connected, timeout
        ):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2)
            while sock.recv(4096):
                pass
    assert [r.node_id for r in target.find_servers(MODEL)] == [server.peer_id]
    assert [r.node_id for r in swarm.client.find_servers(MODEL)] == [server.peer_id]


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("not-a-multiaddr", "bad bootstrap address"),
        ("/ip4/127.0.0.1/tcp/4001", "bad bootstrap address"),  # no /p2p/ part
        ("/ip4/127.0.0.1/udp/4001/p2p/12D3KooWAK671rQ7CKTLqLXvSWvYmk1vtvSsvCwuAcs5U7qPe6yA", "not a TCP"),
    ],
)
def test_malformed_bootstrap_address_is_reported(address: str, message: str) -> None:
    node = DhtNode(bootstrap=[address])
    with pytest.raises(DiscoveryError, match=message):
        node.start()
    node.stop()


def test_unreachable_bootstrap_is_reported() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWAK671rQ7CKTLqLXvSWvYmk1vtvSsvCwuAcs5U7qPe6yA"
    node = DhtNode(bootstrap=[address], start_timeout=10)
    began = time.perf_counter()
    with pytest.raises(DiscoveryError, match="cannot reach any DHT bootstrap peer") as info:
        node.start()
    assert str(port) in str(info.value)
    assert time.perf_counter() - began < 10
    node.stop()


def test_bad_listen_settings_are_reported() -> None:
    with pytest.raises(DiscoveryError, match="IP address"):
        DhtNode(host="localhost").start()
    with pytest.raises(DiscoveryError, match="bootstrap must be a sequence"):
        DhtNode(bootstrap="/ip4/127.0.0.1/tcp/1/p2p/x")


def test_lifecycle(make_node: Callable[..., DhtNode]) -> None:
    node = DhtNode()
    peer_id = node.peer_id  # known before start
    with pytest.raises(DiscoveryError, match="start"):
        node.find_servers(MODEL)
    with node:
        assert node.addrs and all(a.endswith(f"/p2p/{peer_id}") for a in node.addrs)
        assert node.find_servers(MODEL) == []  # alone in the swarm: nothing, no error
        node.announce(make_record(node, 0))
        assert [r.node_id for r in node.find_servers(MODEL)] == [peer_id]
        with pytest.raises(DiscoveryError, match="cannot be started"):
            node.start()
    node.stop()  # idempotent
    with pytest.raises(DiscoveryError, match="stopped"):
        node.announce(make_record(node, 0))
    assert not [
        t
        for t in threading.enumerate()
        if t.name.startswith("corolla-dht") and t.is_alive() and t.name.endswith(peer_id[-6:])
    ]


def test_wildcard_listener_advertises_dialable_addresses(make_node: Callable[..., DhtNode]) -> None:
    bootstrap = make_node(host="0.0.0.0")
    assert bootstrap.addrs and not any("/0.0.0.0/" in a for a in bootstrap.addrs)
    server = make_node(bootstrap=bootstrap.addrs[:1])
    server.announce(make_record(server, 0))
    client = make_node(bootstrap=bootstrap.addrs[:1])
    assert [r.node_id for r in client.find_servers(MODEL)] == [server.peer_id]
