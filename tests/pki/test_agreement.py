"""Sites' X25519 key-agreement certificates (secure aggregation): issuing, checking, upgrading."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import x25519

from corolla.pki import CertificateError, ConsortiumCA, NodeIdentity, Role, WorkspaceError, _x509


@pytest.fixture
def ca(tmp_path: Path) -> ConsortiumCA:
    return ConsortiumCA.init(tmp_path / "ws", consortium="test")


def test_site_gets_a_certified_x25519_key(ca: ConsortiumCA) -> None:
    site = ca.issue("h1", "site")
    assert site.has_agreement_key
    assert stat.S_IMODE((site.directory / "agreement.key").stat().st_mode) == 0o600
    cert = x509.load_der_x509_certificate(site.agreement_cert_der)
    assert isinstance(cert.public_key(), x25519.X25519PublicKey)  # RFC 8410 subject public key
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_agreement and not usage.value.digital_signature
    assert f"urn:corolla:node:{site.node_id}" in _x509.san_uris(cert)
    assert _x509.common_name(cert) == "h1"
    public = site.verifier().check_agreement_der(site.agreement_cert_der, node_id=site.node_id)
    private = x25519.X25519PrivateKey.from_private_bytes(site.agreement_key_raw())
    assert _raw(private.public_key()) == public
    # the agreement serial is in the registry, so revocation covers it
    entry = next(n for n in ca.list() if n.name == "h1")
    assert entry.agreement_serial == cert.serial_number and cert.serial_number in entry.serials


def test_pairwise_secret_is_shared_through_the_certificates(ca: ConsortiumCA) -> None:
    a, b = ca.issue("a", "site"), ca.issue("b", "site")
    verifier = a.verifier()
    pk_a = verifier.check_agreement_der(a.agreement_cert_der, node_id=a.node_id)
    pk_b = verifier.check_agreement_der(b.agreement_cert_der, node_id=b.node_id)
    sk_a = x25519.X25519PrivateKey.from_private_bytes(a.agreement_key_raw())
    sk_b = x25519.X25519PrivateKey.from_private_bytes(b.agreement_key_raw())
    assert sk_a.exchange(x25519.X25519PublicKey.from_public_bytes(pk_b)) == sk_b.exchange(
        x25519.X25519PublicKey.from_public_bytes(pk_a)
    )


def test_signing_key_comes_from_the_identity_certificate(ca: ConsortiumCA) -> None:
    site, coordinator = ca.issue("s", "site"), ca.issue("coord", "coordinator")
    verifier = site.verifier()
    raw = verifier.check_signing_key_der(site.identity_cert_der, node_id=site.node_id, role="site")
    assert _x509.ed25519_raw(_x509.key_from_pem((site.directory / "node.key").read_bytes()))[1] == raw  # type: ignore[arg-type]
    assert len(site.identity_key_raw()) == 32
    verifier.check_signing_key_der(coordinator.identity_cert_der, node_id=coordinator.node_id, role=Role.COORDINATOR)
    with pytest.raises(CertificateError, match="has role coordinator; allowed here: site"):
        verifier.check_signing_key_der(coordinator.identity_cert_der, node_id=coordinator.node_id, role="site")
    with pytest.raises(CertificateError, match="does not belong"):
        verifier.check_signing_key_der(site.identity_cert_der, node_id=coordinator.node_id, role="site")


def test_only_sites_hold_agreement_keys(ca: ConsortiumCA) -> None:
    for role in ("server", "verifier", "coordinator"):
        node = ca.issue(f"n-{role}", role)
        assert not node.has_agreement_key
        with pytest.raises(WorkspaceError, match="only sites hold a key-agreement key"):
            node.agreement_key_raw()
        assert len(next(n for n in ca.list() if n.name == node.name).serials) == 2


def test_agreement_check_rejects_substitutes(ca: ConsortiumCA, tmp_path: Path) -> None:
    a, b = ca.issue("a", "site"), ca.issue("b", "site")
    verifier = a.verifier()
    with pytest.raises(CertificateError, match="does not belong"):  # b's key offered as a's
        verifier.check_agreement_der(b.agreement_cert_der, node_id=a.node_id)
    with pytest.raises(CertificateError, match="not an X25519 key-agreement certificate"):  # identity cert
        verifier.check_agreement_der(a.identity_cert_der, node_id=a.node_id)
    other = ConsortiumCA.init(tmp_path / "other").issue("a", "site")
    with pytest.raises(CertificateError, match="not issued by the consortium CA"):
        verifier.check_agreement_der(other.agreement_cert_der, node_id=other.node_id)
    der = bytearray(a.agreement_cert_der)
    der[-5] ^= 0x01  # inside the signature
    with pytest.raises(CertificateError):
        verifier.check_agreement_der(bytes(der), node_id=a.node_id)
    old = ca.issue("old", "site", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with pytest.raises(CertificateError, match="expired"):
        verifier.check_agreement_der(old.agreement_cert_der, node_id=old.node_id)


def test_revoked_site_agreement_key_is_refused(ca: ConsortiumCA) -> None:
    a, b = ca.issue("a", "site"), ca.issue("b", "site")
    verifier = a.verifier()
    verifier.check_agreement_der(b.agreement_cert_der, node_id=b.node_id)
    ca.revoke("b")
    with pytest.raises(CertificateError, match="revoked"):
        verifier.check_agreement_der(b.agreement_cert_der, node_id=b.node_id)


def test_older_workspace_says_how_to_reissue(ca: ConsortiumCA) -> None:
    site = ca.issue("legacy", "site")
    # a site issued before agreement keys existed: no files, no serial in the registry
    (site.directory / "agreement.key").unlink()
    (site.directory / "agreement.pem").unlink()
    registry_path = ca.dir / "registry.json"
    registry = json.loads(registry_path.read_text())
    registry["legacy"]["serials"] = registry["legacy"]["serials"][:2]
    del registry["legacy"]["agreement_serial"]
    registry_path.write_text(json.dumps(registry))
    loaded = NodeIdentity.load(site.directory)  # the node still loads
    assert not loaded.has_agreement_key
    with pytest.raises(WorkspaceError, match=r"platform keys issue-agreement --name legacy"):
        loaded.agreement_key_raw()
    with pytest.raises(WorkspaceError, match=r"lacks agreement\.key, agreement\.pem"):
        _ = loaded.agreement_cert_der
    upgraded = ca.issue_agreement("legacy")
    assert upgraded.node_id == site.node_id and upgraded.has_agreement_key
    upgraded.verifier().check_agreement_der(upgraded.agreement_cert_der, node_id=site.node_id)
    entry = next(n for n in ca.list() if n.name == "legacy")
    assert entry.agreement_serial is not None and len(entry.serials) == 3
    with pytest.raises(WorkspaceError, match="already has a key-agreement certificate"):
        ca.issue_agreement("legacy")
    ca.issue("srv", "server")
    with pytest.raises(WorkspaceError, match="only sites hold a key-agreement key"):
        ca.issue_agreement("srv")
    with pytest.raises(WorkspaceError, match="no node named"):
        ca.issue_agreement("nobody")


def _raw(key: x25519.X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
