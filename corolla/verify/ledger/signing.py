"""The ledger key: an Ed25519 key whose signature over the chain head vouches for the ledger.

Anyone who can write to the database can recompute a hash chain, so the chain alone only
shows that rows agree with each other. What makes an edit detectable is the head
signature: only the holder of the ledger key (the coordinator, or a verifier sharing its
key file) can sign a new head, and an auditor checks it with the public key alone.

The private key is a PKCS#8 PEM file with 0600 permissions, created on first use. A node's
Ed25519 identity key (`node.key`) is also accepted, so a coordinator may sign with its
identity; the auditor then verifies with its certificate (`node.pem`) or the public key.

This is the only module of the ledger that touches `cryptography`'s hazmat layer. Its
convention is the one of `corolla.secure_agg._crypto` and the PKI: `key.sign(message)`,
`public.verify(message, signature)` returning None or raising `SignatureError`, never a bool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from corolla.verify.errors import LedgerError

__all__ = ["LedgerKey", "LedgerPublicKey", "SignatureError"]

_log = logging.getLogger(__name__)

_RAW_PUBLIC_LEN = 32
_SIGNATURE_LEN = 64


class SignatureError(LedgerError):
    """A signature that is not the key's on the message. Deliberately opaque, one message
    for every cause (another key, an edited byte, a malformed signature); callers say what
    was signed."""

    def __init__(self) -> None:
        super().__init__("a signature check failed")

    def __reduce__(self) -> tuple[type[SignatureError], tuple[()]]:  # pickle: no arguments to pass back
        return (type(self), ())


def _key_id(public_raw: bytes) -> str:
    """The first 16 hex characters of SHA-256 over the raw 32-byte public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


class LedgerPublicKey:
    """What an auditor needs: checks head signatures, never makes them."""

    __slots__ = ("_key", "key_id", "raw")

    def __init__(self, key: ed25519.Ed25519PublicKey) -> None:
        self._key = key
        self.raw: bytes = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id: str = _key_id(self.raw)

    @classmethod
    def from_raw(cls, raw: bytes) -> LedgerPublicKey:
        if len(raw) != _RAW_PUBLIC_LEN:
            raise LedgerError(f"a raw Ed25519 public key has {_RAW_PUBLIC_LEN} bytes, got {len(raw)}")
        return cls(ed25519.Ed25519PublicKey.from_public_bytes(raw))

    @classmethod
    def from_pem(cls, pem: bytes) -> LedgerPublicKey:
        """From a PEM public key (`BEGIN PUBLIC KEY`) or a PEM certificate whose key is Ed25519."""
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                key: object = x509.load_pem_x509_certificate(pem).public_key()
            else:
                key = serialization.load_pem_public_key(pem)
        except ValueError:
            raise LedgerError("not a PEM public key or certificate") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise LedgerError(f"the ledger key must be Ed25519, got {type(key).__name__}")
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> LedgerPublicKey:
        """From a file: PEM public key, PEM certificate, or 64 hex characters of the raw key."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger public key {path}: {exc.strerror}") from None
        text = data.strip()
        if len(text) == 2 * _RAW_PUBLIC_LEN:
            try:
                return cls.from_raw(bytes.fromhex(text.decode("ascii")))
            except (ValueError, UnicodeDecodeError):
                pass  # not hex: try PEM below
        return cls.from_pem(data)

    def to_pem(self) -> bytes:
        return self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Return if `signature` is this key's Ed25519 signature on `message`; else `SignatureError`."""
        if len(signature) != _SIGNATURE_LEN:
            raise SignatureError()
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            raise SignatureError() from None

    def __repr__(self) -> str:
        return f"LedgerPublicKey(key_id={self.key_id!r})"


class LedgerKey:
    """The private ledger key: signs chain heads."""

    __slots__ = ("_key", "key_id", "public_raw")

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self.public_raw: bytes = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id: str = _key_id(self.public_raw)

    @classmethod
    def generate(cls) -> LedgerKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_private_pem(cls, pem: bytes) -> LedgerKey:
        """From an unencrypted PEM private key (PKCS#8 or OpenSSL's), e.g. a node identity key."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            # TypeError: the key is encrypted; the ledger needs it unattended.
            raise LedgerError("not an unencrypted PEM private key") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise LedgerError(f"the ledger key must be Ed25519, got {type(key).__name__}")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> LedgerKey:
        """The key in `path`, or a new one written there (PEM, mode 0600) if there is none.

        Several processes may race to create it: the new key is written to a private
        temporary file and hard-linked into place, which fails if another process got
        there first; the loser then reads the winner's key, so all end up with one key.
        """
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        key = cls.generate()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(key.private_pem())
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)
            except FileExistsError:
                return cls._load(path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot write the ledger key {path}: {exc.strerror}") from None
        _log.info("created ledger key %s in %s", key.key_id, path)
        return key

    @classmethod
    def _load(cls, path: Path) -> LedgerKey:
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger key {path}: {exc.strerror}") from None
        if path.stat().st_mode & 0o077:
            # Not refused: mounted secrets (Kubernetes, Docker) are often 0644 inside a private volume.
            _log.warning("ledger key %s is readable by other users; chmod 600 it", path)
        return cls.from_private_pem(pem)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_key(self) -> LedgerPublicKey:
        return LedgerPublicKey(self._key.public_key())

    def sign(self, message: bytes) -> bytes:
        """This key's Ed25519 signature on `message` (64 bytes; deterministic, RFC 8032)."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"LedgerKey(key_id={self.key_id!r})"
