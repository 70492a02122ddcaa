"""The consortium CA: issuing, verifying, revoking; and the swarm key's known answers."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from libp2p.peer.id import ID

from corolla.pki import (
    CertificateError,
    ConsortiumCA,
    NodeIdentity,
    Role,
    WorkspaceError,
    _x509,
    tls_server_name,
)

VECTORS = Path(__file__).parents[1] / "vectors" / "swarm_key.json"


@pytest.fixture
def ca(tmp_path: Path) -> ConsortiumCA:
    return ConsortiumCA.init(tmp_path / "ws", consortium="test")


def test_swarm_key_known_answers() -> None:
    for vector in json.loads(VECTORS.read_text())["vectors"]:
        got = _x509.derive_swarm_key(bytes.fromhex(vector["consortium_secret"]))
        assert got.hex() == vector["swarm_key"]


def test_ca_files_and_private_key_modes(ca: ConsortiumCA) -> None:
    for name in ("ca.key", "consortium.secret"):
        assert stat.S_IMODE((ca.dir / name).stat().st_mode) == 0o600
    with pytest.raises(WorkspaceError, match="already holds a CA"):
        ConsortiumCA.init(ca.workspace)


def test_issued_node_binds_its_libp2p_id_and_role(ca: ConsortiumCA) -> None:
    node = ca.issue("alpha", "server")
    assert node.role is Role.SERVER and node.name == "alpha"
    key_pair = node.libp2p_key_pair()
    assert ID.from_pubkey(key_pair.public_key).to_base58() == node.node_id
    verifier = node.verifier()
    tls = verifier.check_pem(node.tls_cert_pem, roles=frozenset({Role.SERVER}))
    assert tls.node_id == node.node_id and tls.role is Role.SERVER
    holder = verifier.check_identity_der(node.identity_cert_der, node_id=node.node_id, roles=frozenset({Role.SERVER}))
    assert holder.name == "alpha"
    for name in ("node.key", "tls.key", "swarm.key"):
        assert stat.S_IMODE((node.directory / name).stat().st_mode) == 0o600
    assert tls_server_name(node.node_id) == node.node_id.lower() + ".node.corolla"
    assert node.swarm_key == _x509.derive_swarm_key(bytes.fromhex((ca.dir / "consortium.secret").read_text()))


def test_issue_rejects_bad_names_roles_and_duplicates(ca: ConsortiumCA) -> None:
    with pytest.raises(WorkspaceError, match="role 'admin' is not one of"):
        ca.issue("x", "admin")
    with pytest.raises(WorkspaceError, match=r"node name"):
        ca.issue("../escape", "server")
    ca.issue("x", "site")
    with pytest.raises(WorkspaceError, match="already issued"):
        ca.issue("x", "server")


def test_role_is_enforced(ca: ConsortiumCA) -> None:
    site = ca.issue("h", "site")
    with pytest.raises(CertificateError, match="has role site; allowed here: server"):
        site.verifier().check_pem(site.tls_cert_pem, roles=frozenset({Role.SERVER}))


def test_other_ca_self_signed_and_expired_are_rejected(ca: ConsortiumCA, tmp_path: Path) -> None:
    verifier = ca.issue("good", "server").verifier()
    other = ConsortiumCA.init(tmp_path / "other").issue("evil", "server")
    with pytest.raises(CertificateError, match="not issued by the consortium CA"):
        verifier.check_pem(other.tls_cert_pem)
    key = _x509.new_identity_key()
    self_ca = _x509.build_ca(key, consortium="test", now=dt.datetime.now(dt.UTC), days=1)
    with pytest.raises(CertificateError, match="not issued by the consortium CA"):
        verifier.check_pem(_x509.cert_to_pem(self_ca))
    old = ca.issue("old", "server", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with pytest.raises(CertificateError, match="expired"):
        verifier.check_pem(old.tls_cert_pem)


def test_tampered_certificate_is_rejected(ca: ConsortiumCA) -> None:
    node = ca.issue("n", "server")
    der = bytearray(node.identity_cert_der)
    der[-5] ^= 0x01  # inside the signature
    with pytest.raises(CertificateError):
        node.verifier().check_der(bytes(der))


def test_identity_must_match_the_node_id(ca: ConsortiumCA) -> None:
    a, b = ca.issue("a", "server"), ca.issue("b", "server")
    with pytest.raises(CertificateError, match="does not belong"):
        a.verifier().check_identity_der(b.identity_cert_der, node_id=a.node_id, roles=frozenset({Role.SERVER}))


def test_revocation_reaches_running_verifiers(ca: ConsortiumCA) -> None:
    node, other = ca.issue("r", "server"), ca.issue("s", "server")
    verifier = other.verifier()  # reads s's crl.pem, which revoke() refreshes
    verifier.check_pem(node.tls_cert_pem)
    number = verifier.crl_number
    entry = ca.revoke("r")
    assert entry.revoked_at is not None
    with pytest.raises(CertificateError, match="revoked"):
        verifier.check_pem(node.tls_cert_pem)
    with pytest.raises(CertificateError, match="revoked"):
        verifier.check_der(node.identity_cert_der)
    assert verifier.crl_number == number + 1
    verifier.check_pem(other.tls_cert_pem)  # others unaffected
    assert [n.name for n in ca.list() if n.revoked_at] == ["r"]
    with pytest.raises(WorkspaceError, match="no node named"):
        ca.revoke("nobody")


def test_forged_revocation_list_is_refused(ca: ConsortiumCA, tmp_path: Path) -> None:
    node = ca.issue("n", "server")
    other = ConsortiumCA.init(tmp_path / "other")
    (node.directory / "crl.pem").write_bytes((other.dir / "crl.pem").read_bytes())
    with pytest.raises(CertificateError, match="not signed by the consortium CA"):
        node.verifier()


def test_node_directory_must_be_complete(ca: ConsortiumCA) -> None:
    node = ca.issue("n", "server")
    (node.directory / "tls.key").unlink()
    with pytest.raises(WorkspaceError, match=r"lacks tls\.key"):
        NodeIdentity.load(node.directory)


def test_registry_is_typed_and_checked(ca: ConsortiumCA) -> None:
    ca.issue("s", "site")
    ca.issue("v", "verifier")
    (site, verifier) = ca.list()
    assert site.role is Role.SITE and verifier.role is Role.VERIFIER
    assert len(site.serials) == 3 and site.agreement_serial == site.serials[2]
    stored = json.loads((ca.dir / "registry.json").read_text())
    assert stored["s"]["role"] == "site" and stored["s"]["serials"] == list(site.serials)
    stored["v"]["role"] = "admin"
    (ca.dir / "registry.json").write_text(json.dumps(stored))
    with pytest.raises(WorkspaceError, match="not a valid node registry"):
        ca.list()


def test_flower_key_must_be_the_one_the_certificate_names(ca: ConsortiumCA) -> None:
    site = ca.issue("s", "site")
    identity_pem = (site.directory / "node.pem").read_bytes()
    public_line = (site.directory / "flower-auth.pub").read_bytes()
    assert site.verifier().check_flower_key(identity_pem, public_line).node_id == site.node_id
    with pytest.raises(CertificateError, match="is not the one its certificate names"):
        site.verifier().check_flower_key(identity_pem, _x509.new_flower_auth_key()[1])
