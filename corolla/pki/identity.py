"""A node's identity: its keys and certificates, and how peers check them.

Every node holds an Ed25519 identity key (its node id is the libp2p peer id of that
key; it signs DHT records) and a P-256 TLS key; the consortium CA certifies both, each
naming the node id and its role. Sites also hold an X25519 key-agreement key, certified
the same way, from which secure aggregation derives its pairwise secrets. `Verifier` is
what every node runs on what a peer shows it: chain to the CA, validity period,
revocation, node id, role.
"""

from __future__ import annotations

import datetime as dt
import hmac
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from libp2p.crypto.ed25519 import Ed25519PrivateKey as P2pPrivateKey
from libp2p.crypto.ed25519 import Ed25519PublicKey as P2pPublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from corolla.pki import _x509
from corolla.pki.errors import CertificateError, SignatureError, WorkspaceError


class Role(StrEnum):
    SERVER = "server"  # serves blocks
    SITE = "site"  # a member that trains and generates (a client of the swarm)
    VERIFIER = "verifier"  # re-runs spot checks
    COORDINATOR = "coordinator"  # runs the federation (SuperLink, ServerApp, ledger)


def node_id_from_public(raw: bytes) -> str:
    """The libp2p peer id (base58) of a raw 32-byte Ed25519 public key."""
    return str(ID.from_pubkey(P2pPublicKey.from_bytes(raw)).to_base58())


