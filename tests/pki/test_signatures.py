"""The PKI's signature checks (`_x509.verify_certificate`, `_x509.verify_crl`): the CA's key
first, then what it signed; None or the one opaque `SignatureError`, never a bool."""

from __future__ import annotations

import datetime as dt
import json
import pickle
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.pki import CertificateError, SignatureError, _x509
from tests.signature_edits import flip

RFC8032_TEST_1 = json.loads((Path(__file__).parents[1] / "vectors" / "ed25519_rfc8032.json").read_text())["vectors"][0]
OPAQUE = r"^a signature check failed$"
NOW = dt.datetime.now(dt.UTC)
ED25519_ALGORITHM = bytes.fromhex("300506032b6570")  # AlgorithmIdentifier { id-Ed25519 } (RFC 8410)
REVOKED_SERIAL = 0x0102030405060708


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element (definite length)."""
    n = len(content)
    length = (
        bytes([n]) if n < 0x80 else bytes([0x80 | (n.bit_length() + 7) // 8]) + n.to_bytes((n.bit_length() + 7) // 8)
    )
    return bytes([tag]) + length + content


def _signed(tbs: bytes, signature: bytes) -> bytes:
    """A Certificate or CertificateList (RFC 5280): SEQUENCE { tbs, Ed25519, BIT STRING signature }."""
    return _tlv(0x30, tbs + ED25519_ALGORITHM + _tlv(0x03, b"\x00" + signature))


def _ca(key: ed25519.Ed25519PrivateKey) -> x509.Certificate:
    return _x509.build_ca(key, consortium="test", now=NOW, days=1)


CA_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC8032_TEST_1["secret"]))
CA = _ca(CA_KEY)
LEAF_KEY = _x509.new_identity_key()
LEAF = _x509.build_leaf(
    CA_KEY, CA, LEAF_KEY.public_key(), name="n", node_id="x", role="server", now=NOW, days=1, tls=False
)
CRL = _x509.build_crl(CA_KEY, CA, [(REVOKED_SERIAL, NOW)], number=1, now=NOW, days=1)


def test_ca_key_is_rfc8032_test_1_and_its_signatures_verify() -> None:
    """The CA key is RFC 8032's TEST 1 key, and what the wrappers accept is exactly an Ed25519
    signature under its public key on the to-be-signed bytes."""
    assert _x509.ed25519_raw(CA_KEY)[1].hex() == RFC8032_TEST_1["public"]
    assert CA_KEY.sign(bytes.fromhex(RFC8032_TEST_1["message"])).hex() == RFC8032_TEST_1["signature"]
    public = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(RFC8032_TEST_1["public"]))
    public.verify(LEAF.signature, LEAF.tbs_certificate_bytes)  # pyca's own order: (signature, data)
    public.verify(CRL.signature, CRL.tbs_certlist_bytes)
    assert _signed(LEAF.tbs_certificate_bytes, LEAF.signature) == _x509.cert_to_der(LEAF)
    assert _x509.verify_certificate(CA, LEAF) is None
    assert _x509.verify_certificate(CA, CA) is None  # self-signed
    assert _x509.verify_crl(CA, CRL) is None


def test_another_key_or_issuer_name_is_the_one_error() -> None:
    impostor = _ca(_x509.new_identity_key())  # the same name, another key
    renamed = _x509.build_ca(CA_KEY, consortium="other", now=NOW, days=1)  # the same key, another name
    for ca in (impostor, renamed):
        with pytest.raises(SignatureError, match=OPAQUE):
            _x509.verify_certificate(ca, LEAF)
    with pytest.raises(SignatureError, match=OPAQUE):
        _x509.verify_crl(impostor, CRL)


def test_a_non_signing_ca_key_is_the_one_error() -> None:
    """A certificate whose key cannot sign (X25519): refused, not a TypeError."""
    agreement = _x509.build_leaf(
        CA_KEY, CA, _x509.new_agreement_key().public_key(), name="a", node_id="x", role="site", now=NOW, days=1,
        tls=False, agreement=True,
    )  # fmt: skip
    with pytest.raises(SignatureError, match=OPAQUE):
        _x509.verify_crl(agreement, CRL)
    with pytest.raises(SignatureError, match=OPAQUE):
        _x509.verify_certificate(agreement, LEAF)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_certificate_edits_are_the_one_error(data: st.DataObject) -> None:
    """A flipped bit of what was signed (the subject's key), a flipped signature bit, a
    truncated signature."""
    tbs, signature = LEAF.tbs_certificate_bytes, LEAF.signature
    subject_key = tbs.find(_x509.ed25519_raw(LEAF_KEY)[1])
    assert subject_key > 0
    tbs_bit = data.draw(st.integers(8 * subject_key, 8 * (subject_key + 32) - 1), label="signed bit")
    signature_bit = data.draw(st.integers(0, 8 * len(signature) - 1), label="signature bit")
    cut = data.draw(st.integers(0, len(signature) - 1), label="signature length")
    for der in (_signed(flip(tbs, tbs_bit), signature), _signed(tbs, flip(signature, signature_bit))):
        with pytest.raises(SignatureError, match=OPAQUE):
            _x509.verify_certificate(CA, _x509.cert_from_der(der))
    with pytest.raises(SignatureError, match=OPAQUE):
        _x509.verify_certificate(CA, _x509.cert_from_der(_signed(tbs, signature[:cut])))


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_revocation_list_edits_are_the_one_error(data: st.DataObject) -> None:
    """A flipped bit of a revoked serial (not its sign bit), a flipped signature bit, a
    truncated signature."""
    tbs, signature = CRL.tbs_certlist_bytes, CRL.signature
    serial = tbs.find(REVOKED_SERIAL.to_bytes(8))
    assert serial > 0
    tbs_bit = data.draw(st.integers(8 * (serial + 1), 8 * (serial + 8) - 1), label="signed bit")
    signature_bit = data.draw(st.integers(0, 8 * len(signature) - 1), label="signature bit")
    cut = data.draw(st.integers(0, len(signature) - 1), label="signature length")
    for der in (
        _signed(flip(tbs, tbs_bit), signature),
        _signed(tbs, flip(signature, signature_bit)),
        _signed(tbs, signature[:cut]),
    ):
        with pytest.raises(SignatureError, match=OPAQUE):
            _x509.verify_crl(CA, x509.load_der_x509_crl(der))


def test_signature_error_is_a_certificate_error_and_pickles() -> None:
    error = pickle.loads(pickle.dumps(SignatureError()))
    assert isinstance(error, CertificateError) and str(error) == "a signature check failed"
    assert error.exit_code == 8
