"""The ledger key: signatures (RFC 8032 vectors, one opaque error), PEM files, identity
keys, public keys from raw bytes, PEM and certificates."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import pickle
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import settings
from hypothesis import strategies as st

from corolla.verify.errors import LedgerError
from corolla.verify.ledger import LedgerKey, LedgerPublicKey, SignatureError
from tests.signature_edits import edits, signature_cases

ED25519 = json.loads((Path(__file__).parents[2] / "vectors" / "ed25519_rfc8032.json").read_text())["vectors"]
OPAQUE = r"^a signature check failed$"


def _key(seed: bytes) -> LedgerKey:
    return LedgerKey(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def test_sign_and_verify() -> None:
    key = LedgerKey.generate()
    public = key.public_key()
    signature = key.sign(b"head")
    assert len(signature) == 64
    assert public.verify(b"head", signature) is None
    for message, sig, by in [
        (b"head!", signature, public),
        (b"head", signature[:-1] + bytes([signature[-1] ^ 1]), public),
        (b"head", b"short", public),
        (b"head", signature, LedgerKey.generate().public_key()),
    ]:
        with pytest.raises(SignatureError, match=OPAQUE):
            by.verify(message, sig)


@pytest.mark.parametrize("vector", ED25519, ids=lambda v: v["name"])
def test_signature_known_answers(vector: dict[str, str]) -> None:
    """RFC 8032's Ed25519 vectors: the ledger key signs and verifies exactly as the RFC says."""
    key = _key(bytes.fromhex(vector["secret"]))
    message, signature = bytes.fromhex(vector["message"]), bytes.fromhex(vector["signature"])
    assert key.public_raw.hex() == vector["public"]
    assert key.sign(message) == signature
    LedgerPublicKey.from_raw(bytes.fromhex(vector["public"])).verify(message, signature)


@settings(max_examples=50, deadline=None)
@signature_cases
def test_verify_refuses_every_edit_with_one_opaque_error(
    seed: bytes, other: bytes, message: bytes, data: st.DataObject
) -> None:
    """Another key, a flipped message bit, a flipped signature bit, a truncated signature:
    each is the one `SignatureError`, with the one message."""
    key = _key(seed)
    public, signature = key.public_key(), key.sign(message)
    public.verify(message, signature)
    refused = [(public, signed, sig) for signed, sig in edits(message, signature, data)]
    if other != seed:
        refused.append((_key(other).public_key(), message, signature))
    for by, signed, sig in refused:
        with pytest.raises(SignatureError, match=OPAQUE):
            by.verify(signed, sig)


def test_signature_error_is_a_ledger_error_and_pickles() -> None:
    error = pickle.loads(pickle.dumps(SignatureError()))
    assert isinstance(error, LedgerError) and str(error) == "a signature check failed"


def test_key_id_is_sha256_of_raw_public_key() -> None:
    key = LedgerKey.generate()
    assert len(key.public_raw) == 32
    assert key.key_id == hashlib.sha256(key.public_raw).hexdigest()[:16]
    assert key.public_key().key_id == key.key_id
    assert key.public_key().raw == key.public_raw
    assert repr(key) == f"LedgerKey(key_id={key.key_id!r})"  # no key material in logs


def test_load_or_create_writes_0600_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "ledger.key"
    created = LedgerKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert LedgerKey.load_or_create(path).key_id == created.key_id
    assert [p.name for p in path.parent.iterdir()] == ["ledger.key"]  # no temporary files left


def test_load_or_create_race_ends_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "ledger.key"
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        ids.append(LedgerKey.load_or_create(path).key_id)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(ids) == 8
    assert set(ids) == {LedgerKey.load_or_create(path).key_id}


def test_identity_key_pem_is_accepted() -> None:
    identity = ed25519.Ed25519PrivateKey.generate()  # as `platform keys` writes node.key: PKCS#8 PEM
    pem = identity.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = LedgerKey.from_private_pem(pem)
    raw = identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.public_raw == raw
    identity.public_key().verify(key.sign(b"x"), b"x")  # pyca's own order: (signature, data)


def test_bad_private_keys_are_refused() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(LedgerError, match="must be Ed25519"):
        LedgerKey.from_private_pem(p256)
    with pytest.raises(LedgerError, match="not an unencrypted PEM"):
        LedgerKey.from_private_pem(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(LedgerError, match="not an unencrypted PEM"):
        LedgerKey.from_private_pem(encrypted)


def _certificate(key: ed25519.Ed25519PrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coordinator")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_public_key_from_raw_pem_certificate_and_files(tmp_path: Path) -> None:
    identity = ed25519.Ed25519PrivateKey.generate()
    key = LedgerKey.from_private_pem(
        identity.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    sig = key.sign(b"m")
    pem = key.public_key().to_pem()
    cert = _certificate(identity)
    for public in (
        LedgerPublicKey.from_raw(key.public_raw),
        LedgerPublicKey.from_pem(pem),
        LedgerPublicKey.from_pem(cert),
    ):
        assert public.key_id == key.key_id
        public.verify(b"m", sig)
    for name, data in (("pub.pem", pem), ("node.pem", cert), ("pub.hex", key.public_raw.hex().encode() + b"\n")):
        (tmp_path / name).write_bytes(data)
        assert LedgerPublicKey.load(tmp_path / name).key_id == key.key_id


def test_bad_public_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="32 bytes"):
        LedgerPublicKey.from_raw(b"\x00" * 31)
    with pytest.raises(LedgerError, match="not a PEM"):
        LedgerPublicKey.from_pem(b"nonsense")
    p256 = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(LedgerError, match="must be Ed25519"):
        LedgerPublicKey.from_pem(p256)
    with pytest.raises(LedgerError, match="cannot read"):
        LedgerPublicKey.load(tmp_path / "missing.pem")