def tls_server_name(node_id: str) -> str:
    """The DNS name a node's TLS certificate carries; clients verify it (gRPC target name)."""
    return node_id.lower() + _x509.DNS_SUFFIX


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What a verified certificate says about its holder."""

    node_id: str
    role: Role
    name: str
    serial: int
    fingerprint: str


class Verifier:
    """Checks certificates against the consortium CA and its revocation list.

    The CRL is re-read from its file when the file changes, so `platform keys revoke`
    (or a copied CRL) takes effect on running nodes without a restart.
    """

    def __init__(self, ca_pem: bytes, crl_path: Path | None = None, *, clock: type[dt.datetime] = dt.datetime):
        self.ca_pem = ca_pem
        self._ca = _x509.cert_from_pem(ca_pem)
        self._crl_path = crl_path
        self._crl_mtime: float | None = None
        self._revoked: frozenset[int] = frozenset()
        self._crl_number = -1
        self._clock = clock
        self._lock = threading.Lock()
        self.reload_crl()

    @property
    def crl_number(self) -> int:
        return self._crl_number

    def reload_crl(self) -> None:
        if self._crl_path is None or not self._crl_path.is_file():
            return
        mtime = self._crl_path.stat().st_mtime
        with self._lock:
            if mtime == self._crl_mtime:
                return
            revoked, number = _x509.crl_from_pem(self._crl_path.read_bytes(), self._ca)
            if number >= self._crl_number:  # never roll back to an older list
                self._revoked, self._crl_number = revoked, number
            self._crl_mtime = mtime

    def is_revoked(self, serial: int) -> bool:
        self.reload_crl()
        return serial in self._revoked

    def check_pem(self, pem: bytes, *, roles: frozenset[Role] | None = None, validity: bool = True) -> PeerCertificate:
        return self.check(_x509.cert_from_pem(pem), roles=roles, validity=validity)

    def check_der(self, der: bytes, *, roles: frozenset[Role] | None = None) -> PeerCertificate:
        return self.check(_x509.cert_from_der(der), roles=roles)

    def check(
        self, cert: x509.Certificate, *, roles: frozenset[Role] | None = None, validity: bool = True
    ) -> PeerCertificate:
        """The holder of `cert`, or `CertificateError` naming the check that failed
        (`validity=False` skips the validity period: reading one's own files)."""
        try:
            _x509.verify_certificate(self._ca, cert)
        except SignatureError:
            raise CertificateError("certificate is not issued by the consortium CA") from None
        now = self._clock.now(dt.UTC)
        if validity and not _x509.not_valid_before(cert) <= now <= _x509.not_valid_after(cert):
            raise CertificateError(f"certificate of {_x509.common_name(cert)!r} is expired or not yet valid")
        serial = _x509.serial(cert)
        if self.is_revoked(serial):
            raise CertificateError(f"certificate of {_x509.common_name(cert)!r} is revoked")
        node_id = role = None
        for uri in _x509.san_uris(cert):
            if uri.startswith(_x509.URI_NODE):
                node_id = uri[len(_x509.URI_NODE) :]
            elif uri.startswith(_x509.URI_ROLE):
                role = uri[len(_x509.URI_ROLE) :]
        if node_id is None or role is None or role not in {r.value for r in Role}:
            raise CertificateError("certificate names no node id or no known role")
        holder = PeerCertificate(
            node_id=node_id,
            role=Role(role),
            name=_x509.common_name(cert),
            serial=serial,
            fingerprint=_x509.fingerprint(cert),
        )
        if roles is not None and holder.role not in roles:
            allowed = ", ".join(sorted(roles))
            raise CertificateError(f"{holder.name!r} has role {holder.role!s}; allowed here: {allowed}")
        return holder

    def check_flower_key(self, identity_pem: bytes, public_line: bytes) -> PeerCertificate:
        """A site whose identity certificate certifies this Flower node-auth public key:
        what the coordinator checks before enrolling a SuperNode."""
        cert = _x509.cert_from_pem(identity_pem)
        holder = self.check(cert, roles=frozenset({Role.SITE}))
        wanted = (_x509.URI_FLOWER_KEY + _x509.public_line_digest(public_line)).encode()
        named = [uri.encode() for uri in _x509.san_uris(cert)]
        if not any(hmac.compare_digest(wanted, uri) for uri in named):  # a digest: compared in constant time
            raise CertificateError(f"the Flower key offered for {holder.name!r} is not the one its certificate names")
        return holder

    def check_identity_der(self, der: bytes, *, node_id: str, roles: frozenset[Role]) -> PeerCertificate:
        """An identity certificate whose Ed25519 key is the key of `node_id`."""
        return self._identity(der, node_id=node_id, roles=roles)[0]

    def check_signing_key_der(self, der: bytes, *, node_id: str, role: Role | str) -> bytes:
        """The raw 32-byte Ed25519 public key of `node_id`, from its identity certificate
        (DER), after every check of `check_identity_der` with `role` as the only role allowed."""
        return self._identity(der, node_id=node_id, roles=frozenset({Role(role)}))[1]

    def check_agreement_der(self, der: bytes, *, node_id: str) -> bytes:
        """The raw 32-byte X25519 public key of site `node_id`, from its key-agreement
        certificate (DER): issued by the CA, valid now, not revoked, role site, the
        node id named, KeyUsage keyAgreement and an X25519 key."""
        cert = _x509.cert_from_der(der)
        holder = self.check(cert, roles=frozenset({Role.SITE}))
        if holder.node_id != node_id:
            raise CertificateError("key-agreement certificate does not belong to the node it is presented for")
        raw = _x509.agreement_public_raw(cert)
        if raw is None:
            raise CertificateError(f"certificate of {holder.name!r} is not an X25519 key-agreement certificate")
        return raw

    def _identity(self, der: bytes, *, node_id: str, roles: frozenset[Role]) -> tuple[PeerCertificate, bytes]:
        cert = _x509.cert_from_der(der)
        holder = self.check(cert, roles=roles)
        raw = _x509.identity_public_raw(cert)
        if raw is None or node_id_from_public(raw) != node_id or holder.node_id != node_id:
            raise CertificateError("identity certificate does not belong to the node it is presented for")
        return holder, raw


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """The files of one node in a workspace (`<workspace>/nodes/<name>/`)."""

    directory: Path
    name: str
    role: Role
    node_id: str

    @classmethod
    def load(cls, directory: Path) -> NodeIdentity:
        missing = [f for f in _NODE_FILES if not (directory / f).is_file()]
        if missing:
            raise WorkspaceError(f"node directory {str(directory)!r} lacks {', '.join(missing)}")
        # A garbage key is named now, not a traceback at its first use.
        for name, parse in (("node.key", _x509.identity_key_from_pem), ("tls.key", _x509.key_from_pem)):
            try:
                parse((directory / name).read_bytes())
            except (ValueError, TypeError, UnsupportedAlgorithm, CertificateError) as exc:
                reason = exc if isinstance(exc, CertificateError) else "not a PEM private key"
                raise WorkspaceError(f"{str(directory / name)!r}: {reason}; reissue the node") from None
        try:
            verifier = Verifier((directory / "ca.pem").read_bytes())
        except (ValueError, TypeError) as exc:
            raise WorkspaceError(f"{str(directory / 'ca.pem')!r} is not a PEM certificate: {exc}") from None
        # an expired certificate still loads: peers refuse it, and `check_own_certificate` says why
        try:
            holder = verifier.check_pem((directory / "node.pem").read_bytes(), validity=False)
        except (ValueError, TypeError) as exc:
            raise WorkspaceError(f"{str(directory / 'node.pem')!r} is not a PEM certificate: {exc}") from None
        return cls(directory=directory, name=holder.name, role=holder.role, node_id=holder.node_id)

    def check_own_certificate(self) -> None:
        """`CertificateError` naming the file when this node's own certificate is expired, not
        yet valid or revoked by its CA's list (`crl.pem`): every peer would refuse it."""
        path = self.directory / "node.pem"
        try:
            verifier = self.verifier()
        except (ValueError, TypeError, CertificateError) as exc:
            raise WorkspaceError(f"{str(self.directory / 'crl.pem')!r} cannot be read: {exc}") from None
        try:
            verifier.check_pem(path.read_bytes())
        except CertificateError as exc:
            raise CertificateError(
                f"this node's own certificate {str(path)!r} is refused: {exc}; the CA can issue a new one "
                "(`platform keys issue` under a new name)"
            ) from None

    def verifier(self) -> Verifier:
        return Verifier(self.ca_pem, self.directory / "crl.pem")

    @property
    def ca_pem(self) -> bytes:
        return (self.directory / "ca.pem").read_bytes()

    @property
    def tls_key_pem(self) -> bytes:
        return (self.directory / "tls.key").read_bytes()

    @property
    def tls_cert_pem(self) -> bytes:
        return (self.directory / "tls.pem").read_bytes()

    @property
    def tls_fingerprint(self) -> str:
        return _x509.fingerprint(_x509.cert_from_pem(self.tls_cert_pem))

    @property
    def identity_cert_der(self) -> bytes:
        return _x509.cert_to_der(_x509.cert_from_pem((self.directory / "node.pem").read_bytes()))

    def identity_key_raw(self) -> bytes:
        """The 32-byte seed of the node's Ed25519 identity key (it signs secure-aggregation
        messages as it signs DHT records). Secret: never log or send it."""
        seed = _x509.ed25519_seed((self.directory / "node.key").read_bytes())
        if seed is None:
            raise WorkspaceError(f"{str(self.directory / 'node.key')!r} is not an Ed25519 key")
        return seed

    @property
    def has_agreement_key(self) -> bool:
        return all((self.directory / f).is_file() for f in _AGREEMENT_FILES)

    def agreement_key_raw(self) -> bytes:
        """The 32-byte X25519 private key of a site (secure aggregation's pairwise secrets).
        Secret: never log or send it."""
        self._require_agreement()
        return _x509.agreement_key_raw((self.directory / "agreement.key").read_bytes())

    @property
    def agreement_cert_der(self) -> bytes:
        """The site's key-agreement certificate (DER), as peers are shown it."""
        self._require_agreement()
        return _x509.cert_to_der(_x509.cert_from_pem((self.directory / "agreement.pem").read_bytes()))

    def _require_agreement(self) -> None:
        if self.role is not Role.SITE:
            raise WorkspaceError(
                f"{self.name!r} has role {self.role}; only sites hold a key-agreement key (secure aggregation)"
            )
        missing = [f for f in _AGREEMENT_FILES if not (self.directory / f).is_file()]
        if missing:
            raise WorkspaceError(
                f"node directory {str(self.directory)!r} lacks {', '.join(missing)}: the site was issued before "
                f"secure aggregation needed a key-agreement key. On the CA's workspace run "
                f"`platform keys issue-agreement --name {self.name}` and copy agreement.key and agreement.pem "
                f"from nodes/{self.name}/ into this directory"
            )

    @property
    def swarm_key(self) -> bytes:
        """The consortium's 32-byte secret for the private DHT (pre-shared key)."""
        return bytes.fromhex((self.directory / "swarm.key").read_text().strip())

    @property
    def swarm_epoch(self) -> int:
        """The epoch of `swarm_key` (rotated on every revocation); 0 if the file predates it."""
        path = self.directory / "swarm.epoch"
        text = path.read_text().strip() if path.is_file() else "0"
        if not text.isdigit():
            raise WorkspaceError(f"{str(path)!r} must hold a swarm key epoch (an integer >= 0), got {text[:20]!r}")
        return int(text)

    def libp2p_key_pair(self) -> KeyPair:
        seed = _x509.ed25519_seed((self.directory / "node.key").read_bytes())
        if seed is None:
            raise WorkspaceError(f"{str(self.directory / 'node.key')!r} is not an Ed25519 key")
        private = P2pPrivateKey.from_bytes(seed)
        return KeyPair(private, private.get_public_key())


_NODE_FILES = ("node.key", "node.pem", "tls.key", "tls.pem", "ca.pem", "crl.pem", "swarm.key")
_AGREEMENT_FILES = ("agreement.key", "agreement.pem")  # sites only; not required to load (older workspaces)
