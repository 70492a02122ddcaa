"""Only consortium members get in.

Certified servers (real `platform serve` processes) serve blocks 0:2 and 2:4. Five
rogue servers join the same DHT, each offering all four blocks in one hop (a route any
client would prefer): one with a self-signed certificate, one signed by another CA,
one expired, one revoked, one with the wrong role (a site's). The rogues hold the
consortium's DHT key (a leaked pre-shared key), so their records do reach the DHT;
the test shows they are there, and that a member ignores them, refuses their
connections and routes nothing to them, while the certified servers keep serving.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from transformers import AutoModelForCausalLM

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.client.transport import ServerStub
from corolla.inference.discovery import DhtNode
from corolla.inference.errors import AccessDeniedError, ServerUnavailableError
from corolla.inference.security import TlsConfig
from corolla.inference.server import BlockServer, ServerConfig
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.pki import ConsortiumCA, NodeIdentity, Verifier
from corolla.pki.identity import node_id_from_public
from corolla.platform.launch.servers import LocalServers

pytestmark = pytest.mark.e2e

ROGUES = ("self-signed", "other-ca", "expired", "revoked", "wrong-role")


def _pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _self_signed_node(directory: Path, swarm_key: bytes) -> None:
    """A node directory whose certificates sign themselves (no CA at all)."""
    directory.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)
    identity_key, tls_key = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    raw = identity_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    node_id = node_id_from_public(raw)

    def cert(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey, dns: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed")])
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"urn:corolla:node:{node_id}"),
            x509.UniformResourceIdentifier("urn:corolla:role:server"),
        ]
        if dns:
            sans.append(x509.DNSName(node_id.lower() + ".node.corolla"))
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        )
        return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())

    identity, tls = cert(identity_key, dns=False), cert(tls_key, dns=True)
    files = {
        "node.key": _pem(identity_key),
        "tls.key": _pem(tls_key),
        "node.pem": identity.public_bytes(serialization.Encoding.PEM),
        "tls.pem": tls.public_bytes(serialization.Encoding.PEM),
        "ca.pem": identity.public_bytes(serialization.Encoding.PEM) + tls.public_bytes(serialization.Encoding.PEM),
        "swarm.key": swarm_key.hex().encode(),
        "crl.pem": b"",  # no CA, no revocation list: the file only completes the layout
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("members")
    ca = ConsortiumCA.init(root / "ws", consortium="members")
    rogue_dirs: dict[str, Path] = {"revoked": ca.issue("revoked", "server").directory}
    ca.revoke("revoked")  # rotates the swarm key: every node issued from now on holds the new epoch's
    nodes = {name: ca.issue(name, "server") for name in ("server-0", "server-1", "bootstrap")}
    nodes["site"] = ca.issue("site", "site")
    swarm_key = nodes["site"].swarm_key
    # Each rogue holds the current swarm key (leaked to it by a member), so its records reach the DHT.
    (rogue_dirs["revoked"] / "swarm.key").write_bytes(swarm_key.hex().encode())
    (rogue_dirs["revoked"] / "swarm.epoch").write_bytes((nodes["site"].directory / "swarm.epoch").read_bytes())
    _self_signed_node(root / "self-signed", swarm_key)
    rogue_dirs["self-signed"] = root / "self-signed"
    other = ConsortiumCA.init(root / "other-ws", consortium="members").issue("other-ca", "server")
    (other.directory / "swarm.key").write_bytes(swarm_key.hex().encode())  # the leaked key
    rogue_dirs["other-ca"] = other.directory
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    rogue_dirs["expired"] = ca.issue("expired", "server", days=1, now=past).directory
    rogue_dirs["wrong-role"] = ca.issue("wrong-role", "site").directory
    return {"ca": ca, "nodes": nodes, "rogues": rogue_dirs, "root": root}


class _Rogue:
    """An in-process rogue server (the CLI would refuse some of these identities) that
    counts every request that reaches its blocks."""

    def __init__(self, model: Path, directory: Path, bootstrap: str) -> None:
        identity = NodeIdentity.load(directory)
        self.tls = TlsConfig(identity=identity, verifier=Verifier(identity.ca_pem))
        self.server = BlockServer(
            ServerConfig(model=model, blocks=(0, 4), bootstrap=(bootstrap,), tls=self.tls, announce_ttl=30.0)
        ).start()
        self.calls = 0
        backend = self.server.backend
        for method in ("forward", "backward", "step"):
            original = getattr(backend, method)

            def counted(*args: object, _original: object = original, **kwargs: object) -> object:
                self.calls += 1
                return _original(*args, **kwargs)  # type: ignore[operator]

            setattr(backend, method, counted)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint


@pytest.fixture(scope="module")
def swarm(consortium: dict[str, object], tiny_llama: Path) -> Iterator[dict[str, object]]:
    ca: ConsortiumCA = consortium["ca"]  # type: ignore[assignment]
    nodes: dict[str, NodeIdentity] = consortium["nodes"]  # type: ignore[assignment]
    with LocalServers(
        tiny_llama, [(0, 2), (2, 4)], torch_threads=1, workspace=ca.workspace, nodes=["server-0", "server-1"]
    ) as local:
        bootstrap = local.initial_peers[0]
        rogues = {name: _Rogue(tiny_llama, directory, bootstrap) for name, directory in consortium["rogues"].items()}  # type: ignore[union-attr]
        try:
            yield {"local": local, "bootstrap": bootstrap, "rogues": rogues, "site": TlsConfig.for_node(nodes["site"])}
        finally:
            for rogue in rogues.values():
                rogue.server.stop(grace=0)


def test_rogue_records_reach_the_dht_but_members_ignore_them(swarm: dict[str, object], tiny_llama: Path) -> None:
    rogues: dict[str, _Rogue] = swarm["rogues"]  # type: ignore[assignment]
    local: LocalServers = swarm["local"]  # type: ignore[assignment]
    site: TlsConfig = swarm["site"]  # type: ignore[assignment]
    model_id = next(iter(rogues.values())).server.backend.model_id
    deadline = time.time() + 20
    with DhtNode(bootstrap=[swarm["bootstrap"]], psk=site.identity.swarm_key) as unfiltered:
        while True:  # an outsider with the key sees everything that was announced
            everything = {r.endpoint for r in unfiltered.find_servers(model_id)}
            if everything >= {r.endpoint for r in rogues.values()} | set(local.endpoints) or time.time() > deadline:
                break
            time.sleep(0.5)
    assert everything >= {r.endpoint for r in rogues.values()}, "rogue records never reached the DHT"
    assert {r.endpoint for r in _view(swarm, model_id, site.record_filter)} == set(local.endpoints)


@pytest.mark.parametrize("rogue", ROGUES)
def test_member_refuses_rogue_connections(swarm: dict[str, object], rogue: str) -> None:
    site: TlsConfig = swarm["site"]  # type: ignore[assignment]
    endpoint = swarm["rogues"][rogue].endpoint  # type: ignore[index]
    with pytest.raises(AccessDeniedError):
        site.verify_server(endpoint)


def test_generation_routes_nothing_to_rogues(swarm: dict[str, object], tiny_llama: Path) -> None:
    rogues: dict[str, _Rogue] = swarm["rogues"]  # type: ignore[assignment]
    local: LocalServers = swarm["local"]  # type: ignore[assignment]
    prompt = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(12))
    want = (
        AutoModelForCausalLM.from_pretrained(tiny_llama)
        .eval()
        .generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=None)
    )
    with RemoteModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[swarm["bootstrap"]], tls=swarm["site"]
    ) as model:  # type: ignore[arg-type]
        records = model.swarm.router.records(refresh=True)
        assert {r.endpoint for r in records} == set(local.endpoints)
        assert torch.equal(model.generate(prompt, max_new_tokens=12, eos_token_id=None), want)
        with torch.no_grad():
            model(prompt)
        for endpoint in (r.endpoint for r in rogues.values()):  # even when named directly
            with pytest.raises(AccessDeniedError):
                model.swarm.stub(endpoint)
    assert {name: rogue.calls for name, rogue in rogues.items()} == dict.fromkeys(ROGUES, 0)


def test_forged_record_with_a_stolen_certificate_is_ignored(swarm: dict[str, object], tiny_llama: Path) -> None:
    """A rogue announces under its own key a record carrying a member's certificate and
    TLS fingerprint: the certificate's key is not the signer's, so it is ignored."""
    site: TlsConfig = swarm["site"]  # type: ignore[assignment]
    local: LocalServers = swarm["local"]  # type: ignore[assignment]
    rogue = swarm["rogues"]["wrong-role"]  # type: ignore[index]
    model_id = rogue.server.backend.model_id
    genuine = next(r for r in _view(swarm, model_id, None) if r.endpoint == local.endpoints[0])
    with DhtNode(bootstrap=[swarm["bootstrap"]], psk=site.identity.swarm_key) as forger:
        now = time.time()
        forged = genuine.model_copy(
            update={"node_id": forger.peer_id, "endpoint": rogue.endpoint, "updated_at": now, "expires_at": now + 30}
        )
        forger.announce(forged)
        assert site.record_filter(forged) is not None
        time.sleep(1.0)
        everything = {(r.node_id, r.endpoint) for r in _view(swarm, model_id, None)}
        seen = {(r.node_id, r.endpoint) for r in _view(swarm, model_id, site.record_filter)}
    assert (forger.peer_id, rogue.endpoint) in everything, "the forged record never reached the DHT"
    assert (forger.peer_id, rogue.endpoint) not in seen
    assert (genuine.node_id, genuine.endpoint) in seen


def test_a_revoked_members_fresh_records_are_ignored(consortium: dict[str, object], swarm: dict[str, object]) -> None:
    """A record that was valid when written is ignored once the node is revoked: the
    node keeps re-announcing (replaying) it, correctly signed, and it does not count."""
    rogue = swarm["rogues"]["revoked"]  # type: ignore[index]
    site: TlsConfig = swarm["site"]  # type: ignore[assignment]
    record = rogue.server.record()
    assert record.certificate is not None
    rogue.server.announce()
    reason = site.record_filter(record)
    assert reason is not None and "revoked" in reason
    der = base64.b64decode(record.certificate)
    unrevoked = NodeIdentity.load(consortium["ca"].workspace / "nodes" / "revoked")  # type: ignore[union-attr]
    assert unrevoked.identity_cert_der == der  # the same, once-valid certificate


def test_revoked_and_uncertified_clients_are_refused(consortium: dict[str, object], swarm: dict[str, object]) -> None:
    local: LocalServers = swarm["local"]  # type: ignore[assignment]
    site: TlsConfig = swarm["site"]  # type: ignore[assignment]
    endpoint = local.endpoints[0]
    member = site.verify_server(endpoint)
    revoked = swarm["rogues"]["revoked"].tls  # type: ignore[index]
    stub = ServerStub(endpoint, tls=revoked, node_id=member.node_id)
    with pytest.raises(AccessDeniedError, match="revoked"):
        stub.info(timeout=10)
    stub.close()
    expired = swarm["rogues"]["expired"].tls  # type: ignore[index]
    stub = ServerStub(endpoint, tls=expired, node_id=member.node_id)
    with pytest.raises(ServerUnavailableError):  # the TLS handshake itself fails
        stub.info(timeout=10)
    stub.close()
    # a TLS handshake with no client certificate at all
    channel = grpc.secure_channel(
        endpoint,
        grpc.ssl_channel_credentials(root_certificates=site.identity.ca_pem),
        options=site.channel_options(member.node_id),
    )
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.BlockServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    # plaintext gRPC to a TLS port, and raw garbage: refused, and the server goes on
    plain = grpc.insecure_channel(endpoint)
    with pytest.raises(grpc.RpcError):
        pb_grpc.BlockServiceStub(plain).Info(pb.InfoRequest(), timeout=5)
    plain.close()
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01garbage that is not a TLS record" * 50)
        sock.settimeout(5)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            sock.recv(100)
    assert ServerStub(endpoint, tls=site, node_id=member.node_id).info(timeout=10).start == 0


def _view(swarm: dict[str, object], model_id: str, record_filter: object) -> list:
    """What a DHT node holding the swarm key finds, with or without a member's checks."""
    site: TlsConfig = swarm["site"]  # type: ignore[assignment]
    with DhtNode(bootstrap=[swarm["bootstrap"]], psk=site.identity.swarm_key, record_filter=record_filter) as viewer:  # type: ignore[arg-type]
        return viewer.find_servers(model_id)
