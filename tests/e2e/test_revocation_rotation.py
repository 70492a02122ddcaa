"""Revocation rotates the DHT's pre-shared key: a revoked member is shut out of discovery.

The CA revokes a site; the remaining members get the next swarm key epoch, the revoked
site keeps the old key. Real DHT nodes on loopback show that the old key can no longer
connect to (or read records from) members holding the new one, while those members
still find each other's records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corolla.inference.discovery import DhtNode, ServerRecord
from corolla.inference.errors import DiscoveryError
from corolla.pki import ConsortiumCA, NodeIdentity, WorkspaceError, _x509

pytestmark = pytest.mark.e2e

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "swarm_key.json"
MODEL = "test-org/tiny-llama"


@pytest.fixture
def consortium(tmp_path: Path) -> ConsortiumCA:
    ca = ConsortiumCA.init(tmp_path, consortium="rotation-test")
    for name in ("server-a", "server-b"):
        ca.issue(name, "server")
    ca.issue("site-x", "site")
    return ca


def _member(make_node: Callable[..., DhtNode], identity: NodeIdentity, **kwargs: object) -> DhtNode:
    """A DHT node with a member's libp2p key and its current swarm key."""
    return make_node(key_pair=identity.libp2p_key_pair(), psk=identity.swarm_key, start_timeout=8.0, **kwargs)


def _record(node: DhtNode) -> ServerRecord:
    now = time.time()
    return ServerRecord(
        node_id=node.peer_id,
        endpoint="127.0.0.1:50001",
        model_id=MODEL,
        start=0,
        end=4,
        throughput=100.0,
        step_ms_per_block=2.5,
        free_cache_bytes=1 << 30,
        dtype="float32",
        quant=None,
        updated_at=now,
        expires_at=now + 60.0,
    )


def test_epoch_zero_keeps_the_known_answer_vectors() -> None:
    for vector in json.loads(VECTORS.read_text())["vectors"]:
        secret = bytes.fromhex(vector["consortium_secret"])
        assert _x509.derive_swarm_key(secret).hex() == vector["swarm_key"]
        assert _x509.derive_swarm_key(secret, 0).hex() == vector["swarm_key"]
        later = {_x509.derive_swarm_key(secret, epoch) for epoch in (1, 2, 3)}
        assert len(later) == 3 and bytes.fromhex(vector["swarm_key"]) not in later
    with pytest.raises(ValueError, match="epoch"):
        _x509.derive_swarm_key(b"\0" * 32, -1)


def test_revoking_gives_the_remaining_members_a_new_epoch(consortium: ConsortiumCA) -> None:
    before = {name: consortium.node(name) for name in ("server-a", "server-b", "site-x")}
    assert consortium.swarm_epoch == 0
    assert {n.swarm_epoch for n in before.values()} == {0}
    old_key = before["site-x"].swarm_key
    assert {n.swarm_key for n in before.values()} == {old_key}

    consortium.revoke("site-x")

    assert consortium.swarm_epoch == 1
    a, b, x = (consortium.node(name) for name in ("server-a", "server-b", "site-x"))
    assert a.swarm_epoch == b.swarm_epoch == 1
    assert a.swarm_key == b.swarm_key != old_key
    assert (x.swarm_epoch, x.swarm_key) == (0, old_key)  # the revoked node gets nothing new
    epoch_1_key = a.swarm_key  # NodeIdentity reads the file each time: keep the bytes
    # Revoking the same node again re-signs the CRL but does not rotate again.
    consortium.revoke("site-x")
    assert consortium.swarm_epoch == 1 and consortium.node("server-a").swarm_key == epoch_1_key
    # A node issued after the rotation starts in the current epoch.
    late = consortium.issue("server-c", "server")
    assert (late.swarm_epoch, late.swarm_key) == (1, epoch_1_key)
    consortium.revoke("server-b")
    assert consortium.swarm_epoch == 2
    assert consortium.node("server-a").swarm_key == consortium.node("server-c").swarm_key != epoch_1_key
    assert consortium.node("server-b").swarm_key == epoch_1_key


def test_a_corrupt_epoch_file_is_reported(consortium: ConsortiumCA) -> None:
    (consortium.dir / "swarm.epoch").write_text("one\n")
    with pytest.raises(WorkspaceError, match=r"swarm\.epoch.*integer"):
        _ = consortium.swarm_epoch


def test_old_epoch_key_cannot_reach_the_dht(consortium: ConsortiumCA, make_node: Callable[..., DhtNode]) -> None:
    revoked = consortium.node("site-x")  # what the revoked site holds: its epoch-0 key
    consortium.revoke("site-x")
    server_a = _member(make_node, consortium.node("server-a"))
    server_b = _member(make_node, consortium.node("server-b"), bootstrap=server_a.addrs)
    server_b.announce(_record(server_b))

    # A current member still reads the swarm ...
    found = server_a.find_servers(MODEL, timeout=5.0)
    assert [r.node_id for r in found] == [server_b.peer_id]

    # ... the revoked site, with the old key, cannot even connect to it.
    stale = DhtNode(key_pair=revoked.libp2p_key_pair(), psk=revoked.swarm_key, bootstrap=server_a.addrs)
    try:
        with pytest.raises(DiscoveryError, match="cannot reach any DHT bootstrap peer"):
            stale.start()
    finally:
        stale.stop()
    # Nor can any old-key node, whichever member it dials.
    outsider = DhtNode(psk=revoked.swarm_key, bootstrap=[*server_a.addrs, *server_b.addrs])
    try:
        with pytest.raises(DiscoveryError, match="cannot reach any DHT bootstrap peer"):
            outsider.start()
    finally:
        outsider.stop()
    # The members are unharmed by the attempts.
    assert [r.node_id for r in server_a.find_servers(MODEL, timeout=5.0)] == [server_b.peer_id]
