"""A Flower federation admits only enrolled SuperNodes that trust the consortium CA.

Real `flower-superlink`/`flower-supernode` processes on 127.0.0.1, TLS with a throwaway
Ed25519 CA and an ECDSA P-256 server key (as the consortium PKI issues them), SuperNode
authentication with ECDSA keys in OpenSSH format, and runs of the app in `app/`
submitted offline with the `flwr` CLI.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from corolla.platform.flower import (
    ControlClient,
    ControlError,
    FederationError,
    ProcessFailed,
    RunStatus,
    ServerTls,
    SuperLink,
    SuperLinkConfig,
    SuperLinkConnection,
    SuperNode,
    SuperNodeConfig,
    SuperNodeStatus,
)

APP = Path(__file__).parent / "app"
ENROLLED = {"site-a": 0, "site-b": 1}  # SuperNode name -> partition id
NODE_CURVES = {name: ec.SECP256R1() for name in ("site-a", "site-c", "site-d")} | {
    name: ec.SECP384R1() for name in ("site-b", "stranger")
}


# --- keys and certificates, made here as the consortium PKI would issue them -----------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ed25519_ca(common_name: str) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)  # Ed25519 signs without a separate hash
    )
    return key, cert


def _server_cert(
    ca_key: ed25519.Ed25519PrivateKey, ca_cert: x509.Certificate, sans: list[x509.GeneralName]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("superlink"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, None)
    )
    return key, cert


def _write_pem_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca_cert: Path
    other_ca_cert: Path  # a CA that is not the consortium's
    tls: ServerTls
    tls_without_ip_san: ServerTls  # names only DNS:localhost

    def node_key(self, name: str) -> Path:
        return self.directory / f"{name}.key"  # OpenSSH private key

    def node_public_key(self, name: str) -> Path:
        return self.directory / f"{name}.pub"  # OpenSSH public key line


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ed25519_ca("Corolla test consortium CA")
    _, other_ca_cert = _ed25519_ca("Some other CA")
    loopback = [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
    server_key, server_cert = _server_cert(ca_key, ca_cert, loopback)
    named_key, named_cert = _server_cert(ca_key, ca_cert, [x509.DNSName("localhost")])
    for name, curve in NODE_CURVES.items():
        key = ec.generate_private_key(curve)
        openssh = serialization.PrivateFormat.OpenSSH  # Flower reads node-auth keys only in OpenSSH format
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, openssh, serialization.NoEncryption())
        )
        (directory / f"{name}.pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    # Keys Flower refuses for node authentication: Ed25519 (OpenSSH) and ECDSA in PEM/PKCS#8.
    ed_key = ed25519.Ed25519PrivateKey.generate()
    (directory / "ed25519.pub").write_bytes(
        ed_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    _write_pem_key(directory / "pkcs8.key", ec.generate_private_key(ec.SECP256R1()))
    return Pki(
        directory=directory,
        ca_cert=_write_cert(directory / "ca.pem", ca_cert),
        other_ca_cert=_write_cert(directory / "other-ca.pem", other_ca_cert),
        tls=ServerTls(
            ca_cert=directory / "ca.pem",
            cert=_write_cert(directory / "superlink.pem", server_cert),
            key=_write_pem_key(directory / "superlink.key", server_key),
        ),
        tls_without_ip_san=ServerTls(
            ca_cert=directory / "ca.pem",
            cert=_write_cert(directory / "superlink-dns-only.pem", named_cert),
            key=_write_pem_key(directory / "superlink-dns-only.key", named_key),
        ),
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- one federation for the module: a SuperLink and two enrolled SuperNodes ------------------


@dataclass(frozen=True)
class Federation:
    link: SuperLink
    control: ControlClient
    nodes: dict[str, SuperNode]
    enrolled_ids: dict[str, int]  # name -> node id given at registration
    work_dir: Path


@pytest.fixture(scope="module")
def federation(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    work_dir = tmp_path_factory.mktemp("federation")
    link = SuperLink(SuperLinkConfig(tls=pki.tls, port=_free_port()), work_dir=work_dir)
    with ExitStack() as stack:
        stack.enter_context(link)
        control = ControlClient(link.connection, work_dir=work_dir)
        enrolled_ids = {name: control.register_supernode(pki.node_public_key(name)) for name in ENROLLED}
        nodes = {
            name: SuperNode(
                SuperNodeConfig(
                    superlink=link.connection,
                    auth_private_key=pki.node_key(name),
                    runtime_port=_free_port(),
                    node_config={"partition-id": partition},
                    name=name,
                ),
                work_dir=work_dir,
            )
            for name, partition in ENROLLED.items()
        }
        for node in nodes.values():
            stack.callback(node.stop)
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(SuperNode.start, nodes.values()))
        yield Federation(link=link, control=control, nodes=nodes, enrolled_ids=enrolled_ids, work_dir=work_dir)
    assert not link.running
    assert not any(node.running for node in nodes.values())


def _run_round(federation: Federation, result_path: Path) -> dict[int, int]:
    """Run the app once; the partition id each SuperNode reported, by node id."""
    run = federation.control.run(APP, run_config={"result-path": str(result_path), "min-nodes": 2}, timeout=90)
    run.raise_for_status()
    assert run.status is RunStatus.COMPLETED
    assert "partition-sum result:" in run.log  # the ServerApp's output reaches the run log
    result = json.loads(result_path.read_text())
    partitions = {int(node_id): int(partition) for node_id, partition in result["partitions"].items()}
    assert result["sum"] == sum(partitions.values())
    return partitions


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_enrolled_supernodes_complete_a_round_over_tls(federation: Federation, pki: Pki, tmp_path: Path) -> None:
    partitions = _run_round(federation, tmp_path / "result.json")

    ids = {name: node.node_id for name, node in federation.nodes.items()}
    assert ids == federation.enrolled_ids  # each node was admitted under its enrolled key
    assert partitions == {ids[name]: partition for name, partition in ENROLLED.items()}

    # The SuperLink speaks only TLS, with the Ed25519-signed P-256 certificate the nodes verified.
    host, port = federation.link.connection.address.split(":")
    plain = http.client.HTTPConnection(host, int(port), timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/health")
        plain.getresponse()
    plain.close()
    served = x509.load_pem_x509_certificate(ssl.get_server_certificate((host, int(port))).encode())
    assert served.signature_algorithm_oid == SignatureAlgorithmOID.ED25519
    served_key = served.public_key()
    assert isinstance(served_key, ec.EllipticCurvePublicKey)
    assert served_key.curve.name == "secp256r1"


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_supernode_with_unenrolled_key_is_refused(federation: Federation, pki: Pki, tmp_path: Path) -> None:
    stranger = SuperNode(
        SuperNodeConfig(
            superlink=federation.link.connection,
            auth_private_key=pki.node_key("stranger"),  # valid key, CA trusted, never registered
            runtime_port=_free_port(),
            node_config={"partition-id": 100},
            name="stranger",
        ),
        work_dir=federation.work_dir,
    )
    with pytest.raises(ProcessFailed) as refused:
        stranger.start()
    assert not stranger.running
    assert refused.value.flower_exit_code == 305
    assert "Failed to activate SuperNode" in str(refused.value)
    assert "No SuperNode found with the given public key" in federation.link.output()
    online = {info.node_id for info in federation.control.list_supernodes() if info.status is SuperNodeStatus.ONLINE}
    assert online == set(federation.enrolled_ids.values())

    partitions = _run_round(federation, tmp_path / "result.json")  # the enrolled nodes still complete
    assert set(partitions) == set(federation.enrolled_ids.values())
    assert 100 not in partitions.values()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_supernode_that_does_not_trust_the_consortium_ca_cannot_connect(federation: Federation, pki: Pki) -> None:
    node_id = federation.control.register_supernode(pki.node_public_key("site-c"))  # enrolled: only the CA is wrong
    untrusting = SuperNode(
        SuperNodeConfig(
            superlink=SuperLinkConnection(
                address=federation.link.connection.address, root_certificates=pki.other_ca_cert
            ),
            auth_private_key=pki.node_key("site-c"),
            runtime_port=_free_port(),
            node_config={"partition-id": 2},
            name="site-c-other-ca",
        ),
        work_dir=federation.work_dir,
    )
    with pytest.raises(ProcessFailed) as untrusted:
        untrusting.start()
    assert not untrusting.running
    assert untrusted.value.flower_exit_code == 305
    assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)
    statuses = {info.node_id: info.status for info in federation.control.list_supernodes()}
    assert statuses[node_id] is SuperNodeStatus.REGISTERED  # never activated
    federation.control.unregister_supernode(node_id)


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_unregistered_supernode_leaves_the_federation(federation: Federation, pki: Pki) -> None:
    node_id = federation.control.register_supernode(pki.node_public_key("site-d"))
    config = SuperNodeConfig(
        superlink=federation.link.connection,
        auth_private_key=pki.node_key("site-d"),
        runtime_port=_free_port(),
        node_config={"partition-id": 3},
        name="site-d",
    )
    with SuperNode(config, work_dir=federation.work_dir) as node:
        assert node.node_id == node_id
        federation.control.unregister_supernode(node_id)
        assert node.wait_exit(timeout=30) == 0  # refused with 401, Flower shuts the node down "gracefully"
    statuses = {info.node_id: info.status for info in federation.control.list_supernodes()}
    assert statuses[node_id] is SuperNodeStatus.UNREGISTERED


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_node_auth_keys_must_be_ecdsa_in_openssh_format(federation: Federation, pki: Pki) -> None:
    with pytest.raises(ControlError, match="Not an EC public key"):
        federation.control.register_supernode(pki.directory / "ed25519.pub")
    pem_keyed = SuperNodeConfig(
        superlink=federation.link.connection,
        auth_private_key=pki.directory / "pkcs8.key",
        runtime_port=_free_port(),
        name="pem-keyed",
    )
    with pytest.raises(ProcessFailed, match="Unable to parse the private key file"):
        SuperNode(pem_keyed, work_dir=federation.work_dir).start()


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_superlink_certificate_must_name_the_address_it_is_dialled_at(pki: Pki, tmp_path: Path) -> None:
    # Python's ssl matches 127.0.0.1 against IP SANs only; the SuperLink's own SuperExec dials it.
    link = SuperLink(SuperLinkConfig(tls=pki.tls_without_ip_san, port=_free_port()), work_dir=tmp_path)
    with pytest.raises(FederationError, match=r"does not verify .* for host '127\.0\.0\.1'"):
        link.start()
    assert not link.running


# --- settings are checked before anything starts ---------------------------------------------


def test_node_config_is_written_as_flower_parses_it(pki: Pki) -> None:
    config = SuperNodeConfig(
        superlink=SuperLinkConnection(address="127.0.0.1:9200", root_certificates=pki.ca_cert),
        auth_private_key=pki.node_key("site-a"),
        runtime_port=9300,
        node_config={"partition-id": 3, "site": "Ward 7", "weight": 0.5, "dp": True},
    )
    command = SuperNode(config, work_dir=pki.directory).command
    assert command[command.index("--node-config") + 1] == "partition-id=3 site='Ward 7' weight=0.5 dp=true"


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"partition id": 1}, "key 'partition id' is not allowed"),
        ({"site": "it's"}, "may not contain a quote"),
        ({"weight": float("nan")}, "only finite floats"),
    ],
)
def test_bad_node_config_is_refused(pki: Pki, node_config: dict[str, object], message: str) -> None:
    with pytest.raises(FederationError, match=message):
        SuperNodeConfig(
            superlink=SuperLinkConnection(address="127.0.0.1:9200", root_certificates=pki.ca_cert),
            auth_private_key=pki.node_key("site-a"),
            runtime_port=9300,
            node_config=node_config,  # type: ignore[arg-type]
        )


def test_missing_tls_file_is_named(pki: Pki) -> None:
    with pytest.raises(FederationError, match=r"ServerTls.key = '.*missing.key': no such file"):
        ServerTls(ca_cert=pki.ca_cert, cert=pki.tls.cert, key=pki.directory / "missing.key")
