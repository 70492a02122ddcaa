"""Every use of `cryptography.hazmat` by the consortium PKI, behind one door.

Keys: Ed25519 for node identities and the CA (a node's id is the libp2p peer id of its
Ed25519 key), ECDSA P-256 for TLS leaf keys: gRPC's TLS stack (BoringSSL) offers no
Ed25519 signature algorithm in the handshake (`NO_COMMON_SIGNATURE_ALGORITHMS`), while
it verifies Ed25519 *certificate* signatures fine, so the CA stays Ed25519. Sites also
hold an X25519 key-agreement key (secure aggregation's pairwise secrets), certified like
the others (RFC 8410 X25519 subject public key, KeyUsage keyAgreement only).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corolla.pki.errors import CertificateError, SignatureError

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey
_ISSUER_KEY_TYPES = (  # what can sign a certificate or a CRL (an X25519 or X448 key cannot)
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    dsa.DSAPublicKey,
)

URI_NODE = "urn:corolla:node:"  # SAN URI prefix carrying the node id
URI_ROLE = "urn:corolla:role:"  # SAN URI prefix carrying the role
URI_FLOWER_KEY = "urn:corolla:flower-auth:"  # SAN URI: SHA-256 of the site's Flower node-auth public key
DNS_SUFFIX = ".node.corolla"  # TLS certs name the node as <node id, lowercase>.node.corolla


def new_identity_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_agreement_key() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_from_pem(data: bytes) -> ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey:
    """An identity (Ed25519) or TLS (P-256) private key."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise CertificateError("unsupported private key type")
    return key


IdentityKey = ed25519.Ed25519PrivateKey  # what node identities and the CA sign with


def identity_key_from_pem(data: bytes) -> IdentityKey:
    """An Ed25519 private key: a node's identity key or the CA's."""
    key = key_from_pem(data)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CertificateError("not an Ed25519 private key")
    return key


def agreement_key_raw(pem: bytes) -> bytes:
    """The 32 raw bytes of a PEM X25519 private key (RFC 7748 scalar, unclamped as stored)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError:
        raise CertificateError("the agreement key is not a PEM private key") from None
    if not isinstance(key, x25519.X25519PrivateKey):
        raise CertificateError("the agreement key is not an X25519 key")
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def ed25519_raw(key: ed25519.Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """(32-byte seed, 32-byte public key), as libp2p wants them."""
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return seed, public


def new_flower_auth_key() -> tuple[bytes, bytes]:
    """A Flower SuperNode authentication key: (OpenSSH private key, OpenSSH public line).
    Flower 1.42 accepts only ECDSA on a NIST curve, in OpenSSH format, for node auth."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public


def public_line_digest(public_line: bytes) -> str:
    """SHA-256 (hex) of an OpenSSH public key line, whitespace-trimmed."""
    return hashlib.sha256(public_line.strip()).hexdigest()


def ed25519_seed(pem: bytes) -> bytes | None:
    """The 32-byte seed of a PEM Ed25519 private key; None for another key type."""
    key = key_from_pem(pem)
    return ed25519_raw(key)[0] if isinstance(key, ed25519.Ed25519PrivateKey) else None


def derive_swarm_key(consortium_secret: bytes, epoch: int = 0) -> bytes:
    """The private DHT's pre-shared key: HKDF-SHA256 of the consortium secret, bound to
    its purpose in `info` so that the secret's other uses never yield the same bytes.

    `epoch` counts revocations: each one gives the DHT a new key that only the CA (which
    alone holds the secret) can derive and that it hands to the remaining members. Epoch
    0 keeps the original `info`, so existing workspaces keep their key."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"swarm key epoch must be an integer >= 0, got {epoch!r}")
    info = b"corolla/v1/dht-pre-shared-key" + (b"" if epoch == 0 else f"/epoch/{epoch}".encode())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(consortium_secret)


def random_secret() -> bytes:
    return os.urandom(32)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cert_from_pem(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None


def cert_from_der(data: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"not a DER certificate: {exc}") from None


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lowercase hex."""
    return hashlib.sha256(cert_to_der(cert)).hexdigest()


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def build_ca(key: ed25519.Ed25519PrivateKey, *, consortium: str, now: dt.datetime, days: int) -> x509.Certificate:
    subject = _name(f"{consortium} consortium CA", consortium)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )


def build_leaf(
    ca_key: ed25519.Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | x25519.X25519PublicKey,
    *,
    name: str,
    node_id: str,
    role: str,
    now: dt.datetime,
    days: int,
    tls: bool,
    hosts: Sequence[str] = (),
    extra_uris: Sequence[str] = (),
    agreement: bool = False,
) -> x509.Certificate:
    """A node certificate: identity (`tls=False`, Ed25519 key), TLS (P-256 key) or
    key agreement (`agreement=True`, X25519 key: KeyUsage keyAgreement, critical)."""
    organisation = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(URI_NODE + node_id),
        x509.UniformResourceIdentifier(URI_ROLE + role),
        *(x509.UniformResourceIdentifier(uri) for uri in extra_uris),
    ]
    if tls:
        names.append(x509.DNSName(node_id.lower() + DNS_SUFFIX))
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name, str(organisation)))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if tls:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    if agreement:
        builder = builder.add_extension(_KEY_AGREEMENT_ONLY, critical=True)
    return builder.sign(ca_key, None)


_KEY_AGREEMENT_ONLY = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def verify_certificate(ca_cert: x509.Certificate, cert: x509.Certificate) -> None:
    """Return if `ca_cert`'s key signed `cert` and `cert` names `ca_cert` as its issuer;
    else `SignatureError` (opaque)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):  # another issuer name, an unusable key, a bad signature
        raise SignatureError() from None


def identity_public_raw(cert: x509.Certificate) -> bytes | None:
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agreement_public_raw(cert: x509.Certificate) -> bytes | None:
    """The raw X25519 public key of a key-agreement certificate (KeyUsage keyAgreement);
    None for any other certificate."""
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    key = cert.public_key()
    if not usage.key_agreement or not isinstance(key, x25519.X25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def build_crl(
    ca_key: ed25519.Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    revoked: Sequence[tuple[int, dt.datetime]],
    *,
    number: int,
    now: dt.datetime,
    days: int,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, None)


def verify_crl(ca_cert: x509.Certificate, crl: x509.CertificateRevocationList) -> None:
    """Return if `ca_cert`'s key signed `crl`; else `SignatureError` (opaque)."""
    key = ca_cert.public_key()
    if not isinstance(key, _ISSUER_KEY_TYPES) or not crl.is_signature_valid(key):
        raise SignatureError()


def crl_to_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def crl_from_pem(data: bytes, ca_cert: x509.Certificate) -> tuple[frozenset[int], int]:
    """(revoked serials, CRL number) of a CRL the CA signed; anything else is an error."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise CertificateError(f"not a PEM revocation list: {exc}") from None
    try:
        verify_crl(ca_cert, crl)
    except SignatureError:
        raise CertificateError("the revocation list is not signed by the consortium CA") from None
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return frozenset(r.serial_number for r in crl), int(number)


def not_valid_before(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_before_utc


def not_valid_after(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def serial(cert: x509.Certificate) -> int:
    return int(cert.serial_number)
